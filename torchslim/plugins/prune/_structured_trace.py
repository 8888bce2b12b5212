"""Building Torch-Pruning's dependency graph, with its concatenation sizes repaired and its failures explained.

Torch-Pruning maps channel indices through each ``torch.cat`` by the sizes of its inputs, which it infers
from the layers around. Where an input is a slice of another tensor (a dual-path network concatenates
channel slices), it cannot infer them: the graph builder then crashes (``unsupported operand type(s) for +:
'int' and 'NoneType'``), or, where it does not, maps no index through that concatenation and the groups
across it cannot be scored. Autograd recorded the real sizes during the trace (each input's shape, in the
concatenation's backward node): :func:`repair_concats` gives them to Torch-Pruning where it found none, and
the index mapping is run again. A concatenation (or reshape) the mapping still fails at is made to map nothing, and the
groups whose channels reach it are left whole, named with the reason, while the rest of the model is pruned. Any other
failure becomes :class:`TraceFailure`, naming the library, the phase, and the operation or layer it failed
at (from the failing frames of the traceback), and what to try.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from torch import nn

from ...engine.errors import first_line
from ._structured_expand import repair_expands


class TraceFailure(Exception):
    """Torch-Pruning could not build the model's dependency graph; the message says where and what to try."""


def build(
    model: nn.Module, example: Any, customized: dict[type, Any] | None, forward: Callable[[nn.Module, Any], Any] | None = None
) -> tuple[Any, dict[Any, str]]:
    """Torch-Pruning's dependency graph of ``model`` (traced on ``forward(model, example)``, or its forward on
    ``example``), concatenation sizes repaired where it could not infer them, and the concatenations it still
    could not map channel indices through, each with why (the groups across them must be left whole);
    :class:`TraceFailure` where no graph could be built."""
    import torch_pruning as tp

    graph = tp.DependencyGraph()
    try:
        graph.build_dependency(model, example_inputs=example, verbose=False, customized_pruners=customized, forward_fn=forward)
    except Exception as exc:
        # the index mapping is the builder's last step: the graph is complete but for it
        if "update_index_mapping" not in _functions(exc):
            raise TraceFailure(_message(exc, model)) from exc
    repair_concats(graph)
    unflatten_channel_last(graph)
    unmapped = _map_indices(graph, model)
    repair_expands(graph)  # an expand Torch-Pruning took for a grouped-query repeat (_structured_expand)
    return graph, unmapped


def _map_indices(graph: Any, model: nn.Module) -> dict[Any, str]:
    """Run Torch-Pruning's index mapping; a concatenation it fails at is given sizes that make it skip that
    one (no index is mapped through it), and named with the failure. Any other failure: :class:`TraceFailure`."""
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping

    unmapped: dict[Any, str] = {}
    while True:
        try:
            index_mapping.update_index_mapping(graph)
            return unmapped
        except Exception as exc:
            node = _failing_node(exc)
            if node is None or node.type not in (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.RESHAPE) or node in unmapped:
                raise TraceFailure(_message(exc, model)) from exc
            if node.type == tp.ops.OPTYPE.CONCAT:
                # sizes summing to 0 never match the concatenation's output: Torch-Pruning maps nothing through it
                node.module.concat_sizes = [0] * len(node.inputs)
            else:  # a reshape whose channel counts it could not infer: no mapping is tried through it
                node.type = tp.ops.OPTYPE.ELEMENTWISE
            unmapped[node] = (
                f"its channels reach {_describe(node, model)}, whose channel indices Torch-Pruning "
                f"could not map ({first_line(exc, typed=True, limit=120)})"
            )


def unflatten_channel_last(graph: Any) -> int:
    """Keep Torch-Pruning from mapping channel indices through reshapes that keep the last dimension of a tensor
    that is not 4-D (``(n*h, w, c)`` to ``(n, h, w, c)``: the rows of a sequence regrouped, channels untouched);
    returns how many reshapes it had mapped.

    Torch-Pruning means to map channels only through reshapes of 1-D and 4-D tensors, but reads the input shape
    from an attribute autograd no longer has (``_saved_self_sizes``, now ``_saved_self_sym_sizes``), and then maps
    such a reshape by channel counts it infers from the layers around: through a concatenation it inferred twice
    the channels, and each index of the LSTM before it became two (``index 384 is out of bounds``). Such a
    reshape's node is given the attribute it reads (so that its own check skips it: it maps again at every
    group it lists), and the mappings it already made are removed."""
    import torch_pruning as tp
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    undone = 0
    for node in graph.module2node.values():
        before = _kept_last_dimension(node.grad_fn) if node.type == tp.ops.OPTYPE.RESHAPE else None
        if before is None:
            continue
        node.grad_fn = _SizedReshape(node.grad_fn, before)
        neighbours = [*node.inputs, *node.outputs]
        deps = [d for d in node.dependencies if d.target in neighbours]
        deps += [d for n in neighbours for d in n.dependencies if d.target is node]
        for dep in deps:
            if isinstance(dep.index_mapping[0], _FlattenIndexMapping):
                dep.index_mapping[0] = None
                undone += 1
    return undone


def _kept_last_dimension(grad_fn: Any) -> tuple[int, ...] | None:
    """The input shape of a reshape that keeps the last dimension of a tensor that is not 1-D or 4-D (the kind
    Torch-Pruning's check means to skip), or None."""
    before = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if before is None or hasattr(grad_fn, "_saved_self_sizes") or len(before) in (1, 4):
        return None
    try:
        after = grad_fn._input_metadata[0].shape
    except (AttributeError, IndexError):
        return None
    return tuple(int(s) for s in before) if len(after) and after[-1] == before[-1] else None


class _SizedReshape:
    """A reshape's autograd node that also answers ``_saved_self_sizes`` (what Torch-Pruning reads)."""

    def __init__(self, grad_fn: Any, sizes: tuple[int, ...]) -> None:
        self._grad_fn, self._saved_self_sizes = grad_fn, sizes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grad_fn, name)


def repair_concats(graph: Any) -> int:
    """Give every concatenation whose input sizes Torch-Pruning could not infer the sizes autograd recorded
    (along the channel axis only, the one Torch-Pruning maps); returns how many were repaired.

    Only the sizes it could not infer: replacing those it inferred, even where a slice is counted as the
    whole tensor it slices, left 88 of res2net50_14w_8s's groups unscorable instead of 16."""
    import torch_pruning as tp

    repaired = 0
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.CONCAT:
            continue
        known = node.module.concat_sizes
        if known is not None and None not in known:
            continue  # where Torch-Pruning's own sizes are given, its slice and split mappings agree with them
        sizes = _recorded_sizes(node)
        if sizes is not None:
            node.module.concat_sizes = sizes
            repaired += 1
    return repaired


def _recorded_sizes(node: Any) -> list[int] | None:
    """The channel sizes of a concatenation's inputs as autograd recorded them, in Torch-Pruning's input order."""
    grad_fn = node.grad_fn
    producers = getattr(grad_fn, "next_functions", ())
    if not producers or any(f is None for f, _ in producers) or len(producers) != len(node.inputs):
        return None  # an input that needs no gradient, or one tensor concatenated twice: order unknown
    try:
        shapes = [list(f._input_metadata[i].shape) for f, i in producers]
    except (AttributeError, IndexError):
        return None
    dim = getattr(grad_fn, "_saved_dim", 1)
    dim = dim + len(shapes[0]) if dim < 0 else dim
    if dim != 1 or any(len(s) < 2 for s in shapes):
        return None
    return [int(s[1]) for s in shapes]


def _functions(exc: BaseException) -> set[str]:
    return {frame.name for frame in traceback.extract_tb(exc.__traceback__)}


def _message(exc: BaseException, model: nn.Module) -> str:
    node = _failing_node(exc)
    place = f" at {_describe(node, model)}" if node is not None else ""
    return (
        f"Torch-Pruning could not build the model's dependency graph{place} "
        f"({_phase(exc)}: {first_line(exc, typed=True, limit=200)}). Structured pruning needs that graph of "
        "the whole model; exclude does not take a layer out of it. Try the unstructured methods (magnitude, "
        "wanda, nm), or prune the sub-network that traces (a model of its own)"
    )


_PHASES = {
    "_trace": "tracing the forward",
    "_build_dependency": "coupling the layers' channels",
    "init_shape_information": "inferring channel counts",
    "update_index_mapping": "mapping channel indices through concatenations, splits and reshapes",
}


def _phase(exc: BaseException) -> str:
    seen = _functions(exc)
    return next((phase for function, phase in _PHASES.items() if function in seen), "in its graph builder")


def _failing_node(exc: BaseException) -> Any:
    """The Torch-Pruning graph node held by the innermost failing frame that holds one, or None."""
    from torch_pruning.dependency.node import Node

    tb, found = exc.__traceback__, None
    while tb is not None:
        nodes = [v for v in list(tb.tb_frame.f_locals.values()) if isinstance(v, Node)]
        found = nodes[0] if nodes else found
        tb = tb.tb_next
    return found


def _describe(node: Any, model: nn.Module) -> str:
    """A graph node in the model's words: the layer's name, or the operation and the layers feeding it."""
    names = {module: name for name, module in model.named_modules()}
    if node.module in names:
        return f"layer {names[node.module]}"
    operation = type(node.module).__name__.strip("_").removesuffix("Op").lower() or "an"
    feeding = _named_inputs(node, names)
    return f"the {operation} operation fed by {', '.join(feeding)}" if feeding else f"the {operation} operation {node.name}"


def _named_inputs(node: Any, names: dict[nn.Module, str], limit: int = 3) -> list[str]:
    """The nearest named layers upstream of ``node`` (through unnamed operations), at most ``limit``."""
    found: list[str] = []
    stack, seen = list(node.inputs), set()
    while stack and len(found) < limit:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.module in names:
            found.append(names[current.module])
        else:
            stack.extend(current.inputs)
    return found
