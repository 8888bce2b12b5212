"""A packed encoding of sparse state dicts: the non-zero values plus a bitmask, loaded back bit for bit.

Zeros left by pruning do not shrink a dense file, and ``torch.save`` of COO/CSR sparse tensors is
larger than dense (FIELD.md). Here a tensor is stored as its non-zero values (original dtype) and
one bit per element saying where they go: at 50% sparsity a float32 tensor takes about
0.5 + 1/32 = 0.53 of its dense size. Zeros with a sign (-0.0, which masking a negative weight
gives) add one bit per zero, so loading gives back the same bits. Everything in the result is plain tensors, strings, ints and
lists, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import IO, Any, cast

import torch
from torch import nn

PACKED_FORMAT = "torchslim.packed/1"

#: Bytes a packed tensor costs beyond its values and bits in a ``torch.save`` file: one more
#: tensor record (about 250 bytes: zip headers, 64-byte alignment) plus its shape. Tensors that
#: would save less than this stay dense.
RECORD_OVERHEAD = 320

FLOAT_TYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.int32)


def pack_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with each sparse float tensor replaced by values + bitmask where that is smaller.

    Other entries (dense tensors, quantized tensors, packed quantized parameters, extra state) are
    kept as they are. :func:`unpack_state_dict` gives back the same tensors, bit for bit.
    """
    dense: dict[str, Any] = {}
    packed: dict[str, dict[str, Any]] = {}
    for name, value in state.items():
        if _worth_packing(value):
            packed[name] = _pack(value)
        else:
            dense[name] = value
    # Layers read their format version from the state dict's metadata (quantized Linear does):
    # a plain dict would lose it, so it travels as plain data.
    metadata = {key: dict(value) for key, value in getattr(state, "_metadata", {}).items()}
    return {"format": PACKED_FORMAT, "order": list(state), "dense": dense, "packed": packed, "metadata": metadata}


def unpack_state_dict(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict that :func:`pack_state_dict` packed (metadata included); anything else is returned as is."""
    if not is_packed(data):
        return data
    dense, packed = data["dense"], data["packed"]
    state = OrderedDict((name, _unpack(packed[name]) if name in packed else dense[name]) for name in data["order"])
    state._metadata = {key: dict(value) for key, value in data.get("metadata", {}).items()}  # type: ignore[attr-defined]
    return state


def is_packed(data: Any) -> bool:
    """Whether ``data`` is the output of :func:`pack_state_dict`."""
    return isinstance(data, Mapping) and data.get("format") == PACKED_FORMAT


def smallest_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` packed if that makes the saved file smaller, else ``state`` itself (what a saved model stores)."""
    return _smallest(state)[0]


def packed_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the model's state dict in the form torchslim saves it: packed where
    that is smaller (sparse layers), dense otherwise. Compare with the dense ``size_bytes``."""
    chosen, size = _smallest(model.state_dict())
    return saved_bytes(chosen) if size is None else size


def _smallest(state: Mapping[str, Any]) -> tuple[Mapping[str, Any], int | None]:
    """:func:`smallest_state` and its saved bytes where choosing it measured them (None where nothing packs: the
    choice needs no serialization, and a saved model's path should not pay for one)."""
    packed = pack_state_dict(state)
    if not packed["packed"]:
        return state, None
    packed_bytes, dense_bytes = saved_bytes(packed), saved_bytes(state)
    return (packed, packed_bytes) if packed_bytes < dense_bytes else (state, dense_bytes)


def saved_bytes(obj: Any) -> int:
    """Bytes of ``torch.save(obj)``, counted as they are written and not kept (a buffer held a second copy of
    the model: 1.6 GB more at the peak for a 412M-parameter model)."""
    sink = _Count()
    torch.save(obj, cast(IO[bytes], sink))  # torch.save calls only write() on a file object
    return sink.size


class _Count:
    """A write-only file that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        written = memoryview(data).nbytes
        self.size += written
        return written

    def flush(self) -> None:
        """Nothing is buffered."""


def _worth_packing(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_TYPES or value.layout != torch.strided:
        return False
    if value.is_quantized or value.numel() == 0:
        return False
    numel, itemsize = value.numel(), value.element_size()
    nonzero = int(torch.count_nonzero(value))
    signs = -(-(numel - nonzero) // 8) if _has_negative_zero(value) else 0
    packed = nonzero * itemsize + -(-numel // 8) + signs
    return numel * itemsize - packed > RECORD_OVERHEAD * (2 if signs else 1)


def _has_negative_zero(tensor: torch.Tensor) -> bool:
    return bool((torch.signbit(tensor) & (tensor == 0)).any())


def _pack(tensor: torch.Tensor) -> dict[str, Any]:
    flat = tensor.detach().contiguous().flatten()
    mask = flat != 0  # NaN != 0, so NaNs are kept as values
    entry: dict[str, Any] = {"shape": list(tensor.shape), "mask": _pack_bits(mask), "values": flat[mask].clone()}
    if _has_negative_zero(flat):
        # Pruning by multiplying with a mask turns negative weights into -0.0. Keep the sign of
        # each zero (one bit per zero, only when some are negative) so loading is bit for bit.
        entry["zero_signs"] = _pack_bits(torch.signbit(flat[~mask]))
    return entry


def _unpack(entry: Mapping[str, Any]) -> torch.Tensor:
    shape, values = list(entry["shape"]), entry["values"]
    numel = 1
    for size in shape:
        numel *= int(size)
    mask = _unpack_bits(entry["mask"], numel)
    flat = torch.zeros(numel, dtype=values.dtype)
    flat[mask] = values
    if "zero_signs" in entry:
        signs = _unpack_bits(entry["zero_signs"], numel - int(mask.sum()))
        flat[~mask] = torch.where(signs, torch.tensor(-0.0, dtype=values.dtype), torch.tensor(0.0, dtype=values.dtype))
    return flat.view(shape)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor, eight flags a byte, most significant bit first."""
    flags = mask.to(torch.int32)
    flags = torch.cat([flags, flags.new_zeros(-flags.numel() % 8)]).view(-1, 8)
    return (flags << _SHIFTS).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: the first ``numel`` flags as a bool tensor."""
    bits = (packed.to(torch.int32).unsqueeze(1) >> _SHIFTS) & 1
    return bits.flatten()[:numel].bool()
