"""Tuning tools of the Flash Attention Entropy kernel (toprovar/kernels/triton_fae.py) and their raw results.

`tune` times kernel variants on a GPU, `sass_report` counts what the compiler made of them (no
GPU), `v0` is the frozen previous kernel `tune` times beside the current one; `results/` holds
every device run. docs/kernels.md reads them.
"""
