"""Data adapters only the benchmark needs (recipes name them as ``bench.adapters.<module>:<callable>``;
run from the repository root)."""
