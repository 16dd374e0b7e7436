"""FLOP accounting of one generation call from its trace: what ran vs the unpruned model.

Counted (multiply-add = 2 FLOPs), per batch row, as in ../shared/reference/anchors.md:
  * linear layers per token and block: QKV 6C², out-proj 2C², cross-attn query and out-proj
    4C², FFN 4·C·F (28C² for F = 4C), for the tokens that ran the block;
  * self-attention 4·C·Lq·Lk with Lk the layer's KV-cache length after this scale's append
    (kv_policy 'kept': only tokens that ran were appended; 'all': every token of a block that ran).
Executed work counts the rows each scale ran (`ScaleRecord.rows`: B instead of 2B from a CFG
skip's scale on); the unpruned reference keeps the trace's rows (2B under guidance) at every scale.
Not counted (identical for every policy or negligible): text encoding, cross-attention scores
against the text (≤ 512 keys), the text K/V projections, embeddings, the head and sampling, and
the VAE decode. Scales a policy exited before are counted as unpruned work that did not run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def linear_flops_per_token(embed_dim: int, ffn_hidden: int) -> float:
    c = embed_dim
    return 12.0 * c * c + 4.0 * c * ffn_hidden


def model_dims(trace: Any, spec: Any | None) -> tuple[int, int]:
    """(width C, FFN hidden F) of the traced model: the trace's own, else the backbone spec's."""
    if getattr(trace, "embed_dim", 0):
        return trace.embed_dim, trace.ffn_hidden
    cfg = spec.transformer
    return cfg.embed_dim, cfg.ffn_hidden


def call_rows(trace: Any) -> int:
    """Transformer rows of the call: 2B under guidance (the unpruned reference's rows at every scale)."""
    return trace.rows or 2 * trace.batch


def scale_rows(trace: Any, record: Any) -> int:
    """Rows a scale ran: `ScaleRecord.rows` (B instead of 2B from a CFG skip's scale on), else the call's."""
    return getattr(record, "rows", 0) or call_rows(trace)


def layer_flops(trace: Any, spec: Any | None = None) -> list[dict]:
    """One row per (scale, layer) that the schedule has: executed and unpruned FLOPs."""
    c, f = model_dims(trace, spec)
    per_token = linear_flops_per_token(c, f)
    rows = call_rows(trace)
    ran = {(r.scale, r.layer): r.kept for r in trace.layers}
    depth = getattr(trace, "depth", 0) or max((r.layer for r in trace.layers), default=-1) + 1
    fill_exec: dict[int, int] = defaultdict(int)
    fill_full: dict[int, int] = defaultdict(int)
    out = []
    for s in trace.scales:
        n = s.tokens
        for li in range(depth):
            kept = ran.get((s.scale, li), 0)
            if kept:
                fill_exec[li] += kept if trace.kv_policy == "kept" else n
            fill_full[li] += n
            ran_rows = scale_rows(trace, s)
            linear = ran_rows * per_token * kept
            attention = ran_rows * 4.0 * c * kept * fill_exec[li] if kept else 0.0
            unpruned = rows * (per_token * n + 4.0 * c * n * fill_full[li])
            out.append(
                {
                    "scale": s.scale,
                    "layer": li,
                    "tokens": n,
                    "kept": kept,
                    "rows": ran_rows,
                    "kv_length": fill_exec[li] if kept else 0,  # keys this layer's attention read
                    "linear_flops": linear,
                    "attention_flops": attention,
                    "flops_executed": linear + attention,
                    "flops_unpruned": unpruned,
                }
            )
    return out


def trace_flops(trace: Any, spec: Any | None = None) -> tuple[float, float]:
    """(executed, unpruned) transformer FLOPs of one traced call."""
    rows = layer_flops(trace, spec)
    return sum(r["flops_executed"] for r in rows), sum(r["flops_unpruned"] for r in rows)
