"""PyTorch's own ``nn.MultiheadAttention`` pruned by whole heads and along its embedding width.

``nn.MultiheadAttention``'s forward (``F.multi_head_attention_forward``, and the fused kernels of it and of
``nn.TransformerEncoderLayer``) assumes that the query, key and value projections are ``embed_dim`` wide,
``num_heads`` heads of ``embed_dim // num_heads``. A layer with fewer heads of the same width, or whose
embedding width (the residual stream it reads and writes) was pruned without touching its heads, breaks that.
Such a layer becomes a :class:`PrunedMultiheadAttention`: the same module, parameters and state-dict keys,
still an ``nn.MultiheadAttention``, with a forward that reads its widths from its weights.

Heads are not seen by Torch-Pruning's graph (the projections are parameters of the layer, not Linear
modules); they are cut here (:func:`cut_heads`). The embedding width is Torch-Pruning's to cut, through
:func:`residual_pruner`, which removes the projections' input columns and the output projection's rows and
leaves the heads whole (Torch-Pruning's own pruner shrinks the heads along with ``embed_dim``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose heads' total width may differ from ``embed_dim``.

    ``num_heads`` heads of ``head_dim`` (the rows of each of q, k and v in ``in_proj_weight``), read from
    ``embed_dim`` wide queries (``kdim``/``vdim`` wide keys and values) and projected back to
    ``out_proj.out_features``. Not built directly: :func:`settle` turns a pruned layer into one in place. A
    per-head 3-D ``attn_mask`` must have ``batch * num_heads`` (the heads left) entries.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; the attention runs in ``F.scaled_dot_product_attention``
        unless ``need_weights`` asks for the weights (then averaged over heads unless ``average_attn_weights``)."""
        batched, same = query.dim() == 3, query is key and key is value
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if is_causal and attn_mask is None:
            raise RuntimeError("need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        q, k, v = self._projected(query, key, value, same)
        mask = self._mask(attn_mask, key_padding_mask, q)
        k, v = self._extended(k, v)
        batch, length = query.shape[:2]
        q, k, v = (t.view(batch, t.shape[1], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out, weights = self._attend(q, k, v, _padded_mask(mask, k.shape[2]), need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Heads' outputs (batch, heads, length, head_dim), and their weights where asked for (the fused
        kernel does not return them)."""
        dropout = self.dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        weights = F.dropout(torch.softmax(scores if mask is None else scores + mask, dim=-1), dropout, self.training)
        return weights @ v, weights  # the weights returned after dropout, as torch's

    def _projected(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v; one matrix product where they are projections of the ``same`` tensor (self-attention)."""
        inner = self.num_heads * self.head_dim
        if self.in_proj_weight is not None and same:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).split(inner, dim=-1)
            return q, k, v
        bias = [None] * 3 if self.in_proj_bias is None else self.in_proj_bias.split(inner)
        if self.in_proj_weight is not None:
            weights: Sequence[torch.Tensor] = self.in_proj_weight.split(inner)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return (F.linear(query, weights[0], bias[0]), F.linear(key, weights[1], bias[1]), F.linear(value, weights[2], bias[2]))

    def _extended(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values with the learnt bias position and then the zero position appended, where the layer has them."""
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(k.shape[0], 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(v.shape[0], 1, -1)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[0], 1, k.shape[2])], dim=1)
            v = torch.cat([v, v.new_zeros(v.shape[0], 1, v.shape[2])], dim=1)
        return k, v

    def _mask(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q: torch.Tensor
    ) -> torch.Tensor | None:
        """One additive float mask broadcastable to (batch, heads, length, source length), or None."""
        padding = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=q.dtype,
        )
        attn = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype, check_other=False
        )
        mask = None
        if attn is not None:
            mask = attn.view(q.shape[0], self.num_heads, *attn.shape[-2:]) if attn.dim() == 3 else attn
        if padding is not None:
            padding = padding.view(q.shape[0], 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return mask


def _padded_mask(mask: torch.Tensor | None, source: int) -> torch.Tensor | None:
    """The mask widened with unmasked source positions up to ``source`` (the appended bias and zero positions)."""
    if mask is None or mask.shape[-1] == source:
        return mask
    return F.pad(mask, (0, source - mask.shape[-1]))


def _own_forward(module: nn.Module, args: Any) -> None:
    """A pre-hook that does nothing: its presence keeps ``nn.TransformerEncoderLayer`` off its fused kernel,
    which reads this layer's weights as ``embed_dim`` wide heads (the layer checks for hooks, and for
    nothing else this layer could honestly change)."""


def needs_own_forward(layer: nn.MultiheadAttention) -> bool:
    """Whether ``nn.MultiheadAttention``'s forward would misread the layer: its heads are not ``embed_dim`` wide."""
    weight = layer.in_proj_weight if layer.in_proj_weight is not None else layer.q_proj_weight
    inner = layer.num_heads * layer.head_dim
    return (
        inner != layer.embed_dim
        or weight is None
        or weight.shape[0] not in (inner, 3 * inner)
        or layer.out_proj.in_features != inner
    )


def prunable(module: nn.Module) -> bool:
    """An attention layer this module prunes: torch's own class (a user's subclass keeps its own forward)."""
    return type(module) in (nn.MultiheadAttention, PrunedMultiheadAttention)


def settle(model: nn.Module) -> None:
    """Give every pruned ``nn.MultiheadAttention`` of ``model`` the forward that reads its widths, in place
    (same object, parameters and keys), and keep torch's fused paths away from it: its own pre-hook, and
    ``use_nested_tensor`` turned off on the encoders holding it (their padded batches would reach it nested).
    A layer that no longer needs it (a cut undone) loses the hook."""
    pruned = []
    for module in model.modules():
        if not prunable(module):
            continue
        hooked = [key for key, hook in module._forward_pre_hooks.items() if hook is _own_forward]
        if needs_own_forward(module):  # type: ignore[arg-type]
            module.__class__ = PrunedMultiheadAttention
            if not hooked:
                module.register_forward_pre_hook(_own_forward)
            pruned.append(module)
        else:
            for key in hooked:
                del module._forward_pre_hooks[key]
    for owner in model.modules():
        if getattr(owner, "use_nested_tensor", None) is True and any(m in pruned for m in owner.modules()):
            setattr(owner, "use_nested_tensor", False)  # noqa: B010 (an attribute of torch's encoder, not typed on Module)


def cut_heads(layer: nn.MultiheadAttention, kept: torch.Tensor) -> None:
    """Keep only heads ``kept`` (sorted indices): their rows of q, k and v and their columns of ``out_proj``."""
    inner, size = layer.num_heads * layer.head_dim, layer.head_dim
    rows = (kept.view(-1, 1) * size + torch.arange(size)).flatten()
    if layer.in_proj_weight is not None:
        _slice(layer, "in_proj_weight", torch.cat([rows + block * inner for block in range(3)]), 0)
    else:
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            _slice(layer, name, rows, 0)
    if layer.in_proj_bias is not None:
        _slice(layer, "in_proj_bias", torch.cat([rows + block * inner for block in range(3)]), 0)
    for name in ("bias_k", "bias_v"):
        if getattr(layer, name) is not None:
            _slice(layer, name, rows, 2)
    _slice(layer.out_proj, "weight", rows, 1)
    layer.out_proj.in_features = int(rows.numel())
    layer.num_heads = int(kept.numel())


def _slice(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    old = getattr(module, name)
    fresh = nn.Parameter(torch.index_select(old.data, dim, index.to(old.device)), requires_grad=old.requires_grad)
    setattr(module, name, fresh)


def row_importance(layer: nn.MultiheadAttention, norm: int) -> torch.Tensor:
    """One score per row of q, k and v (``3 * num_heads * head_dim``): the row's weight norm over its block's
    mean, plus, for v, the output projection's matching column likewise (a head is scored by its mean)."""
    inner = layer.num_heads * layer.head_dim
    if layer.in_proj_weight is not None:
        blocks = list(layer.in_proj_weight.detach().split(inner))
    else:
        blocks = [layer.q_proj_weight.detach(), layer.k_proj_weight.detach(), layer.v_proj_weight.detach()]
    scores = [_relative(block.norm(p=norm, dim=1)) for block in blocks]
    scores[2] = scores[2] + _relative(layer.out_proj.weight.detach().norm(p=norm, dim=0))
    return torch.cat(scores).float().cpu()


def _relative(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def residual_pruners(model: nn.Module) -> dict[type, Any]:
    """Torch-Pruning pruners for the attention layers of ``model``, by class: their embedding width is cut
    as the residual stream's channels (input columns of q, k and v, rows of ``out_proj``), heads left whole."""
    types = {type(m) for m in model.modules() if prunable(m)}
    if not types:
        return {}
    pruner = _residual_pruner()
    return {t: pruner for t in types | {PrunedMultiheadAttention}}


def _residual_pruner() -> Any:
    import torch_pruning as tp

    class ResidualPruner(tp.pruner.function.BasePruningFunc):  # type: ignore[misc]
        TARGET_MODULES = nn.MultiheadAttention

        def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
            if layer.kdim != layer.embed_dim or layer.vdim != layer.embed_dim:
                raise ValueError(
                    f"key and value widths ({layer.kdim}, {layer.vdim}) differ from the query's "
                    f"({layer.embed_dim}): they are other streams, not cut with it"
                )
            gone = {int(i) for i in idxs}
            keep = [i for i in range(layer.embed_dim) if i not in gone]
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(layer, name) is not None:
                    setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
            out = layer.out_proj
            out.weight = self._prune_parameter_and_grad(out.weight, keep, 0)
            if out.bias is not None:
                out.bias = self._prune_parameter_and_grad(out.bias, keep, 0)
            out.out_features = layer.embed_dim = layer.kdim = layer.vdim = len(keep)
            return layer

        # Input and output are one width, as in Torch-Pruning's own pruner: the residual stream's.
        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: Any) -> int:
            return int(layer.embed_dim)

        get_in_channels = get_out_channels

    return ResidualPruner()
