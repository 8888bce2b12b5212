"""``backend: torchao``: static int8 through torchao's PT2E flow, compiled by inductor with freezing.

``torch.export`` captures the model, torchao's ``X86InductorQuantizer`` annotates it,
``prepare_pt2e`` inserts observers, calibration runs, ``convert_pt2e`` leaves int8 weights and
quantize/dequantize pairs that ``torch.compile`` (with ``freezing``, without which there is no
speed-up) fuses into int8 kernels. torchao is optional: without it this backend says how to get it.

The activations' scales and zero points end up as constants in the graph, not in the state
dict, so they are recorded for :meth:`TorchaoBackend.restore`.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...engine.macs import count_macs
from ...engine.metrics import model_device
from ._backends import BackendError, Census, Quantized, StaticOptions, excluded_names, module_types

INSTALL = (
    "install it next to torch (torchao 0.18.0 matches torch 2.13): pip install --no-deps torchao==0.18.0; or use backend x86"
)
_ACTIVATION_OPS = ("quantize_per_tensor.default", "dequantize_per_tensor.default")
_WEIGHTED_OPS = {"conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d", "linear": "Linear"}


def _torchao() -> Any:
    try:
        return importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
    except ImportError as exc:
        raise BackendError(f"torchao is not installed ({exc}); {INSTALL}") from None


class TorchaoBackend:
    """Static int8 with torchao's PT2E quantizer for x86 and inductor."""

    def quantize(
        self, model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor], options: StaticOptions
    ) -> Quantized:
        """Export, annotate, calibrate, convert, then compile (the first call compiles, here)."""
        pt2e = _torchao()
        before = module_types(model)
        device = model_device(model)  # with device: cuda the loaders' batches are still on the CPU
        example = _two_rows(example).to(device)
        prepared = pt2e.prepare_pt2e(_export(copy.deepcopy(model), example), _quantizer(model, options))
        with torch.no_grad():
            for inputs in batches:
                prepared(inputs.to(device))
        converted = _drop_unused(pt2e.convert_pt2e(prepared))
        record = {
            "example_shape": list(example.shape),
            "example_dtype": str(example.dtype).removeprefix("torch."),
            "activation_qparams": [list(n.args[1:3]) for n in _activation_nodes(converted)],
        }
        census = _census(converted, before)
        compiled = _compile(converted)
        with torch.no_grad():
            compiled(example)  # compile now, while the stage is timed, not in the first measurement
        return Quantized(compiled, record, census)

    def restore(self, model: nn.Module, options: StaticOptions, record: Mapping[str, Any]) -> nn.Module:
        """Redo export, annotation and conversion, then put back the recorded activation scales."""
        pt2e = _torchao()
        example = torch.zeros(record["example_shape"], dtype=getattr(torch, record["example_dtype"]))
        prepared = pt2e.prepare_pt2e(_export(model, example), _quantizer(model, options))
        with torch.no_grad():
            prepared(example)  # gives the per-channel weight observers their shapes; values come from the state dict
        converted = _drop_unused(pt2e.convert_pt2e(prepared))
        nodes = _activation_nodes(converted)
        qparams = record["activation_qparams"]
        if len(nodes) != len(qparams):
            raise BackendError(f"the model's graph has {len(nodes)} activation quantizers, the record {len(qparams)}")
        for node, (scale, zero_point) in zip(nodes, qparams, strict=True):
            node.args = (node.args[0], scale, zero_point, *node.args[3:])
        converted.recompile()
        return _compile(converted)


def _two_rows(example: torch.Tensor) -> torch.Tensor:
    # export specializes a batch dimension of 1; two rows keep it symbolic.
    return example[:2] if len(example) >= 2 else torch.cat([example, example])


def _export(model: nn.Module, example: torch.Tensor) -> nn.Module:
    batch = torch.export.Dim("batch")
    try:
        exported = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # export raises many kinds of errors on untraceable code
        raise BackendError(f"torch.export could not capture the model ({type(exc).__name__}: {str(exc).strip()[:300]})") from exc
    return exported.module()


def _quantizer(model: nn.Module, options: StaticOptions) -> Any:
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    config = xiq.get_default_x86_inductor_quantization_config()
    for name in options.modules:
        quantizer.set_module_type_qconfig(getattr(nn, name), config)
    for name in excluded_names(model, options.exclude):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _activation_nodes(graph_module: nn.Module) -> list[Any]:
    graph: Any = graph_module.graph
    return [n for n in graph.nodes if n.op == "call_function" and str(n.target).endswith(_ACTIVATION_OPS)]


def _drop_unused(graph_module: Any) -> Any:
    """Delete the float weights convert_pt2e leaves behind next to their int8 copies (they would double the file)."""
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    names = [name for name, _ in graph_module.named_parameters()] + [name for name, _ in graph_module.named_buffers()]
    for name in names:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner), attr)
    graph_module.delete_all_unused_submodules()
    return graph_module


def _census(graph_module: Any, before: Mapping[str, str]) -> Census:
    census = Census()
    for node in graph_module.graph.nodes:
        op = str(node.target).removeprefix("aten.").split(".")[0]
        if node.op != "call_function" or op not in _WEIGHTED_OPS:
            continue
        stack = list(node.meta.get("nn_module_stack", {}).values())
        name = stack[-1][0] if stack else str(node.name)
        weight = node.args[1]
        dequantized = "dequantize" in str(getattr(weight, "target", ""))
        (census.quantized if dequantized else census.left_float)[name] = before.get(name, _WEIGHTED_OPS[op])
    return census


class FrozenCompiled(nn.Module):
    """The converted graph, compiled by inductor with freezing on whenever it (re)compiles.

    Freezing folds the int8 weights into constants so that inductor picks int8 kernels
    (without it there is no speed-up). ``torch.compile(options={"freezing": True})`` does not
    reach the constant folding in torch 2.13, so the config is patched around each call instead
    of being switched on for the whole process.
    """

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        # dynamic=False: one compilation per batch size. With symbolic batch sizes inductor's
        # int8 conv lowering in torch 2.13 mixes up channels-last strides and fails.
        self.compiled = torch.compile(graph_module, dynamic=False)

    def train(self, mode: bool = True) -> FrozenCompiled:
        """Only flag the mode: an exported graph refuses ``train()``/``eval()``, and an int8 graph has no training mode."""
        self.training = mode
        return self

    def forward(self, inputs: torch.Tensor) -> Any:
        """Run the compiled graph (compiling on the first call and on new input shapes)."""
        from torch._inductor import config

        with config.patch(freezing=True):
            return self.compiled(inputs)

    @property
    def graph_module(self) -> Any:
        """The converted graph before compilation (its int8 weights are constants, not parameters)."""
        compiled: Any = self.compiled
        return compiled._orig_mod

    def counted_weights(self) -> Iterator[torch.Tensor]:
        """The weights and biases of the graph's Linear and Conv ops, int8 weights dequantized: the
        engine's counters find only the float biases among the parameters (82 of 5,122 on the digits
        ResNet), so the graph lists them itself. BatchNorm is folded into the convs, as in backend x86."""
        for node in _weighted_nodes(self.graph_module):
            for arg in node.args[1:3]:
                value = _constant(self.graph_module, arg)
                if isinstance(value, torch.Tensor):
                    yield value

    def counted_macs(self, example: torch.Tensor) -> int | None:
        """MACs per sample, counted by torch's FLOP counter on the graph before compilation (inductor's
        kernels are invisible to it and to module hooks)."""
        return count_macs(self.graph_module, _two_rows(example))


def _compile(graph_module: nn.Module) -> nn.Module:
    return FrozenCompiled(graph_module)


def _weighted_nodes(graph_module: Any) -> Iterator[Any]:
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and str(node.target).removeprefix("aten.").split(".")[0] in _WEIGHTED_OPS:
            yield node


def _constant(graph_module: Any, arg: Any) -> Any:
    """The value of a graph argument computed from constants only (a weight, or its dequantization); None otherwise."""
    if not isinstance(arg, torch.fx.Node):
        return arg
    if arg.op == "get_attr":
        owner, _, name = str(arg.target).rpartition(".")
        return getattr(graph_module.get_submodule(owner), name)
    if arg.op != "call_function":
        return None  # an input of the graph: not a weight
    args = [_constant(graph_module, a) for a in arg.args]
    if any(value is None for value in args):
        return None
    target: Any = arg.target
    with torch.no_grad():
        return target(*args, **arg.kwargs)
