"""Sweep the FAE kernel's variants on one GPU in one go: compile all (in parallel), check each
against float64, time each with and without entropy beside PyTorch SDPA and the previous kernel.

    python -m kernels.tune [--out DIR] [--shapes main|all] [--ncu]

Shapes are kernels.bench's (B=2, D=128, bf16, the last five scales of the 1M schedule, 16 heads,
and 28 heads at the last scale). Writes DIR/tune.json after every shape (so a run cut short still
leaves numbers) and prints a short table last. `--ncu` profiles the best variant and cuDNN at the
main shape with Nsight Compute (tensor-pipe, MUFU, issue and occupancy metrics).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

# name -> ((BLOCK_M, BLOCK_N, num_warps, num_stages), use_tma, pipe_qk, sum_mode); two sweeps (see NOTES.md).
SETS: dict[str, dict] = {"1": {}, "2": {}}
for _cfg in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (128, 64, 4, 3),
             (64, 128, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4)]:
    SETS["1"]["tma_%dx%d_w%d_s%d" % _cfg] = (_cfg, True, False, 0)
for _cfg in [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 2)]:
    SETS["1"]["tma_pipe_%dx%d_w%d_s%d" % _cfg] = (_cfg, True, True, 0)
for _cfg in [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3)]:
    SETS["1"]["ptr_%dx%d_w%d_s%d" % _cfg] = (_cfg, False, False, 0)
SETS["1"]["ptr_pipe_128x64_w8_s2"] = ((128, 64, 8, 2), False, True, 0)
# Sweep 2: where the two row sums sit against the P·V dot (sum_mode, see triton_fae._softmax_update),
# plain loads vs TMA at the winning tile, and the winners of sweep 1.
for _m in (0, 1, 2, 4):
    SETS["2"][f"tma_128x128_w8_s3_m{_m}"] = ((128, 128, 8, 3), True, False, _m)
for _m in (0, 2):
    SETS["2"][f"tma_64x64_w4_s3_m{_m}"] = ((64, 64, 4, 3), True, False, _m)
SETS["2"]["ptr_128x128_w8_s3_m0"] = ((128, 128, 8, 3), False, False, 0)
SETS["2"]["ptr_128x128_w8_s3_m2"] = ((128, 128, 8, 3), False, False, 2)
SETS["2"]["tma_128x64_w4_s2_m2"] = ((128, 64, 4, 2), True, False, 2)
V0_SETS = {"1": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)],
           "2": [(128, 128, 8, 3), (64, 64, 4, 3)]}
VARIANTS = dict(SETS["2"])
V0_CONFIGS = list(V0_SETS["2"])


def shapes(which: str) -> list[tuple[int, int, int, int]]:
    from kernels.bench import last_scale_shapes

    main = [(16, 12, 4096, 10521)]
    if which == "main":
        return main
    rest = [(16, si, lq, lk) for si, lq, lk in last_scale_shapes() if si != 12]
    return main + [(28, 12, 4096, 10521)] + rest


def _inputs(heads: int, lq: int, lk: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)  # fresh random data, as kernels.bench draws it
    q = torch.randn(2, heads, lq, 128, device="cuda", generator=g)
    k = F.normalize(torch.randn(2, heads, lk, 128, device="cuda", generator=g), dim=-1).to(torch.bfloat16)
    v = torch.randn(2, heads, lk, 128, device="cuda", generator=g).to(torch.bfloat16)
    q = (F.normalize(q, dim=-1) * 8.0).to(torch.bfloat16)
    return q, k, v


def _compile_worker(items):
    """In a spawned process: launch every item once on small tensors with the same specializations
    as the real shapes, so the Triton cache holds the binaries before the timed process asks."""
    from kernels import _fae_v0
    from kernels.triton_fae import launch

    done = []
    for kind, name, heads in items:
        t0 = time.time()
        try:
            q, k, v = _inputs(heads, 128, 201)
            for ent in (True, False):
                if kind == "new":
                    cfg, tma, pipe, mode = VARIANTS[name]
                    _, _, kern = launch(q, k, v, None, ent, cfg, tma, pipe, mode)
                    info = {"regs": kern.n_regs, "spills": kern.n_spills, "smem": kern.metadata.shared}
                else:
                    _fae_v0.fae_forward(q, k, v, None, ent, config=tuple(int(x) for x in name.split("_")[1:]))
                    info = {}
                torch.cuda.synchronize()
                done.append((kind, name, heads, ent, "ok", info, round(time.time() - t0, 1)))
        except Exception as err:  # keep going: one variant that fails to build must not stop the sweep
            done.append((kind, name, heads, None, f"{type(err).__name__}: {str(err)[:300]}", {}, 0))
    return done


def _init_worker(which: str) -> None:
    VARIANTS.clear()
    VARIANTS.update(SETS[which])


def precompile(nproc: int, which: str) -> list:
    items = [("new", n, 16) for n in VARIANTS]
    items += [("v0", "v0_" + "_".join(map(str, c)), h) for c in V0_CONFIGS for h in (16, 28)]
    chunks = [items[i::nproc] for i in range(nproc)]
    with mp.get_context("spawn").Pool(nproc, initializer=_init_worker, initargs=(which,)) as pool:
        return [r for part in pool.map(_compile_worker, chunks) for r in part]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep(out_dir: str, which: str, rep: int, repeat: tuple = (), repeat_n: int = 0,
          repeat_heads: tuple = (16, 28), which_set: str = "2") -> dict:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import _fae_v0
    from kernels.reference import attention_entropy_reference
    from kernels.triton_fae import launch

    def fae_forward(q, k, v, scale, ent, cfg, tma, pipe, mode):  # the public path plus the sum_mode switch
        return launch(q, k, v, scale, ent, cfg, tma, pipe, mode)[:2]

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")

    res = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "python": platform.python_version(), "date": date.today().isoformat(),
                    "command": "python -m kernels.tune " + " ".join(sys.argv[1:]),
                    "times": "median ms (triton.testing.do_bench, L2 flushed between runs)"}, "rows": []}
    t_start = time.time()
    for heads, si, lq, lk in shapes(which):
        q, k, v = _inputs(heads, lq, lk, seed=si + heads)
        ref_out, ref_ent = attention_entropy_reference(q.double(), k.double(), v.double(), chunk=2048)
        row = {"heads": heads, "scale": si, "Lq": lq, "Lk": lk, "variants": {}}
        for be, name in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
            def run(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v)
            try:
                row[name] = bench(run)
            except Exception as err:
                row[name], row[name + "_error"] = float("nan"), str(err)[:200]
        for name, (cfg, tma, pipe, mode) in VARIANTS.items():
            rec = {}
            try:
                out, ent = fae_forward(q, k, v, None, True, cfg, tma, pipe, mode)
                plain, _ = fae_forward(q, k, v, None, False, cfg, tma, pipe, mode)
                rec["err_out"], rec["err_entropy"] = _rel(out, ref_out), _rel(ent, ref_ent)
                rec["same_out"] = bool(torch.equal(out, plain))
                rec["ent"] = bench(lambda: fae_forward(q, k, v, None, True, cfg, tma, pipe, mode))
                rec["noent"] = bench(lambda: fae_forward(q, k, v, None, False, cfg, tma, pipe, mode))
                if heads in repeat_heads and si == 12 and name in repeat:  # noise: alternate the twins
                    rec["ent_rep"], rec["noent_rep"] = [], []
                    for _ in range(repeat_n):
                        rec["ent_rep"].append(bench(lambda: fae_forward(q, k, v, None, True, cfg, tma, pipe, mode)))
                        rec["noent_rep"].append(bench(lambda: fae_forward(q, k, v, None, False, cfg, tma, pipe,
                                                                          mode)))
            except Exception as err:
                rec["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            row["variants"][name] = rec
        for cfg in V0_CONFIGS:
            name = "v0_" + "_".join(map(str, cfg))
            rec = {}
            try:
                out, ent = _fae_v0.fae_forward(q, k, v, None, True, config=cfg)
                rec["err_out"], rec["err_entropy"] = _rel(out, ref_out), _rel(ent, ref_ent)
                rec["ent"] = bench(lambda: _fae_v0.fae_forward(q, k, v, None, True, config=cfg))
                rec["noent"] = bench(lambda: _fae_v0.fae_forward(q, k, v, None, False, config=cfg))
            except Exception as err:
                rec["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            row["variants"][name] = rec
        if which_set == "1" and heads == 16 and si in (8, 12):  # the previous kernel as it ran: autotuned per (Lq, Lk, WITH_ENTROPY)
            rec = {}
            try:
                for ent in (True, False):
                    _fae_v0.fae_forward(q, k, v, None, ent)
                    rec["ent" if ent else "noent"] = bench(lambda: _fae_v0.fae_forward(q, k, v, None, ent))
                rec["picked"] = {str(key): str(cfg) for key, cfg in _fae_v0._autotuned.cache.items()}
                rec["err_out"] = rec["err_entropy"] = 0.0
            except Exception as err:
                rec = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            row["variants"]["v0_autotuned"] = rec
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
        print(f"\n## heads {row['heads']} scale {row['scale']} Lq {row['Lq']} Lk {row['Lk']}: "
              f"sdpa_flash {row['sdpa_flash']:.4f} sdpa_cudnn {row['sdpa_cudnn']:.4f} (at {row['elapsed_s']} s)")
        print("| variant | ent ms | noent ms | ent/best_sdpa | overhead | err_out | err_ent |")
        print("|---|---|---|---|---|---|---|")
        ranked = sorted(ok.items(), key=lambda kv: kv[1]["ent"])
        show = ranked[:8] + [kv for kv in ranked[8:] if kv[0].startswith("v0_")][:1]
        for n, r in show:
            print(f"| {n} | {r['ent']:.4f} | {r['noent']:.4f} | {r['ent'] / best_sdpa:.3f} | "
                  f"{r['ent'] / r['noent'] - 1:+.3f} | {r['err_out']:.1e} | {r['err_entropy']:.1e} |")
        bad = [n for n, r in row["variants"].items() if "error" in r or r.get("err_out", 0) > 1e-2
               or r.get("err_entropy", 0) > 1e-2 or r.get("same_out") is False]
        if bad:
            print("failed or inaccurate:", bad)


NCU_METRICS = [
    "gpu__time_duration.sum", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "lts__t_sectors.avg.pct_of_peak_sustained_elapsed", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "launch__registers_per_thread", "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem",
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

    from kernels.triton_fae import launch

    q, k, v = _inputs(16, 4096, 10521)
    runs = [lambda c=VARIANTS[n], e=e: launch(q, k, v, None, e, *c) for n in names for e in (True, False)]

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    runs.append(cudnn)
    for fn in runs:  # warm-up: compile and autotune outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn in runs:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ncu_profile(out_dir: str, names: list[str], which: str) -> None:
    try:  # an unknown metric name fails the whole ncu run: keep those this ncu knows for the chip
        known = subprocess.run(["ncu", "--query-metrics", "--chip", "gh100"], capture_output=True, text=True,
                               timeout=60).stdout
        metrics = [m for m in NCU_METRICS if m.split(".")[0] in known]
        print("ncu metrics unknown here:", [m for m in NCU_METRICS if m not in metrics])
        cmd = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--metrics", ",".join(metrics),
               "--section", "SpeedOfLight", "--section", "Occupancy", "--csv",
               sys.executable, "-m", "kernels.tune", "--set", which, "--ncu-target", *names]
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
    (default tiles and load path), plus a strided (non-contiguous) K/V and fp16/fp32."""
    from kernels import flash_attn, flash_attn_entropy

    lines = []
    cases = [(dt, 128) for dt in (torch.bfloat16, torch.float16, torch.float32)]
    cases += [(torch.bfloat16, d) for d in (16, 64, 256)]
    for dtype, D in cases:
        q, k, v = [torch.randn(2, 4, L, D, device="cuda", dtype=dtype) for L in (300, 1000, 1000)]
        for name, (kk, vv) in {"contig": (k, v), "strided": (k.transpose(1, 2).contiguous().transpose(1, 2),
                                                            v.transpose(1, 2).contiguous().transpose(1, 2))}.items():
            out, ent = flash_attn_entropy(q, kk, vv)
            s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
            p = torch.softmax(s, -1)
            ref_out, ref_ent = p @ v.double(), -(p * torch.log(p)).sum(-1)
            eo, ee = _rel(out, ref_out), _rel(ent, ref_ent)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            same = torch.equal(flash_attn(q, kk, vv), out)
            lines.append(f"gpu_check {dtype} D={D} {name}: out {eo:.1e} entropy {ee:.1e} same_as_no_entropy {same} "
                         f"{'PASS' if eo <= tol and ee <= tol and same else 'FAIL'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default="all", choices=["main", "all"])
    parser.add_argument("--rep", type=int, default=100, help="do_bench budget per timing (ms)")
    parser.add_argument("--nproc", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--set", default="2", choices=sorted(SETS), help="which variant sweep")
    parser.add_argument("--repeat", nargs="*", default=[], help="variants timed again, alternating the twins")
    parser.add_argument("--repeat-n", type=int, default=5)
    parser.add_argument("--ncu", nargs="*", default=None, help="variants to profile (none named: the best)")
    parser.add_argument("--ncu-target", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _init_worker(args.set)
    V0_CONFIGS[:] = V0_SETS[args.set]
    if args.ncu_target is not None:
        return ncu_target(args.ncu_target)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    print("\n".join(gpu_check()), flush=True)
    comp = precompile(args.nproc, args.set)
    print(f"precompiled {len(comp)} kernels in {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, "compile.json"), "w") as f:
        json.dump(comp, f, indent=1)
    for kind, name, heads, ent, status, info, secs in comp:
        if status != "ok" or (info and info.get("spills")):
            print("compile:", kind, name, heads, ent, status, info)
    res = sweep(args.out, args.shapes, args.rep, tuple(args.repeat), args.repeat_n, which_set=args.set)
    summarize(res)
    if args.ncu is not None:
        main_row = res["rows"][0]
        timed = [n for n, r in main_row["variants"].items() if "ent" in r and n in VARIANTS]
        best = min(timed, key=lambda n: main_row["variants"][n]["ent"])
        best_plain = min((n for n in timed if not VARIANTS[n][2]), key=lambda n: main_row["variants"][n]["ent"])
        ncu_profile(args.out, args.ncu or sorted({best, best_plain}), args.set)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
