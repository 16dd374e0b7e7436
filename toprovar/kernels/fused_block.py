"""Fused elementwise stages of one Infinity transformer block, with plain-PyTorch references.

Two kernels cover every elementwise stage between the matrix products of a block (the residual
stream is float32, the matrix products bf16 under the CUDA recipe):

* `add_ln(x, y, gamma, ...)` -> `(x + y*gamma, LN(x + y*gamma) (affine | AdaLN-modulated))`:
  residual update and the next LayerNorm in one pass over a row. `round_yg` rounds `y*gamma` to
  y's dtype before the add (the official `proj(...).mul_(gamma1)` keeps bf16).
* `qk_norm_rope(qkv, ...)`: split the fused QKV projection, L2-normalize q and k, scale q by the
  per-head temperature, rotate q and k with 2D RoPE, write q `(B, H, n, D)` and k, v straight
  into their KV-cache slot.

Rows through an index (pruned blocks run the kept tokens of a scale): `add_ln(..., src_index=keep)`
reads row r of image b from `x[b, keep[b, r]]` (the gather of the kept tokens, done by the first
stage of the block, which writes the compact copy it read), `add_ln(..., dst=x, dst_index=keep)`
writes the new residual rows back into `x[b, keep[b, r]]` (the scatter, done by the last stage),
and `qk_norm_rope(..., rope_index=keep)` reads the RoPE row of each kept token from the scale's
table. So a pruned block runs no separate gather, scatter or RoPE-select kernel.

Dispatch: Triton on CUDA tensors (when triton imports), the references everywhere else. The
references are the exact op sequences of `toprovar.models.transformer.CrossAttnBlock.forward`
(same ops, same order), so on CPU the fused block path is bit-identical to the plain one; on CUDA
the kernels differ from the eager ops by float32 rounding inside a row (reduction order, fused
multiply-add) before the bf16 rounding of their outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # triton is optional (CPU-only installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

LN_NONE, LN_AFFINE, LN_MODULATE = 0, 1, 2


# ---------------------------------------------------------------------------------- references


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """`x[b, index[b, r]]`: x `(B, N, C)`, index `(B, K)` -> `(B, K, C)` (the block's token gather)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_rows(dst: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """`dst[b, index[b, r]] = rows[b, r]` in place; returns dst (the block's token scatter)."""
    return dst.scatter_(1, index[..., None].expand(-1, -1, dst.shape[-1]), rows)


def add_ln_reference(
    x: Tensor,
    y: Tensor | None,
    gamma: Tensor | None,
    *,
    round_yg: bool,
    ln: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    src_index: Tensor | None = None,
    dst: Tensor | None = None,
    dst_index: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The eager ops of the block; x `(B, n, C)`, gamma/scale/shift `(B, 1, C)`; rows through
    `src_index` / into `dst` at `dst_index` as `add_ln` documents."""
    if src_index is not None:
        x = gather_rows(x, src_index)
    if y is not None:
        if gamma is None:
            x = x + y.float()
        elif round_yg:
            x = x + y.mul(gamma).to(y.dtype)
        else:
            x = x + y.mul(gamma)
    h = None
    c = x.shape[-1]
    if ln == LN_AFFINE:
        h = F.layer_norm(x.float(), (c,), weight.float(), bias.float(), eps)
    elif ln == LN_MODULATE:
        h = F.layer_norm(x.float(), (c,), eps=eps).mul(scale.add(1)).add_(shift)
    if dst_index is not None:
        x = scatter_rows(dst, dst_index, x)
    return x, (None if h is None else h.to(out_dtype))


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of the last dim in float32 (same ops as transformer.apply_rope)."""
    with torch.autocast(x.device.type, enabled=False):
        pairs = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*x.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).reshape(x.shape)


def qk_norm_rope_reference(
    qkv: Tensor,
    num_heads: int,
    head_scale: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_dst: Tensor,
    v_dst: Tensor,
    eps: float = 1e-12,
    rope_index: Tensor | None = None,
) -> Tensor:
    """qkv `(B, n, 3C)`; head_scale `(1, H, 1, 1)`; cos/sin `(n, D/2)` or per row `(B, n, D/2)`
    (with rope_index `(B, n)`: the rows `cos[rope_index]` of a `(N, D/2)` table); k_dst/v_dst `(B, H, n, D)`."""
    if rope_index is not None:
        cos, sin = cos[rope_index], sin[rope_index]
    b, n, c3 = qkv.shape
    d = c3 // 3 // num_heads
    q, k, v = qkv.view(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    q = F.normalize(q, dim=-1, eps=eps).mul(head_scale)
    k = F.normalize(k, dim=-1, eps=eps)
    cos, sin = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos[None, None], sin[None, None])
    q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    k_dst.copy_(k)
    v_dst.copy_(v)
    return q.to(v_dst.dtype)


# ---------------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _add_ln_kernel(
        X,
        Y,
        G,
        XO,
        H,
        W,
        BV,
        S,
        T,
        SRC,
        DST,
        n_per_b,
        x_rows,
        xo_rows,
        C,
        eps,
        g_sb,
        s_sb,
        t_sb,
        src_sb,
        dst_sb,
        HAS_Y: tl.constexpr,
        HAS_G: tl.constexpr,
        ROUND_YG: tl.constexpr,
        LN: tl.constexpr,
        GATHER: tl.constexpr,
        SCATTER: tl.constexpr,
        WRITE_X: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One row per program: row i of image b; x's row comes through SRC (gather) and the new
        # residual goes through DST (scatter) when given, y and h are always compact.
        r = tl.program_id(0).to(tl.int64)
        b = r // n_per_b
        i = r % n_per_b
        if GATHER:
            x_row = b * x_rows + tl.load(SRC + b * src_sb + i)
        else:
            x_row = r
        if SCATTER:
            xo_row = b * xo_rows + tl.load(DST + b * dst_sb + i)
        else:
            xo_row = r
        cols = tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(X + x_row * C + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(Y + r * C + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_G:
                g = tl.load(G + b * g_sb + cols, mask=m, other=0.0)
                y = y * g
                if ROUND_YG:
                    y = y.to(Y.dtype.element_ty).to(tl.float32)
            x = x + y
        if WRITE_X:
            xs = x.to(XO.dtype.element_ty)
            tl.store(XO + xo_row * C + cols, xs, mask=m)
            x = xs.to(tl.float32)
        if LN != 0:
            mean = tl.sum(x, axis=0) / C
            d = tl.where(m, x - mean, 0.0)
            var = tl.sum(d * d, axis=0) / C
            h = d * (1.0 / tl.sqrt(var + eps))
            if LN == 1:
                w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
                bv = tl.load(BV + cols, mask=m, other=0.0).to(tl.float32)
                h = h * w + bv
            else:
                s = tl.load(S + b * s_sb + cols, mask=m, other=0.0)
                t = tl.load(T + b * t_sb + cols, mask=m, other=0.0)
                h = h * (s + 1.0) + t
            tl.store(H + r * C + cols, h.to(H.dtype.element_ty), mask=m)

    @triton.jit
    def _qk_norm_rope_kernel(
        QKV,
        HS,
        COS,
        SIN,
        RIDX,
        QO,
        KD,
        VD,
        n,
        NH,
        C,
        eps,
        cs_sb,
        ridx_sb,
        k_sb,
        k_sh,
        k_sl,
        v_sb,
        v_sh,
        v_sl,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        ROPE_INDEX: tl.constexpr,
    ):
        # One token row (all heads) per program. Every load and store is contiguous along the head
        # dim: RoPE's pair partner comes from a second load at the pair-swapped offsets (d ^ 1),
        # y[d] = cos[d // 2] * x[d] + sign(d) * sin[d // 2] * x[d ^ 1], sign = -1 for even d.
        r = tl.program_id(0).to(tl.int64)
        b = r // n
        i = r % n
        HALF: tl.constexpr = HEAD_DIM // 2
        hh = tl.arange(0, BLOCK_H)[:, None]
        dd = tl.arange(0, HEAD_DIM)[None, :]
        mh = hh < NH
        partner = dd ^ 1
        if ROPE_INDEX:  # the token's row of the scale's RoPE table (a pruned block's kept token)
            cs_row = tl.load(RIDX + b * ridx_sb + i)
        else:
            cs_row = b * cs_sb + i
        cos = tl.load(COS + cs_row * HALF + dd // 2)
        sin = tl.load(SIN + cs_row * HALF + dd // 2)
        sin = tl.where((dd % 2) == 1, sin, -sin)
        base = QKV + r * 3 * C + hh * HEAD_DIM
        # q: normalize, per-head temperature, rotate
        q = tl.load(base + dd, mask=mh, other=0.0).to(tl.float32)
        qp = tl.load(base + partner, mask=mh, other=0.0).to(tl.float32)
        qn = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), eps)[:, None]
        hs = tl.load(HS + hh, mask=mh, other=0.0)
        q = q / qn * hs
        qp = qp / qn * hs
        tl.store(QO + (r * NH + hh) * HEAD_DIM + dd, (cos * q + sin * qp).to(QO.dtype.element_ty), mask=mh)
        # k: normalize, rotate, into the cache slot
        k = tl.load(base + C + dd, mask=mh, other=0.0).to(tl.float32)
        kp = tl.load(base + C + partner, mask=mh, other=0.0).to(tl.float32)
        kn = tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)[:, None]
        k = k / kn
        kp = kp / kn
        tl.store(KD + b * k_sb + hh * k_sh + i * k_sl + dd, (cos * k + sin * kp).to(KD.dtype.element_ty), mask=mh)
        # v: copy into the cache slot
        v = tl.load(base + 2 * C + dd, mask=mh, other=0.0)
        tl.store(VD + b * v_sb + hh * v_sh + i * v_sl + dd, v.to(VD.dtype.element_ty), mask=mh)


def triton_available(t: Tensor) -> bool:
    return triton is not None and t.is_cuda


def _rows_vec(v: Tensor | None, rows: int, c: int, dummy: Tensor) -> tuple[Tensor, int]:
    """gamma/scale/shift `(B, 1, C)` or `(B, C)` -> float32 `(B, C)` with unit stride along C (a
    view when it already is one, e.g. a slice of the block's AdaLN tensor) and its row stride."""
    if v is None:
        return dummy, 0
    v = v.reshape(rows, c)
    if v.dtype != torch.float32 or v.stride(1) != 1:
        v = v.float().contiguous()
    return v, v.stride(0)


def _index_rows(index: Tensor | None, rows: int, dummy: Tensor) -> tuple[Tensor, int]:
    """A `(B, K)` row index with unit stride along K (a view of a pruner's plan table usually is
    one) as int64, and its row stride."""
    if index is None:
        return dummy, 0
    if index.dtype != torch.int64 or index.stride(-1) != 1:
        index = index.to(torch.int64).contiguous()
    return index, (index.stride(0) if rows > 1 else 0)


def add_ln(
    x: Tensor,
    y: Tensor | None = None,
    gamma: Tensor | None = None,
    *,
    round_yg: bool = False,
    ln: int = LN_NONE,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype = torch.float32,
    src_index: Tensor | None = None,
    dst: Tensor | None = None,
    dst_index: Tensor | None = None,
    use_triton: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """x `(B, n, C)` (float32 or bf16), y `(B, n, C)` or None; gamma/scale/shift `(B, 1, C)`.

    Returns `(x + y*gamma` (float32, or bf16 where the eager ops keep bf16: bf16 x plus a rounded
    bf16 product; x itself when y is None), the LayerNorm of it in `out_dtype` or None when
    `ln == LN_NONE`).
    src_index `(B, K)`: the rows are `x[b, src_index[b, r]]` of a `(B, N, C)` x (y and the
    LayerNorm have K rows); the first result is then the compact `(B, K, C)` rows (a copy even
    when y is None). dst `(B, N, C)` with dst_index `(B, K)`: the first result is written into
    `dst[b, dst_index[b, r]]` in place (dst must have its dtype) and dst is returned.
    """
    if (dst is None) != (dst_index is None):
        raise ValueError("add_ln: give dst and dst_index together")
    if use_triton is None:
        use_triton = triton_available(x)
    if not use_triton:
        return add_ln_reference(
            x,
            y,
            gamma,
            round_yg=round_yg,
            ln=ln,
            weight=weight,
            bias=bias,
            scale=scale,
            shift=shift,
            eps=eps,
            out_dtype=out_dtype,
            src_index=src_index,
            dst=dst,
            dst_index=dst_index,
        )
    b, x_rows, c = x.shape
    n = x_rows if src_index is None else src_index.shape[1]
    x = x.contiguous()
    # Residual dtype as the eager ops give it: bf16 + round(bf16 * gamma) stays bf16, else float32.
    res_dtype = x.dtype if y is None or (round_yg and y.dtype == x.dtype) else torch.float32
    write_x = y is not None or src_index is not None or dst is not None
    if dst is not None:
        if dst.dtype != res_dtype or not dst.is_contiguous() or dst.shape[0] != b or dst.shape[2] != c:
            raise ValueError(f"add_ln: dst {dst.dtype}{tuple(dst.shape)} cannot take {res_dtype} rows of width {c}")
        xo = dst
    elif write_x:
        xo = torch.empty((b, n, c), dtype=res_dtype, device=x.device)
    else:
        xo = x
    h = torch.empty((b, n, c), dtype=out_dtype, device=x.device) if ln != LN_NONE else None
    dummy = x
    block = triton.next_power_of_2(c)
    g, g_sb = _rows_vec(gamma, b, c, dummy)
    sc, s_sb = _rows_vec(scale, b, c, dummy)
    sh, t_sb = _rows_vec(shift, b, c, dummy)
    src, src_sb = _index_rows(src_index, b, dummy)
    dsti, dst_sb = _index_rows(dst_index, b, dummy)
    if b * n:
        _add_ln_kernel[(b * n,)](
            x,
            y.contiguous() if y is not None else dummy,
            g,
            xo,
            h if h is not None else dummy,
            weight if weight is not None else dummy,
            bias if bias is not None else dummy,
            sc,
            sh,
            src,
            dsti,
            n,
            x_rows,
            xo.shape[1],
            c,
            eps,
            g_sb,
            s_sb,
            t_sb,
            src_sb,
            dst_sb,
            HAS_Y=y is not None,
            HAS_G=gamma is not None,
            ROUND_YG=round_yg,
            LN=ln,
            GATHER=src_index is not None,
            SCATTER=dst is not None,
            WRITE_X=write_x,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return xo, h


def qk_norm_rope(
    qkv: Tensor,
    num_heads: int,
    head_scale: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_dst: Tensor,
    v_dst: Tensor,
    eps: float = 1e-12,
    rope_index: Tensor | None = None,
    use_triton: bool | None = None,
) -> Tensor:
    """qkv `(B, n, 3C)` -> q `(B, H, n, D)` in k_dst's dtype; k, v written into `k_dst`/`v_dst`.

    head_scale: `(1, H, 1, 1)` per-head temperature (already exp'ed; float32 spares the kernel
    path a conversion per call); cos/sin `(n, D/2)` float32, or `(B, n, D/2)` when the rows hold
    different tokens, or with rope_index `(B, n)` the `(N, D/2)` table of the scale whose rows
    `rope_index[b, r]` the tokens are (pruned blocks run gathered tokens);
    k_dst/v_dst: `(B, H, n, D)` views with unit stride along D (a KV-cache slot).
    """
    if use_triton is None:
        use_triton = triton_available(qkv)
    if not use_triton:
        return qk_norm_rope_reference(qkv, num_heads, head_scale, cos, sin, k_dst, v_dst, eps, rope_index)
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    if k_dst.stride(-1) != 1 or v_dst.stride(-1) != 1:
        raise ValueError("k_dst / v_dst need unit stride along the head dim")
    qkv = qkv.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    cs_rows = cos.shape[1] if cos.dim() == 3 and rope_index is None else 0  # table rows per image
    ridx, ridx_sb = _index_rows(rope_index, b, cos)
    # q is stored (B, n, H, D) and returned as a (B, H, n, D) view: attention kernels take it as
    # is and give their output in the same layout, so merging the heads afterwards is free.
    q = torch.empty((b, n, num_heads, d), dtype=k_dst.dtype, device=qkv.device)
    if b * n:
        _qk_norm_rope_kernel[(b * n,)](
            qkv,
            head_scale.reshape(num_heads).float().contiguous(),
            cos,
            sin,
            ridx,
            q,
            k_dst,
            v_dst,
            n,
            num_heads,
            c,
            eps,
            cs_rows,
            ridx_sb,
            k_dst.stride(0),
            k_dst.stride(1),
            k_dst.stride(2),
            v_dst.stride(0),
            v_dst.stride(1),
            v_dst.stride(2),
            HEAD_DIM=d,
            BLOCK_H=triton.next_power_of_2(num_heads),
            ROPE_INDEX=rope_index is not None,
            num_warps=8 if num_heads * d >= 4096 else 4,
        )
    return q.transpose(1, 2)


__all__ = [
    "add_ln",
    "qk_norm_rope",
    "add_ln_reference",
    "qk_norm_rope_reference",
    "gather_rows",
    "scatter_rows",
    "triton_available",
    "LN_NONE",
    "LN_AFFINE",
    "LN_MODULATE",
]
