"""What one generation call did and what it cost, as plain records -> pandas in one call.

Per scale: grid, tokens, wall time of the scale (transformer blocks, logits, sampling, code
update), whether generation stopped before it. Per (scale, layer): tokens that ran and, when
entropy was recorded, its mean over heads and kept tokens of the conditional rows. Timings on
CUDA come from CUDA events read once at the end (no host sync inside the loop); on CPU from
`time.perf_counter`. Text encoding and VAE decode are timed separately, outside the scale loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    rho: float | None = None  # low-entropy ratio ρ_s, when a pruner measured it


@dataclass
class LayerRecord:
    scale: int
    layer: int
    tokens: int  # tokens of the scale
    kept: int  # tokens that ran the block (0: block skipped)
    entropy_mean: float | None = None


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
    rows: int = 0  # transformer batch rows (2 * batch under CFG)
    kv_policy: str = "kept"
    pruning: dict = field(default_factory=dict)  # the pruner's decisions (method, D, R per layer, ...)
    embed_dim: int = 0  # model width and FFN width, for FLOP accounting (toprovar.flops)
    ffn_hidden: int = 0
    depth: int = 0

    def to_frame(self):
        """One row per scale (pandas DataFrame): grid, time, ρ_s, exit flag, tokens kept summed
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

    @property
    def scale_ms(self) -> list[float]:
        return [r.time_ms for r in self.scales]


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


def entropy_summary(entropy: Tensor, cond_rows: int) -> Tensor:
    """Mean entropy of the conditional rows (a 0-d tensor: read it once at the end)."""
    return entropy[:cond_rows].float().mean()
