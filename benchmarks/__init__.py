"""Benchmarks: commands that print tables (`python -m benchmarks.<name>` from a checkout).

Not part of the installed package: `attention` (Flash Attention Entropy vs SDPA), `latency`
(generation latency and numerics of the fast path), `pruning` (pruning mechanics), `batch` (memory
and images/s vs batch size), `workers` (calibration search workers), `block_kernels` (GPU launches
per block), `fae` (the attention kernel's tuning). `fullscale.sh` runs the full-scale GPU stages
(with `random_clip`, a random-weight CLIP folder). Measured numbers and how they were taken:
docs/benchmarks.md.
"""
