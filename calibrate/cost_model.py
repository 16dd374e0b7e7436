"""A cost model of generation time on a device whose search does not time every trial (the CPU):
what a policy's generation will take, predicted from what its trace says ran.

Why: FLOPs do not predict a CPU's wall clock. On `tiny` (2 cores) the shipped 1.50× FLOP policy ran
1.0–1.3× faster, because work FLOPs do not count costs as much as the pruning saves: each scale's
fixed cost (head, sampling, a dozen small kernels per block), the entropy the pruner reads, the
gather and scatter of a pruned block, and the VAE decode (issue 25).

The model is linear in what the trace records, per scale that ran (one chunk of `rows` transformer
rows, `n` tokens; sums over the scale's blocks):

    ms = c_scale · 1 + c_token_rows · rows·n/10³ + c_block · blocks that ran
       + c_linear · linear GFLOP + c_attention · attention GFLOP
       + c_entropy · entropy GFLOP + c_entropy_pass · entropy passes
       + c_pruned · pruned blocks' rows·n·C/10⁶ + c_pruned_block · pruned blocks

and per chunk `c_decode · images` for the VAE decode (text encoding is left out everywhere, as the
latency objective leaves it out). Entropy GFLOP are those of the scores QKᵀ that an entropy pass
recomputes (2·C·n·kv per row, at blocks whose `LayerRecord.entropy` is set); a pruned block is one
that ran on fewer tokens than the scale has. Coefficients are non-negative (`scipy.optimize.nnls`),
so the model never predicts that more work is faster. They are fitted on timed generations of the
pre-sampling prompts (unpruned, with entropy everywhere, and a few random policies of the search
space; calibrate.stages.presample) or read from the backbone's config (`cost_model:`, fitted the
same way on a reference machine), which keeps a default calibration reproducible bit for bit.
Predicted speedup = predicted unpruned time / predicted policy time, over the same prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from toprovar.flops import layer_flops, model_dims, scale_rows

SCALE_TERMS = (
    "scale",
    "token_rows",
    "block",
    "linear",
    "attention",
    "entropy",
    "entropy_pass",
    "pruned",
    "pruned_block",
)
TERMS = (*SCALE_TERMS, "decode")


def scale_features(trace: Any, spec: Any | None = None) -> tuple[list[int], np.ndarray]:
    """(scale indices, features `(scales, len(SCALE_TERMS))`) of the scales of `trace` that ran."""
    by_scale: dict[int, list[dict]] = {}
    entropy = {(r.scale, r.layer) for r in trace.layers if getattr(r, "entropy", False)}
    for row in layer_flops(trace, spec):
        by_scale.setdefault(row["scale"], []).append(row)
    width, _ = model_dims(trace, spec)
    scales, rows_out = [], []
    for record in trace.scales:
        if record.exited:
            continue
        layers = by_scale.get(record.scale, [])
        rows = scale_rows(trace, record)
        n = record.tokens
        ran = [r for r in layers if r["kept"]]
        probes = [r for r in layers if (record.scale, r["layer"]) in entropy]
        entropy_flops = sum(rows * 2.0 * width * n * max(r["kv_length"], n) for r in probes)
        pruned = sum(1 for r in ran if r["kept"] < n)
        rows_out.append(
            [
                1.0,
                rows * n / 1e3,
                float(len(ran)),
                sum(r["linear_flops"] for r in ran) / 1e9,
                sum(r["attention_flops"] for r in ran) / 1e9,
                entropy_flops / 1e9,
                float(len(probes)),
                pruned * rows * n * width / 1e6,
                float(pruned),
            ]
        )
        scales.append(record.scale)
    return scales, np.asarray(rows_out, dtype=np.float64).reshape(-1, len(SCALE_TERMS))


@dataclass(frozen=True)
class CostModel:
    """Milliseconds per unit of each term (module docstring); `fitted_on`: what it was fitted on."""

    scale: float
    token_rows: float
    block: float
    linear: float
    attention: float
    entropy: float
    entropy_pass: float
    pruned: float
    pruned_block: float
    decode: float  # per image
    fitted_on: str = ""

    def coefficients(self) -> np.ndarray:
        return np.asarray([getattr(self, t) for t in SCALE_TERMS], dtype=np.float64)

    def predict_ms(self, trace: Any, spec: Any | None = None, images: float | None = None) -> float:
        """Predicted time of one traced call: its scale loop and its decode of `images` (default:
        the call's batch)."""
        _, features = scale_features(trace, spec)
        images = trace.batch if images is None else images
        return float(features.sum(0) @ self.coefficients() + self.decode * images)

    def predict_total_ms(self, traces: Sequence[Any], spec: Any | None = None, shares: Sequence[float] = ()) -> float:
        """Summed over chunks; `shares[i]` scales chunk i (a padded chunk's real share, as latency does)."""
        shares = list(shares) or [1.0] * len(traces)
        return sum(share * self.predict_ms(trace, spec) for trace, share in zip(traces, shares))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostModel:
        known = {t: float(data[t]) for t in TERMS}
        return cls(**known, fitted_on=str(data.get("fitted_on", "")))


@dataclass(frozen=True)
class Fit:
    """A fitted model and how well it predicts the calls it was fitted on (whole-call times)."""

    model: CostModel
    calls: int
    mean_abs_error: float  # mean |predicted / measured − 1| over the calls
    max_abs_error: float


def fit_cost_model(traces: Iterable[Any], spec: Any | None = None, fitted_on: str = "") -> Fit:
    """Non-negative least squares of every ran scale's measured `time_ms` on its features, and of
    each call's `decode_ms` on its image count. Needs scales of several sizes (any generation has them)."""
    from scipy.optimize import nnls

    traces = list(traces)
    features, times, decode_images, decode_ms = [], [], [], []
    for trace in traces:
        scales, rows = scale_features(trace, spec)
        measured = {s.scale: s.time_ms for s in trace.scales}
        for si, row in zip(scales, rows):
            if math.isfinite(measured[si]):
                features.append(row)
                times.append(measured[si])
        if math.isfinite(trace.decode_ms):
            decode_images.append(trace.batch)
            decode_ms.append(trace.decode_ms)
    if not features:
        raise ValueError("no timed scale to fit a cost model on")
    a, b = np.asarray(features), np.asarray(times)
    scale = np.maximum(a.max(0), 1e-12)  # columns of unit size: nnls' tolerance treats them alike
    coef, _ = nnls(a / scale, b)
    coef = coef / scale
    decode = float(np.sum(decode_ms) / max(np.sum(decode_images), 1)) if decode_ms else 0.0
    model = CostModel(*(float(c) for c in coef), decode=decode, fitted_on=fitted_on)
    errors = call_errors(model, traces, spec)
    return Fit(
        model,
        len(errors),
        float(np.mean(np.abs(errors))) if errors else math.nan,
        float(np.max(np.abs(errors))) if errors else math.nan,
    )


def call_errors(model: CostModel, traces: Iterable[Any], spec: Any | None = None) -> list[float]:
    """predicted / measured − 1 of each timed call's whole time (scale loop + decode)."""
    return [
        model.predict_ms(t, spec) / t.total_ms - 1.0 for t in traces if math.isfinite(t.total_ms) and t.total_ms > 0
    ]


def prediction_error(predicted_speedup: float, measured_speedup: float) -> float:
    """Relative error of a predicted speedup against the measured one (+0.1: predicted 10 % high)."""
    return predicted_speedup / measured_speedup - 1.0
