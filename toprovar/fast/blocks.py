"""`run_block`: one block of a scale on the fused stages where they apply, the reference elsewhere."""

from __future__ import annotations

from torch import Tensor

from toprovar.models.transformer import CrossAttnBlock, LayerKVCache, RopeSlice, TextKV


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
