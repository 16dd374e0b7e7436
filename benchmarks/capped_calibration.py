"""A calibration on a smaller card: `python -m benchmarks.capped_calibration --cap-gib 40 -- <calibrate overrides>`.

Caps this process's CUDA memory with `torch.cuda.set_per_process_memory_fraction` (what a 40 GB or
24 GB card leaves to one process, on the card at hand), then runs `python -m calibrate` with the
given overrides in the same process. At exit it prints one JSON line: device, cap, exit status,
peak allocated and reserved memory (reserved is what runs out), wall time, and the run folder's
`timings.json` (stage times and the batch size each stage used), so a table of backbone × cap ×
batch × peak × stage times (docs/benchmarks.md) comes from one command per row.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

import torch

from toprovar.environment import run_record
from toprovar.errors import UserError, exit_on_user_error

PROG = "python -m benchmarks.capped_calibration"
GIB = 1 << 30


def newest_run_dir(before: set[Path]) -> Path | None:
    runs = {p.parent for p in Path("outputs/calibrate").glob("*/*/timings.json")} - before
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--cap-gib", type=float, required=True, help="memory this process may use on the card")
    ap.add_argument("--json-out")
    ap.add_argument("overrides", nargs="*", help="calibrate overrides (after --)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("needs a CUDA GPU: it caps the card's memory")
    total = torch.cuda.get_device_properties(0).total_memory
    if not 0 < args.cap_gib * GIB <= total:
        raise UserError(f"--cap-gib={args.cap_gib}: give a size in (0, {total / GIB:.1f}] GiB (this card)")
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / total)
    before = {p.parent for p in Path("outputs/calibrate").glob("*/*/timings.json")}
    sys.argv = ["calibrate", *args.overrides]
    start, status = time.perf_counter(), 0
    try:
        runpy.run_module("calibrate", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    wall = time.perf_counter() - start
    run_dir = newest_run_dir(before)
    timings = json.loads((run_dir / "timings.json").read_text()) if run_dir else None
    row = {
        "device": torch.cuda.get_device_name(),
        "cap_gib": args.cap_gib,
        "overrides": args.overrides,
        "exit_status": status,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "wall_s": round(wall, 1),
        "run_dir": str(run_dir) if run_dir else None,
        "timings": timings,
        **run_record(PROG, argv, device="cuda"),
    }
    print(json.dumps(row))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(row))
    return status


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        raise SystemExit(main(sys.argv[1:]))
