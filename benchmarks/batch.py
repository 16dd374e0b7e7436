"""Images per second vs batch size on the fast path: `python -m benchmarks.batch [--backbone infinity-2b]
[--batches 1,2,4,8] [--reps 3] [--json-out F] [--md-out F] [--smoke]`.

Random weights of the backbone's shapes (`benchmarks.latency.random_backbone`: no files, no T5;
random text features of one length), unpruned, guidance scale 3, the backbone's 1024² schedule,
`toprovar.pipeline.generate` with its CUDA defaults (fast path: one CUDA graph per scale). For each
batch size, after `--warmup` calls (the first captures that size's graphs): the median wall time of
`--reps` calls (synchronized, text encoding excluded) per image and images per second; from the
traces' CUDA events the scale loop per image, the last three scales and the VAE decode per image;
the FLOP floor of the transformer per image at the bf16 matrix rate measured in the same run and the
achieved fraction floor / time; peak GPU memory allocated and reserved during that batch size, the
KV cache's share of it, and the memory still allocated after `release_fast_runtime` (the graphs and
static buffers of the batch size freed before the next one). A batch size that runs out of memory
is recorded as such and the next one still runs. `--smoke`: the same code on CPU with `test-small`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from toprovar.environment import run_record

GIB = float(1 << 30)


def kv_cache_gib(backbone, batch: int) -> float:
    """Bytes of the KV cache one call allocates (every block, K and V, guidance rows, all tokens)."""
    from toprovar.schedules import tokens_per_scale

    spec, cfg = backbone.spec, backbone.transformer.config
    tokens = sum(tokens_per_scale(spec.schedules.scale_schedule(1.0, spec.pixels)))
    element = torch.finfo(backbone.dtype).bits // 8
    return backbone.transformer.depth * 2 * (2 * batch) * tokens * cfg.embed_dim * element / GIB


def measure(backbone, batch: int, warmup: int, reps: int, rate: float) -> dict:
    from benchmarks.latency import floor_flops, sync
    from toprovar.fast import release_fast_runtime
    from toprovar.pipeline import generate

    device = backbone.device
    prompts, seeds = ["a photo"] * batch, list(range(batch))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    row = {"batch": batch, "kv_cache_gib": round(kv_cache_gib(backbone, batch), 2)}
    try:
        for _ in range(warmup):
            generate(backbone, prompts, seeds)
        walls, traces = [], []
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            result = generate(backbone, prompts, seeds)
            walls.append(time.perf_counter() - start - result.trace.text_encode_ms / 1e3)
            traces.append(result.trace)
    except torch.cuda.OutOfMemoryError as err:
        row.update(error=f"out of memory: {str(err).splitlines()[0][:160]}")
        return row
    finally:
        if cuda:
            row.update(
                peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 2),
            )
        release_fast_runtime(backbone)
        if cuda:
            row["allocated_after_release_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
    wall = statistics.median(walls)
    trace = traces[walls.index(sorted(walls)[len(walls) // 2])]
    linear, attention = floor_flops(trace)
    floor_ms = (linear + attention) / rate * 1e3 / batch
    scales = [statistics.median(t.scales[si].time_ms for t in traces) for si in range(len(trace.scales))]
    decode = statistics.median(t.decode_ms for t in traces)
    ms = wall * 1e3 / batch
    row.update(
        ms_per_image=round(ms, 1),
        images_per_s=round(batch / wall, 3),
        scale_loop_ms_per_image=round(sum(scales) / batch, 1),
        last3_scales_ms_per_image=round(sum(scales[-3:]) / batch, 1),
        decode_ms_per_image=round(decode / batch, 1),
        host_gap_ms_per_image=round(ms - (sum(scales) + decode) / batch, 1),
        floor_ms_per_image=round(floor_ms, 1),
        floor_fraction=round(floor_ms / ms, 3),
        runs_s=[round(w, 4) for w in walls],
    )
    return row


def markdown(name: str, rows: list[dict]) -> str:
    keys = [
        "batch",
        "ms_per_image",
        "images_per_s",
        "scale_loop_ms_per_image",
        "last3_scales_ms_per_image",
        "decode_ms_per_image",
        "host_gap_ms_per_image",
        "floor_ms_per_image",
        "floor_fraction",
        "peak_allocated_gib",
        "peak_reserved_gib",
        "kv_cache_gib",
        "allocated_after_release_gib",
        "error",
    ]
    shown = [k for k in keys if any(k in r for r in rows)]
    lines = [f"### {name}", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmarks.latency import matmul_rate, random_backbone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="infinity-2b")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--json-out")
    parser.add_argument("--md-out")
    parser.add_argument("--smoke", action="store_true", help="CPU, test-small")
    args = parser.parse_args()
    if args.smoke:
        from tests.backbones import use_test_backbones  # test-small is registered from the checkout only

        use_test_backbones()
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "test-small" if args.smoke else args.backbone
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rate = matmul_rate(device, args.smoke)
    backbone = random_backbone(name, device, text_len=args.text_len, blocks_dtype=dtype)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        rows.append(measure(backbone, batch, args.warmup, args.reps, rate))
        print(json.dumps(rows[-1]), flush=True)
    record = {
        "backbone": name,
        **run_record("python -m benchmarks.batch", device=device),
        "matmul_tflops": round(rate / 1e12, 1),
        "rows": rows,
    }
    table = markdown(f"{name}: batch size vs time per image (random weights, fast path, unpruned)", rows)
    print(table)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(record, handle, indent=2)
    if args.md_out:
        with open(args.md_out, "w") as handle:
            handle.write(table + f"\n{json.dumps({k: v for k, v in record.items() if k != 'rows'})}\n")


if __name__ == "__main__":
    main()
