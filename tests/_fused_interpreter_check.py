"""Run by tests/test_fused_block.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported): the fused block kernels on CPU against their PyTorch references. Exits non-zero on failure."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from kernels.fused_block import LN_AFFINE, LN_MODULATE, LN_NONE, add_ln, qk_norm_rope  # noqa: E402
from kernels.group_norm import group_norm_silu  # noqa: E402

torch.manual_seed(int(sys.argv[1]))
failures = []


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(name, a, b, tol):
    if a is None or b is None:
        if not (a is None and b is None):
            failures.append(f"{name}: one output is None")
        return
    if a.dtype != b.dtype or a.shape != b.shape:
        failures.append(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        return
    e = rel(a, b)
    if not e <= tol:
        failures.append(f"{name}: rel {e:.2e} > {tol:.0e}")


for B, n, C in [(2, 5, 48), (1, 7, 40), (3, 1, 64)]:
    for xdt, ydt, out in [(torch.float32, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.bfloat16),
                          (torch.bfloat16, torch.bfloat16, torch.bfloat16)]:
        x = torch.randn(B, n, C).to(xdt)
        y = torch.randn(B, n, C).to(ydt)
        ada = torch.randn(B, 1, 6, C)  # gamma/scale/shift as strided slices, as the block passes them
        g, s, t = ada[:, :, 0], ada[:, :, 3] * 0.1, ada[:, :, 5]
        w, bv = 1 + 0.1 * torch.randn(C), torch.randn(C)
        tol = 1e-5 if out == torch.float32 else 1e-2
        cases = [dict(y=y, gamma=g, round_yg=True, ln=LN_AFFINE, weight=w, bias=bv),
                 dict(y=y, gamma=None, ln=LN_MODULATE, scale=s, shift=t),
                 dict(y=y, gamma=g, round_yg=False, ln=LN_NONE),
                 dict(y=None, ln=LN_MODULATE, scale=s, shift=t)]
        for i, kw in enumerate(cases):
            tag = f"add_ln case {i} {(B, n, C)} {xdt} {ydt}"
            xa, ha = add_ln(x, eps=1e-6, out_dtype=out, use_triton=True, **kw)
            xb, hb = add_ln(x, eps=1e-6, out_dtype=out, use_triton=False, **kw)
            # The interpreter's float32 -> bf16 cast truncates (the GPU rounds to nearest): a rounded
            # bf16 product is only bf16-close here.
            exact = xa.dtype == torch.float32 and not (kw.get("round_yg") and ydt == torch.bfloat16)
            check(tag + " x", xa, xb, 1e-5 if exact else 1e-2)
            check(tag + " h", ha, hb, tol)

for B, n, H, D in [(2, 6, 3, 16), (1, 9, 2, 32), (2, 1, 4, 8)]:
    for dt in (torch.float32, torch.bfloat16):
        qkv = torch.randn(B, n, 3 * H * D).to(dt)
        hs = torch.rand(1, H, 1, 1) * 3 + 1
        ang = torch.rand(n, D // 2) * 6
        cos, sin = ang.cos(), ang.sin()
        if dt == torch.bfloat16:  # per-row RoPE (a pruned block's gathered tokens differ per row)
            ang = torch.rand(B, n, D // 2) * 6
            cos, sin = ang.cos(), ang.sin()
        cache_k = torch.full((B, H, n + 5, D), float("nan"), dtype=dt)
        cache_v = torch.full((B, H, n + 5, D), float("nan"), dtype=dt)
        ref_k, ref_v = cache_k.clone(), cache_v.clone()
        qa = qk_norm_rope(qkv, H, hs, cos, sin, cache_k[:, :, 3:3 + n], cache_v[:, :, 3:3 + n], use_triton=True)
        qb = qk_norm_rope(qkv, H, hs, cos, sin, ref_k[:, :, 3:3 + n], ref_v[:, :, 3:3 + n], use_triton=False)
        tol = 1e-5 if dt == torch.float32 else 1e-2
        tag = f"qk_norm_rope {(B, n, H, D)} {dt} cos {tuple(cos.shape)}"
        check(tag + " q", qa, qb, tol)
        check(tag + " k", cache_k[:, :, 3:3 + n], ref_k[:, :, 3:3 + n], tol)
        check(tag + " v", cache_v[:, :, 3:3 + n], ref_v[:, :, 3:3 + n], 0.0)
        if not (cache_k[:, :, :3].isnan().all() and cache_k[:, :, 3 + n:].isnan().all()):
            failures.append(tag + ": wrote outside the cache slot")

for N, C, H, W, G in [(1, 32, 7, 9, 8), (2, 48, 5, 4, 4), (1, 64, 11, 13, 32)]:
    for dt in (torch.float32, torch.bfloat16):
        x = (torch.randn(N, C, H, W) * 3 + 1).to(dt).contiguous(memory_format=torch.channels_last)
        w, bv = 1 + 0.1 * torch.randn(C), 0.1 * torch.randn(C)
        for silu in (True, False):
            a = group_norm_silu(x, G, w, bv, 1e-6, silu=silu, use_triton=True)
            ref = group_norm_silu(x.float(), G, w, bv, 1e-6, silu=silu, use_triton=False)
            tag = f"group_norm_silu {(N, C, H, W, G)} {dt} silu={silu}"
            if not a.is_contiguous(memory_format=torch.channels_last) or a.dtype != dt:
                failures.append(tag + ": output layout / dtype")
            e = rel(a, ref)
            if not e <= (1e-5 if dt == torch.float32 else 1e-2):
                failures.append(f"{tag}: rel {e:.2e}")

print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
