"""Transformer block: the keep (token pruning) path, KV cache policies, entropy, RoPE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.backbones import SMALL
from toprovar.attention import attention
from toprovar.models.transformer import (
    InfinityTransformer,
    KVCache,
    RopeSlice,
    random_state_dict,
    rope2d_table,
)
from toprovar.schedules import full_schedule

CFG = SMALL


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture
def setup():
    torch.manual_seed(_seed())
    model = InfinityTransformer(CFG).eval()
    model.load_state_dict(random_state_dict(CFG, seed=_seed()))
    rows, lt, n, prefix = 4, 5, 36, 21
    text = torch.randn(rows // 2, lt, CFG.text_channels)
    cond = model.encode_condition(text, [lt, 3], with_uncond=True)
    table = rope2d_table(full_schedule(1.0), CFG.head_dim)
    rope = RopeSlice(table[0, prefix : prefix + n], table[1, prefix : prefix + n])
    x = torch.randn(rows, n, CFG.embed_dim)
    prefix_k = F.normalize(torch.randn(rows, CFG.num_heads, prefix, CFG.head_dim), dim=-1)
    prefix_v = torch.randn(rows, CFG.num_heads, prefix, CFG.head_dim)
    return model, cond, rope, x, prefix_k, prefix_v


def _cache(prefix_k, prefix_v, n):
    rows, heads, prefix, dim = prefix_k.shape
    cache = KVCache(1, rows, heads, prefix + n, dim, torch.float32, "cpu")
    cache[0].append(prefix_k, prefix_v)
    return cache[0]


def _rotate(x, cos, sin):
    """RoPE as complex multiplication of adjacent pairs (independent of the model's code)."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * torch.complex(cos, sin)).reshape(x.shape)


def _reference_block(block, x, gss, text, rope, prefix_k, prefix_v, keep, kv_policy):
    """The block's math written out per row, on the kept tokens only."""
    c, heads = CFG.embed_dim, CFG.num_heads
    hd = c // heads
    g1, g2, s1, s2, b1, b2 = (block.ada_gss + gss).unbind(2)
    sa, ca = block.sa, block.ca
    w = sa.mat_qkv.weight
    temp = sa.scale_mul_1H11.clamp_max(math.log(100)).exp().view(heads, 1, 1)
    out, new_k, entropies = x.clone(), [], []
    for b in range(x.shape[0]):
        idx = keep[b]
        xb = x[b, idx]
        h = F.layer_norm(xb, (c,), eps=1e-6) * (1 + s1[b]) + b1[b]
        q = (h @ w[:c].T + sa.q_bias).view(-1, heads, hd).transpose(0, 1)
        q = _rotate(F.normalize(q, dim=-1) * temp, rope.cos[idx], rope.sin[idx])
        src = idx if kv_policy == "kept" else torch.arange(x.shape[1])
        hk = F.layer_norm(x[b, src], (c,), eps=1e-6) * (1 + s1[b]) + b1[b]
        k = F.normalize((hk @ w[c : 2 * c].T).view(-1, heads, hd).transpose(0, 1), dim=-1)
        k = _rotate(k, rope.cos[src], rope.sin[src])
        v = (hk @ w[2 * c :].T + sa.v_bias).view(-1, heads, hd).transpose(0, 1)
        keys, values = torch.cat([prefix_k[b], k], 1), torch.cat([prefix_v[b], v], 1)
        p = (q @ keys.transpose(-1, -2)).softmax(-1)
        entropies.append(-(p * p.log()).sum(-1))
        att = (p @ values).transpose(0, 1).reshape(-1, c)
        xb = xb + (att @ sa.proj.weight.T + sa.proj.bias) * g1[b]
        qc = ca.mat_q(block.ca_norm(xb)).view(-1, heads, hd).transpose(0, 1)
        tk, tv = text.k[b], text.v[b]
        scores = qc @ tk.transpose(-1, -2) / math.sqrt(hd)
        if text.mask is not None:
            scores = scores.masked_fill(~text.mask[b], -torch.inf)
        xb = xb + ca.proj((scores.softmax(-1) @ tv).transpose(0, 1).reshape(-1, c))
        h2 = F.layer_norm(xb, (c,), eps=1e-6) * (1 + s2[b]) + b2[b]
        xb = xb + block.ffn.fc2(F.gelu(block.ffn.fc1(h2), approximate="tanh")) * g2[b]
        out[b, idx] = xb
        new_k.append(k)
    return out, torch.stack(new_k), torch.stack(entropies)


def test_keep_all_is_bit_identical_to_no_keep(setup) -> None:
    model, cond, rope, x, pk, pv = setup
    block, n = model.blocks[1], x.shape[1]
    with torch.no_grad():
        c1, c2 = _cache(pk, pv, n), _cache(pk, pv, n)
        full, e1 = block(x, cond.gss, cond.text[1], rope, c1, entropy=True)
        keep = torch.arange(n).expand(x.shape[0], n)
        kept, e2 = block(x, cond.gss, cond.text[1], rope, c2, keep=keep, entropy=True)
    assert torch.equal(full, kept) and torch.equal(e1, e2)
    assert c1.fill == c2.fill and torch.equal(c1.k[:, :, : c1.fill], c2.k[:, :, : c2.fill])


@pytest.mark.parametrize("kv_policy", ["kept", "all"])
def test_keep_subset_matches_reference(setup, kv_policy: str) -> None:
    model, cond, rope, x, pk, pv = setup
    block, rows, n = model.blocks[0], x.shape[0], x.shape[1]
    k = 13
    keep = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(rows)])
    with torch.no_grad():
        cache = _cache(pk, pv, n)
        out, ent = block(x, cond.gss, cond.text[0], rope, cache, keep=keep, entropy=True, kv_policy=kv_policy)
        ref, ref_k, ref_ent = _reference_block(block, x, cond.gss, cond.text[0], rope, pk, pv, keep, kv_policy)
    appended = k if kv_policy == "kept" else n
    assert cache.fill == pk.shape[2] + appended
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[:, :, pk.shape[2] : cache.fill], ref_k, rtol=1e-5, atol=1e-5)
    assert ent.shape == (rows, CFG.num_heads, k)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-5)
    unkept = torch.ones(rows, n, dtype=torch.bool).scatter(1, keep, False)
    assert torch.equal(out[unkept], x[unkept])  # pruned tokens pass through unchanged


def test_full_block_matches_reference(setup) -> None:
    model, cond, rope, x, pk, pv = setup
    block, rows, n = model.blocks[1], x.shape[0], x.shape[1]
    with torch.no_grad():
        out, ent = block(x, cond.gss, cond.text[1], rope, _cache(pk, pv, n))
        ref, _, _ = _reference_block(
            block, x, cond.gss, cond.text[1], rope, pk, pv, torch.arange(n).expand(rows, n), "kept"
        )
    assert ent is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 17, 16), (1, 2, 64, 32)])
def test_attention_entropy_reference(shape) -> None:
    b, h, lq, d = shape
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lq + 9, d), torch.randn(b, h, lq + 9, d)
    out, ent = attention(q, k, v, entropy=True, scale=0.3)
    plain, none = attention(q, k, v, entropy=False, scale=0.3)
    assert none is None and ent.dtype == torch.float32 and ent.shape == (b, h, lq)
    p = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)


def test_kv_cache_layers_fill_independently() -> None:
    cache = KVCache(3, 2, 2, 10, 4, torch.float32, "cpu")
    a, b = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 2, 4)
    cache[0].append(a, a)
    cache[2].append(b, b)
    k, _ = cache[2].append(a[:, :, :3], a[:, :, :3])
    assert cache.fills == [6, 0, 5]
    assert torch.equal(k, torch.cat([b, a[:, :, :3]], 2))
    with pytest.raises(RuntimeError, match="overflow"):
        cache[0].append(a, a)


def test_rope_positions_follow_the_last_grid() -> None:
    """normalized_by_hw=2: a coarse scale's token sits at its grid position scaled to the last grid."""
    schedule = full_schedule(1.0)
    hd = 16
    table = rope2d_table(schedule, hd)
    half = hd // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    offset = sum(h * w for _, h, w in schedule[:3])  # scale 3: 6x6 grid, last grid 64x64
    r, c = 4, 5
    row_pos, col_pos = round(r * 64 / 6), round(c * 64 / 6)
    angles = torch.cat([row_pos * inv_freq, col_pos * inv_freq])
    torch.testing.assert_close(table[0, offset + r * 6 + c], torch.cos(angles))
    torch.testing.assert_close(table[1, offset + r * 6 + c], torch.sin(angles))
    assert table.shape == (2, sum(h * w for _, h, w in schedule), half)
