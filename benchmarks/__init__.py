"""Benchmarks, each run from the repository root as ``python -m benchmarks.NAME``; they print figures measured
side by side."""
