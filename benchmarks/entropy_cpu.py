"""Benchmark (CPU): what the entropy costs the shipped tiny policy, and the speedup a user sees.

    python -m benchmarks.entropy_cpu [--prompts 32] [--batch 8] [--rounds 3] [--json out.json]

Issue 25 item 2's two numbers, on the `tiny` backbone with its shipped policy (fp32, CPU):
  * entropy share: the time spent computing entropy inside the policy's generation loop (the
    `toprovar.kernels.entropy_reference` passes, timed around each call) over the unpruned loop's
    time (sum of the trace's per-scale times), per round;
  * wall-clock speedup of `python -m toprovar generate policy=tiny` over `policy=none`
    (`batch_size`, the same prompts and seeds): each command's wall time, and the sum of its
    trace.csv `total_ms` (scale loop + VAE decode per batch, text encoding excluded).
Variants alternate within each round (none, tiny, none, tiny, ...) and every figure is the median
over rounds, so a busy machine's slow spell hits both. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import toprovar.openmp  # noqa: F401  (first: OpenMP's spin-wait as the command lines set it, before torch loads)
from toprovar.environment import run_record


def _prompts(n: int) -> list[str]:
    from toprovar.tiny import scenes

    return [scenes.scene_caption(s) for s in scenes.sample_scenes(n, 2026)]


def _in_process(prompts: list[str], batch: int, rounds: int) -> dict:
    """Loop times of policy none and tiny, and the entropy time inside the tiny runs."""
    import toprovar.kernels as kernels
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate

    spent: list[float] = []
    entropy = kernels.entropy_reference

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = entropy(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    kernels.entropy_reference = timed  # sdpa_entropy looks it up at each call
    backbone = build_backbone("tiny", device="cpu")
    seeds = list(range(len(prompts)))
    generate(backbone, prompts[:batch], seeds[:batch])  # warm-up (first-call allocations)
    loop = {"none": [], "tiny": []}
    share = []
    for _ in range(rounds):
        for policy in loop:
            spent.clear()
            ms = 0.0
            for i in range(0, len(prompts), batch):
                trace = generate(backbone, prompts[i : i + batch], seeds[i : i + batch], policy=policy).trace
                ms += sum(s.time_ms for s in trace.scales if not s.exited)
            loop[policy].append(ms)
            if policy == "tiny":
                share.append(sum(spent) * 1e3 / loop["none"][-1])
    kernels.entropy_reference = entropy
    return {
        "loop_ms_none": statistics.median(loop["none"]),
        "loop_ms_tiny": statistics.median(loop["tiny"]),
        "loop_speedup": statistics.median(n / t for n, t in zip(loop["none"], loop["tiny"])),
        "entropy_share_of_unpruned_loop": statistics.median(share),
        "rounds_loop_ms": loop,
    }


def _command(prompts: list[str], batch: int, rounds: int) -> dict:
    """`python -m toprovar generate` per policy, alternating: wall time and summed trace total_ms."""
    import pandas as pd

    wall = {"none": [], "tiny": []}
    traced = {"none": [], "tiny": []}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(rounds):
            for policy in wall:
                out = Path(folder) / f"{policy}{r}"
                cmd = [
                    sys.executable,
                    "-m",
                    "toprovar",
                    "generate",
                    f"policy={policy}",
                    f"batch_size={batch}",
                    f"prompts={json.dumps(prompts)}",
                    f"seeds={list(range(len(prompts)))}",
                    f"out_dir={out}",
                    "device=cpu",
                ]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, capture_output=True)
                wall[policy].append(time.perf_counter() - t0)
                frame = pd.read_csv(out / "trace.csv")
                traced[policy].append(float(frame.groupby("batch")["total_ms"].first().sum()))
    return {
        "command_wall_s_none": statistics.median(wall["none"]),
        "command_wall_s_tiny": statistics.median(wall["tiny"]),
        "command_wall_speedup": statistics.median(n / t for n, t in zip(wall["none"], wall["tiny"])),
        "generate_ms_none": statistics.median(traced["none"]),
        "generate_ms_tiny": statistics.median(traced["tiny"]),
        "generate_speedup": statistics.median(n / t for n, t in zip(traced["none"], traced["tiny"])),
        "rounds_wall_s": wall,
        "rounds_generate_ms": traced,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--skip-command", action="store_true", help="only the in-process loop timings")
    args = parser.parse_args()

    prompts = _prompts(args.prompts)
    result = {
        "meta": {
            **run_record("python -m benchmarks.entropy_cpu", device="cpu"),
            "prompts": args.prompts,
            "batch": args.batch,
            "rounds": args.rounds,
        },
        **_in_process(prompts, args.batch, args.rounds),
    }
    if not args.skip_command:
        result.update(_command(prompts, args.batch, args.rounds))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
