"""Time the FAE kernel's variants on one GPU in one go: compile all (in parallel), check each
against float64, time each with and without entropy (alternating the twins over several rounds,
medians reported) beside PyTorch SDPA and the previous kernel (benchmarks/fae/v0.py).

    python -m benchmarks.fae.tune [--out DIR] [--shapes main|all] [--rounds 3] [--ncu [VARIANT ...]]

Shapes are benchmarks.attention's: B=2, D=128, bf16, the last five scales of the 1M schedule, 16 and 28
heads. Writes DIR/tune.json after every shape (a run cut short still leaves numbers) and prints a
short table last. `--ncu` profiles variants and cuDNN at the main shape with Nsight Compute.
The first two sweeps (tile shapes, pipelining, row-sum placement) ran from this file as of commit
1f00ccf; docs/kernels.md has their results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from functools import partial

import torch
import torch.nn.functional as F

# name -> (config or None for the shape rule, use_tma or None for the default)
VARIANTS: dict[str, tuple] = {
    "final": (None, None),
    "tma_128x128_w8_s3": ((128, 128, 8, 3, False), True),
    "tma_64x64_w4_s3": ((64, 64, 4, 3, True), True),
    "ptr_64x64_w4_s3": ((64, 64, 4, 3, True), False),
}
V0_CONFIGS = [(128, 128, 8, 3), (64, 64, 4, 3)]


def shapes(which: str) -> list[tuple[int, int, int, int]]:
    from benchmarks.attention import last_scale_shapes

    main = [(16, 12, 4096, 10521)]
    if which == "main":
        return main
    return main + [(h, si, lq, lk) for h in (16, 28) for si, lq, lk in last_scale_shapes() if (h, si) != (16, 12)]


def _inputs(heads: int, lq: int, lk: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)  # fresh random data, drawn as benchmarks.attention draws it
    q = torch.randn(2, heads, lq, 128, device="cuda", generator=g)
    k = F.normalize(torch.randn(2, heads, lk, 128, device="cuda", generator=g), dim=-1).to(torch.bfloat16)
    v = torch.randn(2, heads, lk, 128, device="cuda", generator=g).to(torch.bfloat16)
    q = (F.normalize(q, dim=-1) * 8.0).to(torch.bfloat16)
    return q, k, v


def _run(name: str, q, k, v, ent: bool):
    from benchmarks.fae import v0
    from toprovar.kernels.triton_fae import launch

    if name.startswith("v0_"):
        return v0.fae_forward(q, k, v, None, ent, config=tuple(int(x) for x in name.split("_")[1:]))
    cfg, tma = VARIANTS[name]
    return launch(q, k, v, None, ent, cfg, tma)[:2]


def _names() -> list[str]:
    return list(VARIANTS) + ["v0_" + "_".join(map(str, c)) for c in V0_CONFIGS]


def _compile_worker(items):
    """In a spawned process: launch every item once on small tensors with the same specializations
    as the real shapes, so the Triton cache holds the binaries before the timed process asks."""
    from toprovar.kernels.triton_fae import launch

    done = []
    for name, heads, lq in items:
        t0 = time.time()
        try:
            q, k, v = _inputs(heads, lq, 201)
            for ent in (True, False):
                info = {}
                if name.startswith("v0_"):
                    _run(name, q, k, v, ent)
                else:
                    cfg, tma = VARIANTS[name]
                    _, _, kern = launch(q, k, v, None, ent, cfg, tma)
                    info = {"regs": kern.n_regs, "spills": kern.n_spills, "smem": kern.metadata.shared}
                torch.cuda.synchronize()
                done.append((name, heads, lq, ent, "ok", info, round(time.time() - t0, 1)))
        except Exception as err:  # keep going: one variant that fails to build must not stop the sweep
            done.append((name, heads, lq, None, f"{type(err).__name__}: {str(err)[:300]}", {}, 0))
    return done


def precompile(nproc: int) -> list:
    # "final" picks its tiles by shape: a small and a large Lq reach both of its configurations.
    items = [
        (n, h, lq)
        for n in _names()
        for h in ((16, 28) if n.startswith("v0_") else (16,))
        for lq in ((128, 4096) if n == "final" else (128,))
    ]
    chunks = [items[i::nproc] for i in range(nproc)]
    with mp.get_context("spawn").Pool(nproc) as pool:
        return [r for part in pool.map(_compile_worker, chunks) for r in part]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep(out_dir: str, which: str, rep: int, rounds: int) -> dict:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from toprovar.kernels.reference import attention_entropy_reference

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")

    res = {
        "meta": {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "date": date.today().isoformat(),
            "command": "python -m benchmarks.fae.tune " + " ".join(sys.argv[1:]),
            "times": f"median over {rounds} rounds of do_bench medians (ms, L2 flushed between runs)",
        },
        "rows": [],
    }
    t_start = time.time()
    for heads, si, lq, lk in shapes(which):
        q, k, v = _inputs(heads, lq, lk, seed=si + heads)
        ref_out, ref_ent = attention_entropy_reference(q.double(), k.double(), v.double(), chunk=2048)
        row = {"heads": heads, "scale": si, "Lq": lq, "Lk": lk, "variants": {}}
        sdpa = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
        times = {n: [] for n in sdpa}
        for name in _names():
            rec = row["variants"][name] = {"ent_all": [], "noent_all": []}
            try:
                out, ent = _run(name, q, k, v, True)
                plain, _ = _run(name, q, k, v, False)
                rec["err_out"], rec["err_entropy"] = _rel(out, ref_out), _rel(ent, ref_ent)
                rec["same_out"] = bool(torch.equal(out, plain))
            except Exception as err:
                rec["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        for _ in range(rounds):  # rounds: a transient (clocks, a previous heavy shape) hits one round only
            for name, be in sdpa.items():

                def run(be=be, q=q, k=k, v=v):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(q, k, v)

                times[name].append(bench(run))
            for name, rec in row["variants"].items():
                if "error" not in rec:
                    rec["ent_all"].append(bench(partial(_run, name, q, k, v, True)))
                    rec["noent_all"].append(bench(partial(_run, name, q, k, v, False)))
        for name in sdpa:
            row[name], row[name + "_all"] = statistics.median(times[name]), times[name]
        for rec in row["variants"].values():
            if rec["ent_all"]:
                rec["ent"], rec["noent"] = statistics.median(rec["ent_all"]), statistics.median(rec["noent_all"])
        row["elapsed_s"] = round(time.time() - t_start, 1)
        res["rows"].append(row)
        with open(os.path.join(out_dir, "tune.json"), "w") as f:
            json.dump(res, f, indent=1)
        del q, k, v, ref_out, ref_ent
        torch.cuda.empty_cache()
    return res


def summarize(res: dict) -> None:
    for row in res["rows"]:
        best_sdpa = min(row["sdpa_flash"], row["sdpa_cudnn"])
        ok = {n: r for n, r in row["variants"].items() if "ent" in r}
        print(
            f"\n## heads {row['heads']} scale {row['scale']} Lq {row['Lq']} Lk {row['Lk']}: "
            f"sdpa_flash {row['sdpa_flash']:.4f} sdpa_cudnn {row['sdpa_cudnn']:.4f} (at {row['elapsed_s']} s)"
        )
        print("| variant | ent ms | noent ms | ent/best_sdpa | overhead | err_out | err_ent |")
        print("|---|---|---|---|---|---|---|")
        for n, r in sorted(ok.items(), key=lambda kv: kv[1]["ent"]):
            print(
                f"| {n} | {r['ent']:.4f} | {r['noent']:.4f} | {r['ent'] / best_sdpa:.3f} | "
                f"{r['ent'] / r['noent'] - 1:+.3f} | {r['err_out']:.1e} | {r['err_entropy']:.1e} |"
            )
        bad = [
            n
            for n, r in row["variants"].items()
            if "error" in r
            or r.get("err_out", 0) > 1e-2
            or r.get("err_entropy", 0) > 1e-2
            or r.get("same_out") is False
        ]
        if bad:
            print("failed or inaccurate:", bad)


NCU_METRICS = [
    "gpu__time_duration.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "lts__t_sectors.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active",
    "smsp__average_warps_issue_stalled_wait_per_issue_active",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active",
    "smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active",
]


def ncu_target(names: list[str]) -> None:
    """Run under ncu (--profile-from-start off): the named variants with and without entropy, then
    cuDNN, once each inside cudaProfilerStart/Stop, at the main shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _inputs(16, 4096, 10521)
    runs = [lambda n=n, e=e: _run(n, q, k, v, e) for n in names for e in (True, False)]

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    runs.append(cudnn)
    for fn in runs:  # warm-up: compile outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn in runs:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ncu_profile(out_dir: str, names: list[str]) -> None:
    try:  # an unknown metric name fails the whole ncu run: keep those this ncu knows for the chip
        known = subprocess.run(
            ["ncu", "--query-metrics", "--chip", "gh100"], capture_output=True, text=True, timeout=60
        ).stdout
        metrics = [m for m in NCU_METRICS if m.split(".")[0] in known]
        print("ncu metrics unknown here:", [m for m in NCU_METRICS if m not in metrics])
        cmd = [
            "ncu",
            "--clock-control",
            "none",
            "--profile-from-start",
            "off",
            "--metrics",
            ",".join(metrics),
            "--section",
            "SpeedOfLight",
            "--section",
            "Occupancy",
            "--csv",
            sys.executable,
            "-m",
            "benchmarks.fae.tune",
            "--ncu-target",
            *names,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
        with open(os.path.join(out_dir, "ncu.csv"), "w") as f:
            f.write(p.stdout + "\n# stderr\n" + p.stderr[-4000:])
        print(f"ncu rc={p.returncode}; wrote ncu.csv ({len(p.stdout)} chars)")
        for line in p.stdout.splitlines():  # the short form: kernel, metric, value
            cells = [c.strip('"') for c in line.split('","')]
            if len(cells) > 14 and (cells[12] in NCU_METRICS or "Throughput" in cells[12]):
                print("ncu", cells[4][:40], cells[12], cells[14])
    except Exception as err:
        print("ncu failed:", err)


def gpu_check() -> list[str]:
    """What tests/test_kernels_fae.py::test_triton_on_gpu checks, through the public dispatcher
    (default tiles and load path), plus strided (non-contiguous) K/V, fp16/fp32 and other head dims."""
    from toprovar.kernels import flash_attn, flash_attn_entropy

    lines = []
    cases = [(dt, 128) for dt in (torch.bfloat16, torch.float16, torch.float32)]
    cases += [(torch.bfloat16, d) for d in (16, 64, 256)]
    for dtype, D in cases:
        q, k, v = [torch.randn(2, 4, L, D, device="cuda", dtype=dtype) for L in (300, 1000, 1000)]
        for name, (kk, vv) in {
            "contig": (k, v),
            "strided": (k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)),
        }.items():
            out, ent = flash_attn_entropy(q, kk, vv)
            s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
            p = torch.softmax(s, -1)
            ref_out, ref_ent = p @ v.double(), -(p * torch.log(p)).sum(-1)
            eo, ee = _rel(out, ref_out), _rel(ent, ref_ent)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            same = torch.equal(flash_attn(q, kk, vv), out)
            lines.append(
                f"gpu_check {dtype} D={D} {name}: out {eo:.1e} entropy {ee:.1e} same_as_no_entropy {same} "
                f"{'PASS' if eo <= tol and ee <= tol and same else 'FAIL'}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default="all", choices=["main", "all"])
    parser.add_argument("--rep", type=int, default=100, help="do_bench budget per timing (ms)")
    parser.add_argument("--rounds", type=int, default=3, help="timings per variant, twins alternating")
    parser.add_argument("--nproc", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--ncu", nargs="*", default=None, help="variants to profile (none named: final)")
    parser.add_argument("--ncu-target", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fae.tune needs a CUDA GPU")
    if args.ncu_target is not None:
        return ncu_target(args.ncu_target)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    print("\n".join(gpu_check()), flush=True)
    comp = precompile(args.nproc)
    print(f"precompiled {len(comp)} kernels in {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, "compile.json"), "w") as f:
        json.dump(comp, f, indent=1)
    for name, heads, lq, ent, status, info, _secs in comp:
        if status != "ok" or (info and info.get("spills")):
            print("compile:", name, heads, lq, ent, status, info)
    res = sweep(args.out, args.shapes, args.rep, args.rounds)
    summarize(res)
    if args.ncu is not None:
        ncu_profile(args.out, args.ncu or ["final"])
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
