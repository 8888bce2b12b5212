"""What is measured after every stage: size, sparsity, MACs, latency, the task metric."""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import names
from .packed import packed_size_bytes
from .stage import Batch, Context

if TYPE_CHECKING:
    from .recipe import MetricsOptions

Evaluator = Callable[[nn.Module, Iterable[Batch]], float]


def weight_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every weight and bias of the model (detached), including those packed inside quantized modules."""
    with torch.no_grad():
        yield from _weights(model)


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            yield from (p.detach() for p in own)
        elif _is_packed(module):
            yield from _packed_tensors(module)


def _is_packed(module: nn.Module) -> bool:
    # Quantized modules keep weights in packed C++ objects and expose them as methods.
    return callable(getattr(module, "weight", None)) and not isinstance(module.weight, torch.Tensor)


def _packed_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    for name in ("weight", "bias"):
        getter = getattr(module, name, None)
        value = getter() if callable(getter) else getter
        if isinstance(value, torch.Tensor):
            yield value.dequantize() if value.is_quantized else value


def count_params(model: nn.Module) -> int:
    """Number of weight and bias values."""
    return sum(t.numel() for t in weight_tensors(model))


def count_nonzero(model: nn.Module) -> int:
    """Number of weight and bias values that are not exactly zero."""
    return sum(int(torch.count_nonzero(t)) for t in weight_tensors(model))


def size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the dense file size on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of Linear and Conv layers for one input sample (dense count)."""
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        total += _layer_macs(module, output)

    layers = [m for m in model.modules() if _is_layer(m)]
    # A quantized Linear wraps a packed-params child; count each layer once, at its outermost module.
    inner = {id(sub) for m in layers for sub in m.modules() if sub is not m}
    handles = [m.register_forward_hook(hook) for m in layers if id(m) not in inner]
    try:
        with torch.inference_mode():
            model(example.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return total // max(1, example.shape[0])


def _is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def _is_conv(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("in_channels", "groups", "kernel_size"))


def _is_layer(module: nn.Module) -> bool:
    return _is_linear(module) or _is_conv(module)


def _layer_macs(module: nn.Module, output: Any) -> int:
    if not isinstance(output, torch.Tensor):
        return 0
    if _is_linear(module):
        return output.numel() * _attr(module, "in_features")
    if _is_conv(module):
        size: Any = getattr(module, "kernel_size")  # noqa: B009 (typed as Any: nn.Module's getattr says Tensor)
        kernel = math.prod(size) if isinstance(size, tuple) else int(size)
        return output.numel() * (_attr(module, "in_channels") // _attr(module, "groups")) * kernel
    return 0


def _attr(module: nn.Module, name: str) -> int:
    value: Any = getattr(module, name)
    return int(value)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, restoring the previous setting after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def latency_ms(model: nn.Module, example: torch.Tensor, *, warmup: int, runs: int, threads: int | None) -> float:
    """Median wall time of one forward pass on ``example``, in milliseconds."""
    times = []
    example = example.to(model_device(model))
    # CUDA kernels run asynchronously: wait for them, or the clock measures only the launch.
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(example)
        for _ in range(runs):
            sync()
            start = time.perf_counter()
            model(example)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without tensors)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def accuracy(model: nn.Module, loader: Iterable[Batch]) -> float:
    """Percent of samples whose highest-scoring class is the label."""
    correct = total = 0
    device = model_device(model)
    with torch.inference_mode():
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            correct += int((model(inputs).argmax(dim=1) == targets).sum())
            total += int(targets.numel())
    return 100.0 * correct / total if total else float("nan")


def latency_batch(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``example`` repeated or cut along the batch dimension to ``batch_size`` samples."""
    repeats = -(-batch_size // example.shape[0])
    return example.repeat(repeats, *([1] * (example.dim() - 1)))[:batch_size].contiguous()


def fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """A cheap summary of a model's structure and values, to tell whether a stage changed anything.

    Sums rather than a copy of the weights: the check must not double the memory of a large model.
    """
    structure = tuple((name, type(m).__name__) for name, m in model.named_modules())
    values = tuple(
        (tuple(t.shape), str(t.dtype), float(t.float().sum()), float(t.float().abs().sum()))
        for t in weight_tensors(model)
    )
    return structure, values


@dataclass(frozen=True)
class Measurement:
    """The figures of one summary row: counted on the model, timed, and scored with the task metric.

    The count, size and time figures are None when the recipe turned their collection off
    (``metrics.collect: false``; ``metrics.latency: false`` for the latency alone): not measured
    is never shown as 0.
    """

    metric_name: str
    metric: float
    seconds: float
    collected: bool = True
    params: int | None = None
    nonzero: int | None = None
    size_bytes: int | None = None
    packed_bytes: int | None = None
    macs: int | None = None
    latency_ms: float | None = None

    @property
    def sparsity(self) -> float | None:
        """Fraction of weight and bias values that are exactly zero."""
        if self.params is None or self.nonzero is None:
            return None
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The row's metrics as saved in reports, keyed by the names in :mod:`torchslim.engine.names`."""
        if not self.collected:
            return {self.metric_name: self.metric, names.SECONDS: self.seconds}
        counted = {names.PARAMS: self.params, names.NONZERO: self.nonzero, names.SPARSITY: self.sparsity,
                   names.SIZE_BYTES: self.size_bytes, names.PACKED_BYTES: self.packed_bytes, names.MACS: self.macs,
                   names.LATENCY_MS: self.latency_ms}
        return {**counted, self.metric_name: self.metric, names.SECONDS: self.seconds}


def measure(model: nn.Module, ctx: Context, options: MetricsOptions, seconds: float) -> Measurement:
    """Measure ``model`` for one summary row; ``seconds`` is the time the stage took."""
    model.eval()
    if not options.collect:
        return Measurement(ctx.metric_name, ctx.evaluate(model), seconds, collected=False)
    latency = None
    if options.latency:
        batch = latency_batch(ctx.example_inputs, options.batch_size)
        latency = latency_ms(model, batch, warmup=options.warmup, runs=options.runs, threads=options.threads)
    return Measurement(
        ctx.metric_name, ctx.evaluate(model), seconds,
        params=count_params(model), nonzero=count_nonzero(model), size_bytes=size_bytes(model),
        packed_bytes=packed_size_bytes(model), macs=count_macs(model, ctx.example_inputs[:1]), latency_ms=latency,
    )
