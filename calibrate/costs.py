"""Cost and behaviour of generation calls, read from their traces (the CPU objective of the search).

FLOPs come from the project's accounting (`toprovar.flops`: transformer blocks that ran vs the
unpruned model, from the trace); the summary says what the policy did.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from toprovar.flops import trace_flops


def flop_totals(traces: Sequence[Any], backend: Any) -> tuple[float, float]:
    """(executed, unpruned) FLOPs summed over the chunks of one batched generation."""
    spec = backend.backbone.spec
    pairs = [trace_flops(trace, spec) for trace in traces]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def trace_summary(traces: Sequence[Any]) -> dict[str, float]:
    """What the policy did, summed over chunks: kept share of token-layer work overall and per
    scale, blocks skipped, scales not run (early exit), mean first pruned scale D."""
    kept: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    skipped = exited = 0
    starts = []  # D, the first pruned scale, of each chunk (ToProVAR); the scale count when none
    for trace in traces:
        pruning = getattr(trace, "pruning", None) or {}
        if "D" in pruning:
            starts.append(len(trace.scales) if pruning["D"] is None else pruning["D"])
        for rec in trace.layers:
            kept[rec.scale] += rec.kept
            total[rec.scale] += rec.tokens
            skipped += rec.kept == 0
        exited += sum(bool(s.exited) for s in trace.scales)
    summary = {
        "kept_share": sum(kept.values()) / max(1, sum(total.values())),
        "blocks_skipped": float(skipped),
        "scales_exited": float(exited),
    }
    summary.update({f"kept_share.s{si}": kept[si] / max(1, total[si]) for si in sorted(total)})
    if starts:
        summary["D_mean"] = sum(starts) / len(starts)
    return summary
