"""Benchmarks: commands that print tables (`python -m benchmarks.<name>` from a checkout).

Not part of the installed package: `attention` (Flash Attention Entropy vs SDPA), `latency`
(generation latency and numerics of the fast path), `pruning` (pruning mechanics), `entropy_cpu`
(the entropy's share and the tiny policy's wall-clock speedup on a CPU). Measured
numbers and how they were taken: docs/benchmarks.md.
"""
