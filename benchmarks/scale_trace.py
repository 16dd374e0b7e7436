"""Where a scale's time goes on the GPU: `python -m benchmarks.scale_trace`.

One generation call of Infinity-2B (random weights, 1024², guidance scale 3, bf16, the default fast
path) under torch.profiler. Each scale is bracketed by a device synchronization and a profiler range
(patched around the loop's per-scale entry `InfinityTransformer.add_level` and exit
`toprovar.pipeline._next_input`), so every GPU kernel falls inside the range of the scale that
launched it. Per scale it reports the kernel count, the GPU busy time (the union of kernel
intervals), the span from the first kernel's start to the last one's end, and the idle gaps inside
that span (span - busy), for the default path (one CUDA graph per scale) and for the same kernels
launched one by one (`graphs=False`). `--batch N` runs N images (the batch-throughput question of
issue 24: which kernels of the last scales grow with the batch). `--top K` lists the K longest
kernels of the 1-token scale and of the last scale.

Prints a markdown table and a JSON line (device, versions, date, command); `--json-out` writes it.
GPU only: the question is about launches and kernels, which a CPU run does not have.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import torch

from toprovar.environment import run_record
from toprovar.errors import UserError, exit_on_user_error

PROG = "python -m benchmarks.scale_trace"


@contextlib.contextmanager
def scale_ranges():
    """Patches the loop so each scale runs inside `record_function('scale<si>')`, synchronized at
    both ends (the ranges then contain the scale's kernels, not just their launches)."""
    import toprovar.pipeline as pipeline
    from toprovar.models.transformer import InfinityTransformer

    open_ranges: list[Any] = []
    add_level, next_input = InfinityTransformer.add_level, pipeline._next_input

    def traced_add_level(self, x, si, *args, **kwargs):
        torch.cuda.synchronize()
        rng = torch.autograd.profiler.record_function(f"scale{si}")
        rng.__enter__()
        open_ranges.append(rng)
        return add_level(self, x, si, *args, **kwargs)

    def traced_next_input(*args, **kwargs):
        out = next_input(*args, **kwargs)
        torch.cuda.synchronize()
        open_ranges.pop().__exit__(None, None, None)
        return out

    InfinityTransformer.add_level, pipeline._next_input = traced_add_level, traced_next_input
    try:
        yield
    finally:
        InfinityTransformer.add_level, pipeline._next_input = add_level, next_input
        while open_ranges:
            open_ranges.pop().__exit__(None, None, None)


FAMILIES = ("gemm", "attention", "other")


def _family(name: str) -> str:
    """benchmarks.latency's kernel families folded into matrix products, attention and the rest."""
    from benchmarks.latency import kernel_family

    return {"matmul": "gemm", "attention": "attention"}.get(kernel_family(name), "other")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def per_scale(prof) -> dict[int, dict[str, Any]]:
    """Kernels of each `scale<si>` range: count, busy (union), span, gaps, and the kernels by time."""
    ranges, kernels = [], []
    for evt in prof.events():
        tr = evt.time_range
        is_range = evt.name.startswith("scale") and evt.name[5:].isdigit()
        on_gpu = str(getattr(evt, "device_type", "")).lower().endswith("cuda")
        if is_range and not on_gpu:
            ranges.append((tr.start, tr.end, int(evt.name[5:])))
        elif on_gpu and not is_range:  # the profiler mirrors each range on the GPU timeline: not a kernel
            kernels.append((tr.start, tr.end, evt.name))
    out: dict[int, dict[str, Any]] = {}
    for start, end, si in ranges:
        inside = [(a, b, n) for a, b, n in kernels if start <= a <= end]
        if not inside:
            out[si] = {"kernels": 0, "busy_ms": 0.0, "span_ms": 0.0, "gaps_ms": 0.0, "wall_ms": (end - start) / 1e3}
            continue
        busy = _union_us([(a, b) for a, b, _ in inside])
        span = max(b for _, b, _ in inside) - min(a for a, _, _ in inside)
        by_name: dict[str, list[float]] = {}
        for a, b, n in inside:
            rec = by_name.setdefault(n, [0.0, 0])
            rec[0] += b - a
            rec[1] += 1
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])
        family = {f: sum(us for n, (us, _) in by_name.items() if _family(n) == f) / 1e3 for f in FAMILIES}
        out[si] = {
            "kernels": len(inside),
            **{f"{f}_ms": ms for f, ms in family.items()},
            "busy_ms": busy / 1e3,
            "span_ms": span / 1e3,
            "gaps_ms": (span - busy) / 1e3,
            "wall_ms": (end - start) / 1e3,
            "top": [(n[:100], round(us / 1e3, 4), c) for n, (us, c) in top],
        }
    return out


def release(backbone) -> None:
    """Free the fast path's graphs and buffers, so the next variant starts from the weights alone."""
    from toprovar.fast import release_fast_runtime

    release_fast_runtime(backbone)


def trace_call(backbone, fast, batch: int) -> dict[int, dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    from toprovar.pipeline import generate

    prompts, seeds = ["a photo"] * batch, list(range(batch))
    for _ in range(2):  # capture graphs, warm caches
        generate(backbone, prompts, seeds, fast=fast)
    with scale_ranges(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(backbone, prompts, seeds, fast=fast)
    return per_scale(prof)


def markdown(results: dict[str, dict[int, dict[str, Any]]], schedule: list, top: int) -> str:
    lines = []
    for variant, scales in results.items():
        lines.append(f"#### {variant}\n")
        lines.append(
            "| scale | tokens | kernels | GEMM ms | attention ms | other ms | GPU busy ms | span ms | gaps ms |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for si in sorted(scales):
            r = scales[si]
            t, h, w = schedule[si]
            fam = " | ".join(f"{r.get(f + '_ms', 0.0):.3f}" for f in FAMILIES)
            lines.append(
                f"| {si} | {t * h * w} | {r['kernels']} | {fam} | {r['busy_ms']:.3f} | {r['span_ms']:.3f} | "
                f"{r['gaps_ms']:.3f} |"
            )
        for si in (0, max(scales)):
            lines.append(f"\nTop kernels, scale {si} ({variant}): ms total, count\n")
            for name, ms, count in scales[si].get("top", [])[:top]:
                lines.append(f"- {ms:.4f} ms ×{count}: `{name}`")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="infinity-2b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--graphs-only", action="store_true", help="skip the one-by-one launch variant")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("needs a CUDA GPU: it traces GPU kernels and the gaps between them")
    if args.batch < 1:
        raise UserError(f"--batch={args.batch}: give a positive number of images")

    from benchmarks.latency import random_backbone
    from toprovar.pipeline import FastOptions

    device = torch.device("cuda")
    backbone = random_backbone(args.backbone, device, text_len=32, blocks_dtype=torch.bfloat16)
    schedule = backbone.spec.schedules.scale_schedule(1.0, backbone.spec.pixels)
    variants = {"fast path (one CUDA graph per scale)": FastOptions()}
    if not args.graphs_only:
        variants["same kernels, launched one by one (graphs=False)"] = FastOptions(graphs=False)
    print(f"### {args.backbone}, batch {args.batch}, 1024², bf16, guidance scale 3\n", flush=True)
    results = {}
    for name, opts in variants.items():  # each table printed when done: a later OOM loses nothing
        results[name] = trace_call(backbone, opts, args.batch)
        print(markdown({name: results[name]}, schedule, args.top), flush=True)
        release(backbone)
    meta = run_record(PROG, device="cuda")
    payload = {"meta": meta, "results": {k: {str(s): v for s, v in r.items()} for k, r in results.items()}}
    print(json.dumps(meta))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(payload, fh)


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        main()
