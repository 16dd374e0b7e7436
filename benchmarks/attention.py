"""Benchmark: Flash Attention Entropy vs SDPA + entropy beside it vs PyTorch SDPA (flash, cuDNN) vs naive.

    python -m benchmarks.attention [--json out.json] [--repeats 100] [--rounds 3]

Infinity shapes at 1024² (1M schedule, CFG batch 2, head dim 128, bf16): queries of one of the
last five scales against the KV cache of every scale so far; 16 heads (2B) and 28 heads (8B).
`beside` is the runtime's default entropy path (`toprovar.attention`, kernel "beside"): SDPA with
cuDNN first, as the fast path runs it, asked for its log-sum-exp, then the Triton entropy-only
kernel (`entropy_only`, timed alone too); its output must equal plain SDPA's bit for bit
(`beside_out_identical`). `fae` is the one-pass kernel whose output rounds its own way.
Prints medians (ms) and ratios, and checks accuracy against a float64 reference (relative
error of output and entropy). Each time is the median over `--rounds` rounds (the variants of a
shape alternate, so a transient such as clocks settling after the previous shape's heavy naive
run hits one round, not one variant); the naive baseline runs once. Needs CUDA; plain argparse
so it runs where Hydra is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from itertools import accumulate

import torch
import torch.nn.functional as F

from toprovar.environment import run_record

SCHEDULE_1M = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]


def last_scale_shapes(n: int = 5) -> list[tuple[int, int, int]]:
    """(scale index, Lq, Lk) of the last n scales of the 1M schedule."""
    tokens = [s * s for s in SCHEDULE_1M]
    prefix = list(accumulate(tokens))
    return [(i, tokens[i], prefix[i]) for i in range(len(tokens) - n, len(tokens))]


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--repeats", type=int, default=100, help="timed repetitions (ms budget for do_bench)")
    parser.add_argument("--rounds", type=int, default=3, help="timings per variant and shape; the median is kept")
    parser.add_argument("--heads", type=int, nargs="*", default=[16, 28])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention needs a CUDA GPU")
    import triton
    from torch.nn.attention import SDPBackend

    from toprovar.attention import prefer_cudnn_attention
    from toprovar.kernels import flash_attn, flash_attn_entropy, lse_entropy, sdpa_entropy
    from toprovar.kernels.reference import attention_entropy_reference, naive_attention_entropy
    from toprovar.kernels.sdpa import sdpa_with_lse

    def beside(q, k, v):
        with prefer_cudnn_attention():
            return sdpa_entropy(q, k, v)

    variants = {
        "fae": lambda q, k, v: flash_attn_entropy(q, k, v),
        "fae_no_entropy": lambda q, k, v: flash_attn(q, k, v),
        "beside": beside,
        "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "naive_entropy": lambda q, k, v: naive_attention_entropy(q, k, v),
    }
    rows = []
    torch.manual_seed(0)
    warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(600):  # about a second of matrix work: clocks up before the first timing
        warm @ warm
    torch.cuda.synchronize()
    del warm
    for heads in args.heads:
        for si, lq, lk in last_scale_shapes():
            q = torch.randn(2, heads, lq, 128, device="cuda", dtype=torch.bfloat16)
            k = F.normalize(torch.randn(2, heads, lk, 128, device="cuda"), dim=-1).to(torch.bfloat16)
            v = torch.randn(2, heads, lk, 128, device="cuda", dtype=torch.bfloat16)
            q = (F.normalize(q.float(), dim=-1) * 8.0).to(torch.bfloat16)  # cosine attention, scale ~ exp(2)
            row = {"heads": heads, "scale": si, "Lq": lq, "Lk": lk}
            with prefer_cudnn_attention():
                lse = sdpa_with_lse(q, k, v)[1]
            shape_variants = {**variants, "entropy_only": lambda q, k, v, lse=lse: lse_entropy(q, k, lse)}
            times = {name: [] for name in shape_variants}
            for r in range(args.rounds):
                for name, fn in shape_variants.items():
                    if name in row or (r > 0 and name == "naive_entropy"):
                        continue  # failed before, or the slow baseline already timed
                    try:
                        times[name].append(
                            triton.testing.do_bench(
                                partial(fn, q, k, v), warmup=25, rep=args.repeats, return_mode="median"
                            )
                        )
                    except Exception as err:  # a backend not available for this shape
                        row[name] = float("nan")
                        row[name + "_error"] = str(err).splitlines()[0][:120]
            for name, ts in times.items():
                if name not in row:
                    row[name] = statistics.median(ts)
                    row[name + "_rounds"] = ts
            out, ent = flash_attn_entropy(q, k, v)
            ref_out, ref_ent = attention_entropy_reference(q.double(), k.double(), v.double(), chunk=2048)
            row["err_out"], row["err_entropy"] = _rel(out, ref_out), _rel(ent, ref_ent)
            beside_out, beside_ent = beside(q, k, v)
            with prefer_cudnn_attention():
                plain = F.scaled_dot_product_attention(q, k, v)
            row["beside_out_identical"] = bool(torch.equal(beside_out, plain))
            row["err_entropy_beside"] = _rel(beside_ent, ref_ent)
            row["beside_overhead"] = row["beside"] / row["sdpa_cudnn"] - 1
            fastest_sdpa = min(row["sdpa_flash"], row["sdpa_cudnn"])
            row["fae_vs_best_sdpa"] = row["fae"] / fastest_sdpa
            row["entropy_overhead"] = row["fae"] / row["fae_no_entropy"] - 1
            row["naive_vs_fae"] = row["naive_entropy"] / row["fae"]
            rows.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    header = [
        "heads",
        "scale",
        "Lq",
        "Lk",
        "fae",
        "fae_no_entropy",
        "beside",
        "entropy_only",
        "sdpa_flash",
        "sdpa_cudnn",
        "naive_entropy",
        "fae_vs_best_sdpa",
        "entropy_overhead",
        "beside_overhead",
        "beside_out_identical",
        "naive_vs_fae",
        "err_out",
        "err_entropy",
        "err_entropy_beside",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in header]
        print("| " + " | ".join(cells) + " |")
    meta = {
        **run_record("python -m benchmarks.attention", device="cuda"),
        "rounds": args.rounds,
        "times": "median ms (triton.testing.do_bench, L2 flushed), median over rounds",
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
