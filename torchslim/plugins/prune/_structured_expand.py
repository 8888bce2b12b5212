"""Torch-Pruning's index mapping through a five-dimensional ``expand``, repaired where it is no repeat of heads.

Torch-Pruning reads every expand of a five-dimensional tensor as Hugging Face's grouped-query repeat of key
and value heads, ``(batch, kv_heads, 1, tokens, head_dim) -> (batch, kv_heads, repeat, tokens, head_dim)``,
and maps channel indices through it with ``repeat`` = the channels after it // those before. A matrix product
of five-dimensional tensors (windowed or grouped attention: ``(batch, windows, heads, tokens, d)``) broadcasts
its batch axes by such an expand too; there ``repeat`` comes out 0 and listing any group through it divides
by zero. An expand whose third axis was not 1, or whose ``repeat`` is below 1, repeats no head: its indices
pass unchanged. (Torch-Pruning maps indices again before every group it lists, so the expand's node is told
to map none, not only its mappings removed.)
"""

from __future__ import annotations

from typing import Any


def repair_expands(graph: Any) -> int:
    """Make every expand of ``graph`` that repeats no head pass channel indices unchanged; returns how many."""
    import torch_pruning as tp
    from torch_pruning.dependency.index_mapping import _GQAIndexMapping

    repaired = 0
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.EXPAND:
            continue
        deps = [*node.dependencies, *(d for n in node.inputs for d in n.dependencies if d.target is node)]
        mappings = [d for d in deps if isinstance(d.index_mapping[0], _GQAIndexMapping)]
        if mappings and not _repeats_heads(node, mappings[0].index_mapping[0].repeat):
            node.enable_index_mapping = False
            for dep in mappings:
                dep.index_mapping[0] = None  # Torch-Pruning's "no mapping": the indices pass as they are
            repaired += 1
    return repaired


def _repeats_heads(expand: Any, repeat: int) -> bool:
    """Whether ``expand`` is a grouped-query repeat: its input's third axis is 1 and grows ``repeat`` >= 1 times."""
    sizes = getattr(expand.grad_fn, "_saved_self_sym_sizes", None)
    return repeat >= 1 and sizes is not None and len(sizes) == 5 and int(sizes[2]) == 1
