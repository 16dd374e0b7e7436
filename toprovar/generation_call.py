"""One `generate` call from its arguments to its result: `prepare_call` checks the arguments and
resolves the settings and the path the scales take into a `GenerationCall` (the state the loop's
steps share), `call_result` turns it, after the loop, into a `GenerationResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from toprovar.errors import UserError
from toprovar.fast import FastOptions, FastState, RowInputs, resolve_fast
from toprovar.models.registry import Backbone
from toprovar.models.transformer import KV_POLICIES, InfinityTransformer
from toprovar.pruning import Pruner, as_pruner
from toprovar.sampling import GuidedSampling
from toprovar.schedules import tokens_per_scale
from toprovar.trace import LayerRecord, ScaleRecord, Timer, Trace


@dataclass
class GenerationResult:
    images: Tensor  # (B, H, W, 3) uint8 RGB on CPU
    trace: Trace
    bits: list[Tensor]  # per scale that ran: (B, tokens, bits per token) int64 on CPU
    runtime: dict = field(default_factory=dict)  # which path ran: fast options, graphs, capture


@dataclass
class GenerationCall:
    """What the steps of one `generate` call share: its settings, the path its scales take, the
    trace, and from the loop's conditioning step on the text condition, the KV cache and the
    generators."""

    backbone: Backbone
    h_div_w: float
    schedule: list[tuple[int, int, int]]
    batch: int  # images
    rows: int  # transformer rows at scale 0: 2 * batch with guidance (conditional rows first)
    scale_rows: tuple[int, ...]  # rows per scale: `batch` from the policy's CFG skip on
    sampling: GuidedSampling
    pruner: Pruner
    opts: FastOptions | None
    static: bool  # static buffers: unpruned scales as whole-scale graphs, planned scales as units
    planned: bool  # static buffers and a pruner that plans statically
    record_entropy: bool
    kv_policy: str
    trace: Trace
    runtime: dict[str, Any]
    rope: Tensor | None = None
    fast: FastState | None = None  # the static buffers, graphs and units (when `static`)
    # Text condition, AdaLN vectors (fused eager blocks) and KV cache (the static one when there
    # are static buffers), per row count of the schedule: views of the first rows after a CFG skip.
    views: dict[int, RowInputs] = field(default_factory=dict)
    generators: list[torch.Generator] = field(default_factory=list)
    vae_schedule: list = field(default_factory=list)
    units_before: dict[str, int] = field(default_factory=dict)
    captures_before: int = 0
    entropy_means: list[tuple[LayerRecord, Tensor]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # the path each scale that ran took

    @property
    def model(self) -> InfinityTransformer:
        return self.backbone.transformer

    def at(self, si: int) -> RowInputs:
        """The condition, AdaLN vectors and KV cache of the rows scale si runs."""
        return self.views[self.scale_rows[si]]

    @property
    def fused(self) -> bool:
        return self.opts is not None and self.opts.fused

    @property
    def sync_free(self) -> bool:
        return self.opts is not None and self.opts.sync_free_sampling


def prepare_call(
    backbone: Backbone,
    prompts: list[str],
    seeds: list[int],
    *,
    guidance_scale,
    temperature,
    top_k: int,
    top_p: float,
    h_div_w: float,
    pixels: str | None,
    policy: Any,
    record_entropy: bool,
    kv_policy: str,
    fast: bool | FastOptions | None,
) -> GenerationCall:
    """Check the arguments, resolve the settings and the path the scales take, start the trace."""
    if not prompts or len(prompts) != len(seeds):
        raise UserError(f"give one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if kv_policy not in KV_POLICIES:
        raise UserError(f"kv_policy={kv_policy!r}; choose one of {', '.join(KV_POLICIES)}")
    spec, model = backbone.spec, backbone.transformer
    schedule = spec.schedules.scale_schedule(h_div_w, pixels or spec.pixels)
    pruner = as_pruner(policy)
    guidance = spec.guidance_scale if guidance_scale is None else guidance_scale
    reference = GuidedSampling.per_scale(guidance, 1.0, len(schedule), top_k, top_p)
    skip = pruner.skip_uncond_from_scale
    if skip is not None:  # CFG skip: guidance scale 1 from there on, so those scales need no unconditional rows
        guidance = [g if si < skip else 1.0 for si, g in enumerate(reference.guidance_scale)]
    sampling = GuidedSampling.per_scale(
        guidance, spec.temperature if temperature is None else temperature, len(schedule), top_k, top_p
    )
    batch = len(prompts)
    rows = 2 * batch if sampling.guided else batch
    scale_rows = tuple(rows if skip is None or si < skip else batch for si in range(len(schedule)))
    opts = resolve_fast(fast, backbone.device)
    # Static buffers + CUDA graphs: a scale where the pruner does not act as one graph; with a
    # pruner that plans statically, the probe layers, the planned layers and the head as units.
    static = opts is not None and opts.graphs and not record_entropy
    planned = static and pruner.plans_statically
    runtime = {
        "fast": None if opts is None else vars(opts).copy(),
        "planned_units": planned,
        "device": str(backbone.device),
    }
    tokens = tokens_per_scale(schedule)
    # The trace's rows are the unpruned reference's (2B under guidance): FLOPs count a CFG skip as saved work.
    trace = Trace(
        backbone=spec.name,
        batch=batch,
        schedule=schedule,
        rows=2 * batch if reference.guided else batch,
        kv_policy=kv_policy,
        embed_dim=model.config.embed_dim,
        ffn_hidden=model.config.ffn_hidden,
        depth=model.depth,
        scales=[ScaleRecord(si, h, w, tokens[si], rows=scale_rows[si]) for si, (_, h, w) in enumerate(schedule)],
    )
    return GenerationCall(
        backbone,
        h_div_w,
        schedule,
        batch,
        rows,
        scale_rows,
        sampling,
        pruner,
        opts,
        static,
        planned,
        record_entropy,
        kv_policy,
        trace,
        runtime,
    )


def to_uint8(img: Tensor) -> Tensor:
    """`(B, 3, H, W)` in [-1, 1] -> `(B, H, W, 3)` uint8 (official: truncation after scaling)."""
    return ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).mul(255).to(torch.uint8).cpu()


def call_result(
    call: GenerationCall,
    timer: Timer,
    scale_marks: list[tuple[int, int]],
    start: int,
    decode_start: int,
    end: int,
    images: Tensor,
    bits: list[Tensor],
) -> GenerationResult:
    """Times and entropy means into the trace (read once, after the loop), runtime counters, the result."""
    trace = call.trace
    for si, (a, b) in enumerate(scale_marks):
        trace.scales[si].time_ms = timer.elapsed_ms(a, b)
    trace.decode_ms = timer.elapsed_ms(decode_start, end)
    trace.total_ms = timer.elapsed_ms(start, end)
    for record, value in call.entropy_means:
        record.entropy_mean = float(value)
    call.runtime["scale_paths"] = list(call.paths)
    call.runtime["graph_loop"] = call.static and all(path == "graph" for path in call.paths)
    if call.fast is not None:
        call.runtime["capture_ms"] = call.fast.capture_ms
        call.runtime["captures"] = call.fast.captures - call.captures_before  # this call's: its time includes them
        if call.planned:
            call.runtime["units"] = {k: v - call.units_before[k] for k, v in call.fast.unit_cache.counts.items()}
    return GenerationResult(images=to_uint8(images), trace=trace, bits=[b.cpu() for b in bits], runtime=call.runtime)
