"""Codes of 1 to 8 bits packed into a uint8 bit stream, and back, bit-exactly.

One format for every width: code ``i`` occupies bits ``i*b .. i*b+b-1`` of the stream, least
significant bit first. Widths that divide 8 therefore pack whole codes per byte (eight 1-bit, four
2-bit, two 4-bit codes); 3-bit codes are a true bit stream (8 codes in 3 bytes), not padded to 4.
"""

from __future__ import annotations

import torch

#: Bit weights of one byte, least significant first.
_BYTE_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)


def packed_length(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits."""
    return -(-count * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (integers in ``[0, 2**bits)``, any shape) as a flat uint8 bit stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, not {bits}")
    flat = codes.reshape(-1).to(torch.int32)
    if bits == 8:
        return flat.to(torch.uint8)
    stream = ((flat[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, packed_length(flat.numel(), bits) * 8 - stream.numel()))
    return (stream.view(-1, 8) * _BYTE_BITS).sum(1).to(torch.uint8)


def unpack(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a stream :func:`pack` wrote, as a flat uint8 tensor."""
    if bits == 8:
        return stream[:count]
    if 8 % bits == 0:  # whole codes per byte: one shift per position, no per-bit expansion (the hot path)
        mask = 2**bits - 1
        return torch.stack([(stream >> shift) & mask for shift in range(0, 8, bits)], 1).reshape(-1)[:count]
    as_int = stream.to(torch.int32)
    stream_bits = ((as_int[:, None] >> torch.arange(8, dtype=torch.int32, device=stream.device)) & 1).reshape(-1)
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32, device=stream.device)
    return (stream_bits[: count * bits].view(count, bits) * weights).sum(1).to(torch.uint8)
