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
"""Multiply-accumulates for one sample, dense: every matrix product torch's FLOP counter sees (Linear,
Conv, attention's matmul/bmm/scaled_dot_product_attention) as FLOPs / 2, plus the quantized Linear and
Conv layers it cannot see; None (not measured) where neither can see the layers (a compiled graph
that does not count itself)."""
LATENCY_MS = "latency_ms"
"""Median forward time of one batch, in milliseconds."""
LATENCY_ALONE_MS = "latency_alone_ms"
"""A search trial's latency as its run timed it, alone, where the search reads ``latency_ms`` against its
reference (:mod:`torchslim.search.reference`)."""
LATENCY_IQR_MS = "latency_iqr_ms"
"""Interquartile range (75th minus 25th percentile) of the timed runs, in milliseconds."""
LATENCY_OTHERS = "latency_others_running"
"""Median number of other processes' runnable tasks seen between the timed runs (None off Linux): with
the timing's threads, more than the CPUs means the timing waited for a core."""
SECONDS = "seconds"
"""Wall time of the stage itself."""
RUNTIME = "runtime"
"""Where the row's model ran when measured, after a deploy stage (``onnxruntime 1.32.0``); absent: torch."""

#: Every measured figure except the task metric, in the order reports show them.
MEASURED = (PARAMS, NONZERO, SPARSITY, SIZE_BYTES, PACKED_BYTES, MACS, LATENCY_MS, LATENCY_IQR_MS, LATENCY_OTHERS)
