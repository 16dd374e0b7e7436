"""The one generation loop: prompts + seeds -> images, bits per scale and a trace.

Next-scale generation as the official `Infinity.autoregressive_infer_cfg` does it (facts from the
official code): classifier-free guidance with a doubled batch (rows `[:B]` conditional, `[B:]`
with `cfg_uncond` text), guidance applied to the logits (official `cfg_insertion_layer=[0]`),
logits divided by the scale's temperature before guidance (`toprovar.sampling.GuidedSampling`),
bitwise top-k/top-p sampling, then the BSQ codes of the sampled bits are summed at full
resolution and the sum, resized to the next grid, is the next scale's input. After the last
scale the VAE decodes the summed codes.

Differences from the official loop, all numerically neutral: the KV cache is preallocated for the
whole schedule (no concatenation per scale); the text keys/values of every cross-attention are
projected once per call, not once per scale; each image has its own seeded generator (see
`toprovar.sampling`). Images are returned RGB (the official loop flips to BGR for OpenCV).

Pruning plugs in through the hooks of a `toprovar.pruning.Pruner` (docs/architecture.md). Each
scale takes one of three paths:
  * `_scale_graph`: where the pruner does not act (`acts_at(si)` False; everywhere for `none`),
    the scale runs exactly as unpruned: on the fast path one CUDA graph (a direct call on CPU);
  * `_scale_planned`: a pruner that plans statically (`plans_statically`, `static_plan(si)` = P)
    runs the first P blocks on every token (its probe layers, entropy observed), reads its plan
    for the other blocks once, and runs those blocks and the head as units of the static buffers
    (`toprovar.fast.units`). A plan that keeps every token of every block runs the rest of the
    scale on the same kernels as the unpruned graph, so it costs nothing and draws the same bits;
  * `_scale_eager`: block by block, the pruner deciding at each (plans fixed only after each block,
    and `record_entropy`).
Everything inside the scale loop stays on the device: no host synchronization except what a
pruner itself does (and `torch.multinomial`'s validity checks on the plain path).

Fast path (`fast=`, default on for CUDA): `toprovar.fast` (options, static buffers, graph capture,
planned units), whose state the backbone holds (`Backbone.fast_runtime`;
`toprovar.fast.release_fast_runtime` frees it). On CPU every switch keeps the eager float32
arithmetic, so `fast=True` is bit-identical to `fast=False`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from toprovar.attention import prefer_cudnn_attention
from toprovar.errors import UserError
from toprovar.fast import FastOptions, FastState, RowInputs, resolve_fast, row_views, run_block
from toprovar.fast.decode import decode
from toprovar.fast.text import pad_text
from toprovar.models.registry import Backbone
from toprovar.models.transformer import KV_POLICIES, InfinityTransformer, RopeSlice
from toprovar.models.vae import BSQVAE
from toprovar.pruning import Pruner, PrunerContext, as_pruner
from toprovar.renames import RENAMED, renamed_settings
from toprovar.sampling import GuidedSampling, bit_probs, draw_bits, make_generators, sample_bits
from toprovar.schedules import tokens_per_scale
from toprovar.trace import LayerRecord, ScaleRecord, Timer, Trace, entropy_summary

# Official inference defaults (tools/run_infinity.py).
DEFAULT_TOP_K = 900
DEFAULT_TOP_P = 0.97


# -- results ---------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    images: Tensor  # (B, H, W, 3) uint8 RGB on CPU
    trace: Trace
    bits: list[Tensor]  # per scale that ran: (B, tokens, bits per token) int64 on CPU
    runtime: dict = field(default_factory=dict)  # which path ran: fast options, graphs, capture


# -- helpers ---------------------------------------------------------------------------------------


def encode_prompts(text_encoder: Any, prompts: list[str], max_len: int) -> tuple[Tensor, list[int]]:
    """Text features `(B, L, C)` float32 and the number of real tokens of each prompt.

    `text_encoder.encode(prompts)` returns `toprovar.models.text_encoder.TextFeatures` (right-padded
    features, mask, lens). Reads the lengths on the host once, before the timed loop.
    """
    out = text_encoder.encode(prompts)
    features, lengths = out.features, [int(n) for n in out.lens.tolist()]
    if features.shape[1] > max_len:
        warnings.warn(
            f"text features of {features.shape[1]} tokens truncated to the model's limit of {max_len}", stacklevel=2
        )
        features, lengths = features[:, :max_len], [min(n, max_len) for n in lengths]
    return features[:, : max(lengths)].float(), lengths


def _autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    if device.type == "cuda" and dtype != torch.float32:
        # CUDA graph capture needs the autocast weight cache off (cached casts die with the context).
        return torch.autocast("cuda", dtype=dtype, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_uint8(img: Tensor) -> Tensor:
    """`(B, 3, H, W)` in [-1, 1] -> `(B, H, W, 3)` uint8 (official: truncation after scaling)."""
    return ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).mul(255).to(torch.uint8).cpu()


# -- the loop --------------------------------------------------------------------------------------


@dataclass
class _Call:
    """What the steps of one `generate` call share: its settings, the path its scales take, the
    trace, and from `_condition` on the text condition, the KV cache and the generators."""

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


def _prepare(
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
) -> _Call:
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
    return _Call(
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


def _encode_text(call: _Call, prompts: list[str]) -> tuple[Tensor, list[int]]:
    """Text features on the device and prompt lengths; the time goes to `trace.text_encode_ms`."""
    t0 = time.perf_counter()
    features, lengths = encode_prompts(call.backbone.text_encoder, prompts, call.model.config.text_maxlen)
    features = features.to(call.backbone.device)
    if call.static and call.backbone.device.type == "cuda":
        features = pad_text(features, call.model.config.text_maxlen)
    _sync(call.backbone.device)
    call.trace.text_encode_ms = (time.perf_counter() - t0) * 1e3
    return features, lengths


def _condition(call: _Call, features: Tensor, lengths: list[int], seeds: list[int]) -> Tensor:
    """Text condition, RoPE table, KV cache (in the static buffers when the call has them), AdaLN
    vectors, generators; starts the pruner. Returns the first scale's input tokens."""
    bb, model = call.backbone, call.model
    cond = model.encode_condition(features, lengths, with_uncond=call.sampling.guided)
    call.rope = model.rope_table(bb.spec.schedules.full_schedule(call.h_div_w), bb.device)
    if call.static:
        text = cond.text[0]
        key = (tuple(call.schedule), call.rows, call.batch, tuple(text.k.shape), text.mask is not None)
        call.fast, fresh = bb.fast_runtime.state_for(
            model,
            (*key, call.opts, bb.dtype, str(bb.device)),
            call.opts,
            schedule=call.schedule,
            batch=call.batch,
            cond=cond,
            rope=call.rope,
            dtype=bb.dtype,
            device=bb.device,
        )
        call.fast.buffers.load(cond, call.sampling)
        call.fast.buffers.cache.set_fill(0)
        call.units_before = dict(call.fast.unit_cache.counts)
        call.runtime["graphs_captured"] = fresh and bb.device.type == "cuda"
        call.captures_before = call.fast.captures
    host_plan = call.opts is not None and call.opts.host_plan
    call.pruner.begin(
        PrunerContext(
            call.schedule,
            model.depth,
            model.config.num_heads,
            call.batch,
            call.rows,
            bb.device,
            call.trace,
            call.scale_rows,
            host_plan=host_plan,
        )
    )
    # The eager blocks read the call's own condition (the static buffers hold a copy of it); the
    # fused ones their AdaLN vectors, made only when some scale may run block by block.
    cache = (
        call.fast.buffers.cache
        if call.static
        else model.new_cache(call.rows, sum(tokens_per_scale(call.schedule)), bb.dtype, bb.device)
    )
    acts = any(call.pruner.acts_at(si) for si in range(len(call.schedule)))
    ada = [block.ada(cond.gss) for block in model.blocks] if call.fused and (acts or not call.static) else None
    call.views = row_views(RowInputs(cond, ada, cache), call.scale_rows)
    call.generators = make_generators(seeds, bb.device)
    call.vae_schedule = bb.vae.vae_schedule(call.schedule)
    return model.first_tokens(cond)


def _run_scale(call: _Call, si: int, x: Tensor) -> Tensor:
    """Scale si on its path (see the module docs). Returns the sampled bits `(B, n, d)`."""
    pruner = call.pruner
    if not pruner.acts_at(si):  # runs exactly as unpruned
        call.paths.append("graph" if call.static else "eager")
        return _scale_graph(call, si, x) if call.static else _scale_eager(call, si, x, acting=False)
    probe = pruner.static_plan(si) if call.planned else None
    if probe is not None:  # probe blocks, the pruner's plan, planned blocks, head
        return _scale_planned(call, si, x, probe)
    call.paths.append("eager")  # block by block, the pruner deciding at each
    return _scale_eager(call, si, x, acting=True)


def _scale_graph(call: _Call, si: int, x: Tensor) -> Tensor:
    """Scale si as one CUDA graph (a direct call on CPU): every block on every token, the head,
    guidance, top-k/top-p. Returns the sampled bits."""
    n = call.trace.scales[si].tokens
    call.trace.layers.extend(LayerRecord(si, li, n, n) for li in range(call.model.depth))
    probs, x = call.fast.whole.run(si, x)
    call.pruner.end_scale(si, x)
    return draw_bits(probs, call.generators, n, sync_free=call.sync_free)


def _scale_planned(call: _Call, si: int, x: Tensor, probe: int) -> Tensor:
    """Scale si of a pruner with a static plan: the probe layers on every token (their entropy
    observed), the pruner's plan for the other layers read once, those layers, `end_scale`, the
    head, each as a unit of the static buffers. A plan that keeps every token of every layer runs
    those layers through the same block kernels as the unpruned graph (`planned_all_kept` in the
    call's paths), and the probe layers call attention as it does (entropy beside an unchanged
    output), so the scale's bits are the unpruned ones. Returns the sampled bits."""
    units, pruner, trace = call.fast.planned, call.pruner, call.trace
    depth, n = call.model.depth, trace.scales[si].tokens
    probes = range(min(probe, depth))
    if len(probes) and pruner.keep_tokens(si, 0, x) is not None:  # block 0 sees the scale's input
        raise RuntimeError(
            f"{type(pruner).__name__}.static_plan({si}) = {probe} probe layers, "
            "but keep_tokens returned indices for block 0: probe layers run every token"
        )
    wants = [pruner.wants_entropy(si, li) for li in probes]
    ents: list[Tensor | None] = []
    if len(probes):
        x, ents = units.run_layers(si, x, probes, [None] * len(probes), wants, call.kv_policy)
    for li, ent in zip(probes, ents):
        trace.layers.append(LayerRecord(si, li, n, n))
        if ent is not None:
            pruner.observe(si, li, ent)
    planned = range(len(probes), depth)
    keeps = [pruner.keep_tokens(si, li, x) for li in planned]  # (block 0 included when there is no probe)
    trace.layers.extend(
        LayerRecord(si, li, n, n if keep is None else int(keep.shape[1])) for li, keep in zip(planned, keeps)
    )
    call.paths.append("planned_all_kept" if all(keep is None for keep in keeps) else "planned")
    if len(planned):
        x, _ = units.run_layers(si, x, planned, keeps, [False] * len(planned), call.kv_policy)
    pruner.end_scale(si, x)
    return draw_bits(units.run_head(si, x), call.generators, n, sync_free=call.sync_free)


def _scale_eager(call: _Call, si: int, x: Tensor, *, acting: bool) -> Tensor:
    """Scale si block by block: where the pruner acts it picks each block's tokens from the hidden
    states it sees, entropy where it (or `record_entropy`) asks. Returns the sampled bits."""
    model, pruner, n, r = call.model, call.pruner, call.trace.scales[si].tokens, call.at(si)
    offset = sum(rec.tokens for rec in call.trace.scales[:si])
    rope_si = RopeSlice(call.rope[0, offset : offset + n], call.rope[1, offset : offset + n])
    gelu_epilogue = call.fused and call.opts.gelu_epilogue
    for li, block in enumerate(model.blocks):
        keep = pruner.keep_tokens(si, li, x) if acting else None
        record = LayerRecord(si, li, n, n if keep is None else keep.shape[1])
        call.trace.layers.append(record)
        if record.kept == 0:
            continue
        want = call.record_entropy or (acting and pruner.wants_entropy(si, li))
        x, ent = run_block(
            block,
            x,
            r.ada[li] if call.fused else None,
            r.cond.gss,
            r.cond.text[li],
            rope_si,
            r.cache[li],
            keep=keep,
            entropy=want,
            kv_policy=call.kv_policy,
            fused=call.fused,
            gelu_epilogue=gelu_epilogue,
            index_io=call.fused and call.opts.index_io,
        )
        if ent is not None:
            if acting:
                pruner.observe(si, li, ent)
            if call.record_entropy:
                call.entropy_means.append((record, entropy_summary(ent, call.batch)))
    pruner.end_scale(si, x)
    # perform guidance (temperature first), as the graphs do; then top-k/top-p and the draw
    logits = call.sampling.logits(model.logits(x, r.cond.cond_BD), si, call.batch)
    top_k, top_p = call.sampling.top_k, call.sampling.top_p
    if call.sync_free:
        return draw_bits(bit_probs(logits, top_k=top_k, top_p=top_p), call.generators, n, sync_free=True)
    return sample_bits(logits, call.generators, top_k=top_k, top_p=top_p)


def _next_input(call: _Call, si: int, bits: Tensor, summed: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """The codes of scale si's bits added to the running sum at full resolution; before the last
    scale also the next scale's input: the sum resized to its grid, embedded, one copy per row
    group of the next scale (conditional only after a CFG skip). Returns (next input or None
    after the last scale, the new sum)."""
    vae, (_, h, w) = call.backbone.vae, call.schedule[si]
    codes = vae.bits_to_codes(vae.tokens_to_bits(bits, (h, w)))
    if si == len(call.schedule) - 1:
        return None, codes if summed is None else summed + codes
    up = vae.upsample_codes(codes, call.vae_schedule[-1])
    summed = up if summed is None else summed + up
    nxt = vae.codes_to_tokens(vae.upsample_codes(summed, call.vae_schedule[si + 1]))
    return call.model.embed_codes(nxt).repeat(call.scale_rows[si + 1] // call.batch, 1, 1), summed


def _decode(call: _Call, summed: Tensor | None) -> Tensor:
    """The VAE's image of the summed codes (zeros when no scale ran); `toprovar.fast.decode` on the
    fast CUDA path."""
    vae, device, opts = call.backbone.vae, call.backbone.device, call.opts
    if summed is None:  # stopped before the first scale: nothing was generated
        _, fh, fw = call.vae_schedule[-1]
        summed = torch.zeros(call.batch, vae.codebook_dim, 1, fh, fw, device=device)
    if opts is not None and device.type == "cuda" and isinstance(vae, BSQVAE):
        return decode(vae, summed, opts)
    return vae.decode(summed)


def _result(
    call: _Call,
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
    return GenerationResult(images=_to_uint8(images), trace=trace, bits=[b.cpu() for b in bits], runtime=call.runtime)


def _progress(scales: range, progress: bool):
    if not progress:
        return scales
    from tqdm.auto import tqdm

    return tqdm(scales, desc="scales", leave=False)


def generate(
    backbone: Backbone,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float | Sequence[float] | None = None,
    temperature: float | Sequence[float] | None = None,
    top_k: int = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    h_div_w: float = 1.0,
    pixels: str | None = None,
    policy: Any = None,
    record_entropy: bool = False,
    kv_policy: str = "kept",
    progress: bool = False,
    fast: bool | FastOptions | None = None,
    **renamed: Any,
) -> GenerationResult:
    """Generate one image per (prompt, seed).

    guidance_scale / temperature: one value or one per scale (defaults: the backbone's); their old
    names `cfg` / `tau` work for one release with a FutureWarning. pixels: a budget of the
    backbone's schedule family, e.g. '0.06M', '0.25M', '0.60M' or '1M' (default: the backbone's).
    policy: None/'none', a Pruner, or a policy that `toprovar.pruning.as_pruner` understands.
    record_entropy: request every block's attention entropy and record its mean in the trace.
    fast: None (on for CUDA, off elsewhere), True / False, or a `FastOptions` (see module docs).
    """
    settings = _renamed_keywords(renamed, guidance_scale=guidance_scale, temperature=temperature)
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    call = _prepare(
        backbone,
        prompts,
        seeds,
        **settings,
        top_k=top_k,
        top_p=top_p,
        h_div_w=h_div_w,
        pixels=pixels,
        policy=policy,
        record_entropy=record_entropy,
        kv_policy=kv_policy,
        fast=fast,
    )
    device, pruner = backbone.device, call.pruner
    with torch.inference_mode():
        features, lengths = _encode_text(call, prompts)
        timer = Timer(device)
        cudnn = call.opts is not None and call.opts.cudnn_attention and device.type == "cuda"
        with _autocast(device, backbone.dtype, cache_enabled=not call.static), prefer_cudnn_attention(cudnn):
            start = timer.mark()
            x = _condition(call, features, lengths, seeds)
            summed, bits, scale_marks = None, [], []
            for si in _progress(range(len(call.schedule)), progress):
                if pruner.exit_before_scale(si):  # stop refining: the image is decoded from the scales so far
                    for rec in call.trace.scales[si:]:
                        rec.exited = True
                    break
                mark = timer.mark()
                x = call.model.add_level(x, si)
                bits.append(_run_scale(call, si, x))
                # sum the sampled codes; the sum, resized to the next grid, is the next input
                x, summed = _next_input(call, si, bits[-1], summed)
                scale_marks.append((mark, timer.mark()))
            decode_start = timer.mark()
            images = _decode(call, summed)
            end = timer.mark()
        timer.finish()
    return _result(call, timer, scale_marks, start, decode_start, end, images, bits)


def _renamed_keywords(renamed: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """`generate`'s keywords under their current names; old names warn, unknown ones are a TypeError."""
    unknown = sorted(set(renamed) - set(RENAMED))
    if unknown:
        raise TypeError(f"generate() got an unexpected keyword argument '{unknown[0]}'")
    return renamed_settings({**settings, **renamed}, "generate()", stacklevel=3)
