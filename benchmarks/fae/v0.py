"""FROZEN BASELINE: toprovar/kernels/triton_fae.py as of commit 4a54eaa, kept only so `benchmarks.fae.tune` can time the
previous kernel beside the new one in the same session. Not used by the package."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Globals read inside @triton.jit functions must be constexpr (the interpreter does not check this).
LN2 = tl.constexpr(0.6931471805599453)
NEG_BIG = tl.constexpr(-1.0e30)  # finite "-inf": keeps 0 · (-big) = 0 in the entropy sums

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on CUDA.
CUDA_CONFIGS = [
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (128, 32, 4, 4),
]


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    e_i,
    q,
    k_ptrs,
    v_ptrs,
    start_n,
    Lk,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[None, :] < Lk, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Lk, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(offs_n[None, :] < Lk, s, NEG_BIG)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    if WITH_ENTROPY:
        e_i = alpha * (e_i + l_i * (m_i - m_new)) + tl.sum(p * (s - m_new[:, None]), 1)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, e_i


@triton.jit
def _fae_fwd(
    Q,
    K,
    V,
    O,
    E,
    qk_scale,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    som,
    sod,
    seb,
    seh,
    sem,
    H,
    Lq,
    Lk,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Lq, other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd  # (D, BLOCK_N)
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd  # (BLOCK_N, D)

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i, e_i = _attend_block(
            acc, m_i, l_i, e_i, q, k_ptrs, v_ptrs, start_n, Lk, qk_scale, BLOCK_N, False, WITH_ENTROPY, DOT_PRECISION
        )
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
    if n_full < Lk:
        acc, m_i, l_i, e_i = _attend_block(
            acc, m_i, l_i, e_i, q, k_ptrs, v_ptrs, n_full, Lk, qk_scale, BLOCK_N, True, WITH_ENTROPY, DOT_PRECISION
        )

    out = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Lq)
    if WITH_ENTROPY:
        ent = tl.log(l_i) - LN2 * e_i / l_i
        tl.store(E + b * seb + h * seh + offs_m * sem, ent, mask=offs_m < Lq)


_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in CUDA_CONFIGS],
    key=["Lq", "Lk", "HEAD_DIM", "WITH_ENTROPY"],
)(_fae_fwd)


def fae_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    with_entropy: bool,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel. `config=(BLOCK_M, BLOCK_N, num_warps, num_stages)` pins a configuration
    (used by the interpreter tests); None autotunes over CUDA_CONFIGS per shape."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q)
    ent = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32) if with_entropy else out
    e_strides = ent.stride()[:3] if with_entropy else (0, 0, 0)
    args = (
        q,
        k,
        v,
        out,
        ent,
        scale * LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *e_strides,
        H,
        Lq,
        Lk,
    )
    # fp32 operands: full-precision dots (Triton's default for fp32 would be tf32, ~3e-4 error).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if config is None:
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _autotuned[grid](*args, HEAD_DIM=D, WITH_ENTROPY=with_entropy, DOT_PRECISION=precision)
    else:
        bm, bn, warps, stages = config
        _fae_fwd[(triton.cdiv(Lq, bm), B * H)](
            *args,
            HEAD_DIM=D,
            BLOCK_M=bm,
            BLOCK_N=bn,
            WITH_ENTROPY=with_entropy,
            DOT_PRECISION=precision,
            num_warps=warps,
            num_stages=stages,
        )
    return out, (ent if with_entropy else None)


def supported(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return d >= 16 and d <= 256 and (d & (d - 1)) == 0 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


__all__ = ["fae_forward", "supported", "CUDA_CONFIGS"]
