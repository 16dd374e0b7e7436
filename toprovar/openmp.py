"""OpenMP's spin-wait for the command lines, set on import, before torch loads libgomp.

A libgomp thread that finishes its share of a parallel region spins GOMP_SPINCOUNT iterations
(300 000 by default) before it sleeps. On a CPU that anything else also uses, torch's threads then
burn the cores the others need: `python -m calibrate` (pre-sampling + 8 trials of `tiny`, 2 cores,
torch 2.13.0+cpu, 2026-11-30) took 55 s idle and 168 s beside one busy single-thread process. With
1 000 spins it took 54 s idle and 100 s beside it; passive waits (0 spins) cost 71 s idle, 100
spins 68 s idle, one thread 87 s either way (docs/benchmarks.md, "CPU threads"). A value the user
set is kept. Importing this module after torch has no effect (the runtime read the variable).
"""

from __future__ import annotations

import os

SPINCOUNT = "1000"

os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
