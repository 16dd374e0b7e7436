"""Run by tests/test_fused_block.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported): the fused block kernels on CPU against their PyTorch references. Exits non-zero on failure."""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from toprovar.kernels.fused_block import LN_AFFINE, LN_MODULATE, LN_NONE, add_ln, add_ln_reference, qk_norm_rope  # noqa: E402
from toprovar.kernels.group_norm import group_norm_silu  # noqa: E402

torch.manual_seed(int(sys.argv[1]))
failures = []


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def comparable(name, a, b):
    """Whether a and b are tensors of one dtype and shape; a failure where they are not, unless
    both are None (an output neither side makes)."""
    if a is None or b is None:
        if not (a is None and b is None):
            failures.append(f"{name}: one output is None")
        return False
    if a.dtype != b.dtype or a.shape != b.shape:
        failures.append(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        return False
    return True


def check(name, a, b, tol):
    if not comparable(name, a, b):
        return
    e = rel(a, b)
    if not e <= tol:
        failures.append(f"{name}: rel {e:.2e} > {tol:.0e}")


for B, n, C in [(2, 5, 48), (1, 7, 40), (3, 1, 64)]:
    for xdt, ydt, out in [
        (torch.float32, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ]:
        x = torch.randn(B, n, C).to(xdt)
        y = torch.randn(B, n, C).to(ydt)
        ada = torch.randn(B, 1, 6, C)  # gamma/scale/shift as strided slices, as the block passes them
        g, s, t = ada[:, :, 0], ada[:, :, 3] * 0.1, ada[:, :, 5]
        w, bv = 1 + 0.1 * torch.randn(C), torch.randn(C)
        tol = 1e-5 if out == torch.float32 else 1e-2
        cases = [
            dict(y=y, gamma=g, round_yg=True, ln=LN_AFFINE, weight=w, bias=bv),
            dict(y=y, gamma=None, ln=LN_MODULATE, scale=s, shift=t),
            dict(y=y, gamma=g, round_yg=False, ln=LN_NONE),
            dict(y=None, ln=LN_MODULATE, scale=s, shift=t),
        ]
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
        qa = qk_norm_rope(qkv, H, hs, cos, sin, cache_k[:, :, 3 : 3 + n], cache_v[:, :, 3 : 3 + n], use_triton=True)
        qb = qk_norm_rope(qkv, H, hs, cos, sin, ref_k[:, :, 3 : 3 + n], ref_v[:, :, 3 : 3 + n], use_triton=False)
        tol = 1e-5 if dt == torch.float32 else 1e-2
        tag = f"qk_norm_rope {(B, n, H, D)} {dt} cos {tuple(cos.shape)}"
        check(tag + " q", qa, qb, tol)
        check(tag + " k", cache_k[:, :, 3 : 3 + n], ref_k[:, :, 3 : 3 + n], tol)
        check(tag + " v", cache_v[:, :, 3 : 3 + n], ref_v[:, :, 3 : 3 + n], 0.0)
        if not (cache_k[:, :, :3].isnan().all() and cache_k[:, :, 3 + n :].isnan().all()):
            failures.append(tag + ": wrote outside the cache slot")


def fa_check(name, out, ref, truth, atol=1e-6, bf16=False):
    """flash-attention's rule: |kernel - truth| <= 2 |reference in the same dtype - truth| + atol,
    max over elements, truth = the reference in float64. Where bf16 roundings are involved
    (`bf16`, or a bf16 output) the interpreter cannot follow it: it casts float32 -> bf16 toward
    zero (up to one ulp per rounding, all of one sign, where the GPU rounds to nearest), so there
    the check is the relative L2 error against the same-dtype reference (1e-2, as above) and the
    2x rule runs on the GPU (tests/test_fused_block.py::test_fused_rows_through_an_index_on_cuda)."""
    if not comparable(name, out, ref):
        return
    if truth is None:
        failures.append(f"{name}: one output is None")
        return
    if out.numel() == 0:
        return
    if bf16 or out.dtype == torch.bfloat16:
        check(name, out, ref, 1e-2)
        return
    err = (out.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    if not err <= 2 * err_ref + atol:
        failures.append(f"{name}: err {err:.2e} > 2 * {err_ref:.2e} + {atol:.0e}")


def f64(t):
    return t.double() if isinstance(t, torch.Tensor) else t


def truth_add_ln(x, y, gamma, ln_kw, **rows):
    """add_ln's reference in float64 (no intermediate rounding)."""
    kw = dict(ln=LN_NONE, weight=None, bias=None, scale=None, shift=None)
    kw.update({k: f64(v) for k, v in ln_kw.items()})
    return add_ln_reference(f64(x), f64(y), f64(gamma), round_yg=False, eps=1e-6, out_dtype=torch.float64, **kw, **rows)


# Rows through an index: the gather of a pruned block's kept tokens in its first stage, the scatter
# of its new residual rows in its last (index rows differ per image, as under a per-image plan).
for B, N, K, C in [(2, 9, 4, 48), (3, 5, 5, 40), (1, 16, 1, 64), (2, 7, 0, 32)]:
    for xdt, ydt, out in [
        (torch.float32, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ]:
        idx = torch.stack([torch.sort(torch.randperm(N)[:K]).values for _ in range(B)])
        xf = torch.randn(B, N, C).to(xdt)  # a scale's full hidden states
        y = torch.randn(B, K, C).to(ydt)
        ada = torch.randn(B, 1, 6, C)
        g, s, t = ada[:, :, 0], ada[:, :, 3] * 0.1, ada[:, :, 5]
        w, bv = 1 + 0.1 * torch.randn(C), torch.randn(C)
        ln_kw = [dict(ln=LN_MODULATE, scale=s, shift=t), dict(ln=LN_AFFINE, weight=w, bias=bv), dict(ln=LN_NONE)]
        for li, lk in enumerate(ln_kw):
            tag = f"add_ln gather ln{li} {(B, N, K, C)} {xdt} -> {out}"
            xa, ha = add_ln(xf, src_index=idx, eps=1e-6, out_dtype=out, use_triton=True, **lk)
            xb, hb = add_ln(xf, src_index=idx, eps=1e-6, out_dtype=out, use_triton=False, **lk)
            xt, ht = truth_add_ln(xf, None, None, lk, src_index=idx)
            fa_check(tag + " x", xa, xb, xt, atol=0.0)  # a copy: exact
            fa_check(tag + " h", ha, hb, ht, atol=1e-5, bf16=xdt == torch.bfloat16)
            # the last stage: residual + y*gamma, scattered into the full rows (others untouched)
            for kw in (dict(y=y, gamma=g, round_yg=True), dict(y=y, gamma=g), dict(y=y, gamma=None)):
                xc = torch.randn(B, K, C).to(xdt)
                res_dtype = xdt if kw.get("round_yg") and ydt == xdt else torch.float32
                dst_a = torch.randn(B, N, C).to(res_dtype)
                dst_b, dst_t = dst_a.clone(), dst_a.double()
                tag2 = f"add_ln scatter ln{li} {sorted(kw)} rnd={kw.get('round_yg', False)} {(B, N, K, C)} {xdt} {ydt}"
                ra, ha = add_ln(xc, dst=dst_a, dst_index=idx, eps=1e-6, out_dtype=out, use_triton=True, **kw, **lk)
                rb, hb = add_ln(xc, dst=dst_b, dst_index=idx, eps=1e-6, out_dtype=out, use_triton=False, **kw, **lk)
                rt, ht = truth_add_ln(xc, kw["y"], kw["gamma"], lk, dst=dst_t, dst_index=idx)
                if ra is not dst_a:
                    failures.append(tag2 + ": did not return dst")
                low = torch.bfloat16 in (xdt, ydt)
                fa_check(tag2 + " x", ra, rb, rt, atol=1e-6, bf16=low)
                fa_check(tag2 + " h", ha, hb, ht, atol=1e-5, bf16=low)
                untouched = torch.ones(B, N, dtype=torch.bool).scatter_(1, idx, False)
                if not torch.equal(dst_a[untouched], dst_b[untouched]):
                    failures.append(tag2 + ": wrote outside the indexed rows")

# q/k norm + RoPE with the RoPE rows through the kept tokens' index (no cos[keep] / sin[keep] gather).
for B, N, K, H, D in [(2, 12, 5, 3, 16), (1, 9, 9, 2, 32), (3, 4, 1, 4, 8)]:
    for dt in (torch.float32, torch.bfloat16):
        idx = torch.stack([torch.sort(torch.randperm(N)[:K]).values for _ in range(B)])
        qkv = torch.randn(B, K, 3 * H * D).to(dt)
        hs = torch.rand(1, H, 1, 1) * 3 + 1
        ang = torch.rand(N, D // 2) * 6
        cos, sin = ang.cos(), ang.sin()
        caches = [torch.full((B, H, K + 4, D), float("nan"), dtype=d) for d in (dt, dt, torch.float64)]
        vcaches = [torch.full((B, H, K + 4, D), float("nan"), dtype=d) for d in (dt, dt, torch.float64)]
        qs = [
            qk_norm_rope(
                q_in, H, h_in, cos_in, sin_in, c[:, :, 2 : 2 + K], v[:, :, 2 : 2 + K], rope_index=idx, use_triton=u
            )
            for q_in, h_in, cos_in, sin_in, c, v, u in zip(
                (qkv, qkv, qkv.double()),
                (hs, hs, hs.double()),
                (cos, cos, cos.double()),
                (sin, sin, sin.double()),
                caches,
                vcaches,
                (True, False, False),
            )
        ]
        tag = f"qk_norm_rope rope_index {(B, N, K, H, D)} {dt}"
        fa_check(tag + " q", qs[0], qs[1], qs[2], atol=1e-5)
        fa_check(
            tag + " k", caches[0][:, :, 2 : 2 + K], caches[1][:, :, 2 : 2 + K], caches[2][:, :, 2 : 2 + K], atol=1e-5
        )
        fa_check(
            tag + " v", vcaches[0][:, :, 2 : 2 + K], vcaches[1][:, :, 2 : 2 + K], vcaches[2][:, :, 2 : 2 + K], atol=0.0
        )
        if not (caches[0][:, :, :2].isnan().all() and caches[0][:, :, 2 + K :].isnan().all()):
            failures.append(tag + ": wrote outside the cache slot")

# A linear layer for few rows with LayerNorm before and GELU / residual after (toprovar.kernels.fused_linear).
from toprovar.kernels.fused_linear import ln_linear, ln_linear_reference  # noqa: E402

for B, n, K, N in [(2, 5, 64, 40), (3, 3, 40, 136)]:  # N past a tile, rows of several images
    for wdt in (torch.float32, torch.bfloat16):
        x = torch.randn(B, n, K) * 2 + 0.3
        weight = (torch.randn(N, K) / K**0.5).to(wdt)
        bias = (torch.randn(N) * 0.1).to(wdt)
        ada = torch.randn(B, 1, 6, max(K, N))
        lw, lb = 1 + 0.1 * torch.randn(K), 0.1 * torch.randn(K)
        lns = [
            dict(),
            dict(ln=LN_AFFINE, ln_weight=lw.to(wdt), ln_bias=lb.to(wdt)),
            dict(ln=LN_MODULATE, scale=ada[:, :, 1, :K] * 0.1, shift=ada[:, :, 2, :K]),
        ]
        residual = torch.randn(B, n, N)
        gamma = ada[:, :, 0, :N]
        ends = [
            dict(),
            dict(gelu=True),
            dict(residual=residual, gamma=gamma, round_yg=True),
            dict(residual=residual, gamma=gamma),
            dict(residual=residual),
        ]
        for li, lk in enumerate(lns):
            for ei, ek in enumerate(ends):
                xin = x if lk else x.to(wdt)  # without a LayerNorm the input comes in the weight dtype
                tag = f"ln_linear ln{li} end{ei} {(B, n, K, N)} {wdt}"
                a = ln_linear(xin, weight, bias, use_triton=True, **lk, **ek)
                r = ln_linear(xin, weight, bias, use_triton=False, **lk, **ek)
                t = ln_linear_reference(
                    xin.double(),
                    weight.double(),
                    bias.double(),
                    **{k: f64(v) for k, v in lk.items()},
                    **{k: f64(v) for k, v in ek.items()},
                )
                fa_check(tag, a, r, t, atol=1e-5, bf16=wdt == torch.bfloat16)

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
