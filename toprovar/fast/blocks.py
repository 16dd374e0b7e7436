"""Blocks on the fast path: `run_fast_blocks`, a chain of blocks on their fused stages (`FastStep`
each) under a `FastOptions`' switches, and `run_block`, one block of a scale on the fused stages
where they apply, the reference elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from toprovar.fast.options import FastOptions
from toprovar.models.transformer import CrossAttnBlock, LayerKVCache, RopeSlice, TextKV


@dataclass
class FastStep:
    """One block of a `run_fast_blocks` chain: the block, its AdaLN vectors (`block.ada(gss)`),
    text K/V, KV cache, the tokens it runs (None: all; `(B, K)` indices, K = 0: skipped) and
    whether its self-attention entropy is wanted."""

    block: CrossAttnBlock
    ada: Tensor
    text: TextKV
    cache: LayerKVCache
    keep: Tensor | None = None
    entropy: bool = False


def same_rows(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two keep lists are the same memory (hence the same tokens), read on the host only."""
    if a is None or b is None:
        return a is b
    return a is b or (
        a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.data_ptr() == b.data_ptr()
    )


def run_fast_blocks(
    steps: list[FastStep],
    x: Tensor,
    rope: RopeSlice,
    opts: FastOptions,
) -> tuple[Tensor, list[Tensor | None]]:
    """The blocks of `steps` in order, each as `CrossAttnBlock.forward_fast`: `(x, entropies)`.

    Of `opts` the switches of the blocks count (the caller reads the others): `gelu_epilogue` (see
    `forward_fast`), `index_io` (likewise), `chain_blocks` and `small_m_rows`.
    chain_blocks: where a block and the next live block run the same rows (both every token, or the
    same keep list by `same_rows`), the block's last stage (its residual add) also makes the
    next block's AdaLN-LayerNorm, one kernel for two, and pruned rows stay gathered between
    such blocks: one gather and one scatter for a run of blocks on the same kept tokens. The
    arithmetic is the same op sequence, so CPU results stay bit-identical to `forward_fast`
    block by block. small_m_rows: blocks on every token of at most
    that many rows (batch rows × tokens) run their matrix products with the LayerNorms and
    residual adds fused in (`CrossAttnBlock._fast_block_small`; 0: never).
    """
    ents: list[Tensor | None] = [None] * len(steps)
    live = [j for j, s in enumerate(steps) if s.keep is None or s.keep.shape[1] > 0]
    rows = h = None  # the running gathered rows and the next block's first LayerNorm, when made
    small = 0 < x.shape[0] * x.shape[1] <= opts.small_m_rows  # all rows of the scale; pruned blocks never
    for pos, j in enumerate(live):
        s = steps[j]
        nxt = steps[live[pos + 1]] if opts.chain_blocks and pos + 1 < len(live) and not small else None
        together = nxt is not None and same_rows(s.keep, nxt.keep)
        next_ln = None
        if together:
            _, _, scale1, _, shift1, _ = nxt.ada.unbind(2)
            next_ln = (scale1, shift1, nxt.block.eps)
        x, rows, h, ents[j] = s.block.fast_block(
            x,
            s.ada,
            s.text,
            rope,
            s.cache,
            keep=s.keep,
            rows=rows,
            h=h,
            entropy=s.entropy,
            gelu_epilogue=opts.gelu_epilogue,
            index_io=opts.index_io,
            next_ln=next_ln,
            scatter=not together,
            small=small and s.keep is None,
        )
    return x, ents


def run_block(
    block: CrossAttnBlock,
    x: Tensor,
    ada: Tensor | None,
    gss: Tensor,
    text: TextKV,
    rope: RopeSlice,
    cache: LayerKVCache,
    *,
    keep: Tensor | None,
    entropy: bool,
    kv_policy: str,
    fused: bool,
    gelu_epilogue: bool,
    index_io: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One block on the tokens `keep` (None: all): the fused stages where they apply (every token,
    or kept tokens whose K/V alone enter the cache), the reference block otherwise."""
    if fused and (keep is None or kv_policy == "kept"):
        return block.forward_fast(
            x, ada, text, rope, cache, keep=keep, entropy=entropy, gelu_epilogue=gelu_epilogue, index_io=index_io
        )
    return block(x, gss, text, rope, cache, keep=keep, entropy=entropy, kv_policy=kv_policy)
