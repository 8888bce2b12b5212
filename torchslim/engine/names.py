"""Names of the figures measured after every stage: the keys of a row's metrics in every report.

Defined once here; the report, the comparison and the benchmarks refer to these names.
"""

from __future__ import annotations

PARAMS = "params"
"""Weight and bias values."""
NONZERO = "nonzero"
"""Weight and bias values that are not exactly zero."""
SPARSITY = "sparsity"
"""1 - nonzero / params."""
SIZE_BYTES = "size_bytes"
"""Bytes of ``torch.save(state_dict)``: the dense file size."""
PACKED_BYTES = "packed_bytes"
"""Bytes of the state dict in the packed encoding (non-zero values plus a bitmask) where smaller."""
MACS = "macs"
"""Linear and Conv multiply-accumulates for one sample, dense."""
LATENCY_MS = "latency_ms"
"""Median forward time of one batch, in milliseconds."""
SECONDS = "seconds"
"""Wall time of the stage itself."""

#: Every measured figure except the task metric, in the order reports show them.
MEASURED = (PARAMS, NONZERO, SPARSITY, SIZE_BYTES, PACKED_BYTES, MACS, LATENCY_MS)
