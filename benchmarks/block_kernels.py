"""Count the kernel launches of one transformer block on the fast path, on a CPU.

    python -m benchmarks.block_kernels              # a table: launches per block / per scale, per variant
    python -m benchmarks.block_kernels --ops        # also every launch site, in order

The GPU recipe of the fused stages (bf16 linear inputs, the FFN's GELU in the matmul epilogue,
the Triton kernels) is taken on CPU tensors: `_gpu_recipe` and `triton_available` are patched to
say yes and the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set here). Each
Triton launch counts one; each ATen op that does work counts one (views, `empty` and other
metadata ops count none), which is what they launch on CUDA: a linear layer with its bias is one
cuBLASLt call, SDPA one cuDNN kernel, the entropy kernel one Triton kernel. What this cannot
see: cuBLAS's choice of a split-K reduction (a second kernel for some small-M products) and
kernels inside cuDNN's graph; both are the same for every variant here.

Shapes are small (C = 64, 2 heads, 2 rows, 16 tokens) and do not change the count.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# ATen ops that launch nothing on CUDA (views, metadata, allocation).
NO_KERNEL = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "as_strided",
    "alias",
    "detach",
    "unbind",
    "split",
    "split_with_sizes",
    "_reshape_alias",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "lift_fresh_copy",
    "_to_copy_noop",
    "is_same_size",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "_local_scalar_dense_noop",
}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in NO_KERNEL:
            self.sites.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def counting():
    """Yields the list of launch sites of everything run inside (Triton launches by kernel name)."""
    import triton.runtime.interpreter as interp

    import toprovar.attention as att
    import toprovar.kernels.fused_block as fb
    import toprovar.kernels.fused_linear as fl
    import toprovar.models.transformer as tr

    counter = _Counter()
    run = interp.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        counter.sites.append(f"triton.{self.fn.__name__}")
        counter.paused += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    fae = att.flash_attn_entropy

    def counted_fae(q, k, v, scale=None):  # one Triton kernel on CUDA; its CPU reference is a loop of ops
        counter.sites.append("triton._fae_kernel")
        counter.paused += 1
        try:
            return fae(q, k, v, scale=scale)
        finally:
            counter.paused -= 1

    patches = [
        (interp.InterpretedFunction, "run", counted_run),
        (fb, "triton_available", lambda t: True),
        (fl, "triton_available", lambda t: True),
        (tr, "_gpu_recipe", lambda t: True),
        (att, "flash_attn_entropy", counted_fae),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        with counter:
            yield counter.sites
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def build(depth: int = 3, rows: int = 2, n: int = 16, c: int = 64, heads: int = 2, text: int = 5):
    """Blocks of a small config in bf16 on CPU, with their inputs (the GPU recipe's dtypes)."""
    from toprovar.models.transformer import InfinityTransformer, RopeSlice, TextKV, TransformerConfig, random_state_dict

    cfg = TransformerConfig(
        depth=depth,
        embed_dim=c,
        num_heads=heads,
        codebook_dim=8,
        text_channels=32,
        text_maxlen=8,
        pool_head_dim=16,
        block_chunks=1,
    )
    model = InfinityTransformer(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=0))
    model.eval().requires_grad_(False)
    model.blocks.bfloat16()
    gen = torch.Generator().manual_seed(0)
    d = c // heads
    gss = torch.randn(rows, 1, 6, c, generator=gen) * 0.1
    texts = [
        TextKV(
            torch.randn(rows, heads, text, d, generator=gen).bfloat16(),
            torch.randn(rows, heads, text, d, generator=gen).bfloat16(),
            None,
        )
        for _ in range(depth)
    ]
    rope = model.rope_table([(1, 1, 1), (1, 4, 4)], "cpu")
    return {
        "model": model,
        "x": torch.randn(rows, n, c, generator=gen),
        "ada": [b.ada(gss) for b in model.blocks],
        "text": texts,
        "rope": RopeSlice(rope[0, 1 : 1 + n], rope[1, 1 : 1 + n]),
        "n": n,
        "rows": rows,
    }


def launches(fn: Callable[[], Callable[[], object]]) -> list[str]:
    """Launch sites of the callable that `fn()` prepares (the preparation and one warm-up call,
    which makes the blocks' cached constants, are not counted)."""
    with torch.no_grad(), counting() as sites:
        fn()()
        run = fn()
        del sites[:]
        run()
    return list(sites)


VARIANTS = {
    "fused stages (defaults)": {},
    "+ index_io": {"index_io": True},
    "+ chain_blocks": {"chain": True},
    "+ index_io + chain_blocks": {"index_io": True, "chain": True},
    "+ index_io + chain_blocks + small_m_rows": {"index_io": True, "chain": True, "small_m_rows": 10**6},
}


def scenarios(env: dict, index_io: bool = False, chain: bool = False, small_m_rows: int = 0) -> dict[str, list[str]]:
    """Launch sites of the cases of one variant: a block alone (unpruned, probe with entropy,
    pruned to half the tokens) and chains of every block of `env` (unpruned; pruned, each block
    the same kept tokens; pruned, each block other kept tokens), as the planned units run them.
    small_m_rows counts for the unpruned cases only (a scale of few rows is an early, unpruned one)."""
    from toprovar.fast import FastOptions
    from toprovar.fast.blocks import FastStep, run_fast_blocks

    model, x, n, rows = env["model"], env["x"], env["n"], env["rows"]
    depth = len(model.blocks)
    half = torch.arange(0, n, 2).expand(rows, -1)
    other = [torch.arange(j % 2, n, 2).expand(rows, -1) for j in range(depth)]  # alternating rows

    def run(keeps, entropy=(), blocks=None):
        blocks = range(depth) if blocks is None else blocks
        small = small_m_rows if not entropy and all(k is None for k in keeps) else 0  # pruned scales have many rows

        def prepare():
            cache, xs = model.new_cache(rows, 4 * n, torch.bfloat16, "cpu"), x.clone()
            cache.set_fill(0)
            steps = [
                FastStep(model.blocks[li], env["ada"][li], env["text"][li], cache[li], keeps[j], j in entropy)
                for j, li in enumerate(blocks)
            ]
            return lambda: run_fast_blocks(
                steps, xs, env["rope"], FastOptions(index_io=index_io, chain_blocks=chain, small_m_rows=small)
            )

        return prepare

    return {
        "unpruned block": launches(run([None], blocks=[0])),
        "probe block (entropy)": launches(run([None], entropy={0}, blocks=[0])),
        "pruned block": launches(run([half], blocks=[0])),
        f"{depth} unpruned blocks": launches(run([None] * depth)),
        f"{depth} pruned blocks, same tokens": launches(run([half] * depth)),
        f"{depth} pruned blocks, other tokens each": launches(run(other)),
    }


def head_launches(env: dict) -> list[str]:
    """The head unit of a scale: AdaLN before the head, the head, guidance, top-k/top-p, softmax."""
    from toprovar.sampling import GuidedSampling

    model, x, rows = env["model"], env["x"], env["rows"]
    sampling = GuidedSampling.per_scale(3.0, 1.0, 2, 900, 0.97)
    cond = torch.randn(rows, x.shape[-1])
    return launches(lambda: lambda: sampling.probs(model.logits(x, cond), 1, rows // 2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", action="store_true", help="print every launch site")
    ap.add_argument("--depth", type=int, default=32, help="blocks per scale for the per-scale column (2B: 32)")
    args = ap.parse_args(argv)
    env = build(depth=4)
    head = head_launches(env)
    results = {name: scenarios(env, **kw) for name, kw in VARIANTS.items()}
    cases = list(next(iter(results.values())))
    print(
        "Launches (kernels on CUDA) per case; chains of 4 blocks as a planned unit runs them, with the per-block "
        f"mean in brackets. Head unit of a scale: {len(head)}. small_m_rows applies to unpruned blocks of few rows "
        "(the small scales); the 'unpruned scale' column is then such a scale.\n"
    )
    print(
        "| variant | " + " | ".join(cases) + f" | unpruned scale, depth {args.depth} + head "
        f"| pruned scale (probe + {args.depth - 1} pruned, same tokens) + head |"
    )
    print("|---|" + "---:|" * (len(cases) + 2))
    for name, res in results.items():
        cells = []
        for case in cases:
            k = len(res[case])
            blocks = int(case.split()[0]) if case[0].isdigit() else 1
            cells.append(f"{k}" if blocks == 1 else f"{k} ({k / blocks:.2f})")
        per = {c: len(res[c]) / (int(c.split()[0]) if c[0].isdigit() else 1) for c in cases}
        unpruned = per[cases[3]] * args.depth + len(head)
        pruned = per[cases[1]] + per[cases[4]] * (args.depth - 1) + len(head)
        print(f"| {name} | " + " | ".join(cells) + f" | {unpruned:.0f} | {pruned:.0f} |")
    if args.ops:
        for name, res in results.items():
            for case, sites in res.items():
                print(f"\n{name}, {case}:")
                for site, k in Counter(sites).items():
                    print(f"  {k} x {site}")
        print("\nhead unit:")
        for site, k in Counter(head).items():
            print(f"  {k} x {site}")


if __name__ == "__main__":
    main()
