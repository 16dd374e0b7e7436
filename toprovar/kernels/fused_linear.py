"""A linear layer for few rows with its neighbours fused in: LayerNorm before, GELU and residual after.

`ln_linear(x, weight, bias, ...)` = the eager ops of a transformer block around one matrix product:

    a   = x                                   (ln = LN_NONE)
        = LN(x)·w + b  |  LN(x)·(1 + scale) + shift, rounded to the weight dtype  (LN_AFFINE | LN_MODULATE)
    y   = a @ weightᵀ + bias  (float32 accumulator), GELU-tanh of it when `gelu`, rounded to the weight dtype
    out = y                                   (no residual)
        = residual + y·gamma  (rounded to y's dtype first when `round_yg`), or residual + y without gamma

For the small scales of next-scale generation (1–64 tokens, ×2 rows under guidance) a block is
~12 kernels that each read little: the cost of such a scale is launches and weight streaming
(docs/benchmarks.md, "fixed cost of a scale"). With this kernel a block is 9 (LayerNorm + QKV,
q/k norm + RoPE, attention, output projection + residual, LayerNorm + cross-attention query,
cross-attention, its projection + residual, LayerNorm + fc1 + GELU, fc2 + residual). Each
program computes a `BLOCK_M × BLOCK_N` tile over the whole K and recomputes the LayerNorm
statistics of its rows (two passes over x, as `F.layer_norm`): cheap for few rows, wasteful for
many, so the caller uses it only below a row threshold (`FastOptions.small_m_rows`).

Cautions: the weights are read once per row tile, so `BLOCK_M` covers all rows up to 64; more
rows re-read the weights (cuBLAS is the better choice there). float32 weights use IEEE dots (no
TF32); so does the Triton interpreter for bf16 (its bf16 dot is wrong). The references are the
exact eager op sequences (`F.layer_norm`, `F.linear`, `F.gelu`), so on CPU a block built from
these is bit-identical to `CrossAttnBlock.forward`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from toprovar.kernels.fused_block import LN_AFFINE, LN_MODULATE, LN_NONE, add_ln_reference, triton_available

try:  # triton is optional (CPU-only installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None


def ln_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    ln: int = LN_NONE,
    ln_weight: Tensor | None = None,
    ln_bias: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    eps: float = 1e-6,
    gelu: bool = False,
    residual: Tensor | None = None,
    gamma: Tensor | None = None,
    round_yg: bool = False,
) -> Tensor:
    """The eager ops (see the module docstring); x `(B, n, K)`, scale/shift/gamma `(B, 1, ·)`."""
    a = x
    if ln != LN_NONE:
        _, a = add_ln_reference(
            x,
            None,
            None,
            round_yg=False,
            ln=ln,
            weight=ln_weight,
            bias=ln_bias,
            scale=scale,
            shift=shift,
            eps=eps,
            out_dtype=weight.dtype,
        )
    y = F.linear(a, weight, bias)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if residual is None:
        return y
    out, _ = add_ln_reference(
        residual,
        y,
        gamma,
        round_yg=round_yg,
        ln=LN_NONE,
        weight=None,
        bias=None,
        scale=None,
        shift=None,
        eps=eps,
        out_dtype=torch.float32,
    )
    return out


if triton is not None:
    # Rows and tokens per image change with every scale: no recompilation for their values.
    @triton.jit(do_not_specialize=["M", "n_per_b"])
    def _ln_linear_kernel(
        X,
        W,
        BIAS,
        LW,
        LB,
        S,
        T,
        R,
        G,
        OUT,
        M,
        N,
        K,
        n_per_b,
        eps,
        s_sb,
        t_sb,
        g_sb,
        LN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        RESIDUAL: tl.constexpr,
        HAS_G: tl.constexpr,
        ROUND_YG: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        rk = tl.arange(0, BLOCK_K)
        b = rm // n_per_b  # the image row of each token row (AdaLN vectors, gamma)
        if LN != 0:  # the LayerNorm statistics of these rows, two passes as F.layer_norm
            acc_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mk = (k0 + rk) < K
                xk = tl.load(X + rm[:, None] * K + (k0 + rk)[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
                acc_s += tl.sum(xk.to(tl.float32), axis=1)
            mean = acc_s / K
            acc_v = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mk = (k0 + rk) < K
                xk = tl.load(X + rm[:, None] * K + (k0 + rk)[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
                d = tl.where(mk[None, :], xk.to(tl.float32) - mean[:, None], 0.0)
                acc_v += tl.sum(d * d, axis=1)
            rstd = 1.0 / tl.sqrt(acc_v / K + eps)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mk = (k0 + rk) < K
            a = tl.load(X + rm[:, None] * K + (k0 + rk)[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            if LN != 0:
                h = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
                if LN == 1:
                    lw = tl.load(LW + k0 + rk, mask=mk, other=0.0).to(tl.float32)
                    lb = tl.load(LB + k0 + rk, mask=mk, other=0.0).to(tl.float32)
                    h = h * lw[None, :] + lb[None, :]
                else:
                    s = tl.load(S + b[:, None] * s_sb + (k0 + rk)[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
                    t = tl.load(T + b[:, None] * t_sb + (k0 + rk)[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
                    h = h * (s + 1.0) + t
                a = tl.where(mk[None, :], h, 0.0)
            a = a.to(W.dtype.element_ty)
            w = tl.load(W + rn[:, None] * K + (k0 + rk)[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
            if IEEE:  # float32 weights, or the interpreter (its bf16 dot is wrong: float32 of bf16 values is exact)
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        if GELU:  # tanh-GELU on the float32 accumulator (as cuBLASLt's epilogue); tanh(u) = 1 - 2 / (e^2u + 1)
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        y = acc.to(W.dtype.element_ty)
        out_mask = mm[:, None] & mn[None, :]
        if RESIDUAL:
            yf = y.to(tl.float32)
            if HAS_G:
                g = tl.load(G + b[:, None] * g_sb + rn[None, :], mask=out_mask, other=0.0)
                yf = yf * g
                if ROUND_YG:
                    yf = yf.to(W.dtype.element_ty).to(tl.float32)
            r = tl.load(R + rm[:, None] * N + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
            tl.store(OUT + rm[:, None] * N + rn[None, :], (r + yf).to(OUT.dtype.element_ty), mask=out_mask)
        else:
            tl.store(OUT + rm[:, None] * N + rn[None, :], y, mask=out_mask)


# triton 3.9's interpreter returns garbage from a bf16 tl.dot (1e10 off; float32 dots are right).
_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _per_row(v: Tensor | None, rows: int, dummy: Tensor) -> tuple[Tensor, int]:
    """`(B, 1, C)` / `(B, C)` float32 with unit stride along C (a view when it is one), row stride."""
    if v is None:
        return dummy, 0
    v = v.reshape(rows, v.shape[-1])
    if v.dtype != torch.float32 or v.stride(-1) != 1:
        v = v.float().contiguous()
    return v, v.stride(0)


def launch_config(m: int, n: int) -> dict[str, int]:
    """Tiles: all rows (up to 64) in one row tile, so each weight is read once; column tiles small
    enough that the grid has ~128+ programs to stream the weights (a 2048-wide output: 128 of 16)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 16 if n <= 2048 else (32 if n <= 4096 else 64)
    # Three stages of the 64 x 64 tile with the LayerNorm prologue ask 248 KiB of shared memory, more
    # than Hopper's 227 KiB (H100, triton 3.6: OutOfResources at 37-64 rows into 8192 columns).
    stages = 2 if block_m * block_n >= 64 * 64 else 3
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "num_warps": 4, "num_stages": stages}


def ln_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    ln: int = LN_NONE,
    ln_weight: Tensor | None = None,
    ln_bias: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    eps: float = 1e-6,
    gelu: bool = False,
    residual: Tensor | None = None,
    gamma: Tensor | None = None,
    round_yg: bool = False,
    use_triton: bool | None = None,
) -> Tensor:
    """x `(B, n, K)`, weight `(N, K)` (nn.Linear's), bias `(N,)`; LayerNorm parameters `(K,)`
    (affine) or scale/shift `(B, 1, K)` (AdaLN); residual `(B, n, N)`, gamma `(B, 1, N)`.

    Returns `(B, n, N)`: y in the weight dtype, or with a residual `residual + y·gamma` in the
    residual's dtype rule of `toprovar.kernels.fused_block.add_ln` (bf16 only for a bf16 residual plus a
    rounded bf16 product, else float32). See the module docstring for the op sequence.
    """
    if use_triton is None:
        use_triton = triton_available(x)
    if not use_triton:
        return ln_linear_reference(
            x,
            weight,
            bias,
            ln=ln,
            ln_weight=ln_weight,
            ln_bias=ln_bias,
            scale=scale,
            shift=shift,
            eps=eps,
            gelu=gelu,
            residual=residual,
            gamma=gamma,
            round_yg=round_yg,
        )
    b, n, k = x.shape
    n_out = weight.shape[0]
    m = b * n
    x = x.contiguous()
    weight = weight.contiguous()
    if ln == LN_NONE and x.dtype != weight.dtype:
        x = x.to(weight.dtype)  # F.linear would refuse mixed dtypes; autocast casts the input
    dummy = weight
    s, s_sb = _per_row(scale, b, dummy)
    t, t_sb = _per_row(shift, b, dummy)
    g, g_sb = _per_row(gamma, b, dummy)
    if residual is not None:
        res_dtype = (
            residual.dtype if (round_yg and gamma is not None and residual.dtype == weight.dtype) else torch.float32
        )
        out = torch.empty((b, n, n_out), dtype=res_dtype, device=x.device)
        residual = residual.contiguous()
    else:
        out = torch.empty((b, n, n_out), dtype=weight.dtype, device=x.device)
    if m == 0:
        return out
    cfg = launch_config(m, n_out)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n_out, cfg["BLOCK_N"]))
    _ln_linear_kernel[grid](
        x,
        weight,
        bias if bias is not None else dummy,
        ln_weight if ln_weight is not None else dummy,
        ln_bias if ln_bias is not None else dummy,
        s,
        t,
        residual if residual is not None else dummy,
        g,
        out,
        m,
        n_out,
        k,
        n,
        eps,
        s_sb,
        t_sb,
        g_sb,
        LN=ln,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        RESIDUAL=residual is not None,
        HAS_G=gamma is not None,
        ROUND_YG=round_yg,
        IEEE=weight.dtype == torch.float32 or _INTERPRETER,
        **cfg,
    )
    return out


__all__ = ["ln_linear", "ln_linear_reference", "launch_config", "LN_NONE", "LN_AFFINE", "LN_MODULATE"]
