"""FLOPs of generation calls, read from their traces (the CPU objective of the search).

Uses the project's FLOP accounting (`toprovar.flops`) when it is present; until then the same
model the design states: per (scale, layer), tokens kept × 28·d² for the linear layers (self-
attention q/k/v/out, cross-attention q/out, FFN with ratio 4) plus 4·d·Lq·Lk for self-attention,
where Lk counts the keys cached so far for that layer (kept tokens of earlier scales and this one).
Cross-attention over the short text is left out. Rows: 2 per image (classifier-free guidance).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence


def _trace_flops_estimate(trace: Any, embed_dim: int, mlp_ratio: float) -> tuple[float, float]:
    linear_per_token = 2.0 * (6.0 + 2.0 * mlp_ratio) * embed_dim ** 2
    rows = 2 * trace.batch
    executed = unpruned = 0.0
    cached_kept: dict[int, int] = defaultdict(int)
    cached_all: dict[int, int] = defaultdict(int)
    for rec in sorted(trace.layers, key=lambda r: (r.scale, r.layer)):
        cached_kept[rec.layer] += rec.kept
        cached_all[rec.layer] += rec.tokens
        executed += rows * (rec.kept * linear_per_token + 4.0 * embed_dim * rec.kept * cached_kept[rec.layer])
        unpruned += rows * (rec.tokens * linear_per_token + 4.0 * embed_dim * rec.tokens * cached_all[rec.layer])
    # Scales skipped by an early exit have no layer records: count them as unpruned work only.
    ran = {rec.scale for rec in trace.layers}
    depth = max((rec.layer for rec in trace.layers), default=-1) + 1
    for scale in trace.scales:
        if scale.scale not in ran:
            for layer in range(depth):
                cached_all[layer] += scale.tokens
                unpruned += rows * (scale.tokens * linear_per_token
                                    + 4.0 * embed_dim * scale.tokens * cached_all[layer])
    return executed, unpruned


def trace_flops(trace: Any, backend: Any) -> tuple[float, float]:
    """(executed, unpruned) FLOPs of one traced generation call."""
    try:
        from toprovar import flops as accounting
    except ImportError:
        accounting = None
    if accounting is not None and hasattr(accounting, "trace_flops"):
        executed, unpruned = accounting.trace_flops(trace, backend.backbone.spec)
        return float(executed), float(unpruned)
    config = backend.backbone.transformer.config
    return _trace_flops_estimate(trace, config.embed_dim, config.mlp_ratio)


def flop_totals(traces: Sequence[Any], backend: Any) -> tuple[float, float]:
    """(executed, unpruned) FLOPs summed over the chunks of one batched generation."""
    pairs = [trace_flops(trace, backend) for trace in traces]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def trace_summary(traces: Sequence[Any]) -> dict[str, float]:
    """What the policy did, summed over chunks: kept share of token-layer work overall and per
    scale, blocks skipped, scales not run (early exit)."""
    kept: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    skipped = exited = 0
    for trace in traces:
        for rec in trace.layers:
            kept[rec.scale] += rec.kept
            total[rec.scale] += rec.tokens
            skipped += rec.kept == 0
        exited += sum(bool(s.exited) for s in trace.scales)
    summary = {"kept_share": sum(kept.values()) / max(1, sum(total.values())),
               "blocks_skipped": float(skipped), "scales_exited": float(exited)}
    summary.update({f"kept_share.s{si}": kept[si] / max(1, total[si]) for si in sorted(total)})
    return summary
