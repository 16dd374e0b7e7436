"""Flash Attention Entropy: a Triton FlashAttention-2 forward kernel that also returns the
exact Shannon entropy of every softmax row (the paper's Algorithm 2).

Per query block the kernel keeps, beside the running max m and exp-sum l, a third running sum
e = Σ p̃ (s - m) in the log2 domain (s = scale·log2(e)·q·k, so exponentials are `exp2`); at the
end  H = ln l - ln2 · e / l  nats. The shifted form keeps sharp rows (H → 0) accurate, and costs
one FMA per score: d = s - m is computed anyway as the exponent of p̃ = 2^d. `WITH_ENTROPY` is a
compile-time flag: the same kernel without it is plain attention, so the entropy's cost is
measured against an otherwise identical kernel.

`entropy_kernel` / `entropy_forward` is the other way to the same entropy: beside an attention
that already ran (SDPA, whose output stays bit for bit its own), one pass over q·kᵀ reading that
attention's log-sum-exp, with no V and no running max.

Key blocks that are full run unmasked; only the last, partial key block is masked. Rows past
Lq are loaded as zeros and never stored. On Hopper, K and V blocks can come through the tensor
memory accelerator (`USE_TMA`, host-side descriptors over the (B, H, L, D) tensors: rows past
Lk come back as zeros, never another head's keys).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
# Globals read inside @triton.jit functions must be constexpr (the interpreter does not check this).
LN2 = tl.constexpr(0.6931471805599453)
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E_C = tl.constexpr(LOG2E)  # finite "-inf": keeps 0 · (-big) = 0 in the entropy sums


@triton.jit
def _softmax_update(
    acc,
    m_i,
    l_i,
    e_i,
    qk,
    v,
    offs_n,
    Lk,
    qk_scale,
    MASKED: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ENTROPY_AFTER_PV: tl.constexpr,
):
    """Fold one block of raw scores qk = q·kᵀ (BLOCK_M, BLOCK_N) and its values v into the state."""
    if MASKED:
        qk = tl.where(offs_n[None, :] < Lk, qk, NEG_BIG)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # scale > 0: the max commutes with it
    d = qk * qk_scale - m_new[:, None]  # one FMA: log2-domain score minus the running max
    p = tl.math.exp2(d)  # ex2.approx.ftz: one MUFU op
    alpha = tl.math.exp2(m_i - m_new)
    if WITH_ENTROPY:
        e_i = alpha * (e_i + l_i * (m_i - m_new))  # the shifted sum, moved to the new max
    l_i = l_i * alpha + tl.sum(p, 1)
    # Where the entropy row sum sits in source order changes how ptxas schedules the block (the
    # sweeps in docs/kernels.md: 128-row tiles run best with it before the P·V dot, 64-row tiles after).
    if WITH_ENTROPY and not ENTROPY_AFTER_PV:
        e_i += tl.sum(p * d, 1)  # one FMA per score
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    if WITH_ENTROPY and ENTROPY_AFTER_PV:
        e_i += tl.sum(p * d, 1)
    return acc, m_new, l_i, e_i


@triton.jit
def _load_kv(
    K,
    V,
    k_ptrs,
    v_ptrs,
    b,
    h,
    start_n,
    skn,
    svn,
    Lk,
    offs_n,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """k as (HEAD_DIM, BLOCK_N), v as (BLOCK_N, HEAD_DIM) for keys start_n + [0, BLOCK_N)."""
    if USE_TMA:  # the copy engine zero-fills rows past Lk: no mask needed
        k = K.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM).T
        v = V.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif MASKED:
        k = tl.load(k_ptrs + start_n * skn, mask=(start_n + offs_n)[None, :] < Lk, other=0.0)
        v = tl.load(v_ptrs + start_n * svn, mask=(start_n + offs_n)[:, None] < Lk, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * skn)
        v = tl.load(v_ptrs + start_n * svn)
    return k, v


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])  # one binary for every shape of a head dim
def fae_kernel(
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
    USE_TMA: tl.constexpr,
    ENTROPY_AFTER_PV: tl.constexpr,
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
    k_ptrs = K  # unused with TMA
    v_ptrs = V
    if not USE_TMA:
        k_ptrs = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd  # (D, BLOCK_N)
        v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd  # (BLOCK_N, D)

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no masks
        k, v = _load_kv(K, V, k_ptrs, v_ptrs, b, h, start_n, skn, svn, Lk, offs_n, BLOCK_N, HEAD_DIM, False, USE_TMA)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        acc, m_i, l_i, e_i = _softmax_update(
            acc,
            m_i,
            l_i,
            e_i,
            qk,
            v,
            start_n + offs_n,
            Lk,
            qk_scale,
            False,
            WITH_ENTROPY,
            DOT_PRECISION,
            ENTROPY_AFTER_PV,
        )
    if n_full < Lk:  # the ragged last key block, masked
        k, v = _load_kv(K, V, k_ptrs, v_ptrs, b, h, n_full, skn, svn, Lk, offs_n, BLOCK_N, HEAD_DIM, True, USE_TMA)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        acc, m_i, l_i, e_i = _softmax_update(
            acc,
            m_i,
            l_i,
            e_i,
            qk,
            v,
            n_full + offs_n,
            Lk,
            qk_scale,
            True,
            WITH_ENTROPY,
            DOT_PRECISION,
            ENTROPY_AFTER_PV,
        )

    out = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < Lq)
    if WITH_ENTROPY:
        ent = tl.log(l_i) - LN2 * e_i / l_i
        tl.store(E + b * seb + h * seh + offs_m * sem, ent, mask=offs_m < Lq)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tma_ok(t: torch.Tensor) -> bool:
    """Host descriptors need Hopper+, 16-byte aligned base and strides, and a contiguous last dim."""
    if _interpreting() or not t.is_cuda or not _is_hopper_plus(t.device.index or 0):
        return False
    es = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride()[:-1])


def _smem_bytes(bm: int, bn: int, stages: int, D: int, itemsize: int) -> int:
    return (bm * D + stages * 2 * bn * D) * itemsize  # q + `stages` buffers of k and v


SMEM_LIMIT = 227 * 1024 - 2048  # Hopper's per-block limit, less room for barriers
BIG = (128, 128, 8, 3, False)  # (BLOCK_M, BLOCK_N, num_warps, num_stages, ENTROPY_AFTER_PV)
SMALL = (64, 64, 4, 3, True)


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _is_hopper_plus(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pick_config(B: int, H: int, Lq: int, D: int, itemsize: int = 2, n_sm: int = 132) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, ENTROPY_AFTER_PV), from the H100 sweeps in
    docs/kernels.md. 128×128 tiles (8 warps, 3 stages, one block per SM) are fastest per row;
    64×64 tiles (4 warps, two blocks per SM) win where the last wave of 128-row blocks would leave
    most SMs idle (a short grid whose fractional wave is under 0.3). Smaller tiles where the shared
    memory would not hold these; fp32 (exact `ieee` dots on the FMA units, for correctness checks)
    takes small tiles: larger ones spill heavily."""
    if itemsize == 4:
        return (32, 32, 4, 2, True)
    waves = -(-Lq // 128) * B * H / n_sm
    first = SMALL if waves < 8 and waves - int(waves) < 0.3 else BIG
    for cfg in (first, SMALL, (64, 64, 4, 2, True), (32, 32, 4, 2, True)):
        if _smem_bytes(cfg[0], cfg[1], cfg[3], D, itemsize) <= SMEM_LIMIT:
            return cfg
    return (16, 16, 4, 1, True)


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    with_entropy: bool,
    config: tuple | None = None,
    use_tma: bool | None = None,
):
    """`fae_forward`, also returning the compiled kernel (registers, spills) for the tuner.
    `config`: (BLOCK_M, BLOCK_N, num_warps, num_stages[, ENTROPY_AFTER_PV])."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    if scale < 0:  # the kernel folds the scale into an FMA after the row max, which needs scale >= 0
        q, scale = -q, -scale
    if config is None:
        config = pick_config(B, H, Lq, D, q.element_size(), _sm_count(q.device.index or 0) if q.is_cuda else 132)
    bm, bn, warps, stages = config[:4]
    after_pv = bool(config[4]) if len(config) > 4 else bm < 128
    if use_tma is None:  # tuned for 16-bit operands; fp32 keeps plain loads
        use_tma = q.element_size() == 2 and _tma_ok(k) and _tma_ok(v)
    out = torch.empty_like(q)
    ent = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32) if with_entropy else out
    e_strides = ent.stride()[:3] if with_entropy else (0, 0, 0)
    kk, vv = k, v
    if use_tma:
        kk = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, D])
        vv = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, D])
    args = (
        q,
        kk,
        vv,
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
    kernel = fae_kernel[(triton.cdiv(Lq, bm), B * H)](
        *args,
        HEAD_DIM=D,
        BLOCK_M=bm,
        BLOCK_N=bn,
        WITH_ENTROPY=with_entropy,
        DOT_PRECISION=precision,
        USE_TMA=use_tma,
        ENTROPY_AFTER_PV=after_pv,
        num_warps=warps,
        num_stages=stages,
    )
    return out, (ent if with_entropy else None), kernel


def fae_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    with_entropy: bool,
    config: tuple | None = None,
    use_tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel: `(out, entropy or None)`. `config=(BLOCK_M, BLOCK_N, num_warps, num_stages)`
    pins the tiling (the interpreter tests use small ones); None picks one by shape (`pick_config`).
    `use_tma` None: TMA where the hardware and the strides allow."""
    out, ent, _ = launch(q, k, v, scale, with_entropy, config, use_tma)
    return out, ent


# -- entropy beside an unchanged attention: q, k and the attention's log-sum-exp -------------------


@triton.jit
def _entropy_block(l_i, e_i, q, k, lse2, offs_n, Lk, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add Σ p and Σ p·d of one key block: d = s − lse in the log2 domain (≈ ≤ 0), p = 2^d."""
    d = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None]
    if MASKED:
        d = tl.where(offs_n[None, :] < Lk, d, NEG_BIG)  # 2^(-big) = 0 and 0 · (-big) = 0
    p = tl.math.exp2(d)
    return l_i + tl.sum(p, 1), e_i + tl.sum(p * d, 1)


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])
def entropy_kernel(
    Q,
    K,
    LSE,
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
    slb,
    slh,
    slm,
    seb,
    seh,
    sem,
    H,
    Lq,
    Lk,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """H = ln l − ln2 · e / l with l = Σ 2^d, e = Σ 2^d · d, d = scale·log2(e)·q·k − log2(e)·lse:
    the attention's own row normalizer as the shift (l = 1 up to its rounding, which l cancels),
    so one pass over q·kᵀ with no running max, no rescaling and no V."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Lq, other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + offs_m * slm, mask=offs_m < Lq, other=0.0) * LOG2E_C
    k_ptrs = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd  # (D, BLOCK_N)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no masks
        k = tl.load(k_ptrs + start_n * skn)
        l_i, e_i = _entropy_block(l_i, e_i, q, k, lse2, start_n + offs_n, Lk, qk_scale, False, DOT_PRECISION)
    if n_full < Lk:  # the ragged last key block, masked
        k = tl.load(k_ptrs + n_full * skn, mask=(n_full + offs_n)[None, :] < Lk, other=0.0)
        l_i, e_i = _entropy_block(l_i, e_i, q, k, lse2, n_full + offs_n, Lk, qk_scale, True, DOT_PRECISION)
    tl.store(E + b * seb + h * seh + offs_m * sem, tl.log(l_i) - LN2 * e_i / l_i, mask=offs_m < Lq)


def entropy_config(itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `entropy_kernel`: FAE's tiles without V (not
    swept on the GPU yet: `python -m benchmarks.attention` times it against FAE)."""
    if itemsize == 4:
        return (32, 32, 4, 2)
    return (128, 64, 8, 3)


def entropy_forward(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float | None, config: tuple | None = None
) -> torch.Tensor:
    """Entropy `(B, H, Lq)` float32 of the rows of softmax(scale·q·kᵀ) whose natural-log
    log-sum-exp is `lse` (B, H, Lq), e.g. the one SDPA returns beside its output."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    bm, bn, warps, stages = config or entropy_config(q.element_size())
    ent = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    lse = lse.float()
    entropy_kernel[(triton.cdiv(Lq, bm), B * H)](
        q,
        k,
        lse,
        ent,
        scale * LOG2E,
        *q.stride(),
        *k.stride(),
        *lse.stride(),
        *ent.stride(),
        H,
        Lq,
        Lk,
        HEAD_DIM=D,
        BLOCK_M=bm,
        BLOCK_N=bn,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )
    return ent


def supported(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return d >= 16 and d <= 256 and (d & (d - 1)) == 0 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


__all__ = ["fae_forward", "fae_kernel", "launch", "supported", "pick_config", "entropy_forward", "entropy_kernel"]
