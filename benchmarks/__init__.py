"""Benchmarks: commands that print tables (`python -m benchmarks.<name>` from a checkout).

Not part of the installed package: `attention` (Flash Attention Entropy vs SDPA), `latency`
(generation latency and numerics of the fast path), `pruning` (pruning mechanics). Measured
numbers and how they were taken: docs/benchmarks.md.
"""
