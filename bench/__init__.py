"""torchslim's benchmarks: real models and data against their uncompressed selves and hand-written torch.

Run ``python -m bench`` (full) or ``python -m bench --quick`` from the repository root; each
case prints a table and writes ``bench/results/<case>.json``. See ``docs/bench.md``.
"""
