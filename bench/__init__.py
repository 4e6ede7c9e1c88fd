"""Benchmarks: `python -m conceptgate bench ...` writes BENCHMARKS.md (speed and quality, measured)."""
