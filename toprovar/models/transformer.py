"""The Infinity transformer (inference only), with the official parameter names.

Architecture (facts from the official `infinity/models/infinity.py` and `basic.py`):
  * text: RMS-normed T5 features; an attention pool (`text_proj_for_sos`, one learned query per
    head) gives the pooled condition `cond_BD` (also the start token); an MLP (`text_proj_for_ca`)
    gives the cross-attention keys/values; `cfg_uncond` replaces the text of the unconditional rows;
  * `shared_ada_lin` maps `cond_BD` to 6 AdaLN vectors (gamma1, gamma2, scale1, scale2, shift1,
    shift2) that every block adds to its own `ada_gss`;
  * each block: AdaLN -> self-attention (cosine attention: q and k L2-normalized, q scaled per head
    by exp(min(scale_mul_1H11, log 100)); 2D RoPE) -> cross-attention to text (`ca_norm` before) ->
    AdaLN -> FFN (GELU tanh);
  * `lvl_embed` (scale index) is added before the first block only; `head_nm` (AdaLN) + `head`
    give 2 logits per bit of each token (bitwise labels).

Checkpoint layout: the official checkpoints store blocks as `block_chunks.{c}.module.{j}.*`
(8 chunks). This module keeps one flat list `blocks.{n}.*`, n = c * (depth // block_chunks) + j;
`checkpoint_rename(config)` gives that prefix map for `toprovar.models.checkpoint.load_into`.
Every other key has its official name and shape.

The model exposes the pieces the generation loop (`toprovar/pipeline.py`) composes scale by
scale: `encode_condition`, `first_tokens`, `add_level`, `blocks[i](...)`, `logits`,
`embed_codes`. Self-attention goes through `toprovar.attention.attention` with keys and values
from a `KVCache` preallocated for the whole schedule.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import toprovar.kernels.fused_block as fused_block
from toprovar.attention import attention, cross_attention
from toprovar.kernels.fused_block import LN_AFFINE, LN_MODULATE, add_ln, gather_rows, qk_norm_rope, scatter_rows
from toprovar.kernels.fused_linear import ln_linear
from toprovar.schedules import tokens_per_scale

# Buffers the official model drops from checkpoints when loading (not weights).
CHECKPOINT_IGNORE = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")

KV_POLICIES = ("kept", "all")


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture of one Infinity transformer (plain values, no Hydra)."""

    depth: int
    embed_dim: int
    num_heads: int
    codebook_dim: int  # bits per token the head predicts (VAE bits, x4 with spatial patchify)
    apply_spatial_patchify: bool = False
    mlp_ratio: float = 4.0
    text_channels: int = 2048  # T5 feature width
    text_maxlen: int = 512  # rows of cfg_uncond = longest text
    pool_head_dim: int | None = None  # text attention pool; official: 64 if embed_dim > 4096 else 128
    block_chunks: int = 8  # checkpoint layout only
    norm_eps: float = 1e-6
    num_levels: int = 15  # rows of lvl_embed
    rope_base: float = 10000.0
    rope_grid: int = 128  # 2048 // 16: largest token grid edge of the RoPE table
    rope_normalized_by_hw: int = 2  # official 2 ("star style": positions scaled to the last scale)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.ffn_hidden <= 0:
            raise ValueError(f"embed_dim * mlp_ratio = {self.embed_dim * self.mlp_ratio} rounds to an empty FFN")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not a multiple of block_chunks {self.block_chunks}")
        if self.text_channels % self.resolved_pool_head_dim or self.embed_dim % self.pool_num_heads:
            raise ValueError("text_channels / pool_head_dim must divide embed_dim into pool heads")
        if self.apply_spatial_patchify and self.codebook_dim % 4:
            raise ValueError("with spatial patchify, codebook_dim counts 4 VAE tokens and must be a multiple of 4")
        if self.rope_normalized_by_hw not in (0, 1, 2):
            raise ValueError(f"rope_normalized_by_hw must be 0, 1 or 2, not {self.rope_normalized_by_hw}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def resolved_pool_head_dim(self) -> int:
        if self.pool_head_dim is not None:
            return self.pool_head_dim
        return 64 if self.embed_dim > 4096 else 128

    @property
    def pool_num_heads(self) -> int:
        return self.text_channels // self.resolved_pool_head_dim


TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "infinity-2b": TransformerConfig(depth=32, embed_dim=2048, num_heads=16, codebook_dim=32),
    "infinity-8b": TransformerConfig(
        depth=40, embed_dim=3584, num_heads=28, codebook_dim=56, apply_spatial_patchify=True
    ),
}


def checkpoint_rename(config: TransformerConfig) -> dict[str, str]:
    """Official checkpoint prefix -> module prefix (`block_chunks.c.module.j.` -> `blocks.n.`)."""
    if config.block_chunks == 1:
        return {}
    per_chunk = config.depth // config.block_chunks
    return {
        f"block_chunks.{c}.module.{j}.": f"blocks.{c * per_chunk + j}."
        for c in range(config.block_chunks)
        for j in range(per_chunk)
    }


# ----------------------------------------------------------------------------------------------
# 2D RoPE


def rope2d_table(
    full_schedule: list[tuple[int, int, int]],
    head_dim: int,
    *,
    base: float = 10000.0,
    grid: int = 128,
    normalized_by_hw: int = 2,
) -> Tensor:
    """cos/sin of every token of a template's full (1M) schedule: `(2, L, head_dim // 2)` float32.

    Half of the rotated pairs follow the row index, half the column index. With
    `normalized_by_hw=2` (the official setting) the positions of a coarse scale are its grid
    scaled to the last scale's grid and rounded, so all scales share one coordinate frame. The
    official code builds this table from the template's 1M schedule for every pixel budget (the
    smaller budgets are prefixes of it), so callers slice it by token offset.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    pos = torch.arange(grid, dtype=torch.int64).type_as(inv_freq)
    freqs = torch.outer(pos, inv_freq)
    freq_map = torch.cat([freqs[:, None, :].expand(-1, grid, -1), freqs[None, :, :].expand(grid, -1, -1)], dim=-1)
    cos_sin = torch.stack([torch.cos(freq_map), torch.sin(freq_map)], dim=0)  # (2, grid, grid, half)
    _, last_h, last_w = full_schedule[-1]
    parts = []
    for _, ph, pw in full_schedule:
        if normalized_by_hw == 2:
            rows = (torch.arange(ph) * (last_h / ph)).reshape(ph, 1).expand(ph, pw)
            cols = (torch.arange(pw) * (last_w / pw)).reshape(1, pw).expand(ph, pw)
            idx = torch.stack([rows, cols], dim=-1).round().int().reshape(-1, 2)
            part = cos_sin[:, idx[:, 0], idx[:, 1], :]
        elif normalized_by_hw == 1:
            if last_h >= last_w:
                uph, upw = grid, int(grid / last_h * last_w)
            else:
                uph, upw = int(grid / last_w * last_h), grid
            part = F.interpolate(
                cos_sin[:, :uph, :upw, :].permute(0, 3, 1, 2), size=(ph, pw), mode="bilinear", align_corners=True
            ).permute(0, 2, 3, 1)
        else:
            part = cos_sin[:, :ph, :pw, :]
        parts.append(part.reshape(2, ph * pw, half))
    return torch.cat(parts, dim=1)


@dataclass
class RopeSlice:
    """cos/sin `(n, head_dim // 2)` of the n tokens of one scale."""

    cos: Tensor
    sin: Tensor

    def select(self, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """Broadcastable `(1|B, 1, n|K, head_dim // 2)` cos/sin for all tokens or the kept ones."""
        if keep is None:
            return self.cos[None, None], self.sin[None, None]
        return self.cos[keep][:, None], self.sin[keep][:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of the last dim of `(B, H, L, D)` in float32 or wider (autocast off)."""
    with torch.autocast(x.device.type, enabled=False):
        pairs = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*x.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# KV cache


class LayerKVCache:
    """One layer's keys/values for a whole schedule; `fill` tokens are valid."""

    def __init__(self, k: Tensor, v: Tensor, fill: list[int] | None = None):
        self.k, self.v = k, v  # (B, H, max_len, D)
        self._fill = [0] if fill is None else fill  # one cell, shared with the row views of this cache

    @property
    def fill(self) -> int:
        return self._fill[0]

    @fill.setter
    def fill(self, value: int) -> None:
        self._fill[0] = value

    def first_rows(self, rows: int) -> LayerKVCache:
        """The first `rows` batch rows: views of the same storage (no copy) sharing this cache's fill."""
        return LayerKVCache(self.k[:rows], self.v[:rows], self._fill)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write `(B, H, n, D)` after the valid part; return views of everything valid."""
        end = self.fill + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.k.shape[2]}")
        self.k[:, :, self.fill : end] = k
        self.v[:, :, self.fill : end] = v
        self.fill = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reserve(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Claim the next n slots: `(k_slot, v_slot, k_valid, v_valid)` views, the slots to be
        written by the caller (the fused q/k/v kernel writes there directly)."""
        start, end = self.fill, self.fill + n
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.k.shape[2]}")
        self.fill = end
        return self.k[:, :, start:end], self.v[:, :, start:end], self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Preallocated self-attention cache of every layer (no concatenation per scale)."""

    def __init__(
        self,
        depth: int,
        batch: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (depth, batch, num_heads, max_len, head_dim)
        self._k = torch.empty(shape, dtype=dtype, device=device)
        self._v = torch.empty(shape, dtype=dtype, device=device)
        self.layers = [LayerKVCache(self._k[i], self._v[i]) for i in range(depth)]

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def first_rows(self, rows: int) -> KVCache:
        """The first `rows` batch rows of every layer as a cache of views sharing the fills: a call
        that stops running its unconditional rows (rows [B:]) goes on in this view, and the rows it
        dropped are neither read nor written again."""
        view = copy.copy(self)
        view._k, view._v = self._k[:, :rows], self._v[:, :rows]
        view.layers = [layer.first_rows(rows) for layer in self.layers]
        return view

    @property
    def fills(self) -> list[int]:
        return [layer.fill for layer in self.layers]

    def set_fill(self, fill: int) -> None:
        """Every layer holds `fill` valid tokens (replayed CUDA graphs write slots the host never saw)."""
        for layer in self.layers:
            layer.fill = fill


# ----------------------------------------------------------------------------------------------
# Modules (official names)


class FastRMSNorm(nn.Module):
    """RMS norm in float32 with a learned weight (official `FastRMSNorm` fallback path)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight).to(x.dtype)


@dataclass
class TextKV:
    """One block's cross-attention keys/values of the text tokens, `(B, H, Lt, D)`."""

    k: Tensor
    v: Tensor
    mask: Tensor | None  # (B, Lt) True = real token; None when no row is padded


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query per head, for pooling) to text tokens."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, *, learned_query: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        if learned_query:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def text_kv(self, text: Tensor, mask: Tensor | None) -> TextKV:
        kv = F.linear(text, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        b, n, _ = kv.shape
        k, v = kv.view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return TextKV(k, v, mask)

    def forward(self, x: Tensor | None, text: TextKV) -> Tensor:
        if x is None:  # attention pool: the learned query of each head
            q = self.mat_q.to(text.k.dtype)[:, :, None, :].expand(text.k.shape[0], -1, -1, -1)
        else:
            q = _split_heads(self.mat_q(x), self.num_heads)
        q = q.to(text.k.dtype)
        out = cross_attention(q, text.k, text.v, text.mask, scale=self.head_dim**-0.5)
        return self.proj(_merge_heads(out))


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.ca = CrossAttention(embed_dim, text_channels, num_heads, learned_query=True)

    def forward(self, text: Tensor, mask: Tensor | None) -> Tensor:
        return self.ca(None, self.ca.text_kv(text, mask)).squeeze(1)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: Tensor) -> Tensor:
        return super().forward(cond_BD).reshape(-1, 1, 6, self.weight.shape[0] // 6)


class SelfAttention(nn.Module):
    """Cosine self-attention projections; the attention itself runs over the layer's KV cache."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def _scale_q(self, q: Tensor) -> Tensor:
        # The per-head temperature goes into q, so attention runs with scale 1.
        return F.normalize(q, dim=-1, eps=1e-12).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(B, H, n, D)` q (normalized, scaled), k (normalized), v of the tokens in `h`."""
        b, n, c = h.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = (
            F.linear(h, self.mat_qkv.weight, bias)
            .view(b, n, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        return self._scale_q(q), F.normalize(k, dim=-1, eps=1e-12), v

    def q_only(self, h: Tensor) -> Tensor:
        c = h.shape[-1]
        return self._scale_q(_split_heads(F.linear(h, self.mat_qkv.weight[:c], self.q_bias), self.num_heads))

    def kv_only(self, h: Tensor) -> tuple[Tensor, Tensor]:
        c = h.shape[-1]
        bias = torch.cat((self.zero_k_bias, self.v_bias))
        kv = F.linear(h, self.mat_qkv.weight[c:], bias)
        k, v = kv.split(c, dim=-1)
        return F.normalize(_split_heads(k, self.num_heads), dim=-1, eps=1e-12), _split_heads(v, self.num_heads)


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _gpu_recipe(t: Tensor) -> bool:
    """Whether the fast stages take the GPU recipe for t: linear inputs in the weights' dtype, the
    FFN's GELU in the matmul epilogue. Elsewhere they keep the float32 eager arithmetic of
    `CrossAttnBlock.forward`, bit for bit (tools/block_kernels.py patches this to count the GPU
    path's launches on a CPU)."""
    return t.is_cuda


def _gather_tokens(x: Tensor, keep: Tensor) -> Tensor:
    return gather_rows(x, keep)


class CrossAttnBlock(nn.Module):
    """One transformer block; with `keep`, only the kept tokens of the current scale run."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config.embed_dim
        self.embed_dim, self.eps = c, config.norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        self.sa = SelfAttention(c, config.num_heads)
        self.ca = CrossAttention(c, c, config.num_heads)
        self.ffn = FFN(c, config.ffn_hidden)
        self.ca_norm = nn.LayerNorm(c, eps=config.norm_eps)

    def _modulate(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return F.layer_norm(x.float(), (self.embed_dim,), eps=self.eps).mul(scale.add(1)).add_(shift)

    def forward(
        self,
        x: Tensor,
        gss: Tensor,
        text: TextKV,
        rope: RopeSlice,
        cache: LayerKVCache,
        *,
        keep: Tensor | None = None,
        entropy: bool = False,
        kv_policy: str = "kept",
    ) -> tuple[Tensor, Tensor | None]:
        """Run the block on the tokens of the current scale.

        x: `(B, n, C)` float32 hidden states of this scale; gss: `(B, 1, 6, C)` shared AdaLN;
        keep: `(B, K)` sorted token indices that run (None: all). Un-kept tokens pass through.
        kv_policy: 'kept' appends only the kept tokens' K/V to this layer's cache, 'all' every
        token's. Returns the new hidden states and, when asked, the self-attention entropy
        `(B, H, K)` of the tokens that ran.
        """
        with torch.autocast(x.device.type, enabled=False):
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)
        xr = x if keep is None else _gather_tokens(x, keep)
        h = self._modulate(xr, scale1, shift1)
        cos, sin = rope.select(keep)
        if keep is not None and kv_policy == "all":
            q = apply_rope(self.sa.q_only(h), cos, sin)
            k, v = self.sa.kv_only(self._modulate(x, scale1, shift1))
            all_cos, all_sin = rope.select(None)
            k = apply_rope(k, all_cos, all_sin)
        else:
            q, k, v = self.sa.qkv(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = cache.append(k, v)
        out, ent = attention(q.to(v_all.dtype), k_all, v_all, entropy=entropy, scale=1.0)
        xr = self._after_attention(xr, out, gamma1, gamma2, scale2, shift2, text)
        if keep is not None:  # x may still be bf16 (next-scale input under autocast) before block 0
            xr = x.to(xr.dtype).scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), xr)
        return xr, ent

    def ada(self, gss: Tensor) -> Tensor:
        """`(B, 1, 6, C)` float32 AdaLN vectors of this block (its `ada_gss` plus the shared ones)."""
        with torch.autocast(gss.device.type, enabled=False):
            return self.ada_gss + gss

    def _fast_constants(self) -> tuple[Tensor, Tensor, Tensor]:
        """QKV bias and per-head q temperature (the parameters' dtype, and float32 `(H,)` for the
        Triton kernel: converting a bf16 one was a kernel per block and call), recomputed only when
        the parameters change."""
        sa = self.sa
        key = (
            tuple((p.data_ptr(), p._version) for p in (sa.q_bias, sa.v_bias, sa.scale_mul_1H11)),
            torch.is_autocast_enabled(sa.q_bias.device.type),
        )
        cached = getattr(self, "_fast_cache", None)
        if cached is None or cached[0] != key:
            bias = torch.cat((sa.q_bias, sa.zero_k_bias, sa.v_bias))
            head_scale = sa.scale_mul_1H11.clamp_max(sa.max_scale_mul).exp()
            cached = (key, bias, head_scale, head_scale.reshape(-1).float().contiguous())
            self._fast_cache = cached
        return cached[1], cached[2], cached[3]

    def forward_fast(
        self,
        x: Tensor,
        ada: Tensor,
        text: TextKV,
        rope: RopeSlice,
        cache: LayerKVCache,
        *,
        keep: Tensor | None = None,
        entropy: bool = False,
        gelu_epilogue: bool = False,
        index_io: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`forward(keep=keep, kv_policy='kept')` through the fused stages of `toprovar.kernels.fused_block`.

        ada: `self.ada(gss)`, computed once per call. Four passes over the hidden states besides
        the matrix products and attention: AdaLN-LayerNorm; q/k normalize + RoPE + KV-cache write;
        residual + `ca_norm`; residual + AdaLN-LayerNorm; residual. On CPU (and without triton)
        every stage runs the eager ops of `forward`, so the result is bit-identical to it.
        gelu_epilogue (CUDA): the FFN's tanh-GELU runs in the first matrix product's epilogue
        (cuBLASLt) on its float32 accumulator instead of on the bf16-rounded product.
        keep: `(B, K)` token indices that run (None: all; K = 0: the block is skipped); their K/V
        alone enter the cache and the others pass through. The result is scattered into `x` in
        place when x is float32 (the pruned path of the generation loop owns x; a copy per layer
        would cost a full pass). index_io: that gather and scatter and the RoPE rows of the kept
        tokens go through the first and last fused stages and the q/k kernel (no separate kernels).
        """
        if keep is not None and keep.shape[1] == 0:  # nothing kept: the block is skipped
            return x, None
        x, _, _, ent = self.fast_block(
            x, ada, text, rope, cache, keep=keep, entropy=entropy, gelu_epilogue=gelu_epilogue, index_io=index_io
        )
        return x, ent

    def fast_block(
        self,
        x: Tensor,
        ada: Tensor,
        text: TextKV,
        rope: RopeSlice,
        cache: LayerKVCache,
        *,
        keep: Tensor | None,
        entropy: bool,
        gelu_epilogue: bool,
        index_io: bool,
        rows: Tensor | None = None,
        h: Tensor | None = None,
        next_ln: tuple[Tensor, Tensor, float] | None = None,
        scatter: bool = True,
        small: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """One block of `toprovar.fast.blocks.run_fast_blocks` (or of `forward_fast`). x: the
        scale's `(B, N, C)` hidden states; keep: the tokens that run (None: all); rows: their hidden
        states when the previous block left them compact (else gathered here); h: this block's
        first LayerNorm when the previous block made it; next_ln: (scale, shift, eps) of the next
        block's first LayerNorm, made by the last stage (same rows); scatter: write a pruned block's
        rows back into x (else leave them compact); small: every token, few rows: the matrix
        products with their LayerNorms and residual adds fused (`toprovar.kernels.fused_linear`).
        Returns (x, compact rows or None, the next block's LayerNorm or None, entropy or None).
        The chain's keywords default to a block alone, as `forward_fast` runs it."""
        if small:
            x, ent = self._fast_block_small(x, ada, text, rope, cache, entropy)
            return x, None, None, ent
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        cdt = self.sa.mat_qkv.weight.dtype if _gpu_recipe(x) else torch.float32  # what the linear layers consume
        cos, sin, rope_index = rope.cos, rope.sin, None
        if keep is None:
            xr = x
        else:
            xr = rows
            if xr is None and index_io:  # the gather inside the first stage
                xr, h = add_ln(
                    x, ln=LN_MODULATE, scale=scale1, shift=shift1, eps=self.eps, out_dtype=cdt, src_index=keep
                )
            elif xr is None:
                xr = gather_rows(x, keep)
            if index_io:
                rope_index = keep
            else:
                cos, sin = cos[keep], sin[keep]
        if h is None:
            _, h = add_ln(xr, ln=LN_MODULATE, scale=scale1, shift=shift1, eps=self.eps, out_dtype=cdt)
        xr, f, ent = self._fast_middle(
            xr, h, gamma1, scale2, shift2, text, cos, sin, rope_index, cache, cdt, entropy, gelu_epilogue
        )
        if keep is not None and scatter:
            x = x if x.dtype == torch.float32 else x.to(torch.float32)  # bf16 next-scale input before block 0
            if index_io:  # the scatter inside the last stage
                x, _ = add_ln(xr, f, gamma2, dst=x, dst_index=keep)
            else:
                xr, _ = add_ln(xr, f, gamma2)
                scatter_rows(x, keep, xr)
            return x, None, None, ent
        if next_ln is None:
            xr, h_next = add_ln(xr, f, gamma2)
        else:
            xr, h_next = add_ln(
                xr, f, gamma2, ln=LN_MODULATE, scale=next_ln[0], shift=next_ln[1], eps=next_ln[2], out_dtype=cdt
            )
        return (xr, None, h_next, ent) if keep is None else (x, xr, h_next, ent)

    def _fast_block_small(
        self, x: Tensor, ada: Tensor, text: TextKV, rope: RopeSlice, cache: LayerKVCache, entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The block on every token in 9 launches: each matrix product takes the LayerNorm before
        it and the residual add after it (`ln_linear`), besides q/k norm + RoPE and the two
        attentions. The same op sequence as `fast_block` (on CPU bit for bit)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        sa, ca, ffn, norm, n = self.sa, self.ca, self.ffn, self.ca_norm, x.shape[1]
        bias, head_scale, head_scale_f32 = self._fast_constants()
        qkv = ln_linear(x, sa.mat_qkv.weight, bias, ln=LN_MODULATE, scale=scale1, shift=shift1, eps=self.eps)
        k_slot, v_slot, k_all, v_all = cache.reserve(n)
        q = qk_norm_rope(
            qkv,
            sa.num_heads,
            head_scale_f32 if fused_block.triton_available(qkv) else head_scale,
            rope.cos,
            rope.sin,
            k_slot,
            v_slot,
        )
        out, ent = attention(q, k_all, v_all, entropy=entropy, scale=1.0)
        x = ln_linear(_merge_heads(out), sa.proj.weight, sa.proj.bias, residual=x, gamma=gamma1, round_yg=True)
        cq = ln_linear(
            x, ca.mat_q.weight, ca.mat_q.bias, ln=LN_AFFINE, ln_weight=norm.weight, ln_bias=norm.bias, eps=norm.eps
        )
        c_out = cross_attention(
            _split_heads(cq, ca.num_heads).to(text.k.dtype), text.k, text.v, text.mask, scale=ca.head_dim**-0.5
        )
        x = ln_linear(_merge_heads(c_out), ca.proj.weight, ca.proj.bias, residual=x)
        hidden = ln_linear(
            x, ffn.fc1.weight, ffn.fc1.bias, ln=LN_MODULATE, scale=scale2, shift=shift2, eps=self.eps, gelu=True
        )
        return ln_linear(hidden, ffn.fc2.weight, ffn.fc2.bias, residual=x, gamma=gamma2), ent

    def _fast_middle(
        self,
        x: Tensor,
        h: Tensor,
        gamma1: Tensor,
        scale2: Tensor,
        shift2: Tensor,
        text: TextKV,
        cos: Tensor,
        sin: Tensor,
        rope_index: Tensor | None,
        cache: LayerKVCache,
        cdt: torch.dtype,
        entropy: bool,
        gelu_epilogue: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Self-attention, cross-attention and the FFN of the rows x, from their first LayerNorm h:
        (x after both attentions, the FFN's output, entropy or None)."""
        sa, n = self.sa, x.shape[1]
        bias, head_scale, head_scale_f32 = self._fast_constants()
        qkv = F.linear(h, sa.mat_qkv.weight, bias)
        k_slot, v_slot, k_all, v_all = cache.reserve(n)
        q = qk_norm_rope(
            qkv,
            sa.num_heads,
            head_scale_f32 if fused_block.triton_available(qkv) else head_scale,
            cos,
            sin,
            k_slot,
            v_slot,
            rope_index=rope_index,
        )
        out, ent = attention(q, k_all, v_all, entropy=entropy, scale=1.0)
        norm = self.ca_norm
        x, ca_in = add_ln(
            x,
            sa.proj(_merge_heads(out)),
            gamma1,
            round_yg=True,
            ln=LN_AFFINE,
            weight=norm.weight,
            bias=norm.bias,
            eps=norm.eps,
            out_dtype=cdt,
        )
        x, h = add_ln(
            x, self.ca(ca_in, text), None, ln=LN_MODULATE, scale=scale2, shift=shift2, eps=self.eps, out_dtype=cdt
        )
        ffn = self.ffn
        if gelu_epilogue and _gpu_recipe(h):
            b, n_, c = h.shape
            hidden = torch._addmm_activation(
                ffn.fc1.bias.to(h.dtype), h.reshape(b * n_, c), ffn.fc1.weight.t(), use_gelu=True
            )
            f = ffn.fc2(hidden.view(b, n_, -1))
        else:
            f = ffn(h)
        return x, f, ent

    def _after_attention(
        self, xr: Tensor, out: Tensor, gamma1: Tensor, gamma2: Tensor, scale2: Tensor, shift2: Tensor, text: TextKV
    ) -> Tensor:
        """Output projection, cross-attention and FFN: the part of a block after self-attention."""
        # In-place gamma on the projection keeps its dtype, as officially (bf16 under autocast).
        xr = xr + self.sa.proj(_merge_heads(out)).mul_(gamma1)
        norm = self.ca_norm  # in float32 whatever the block's dtype (CUDA autocast does the same)
        ca_in = F.layer_norm(xr.float(), (self.embed_dim,), norm.weight.float(), norm.bias.float(), norm.eps)
        xr = xr + self.ca(ca_in, text).float()
        return xr + self.ffn(self._modulate(xr, scale2, shift2)).mul(gamma2)

    def forward_teacher(
        self, x: Tensor, gss: Tensor, text: TextKV, cos: Tensor, sin: Tensor, attn_mask: Tensor
    ) -> Tensor:
        """Training: the tokens of every scale at once under a block-causal `attn_mask` `(L, L)`
        (True = may attend). Same arithmetic as `forward` scale by scale with a KV cache."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada(gss).unbind(2)
        q, k, v = self.sa.qkv(self._modulate(x, scale1, shift1))
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        return self._after_attention(x, out, gamma1, gamma2, scale2, shift2, text)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.embed_dim, self.eps = embed_dim, eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.embed_dim).unbind(2)
        return F.layer_norm(x, (self.embed_dim,), eps=self.eps).mul(scale.add(1)).add_(shift)


@dataclass
class Condition:
    """Everything the blocks need from the text, for all rows (conditional then unconditional)."""

    cond_BD: Tensor  # (rows, C) pooled text: start token and AdaLN input
    gss: Tensor  # (rows, 1, 6, C) float32 shared AdaLN gamma/scale/shift
    text: list[TextKV]  # per block

    @property
    def rows(self) -> int:
        return self.cond_BD.shape[0]

    def first_rows(self, rows: int) -> Condition:
        """The condition of the first `rows` rows (views): the conditional ones under CFG."""
        return Condition(
            self.cond_BD[:rows],
            self.gss[:rows],
            [TextKV(t.k[:rows], t.v[:rows], None if t.mask is None else t.mask[:rows]) for t in self.text],
        )


class InfinityTransformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        c, ct5 = config.embed_dim, config.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(config.text_maxlen, ct5))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.text_norm = FastRMSNorm(ct5, eps=config.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(ct5, c, config.pool_num_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct5, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.lvl_embed = nn.Embedding(config.num_levels, c)
        self.word_embed = nn.Linear(config.codebook_dim, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(c, 6 * c))
        self.head_nm = AdaLNBeforeHead(c, c, config.norm_eps)
        self.head = nn.Linear(c, 2 * config.codebook_dim)
        self.blocks = nn.ModuleList(CrossAttnBlock(config) for _ in range(config.depth))
        self._rope_tables: dict[tuple, Tensor] = {}

    @property
    def depth(self) -> int:
        return self.config.depth

    # -- text -----------------------------------------------------------------------------------
    def encode_condition(self, text: Tensor, lengths: list[int], *, with_uncond: bool) -> Condition:
        """Text features `(B, Lt, text_channels)` (rows padded after `lengths[b]`) -> Condition.

        With `with_uncond`, rows B..2B-1 use `cfg_uncond[:len]` in place of each prompt's text
        (official classifier-free guidance).
        """
        b, lt, _ = text.shape
        if lt > self.config.text_maxlen:
            raise ValueError(f"text of {lt} tokens exceeds text_maxlen {self.config.text_maxlen}")
        mask = None
        if any(n != lt for n in lengths):
            mask = torch.arange(lt, device=text.device)[None, :] < torch.tensor(lengths, device=text.device)[:, None]
        text = text.float()
        if with_uncond:
            uncond = self.cfg_uncond[:lt].to(text.dtype)[None].expand(b, -1, -1)
            text = torch.cat((text, uncond), dim=0)
            mask = None if mask is None else torch.cat((mask, mask), dim=0)
        text = self.text_norm(text)
        cond_BD = self.text_proj_for_sos(text, mask)
        ca_text = self.text_proj_for_ca(text)
        with torch.autocast(text.device.type, enabled=False):
            gss = self.shared_ada_lin(cond_BD.float()).float()
        return Condition(cond_BD, gss, [blk.ca.text_kv(ca_text, mask) for blk in self.blocks])

    # -- tokens ---------------------------------------------------------------------------------
    def first_tokens(self, cond: Condition) -> Tensor:
        """The start token of every row: pooled text + pos_start, `(rows, 1, C)`."""
        rows = cond.rows
        return cond.cond_BD.unsqueeze(1).expand(rows, 1, -1) + self.pos_start.expand(rows, 1, -1)

    def add_level(self, x: Tensor, scale_index: int) -> Tensor:
        """Add the scale's level embedding in place (kept in x's dtype, as officially)."""
        x += self.lvl_embed.weight[scale_index]
        return x

    def embed_codes(self, codes: Tensor) -> Tensor:
        """Next-scale input: `(B, n, codebook_dim)` summed-code features -> `(B, n, C)`."""
        return self.word_embed(codes)

    def logits(self, x: Tensor, cond_BD: Tensor) -> Tensor:
        """`(rows, n, 2 * codebook_dim)` float32 bitwise logits (pairs: bit = 0, bit = 1)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.head(self.head_nm(x.float(), cond_BD.float()))

    def forward_teacher(
        self, cond: Condition, next_inputs: Tensor, schedule: list[tuple[int, int, int]], rope: Tensor
    ) -> Tensor:
        """Teacher-forced logits of every scale in one pass (training; the official trainer's form).

        next_inputs: `(rows, L - 1, codebook_dim)` the codes' next-scale inputs of scales 1.. (the
        VAE's `teacher_forcing`); rope: the `(2, >= L, head_dim // 2)` table of `rope_table`.
        Returns `(rows, L, 2 * codebook_dim)` float32 logits, L = all tokens of `schedule`.
        """
        sizes = tokens_per_scale(schedule)
        total = sum(sizes)
        x = torch.cat((self.first_tokens(cond), self.embed_codes(next_inputs)), dim=1)
        level = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), torch.tensor(sizes, device=x.device))
        x = x + self.lvl_embed(level)[None]
        # Token i may attend to token j when j's scale is not later than i's.
        attn_mask = level[:, None] >= level[None, :]
        cos, sin = rope[0, :total][None, None], rope[1, :total][None, None]
        for block, text in zip(self.blocks, cond.text):
            x = block.forward_teacher(x, cond.gss, text, cos, sin, attn_mask)
        return self.logits(x, cond.cond_BD)

    # -- cache & positions ------------------------------------------------------------------------
    def new_cache(self, rows: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        cfg = self.config
        return KVCache(cfg.depth, rows, cfg.num_heads, max_len, cfg.head_dim, dtype, device)

    def rope_table(self, full_schedule: list[tuple[int, int, int]], device: torch.device | str) -> Tensor:
        """`(2, L, head_dim // 2)` cos/sin of a template's full schedule (memoized per device)."""
        key = (tuple(full_schedule), str(device))
        if key not in self._rope_tables:
            cfg = self.config
            self._rope_tables[key] = rope2d_table(
                full_schedule,
                cfg.head_dim,
                base=cfg.rope_base,
                grid=cfg.rope_grid,
                normalized_by_hw=cfg.rope_normalized_by_hw,
            ).to(device)
        return self._rope_tables[key]


def random_state_dict(
    config: TransformerConfig, seed: int = 0, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """A reproducible random state dict with the module's keys (tests, fidelity checks).

    Weights ~ N(0, 0.02) (AdaLN vectors and norms around their identity), `zero_k_bias` stays 0.
    `device` draws the numbers there (fast for the real 2B/8B shapes on a GPU; other values than
    the CPU draw of the same seed).
    """
    device = torch.device(device or "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in InfinityTransformer(config).state_dict().items()}
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("zero_k_bias"):
            out[key] = torch.zeros(shape, device=device)
            continue
        noise = torch.randn(shape, generator=gen, device=device)
        if key.endswith("scale_mul_1H11"):
            out[key] = math.log(4.0) + 0.1 * noise
        elif key.endswith(("norm.weight", "ca_norm.weight")) or key == "text_norm.weight":
            out[key] = 1.0 + 0.1 * noise
        elif key.endswith("ada_gss"):
            out[key] = noise / shape[-1] ** 0.5
        else:
            out[key] = 0.02 * noise if "cfg_uncond" not in key else noise / config.text_channels**0.5
    return out
