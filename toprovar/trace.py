"""What one generation call did and what it cost, as plain records -> pandas in one call.

Per scale: grid, tokens, rows of the transformer batch (2B under guidance, B from a CFG skip's
scale on), wall time of the scale (transformer blocks, logits, sampling, code update), whether
generation stopped before it. Per (scale, layer): tokens that ran and, when
entropy was recorded, its mean over heads and kept tokens of the conditional rows. Timings on
CUDA come from CUDA events read once at the end (no host sync inside the loop); on CPU from
`time.perf_counter`. Text encoding and VAE decode are timed separately, outside the scale loop.

Which tokens ran (not only how many) is recorded only on request: run the call with the policy
wrapped in `toprovar.pruning.recording.KeptTokenRecorder` (`record_kept_tokens(policy)`) and
`trace.kept_index` holds the index tensor the pruner returned at every pruned (scale, layer);
`kept_maps()` turns it into one h×w map per scale of how many layers ran each token (the paper's
Fig. 9, `toprovar.plots`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class ScaleRecord:
    scale: int
    h: int
    w: int
    tokens: int
    time_ms: float = float("nan")
    exited: bool = False  # generation stopped before this scale (it did not run)
    rho: float | None = None  # low-entropy ratio ρ_s, where a pruner measured it (ToProVAR: where a decision reads it)
    rows: int = 0  # transformer batch rows this scale runs (0: unknown, read `Trace.rows`)


@dataclass
class LayerRecord:
    scale: int
    layer: int
    tokens: int  # tokens of the scale
    kept: int  # tokens that ran the block (0: block skipped)
    entropy_mean: float | None = None
    entropy: bool = False  # the block computed its attention entropy (a probe, or `record_entropy`)


@dataclass
class Trace:
    backbone: str
    batch: int
    schedule: list[tuple[int, int, int]]
    scales: list[ScaleRecord] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    text_encode_ms: float = float("nan")
    decode_ms: float = float("nan")
    total_ms: float = float("nan")  # scale loop + decode (text encoding excluded)
    rows: int = 0  # transformer batch rows of the unpruned reference (2 * batch under CFG); per scale: ScaleRecord.rows
    kv_policy: str = "kept"
    pruning: dict = field(default_factory=dict)  # the pruner's decisions (method, D, R per layer, ...)
    embed_dim: int = 0  # model width and FFN width, for FLOP accounting (toprovar.flops)
    ffn_hidden: int = 0
    depth: int = 0
    # (scale, layer) -> LongTensor (rows, K) of the tokens that ran, for the pruned layers only;
    # None unless the call ran under `KeptTokenRecorder` (references, no copy, no host sync).
    kept_index: dict | None = None

    def kept_maps(self, image: int = 0) -> dict[int, Tensor]:
        """Per scale: an (h, w) int64 map of how many layers ran each token of image `image`
        (its conditional row under CFG). Scales that did not run (exit) are all zeros.

        Needs `kept_index` for layers that ran only part of their tokens (see `KeptTokenRecorder`).
        """
        ran: dict[tuple[int, int], LayerRecord] = {(r.scale, r.layer): r for r in self.layers}
        maps: dict[int, Tensor] = {}
        for s in self.scales:
            counts = torch.zeros(s.tokens, dtype=torch.int64)
            for li in range(self.depth):
                rec = ran.get((s.scale, li))
                if rec is None or rec.kept == 0:
                    continue
                if rec.kept == rec.tokens:
                    counts += 1
                    continue
                if self.kept_index is None or (s.scale, li) not in self.kept_index:
                    raise ValueError(
                        f"the trace has no kept-token indices for scale {s.scale}, layer {li}; "
                        "generate with policy=toprovar.pruning.recording.record_kept_tokens(policy)"
                    )
                counts[self.kept_index[(s.scale, li)][image].cpu()] += 1
            maps[s.scale] = counts.view(s.h, s.w)
        return maps

    def to_frame(self):
        """One row per scale (pandas DataFrame): grid, rows, time, ρ_s, exit flag, tokens kept summed
        over layers, FLOPs executed vs unpruned. `layers_frame()` gives the per-layer rows."""
        import pandas as pd

        frame = pd.DataFrame([vars(r) for r in self.scales])
        layers = self.layers_frame()
        if len(layers):
            per_scale = layers.groupby("scale")[["kept", "flops_executed", "flops_unpruned"]].sum()
            frame = frame.join(per_scale.rename(columns={"kept": "kept_token_layers"}), on="scale")
        frame["D"] = self.pruning.get("D")
        return frame

    def layers_frame(self):
        """One row per (scale, layer) that ran: tokens, kept (0: block skipped), entropy mean, FLOPs."""
        import pandas as pd

        from toprovar.flops import layer_flops

        frame = pd.DataFrame([vars(r) for r in self.layers])
        if not len(frame) or not self.embed_dim:
            return frame
        flops = pd.DataFrame(layer_flops(self))[["scale", "layer", "flops_executed", "flops_unpruned"]]
        frame = frame.merge(flops, on=["scale", "layer"], how="left")
        R = self.pruning.get("R")
        if R is not None:
            frame["R"] = [R[i] for i in frame["layer"]]
        return frame


class Timer:
    """Marks on the device's timeline; `elapsed_ms(a, b)` after `finish()` (one sync at the end)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[object] = []

    def mark(self) -> int:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())
        return len(self._marks) - 1

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed_ms(self, start: int, end: int) -> float:
        a, b = self._marks[start], self._marks[end]
        if self.cuda:
            return float(a.elapsed_time(b))  # type: ignore[union-attr]
        return (b - a) * 1e3  # type: ignore[operator]


def median_latency_ms(run: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `run()` in ms after `warmup` calls: CUDA events on GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def entropy_summary(entropy: Tensor, cond_rows: int) -> Tensor:
    """Mean entropy of the conditional rows (a 0-d tensor: read it once at the end)."""
    return entropy[:cond_rows].float().mean()
