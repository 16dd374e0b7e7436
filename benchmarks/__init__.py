"""Benchmarks: commands that print tables (`python -m benchmarks.<name>` from a checkout).

Not part of the installed package: `attention` (Flash Attention Entropy vs SDPA), `latency`
(generation latency and numerics of the fast path), `pruning` (pruning mechanics), `batch` (memory
and images/s vs batch size), `workers` (calibration search workers), `block_kernels` (GPU launches
per block), `fae` (the attention kernel's tuning), `entropy_cpu` (the entropy's share and the tiny
policy's wall-clock speedup on a CPU), `scale_trace` (per-scale kernels, busy time and gaps on the
GPU), `capped_calibration` (a calibration under a memory cap), `counting` (tiny's counting accuracy).
`fullscale.sh` runs the full-scale GPU stages (with `random_clip`, a random-weight CLIP folder).
Measured numbers and how they were taken: docs/benchmarks.md.
"""
