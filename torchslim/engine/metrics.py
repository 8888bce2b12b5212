"""What is measured after every stage: size, sparsity, MACs, latency, the task metric."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import names
from .hooks import CountsWeights, Deployed, PackedRecurrent, PackedWeight
from .macs import count_macs
from .packed import packed_size_bytes, saved_bytes
from .stage import Batch, Context
from .timing import Timing, time_forward, torch_threads

__all__ = [
    "Measurement",
    "accuracy",
    "count_macs",
    "count_nonzero",
    "count_params",
    "fingerprint",
    "latency_batch",
    "latency_ms",
    "measure",
    "model_device",
    "size_bytes",
    "torch_threads",
    "weight_tensors",
]

if TYPE_CHECKING:
    from .recipe import MetricsOptions


def weight_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every weight and bias of the model (detached), including those packed inside quantized modules.

    A module whose weights are neither parameters nor packed (an exported graph holds its int8
    weights as plain constants) lists them itself with a ``counted_weights()`` method; its
    submodules are then not searched again.
    """
    with torch.no_grad():
        yield from _weights(model)


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    inside = {id(sub) for m in model.modules() if isinstance(m, CountsWeights) for sub in m.modules() if sub is not m}
    for module in model.modules():
        if id(module) in inside:
            continue
        own = list(module.parameters(recurse=False))
        if isinstance(module, CountsWeights):
            yield from (t.detach() for t in module.counted_weights())
        elif own:
            yield from (p.detach() for p in own)
        elif _is_packed(module):
            yield from _packed_tensors(module)
        elif _is_packed_recurrent(module):
            yield from _packed_recurrent_tensors(module)


def _is_packed(module: nn.Module) -> bool:
    # Quantized modules keep weights in packed C++ objects and expose them as methods. The protocol check
    # sees an attribute only: a weight held as a tensor (a buffer) is not this hook.
    return isinstance(module, PackedWeight) and callable(module.weight)


def _is_packed_recurrent(module: nn.Module) -> bool:
    # torch.ao's dynamic LSTM/GRU and cells list their packed weights and biases by name instead.
    return isinstance(module, PackedRecurrent)


def _packed_recurrent_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    for name in ("get_weight", "get_bias"):
        values: Any = getattr(module, name)()
        for value in values.values() if isinstance(values, dict) else ():
            if isinstance(value, torch.Tensor):
                yield value.dequantize() if value.is_quantized else value.detach()


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
    """Bytes of ``torch.save(model.state_dict())``: the dense file size on disk; for a model deployed to
    a runtime (a ``file_bytes()`` method), the bytes of the files the runtime loads."""
    if isinstance(model, Deployed):
        return int(model.file_bytes())
    return saved_bytes(model.state_dict())


def packed_file_bytes(model: nn.Module) -> int:
    """:func:`packed_size_bytes` of a torch model; for a model deployed to a runtime, the bytes of the files
    the runtime loads (its ``size``): they are what is saved, and torchslim's packing of a state dict does not
    apply to them (packing the wrapper's state would count the exported graph again)."""
    return size_bytes(model) if isinstance(model, Deployed) else packed_size_bytes(model)


def latency_ms(model: nn.Module, example: torch.Tensor, *, warmup: int, runs: int, threads: int | None) -> float:
    """Median wall time of one forward pass on ``example``, in milliseconds (:func:`time_forward` keeps the spread too)."""
    return time_forward(model, example, warmup=warmup, runs=runs, threads=threads).median


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without tensors)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class TargetMismatch(ValueError):
    """The eval data's targets do not fit the built-in accuracy (the fault is the data or the metric, not the model)."""


def accuracy(model: nn.Module, loader: Iterable[Batch]) -> float:
    """Percent of samples whose highest-scoring class is the label: a class index, or a one-hot or
    probability vector of the scores' shape (its highest entry is the class)."""
    correct = total = 0
    device = model_device(model)
    with torch.inference_mode():
        for inputs, targets in loader:
            scores = model(inputs.to(device))
            labels = class_labels(scores, targets.to(device))
            correct += int((scores.argmax(dim=1) == labels).sum())
            total += int(labels.numel())
    return 100.0 * correct / total if total else float("nan")


def class_labels(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class indices from ``targets``; TargetMismatch, in words, when they fit neither accepted form."""
    if targets.is_floating_point() and targets.shape == scores.shape:
        return targets.argmax(dim=1)
    if targets.shape == scores.shape[:1] + scores.shape[2:] and not targets.is_floating_point():
        return targets
    raise TargetMismatch(
        f"the built-in accuracy compares the highest of the model's scores (outputs of shape "
        f"{list(scores.shape)}) with class indices of shape {list(scores.shape[:1] + scores.shape[2:])} "
        f"or one-hot targets of the outputs' shape; the eval loader's targets are "
        f"{list(targets.shape)}, {targets.dtype}. Give targets of either form, or a metric "
        f"of your own (evaluate.metric: module:callable)"
    )


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
        (tuple(t.shape), str(t.dtype), float(t.float().sum()), float(t.float().abs().sum())) for t in weight_tensors(model)
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
    timing: Timing | None = None
    """The timed forward passes (None: latency not measured)."""

    @property
    def latency_ms(self) -> float | None:
        """Median forward time of one batch, in milliseconds."""
        return self.timing.median if self.timing else None

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
        counted = {
            names.PARAMS: self.params,
            names.NONZERO: self.nonzero,
            names.SPARSITY: self.sparsity,
            names.SIZE_BYTES: self.size_bytes,
            names.PACKED_BYTES: self.packed_bytes,
            names.MACS: self.macs,
            names.LATENCY_MS: self.latency_ms,
            **self._spread(),
        }
        return {**counted, self.metric_name: self.metric, names.SECONDS: self.seconds}

    def _spread(self) -> dict[str, Any]:
        if self.timing is None:
            return {}
        return {names.LATENCY_IQR_MS: self.timing.iqr, names.LATENCY_OTHERS: self.timing.others_running}


def measure(model: nn.Module, ctx: Context, options: MetricsOptions, seconds: float) -> Measurement:
    """Measure ``model`` for one summary row; ``seconds`` is the time the stage took."""
    model.eval()
    if not options.collect:
        return Measurement(ctx.metric_name, ctx.evaluate(model), seconds, collected=False)
    timing = None
    if options.latency:
        batch = latency_batch(ctx.example_inputs, options.batch_size)
        timing = time_forward(model, batch, warmup=options.warmup, runs=options.runs, threads=options.threads)
    return Measurement(
        ctx.metric_name,
        ctx.evaluate(model),
        seconds,
        params=count_params(model),
        nonzero=count_nonzero(model),
        size_bytes=size_bytes(model),
        packed_bytes=packed_file_bytes(model),
        macs=count_macs(model, ctx.example_inputs[:1]),
        timing=timing,
    )
