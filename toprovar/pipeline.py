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
scale takes one of three paths (`toprovar.scale_paths`): one CUDA graph where the pruner does not
act, planned units where it plans statically, block by block otherwise. The state the steps share
is a `toprovar.generation_call.GenerationCall`, prepared from the arguments and turned into the
`GenerationResult` there. Everything inside the scale loop stays on the device: no host
synchronization except what a pruner itself does (and `torch.multinomial`'s validity checks on the
plain path).

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
from typing import Any

import torch
from torch import Tensor

from toprovar.attention import prefer_cudnn_attention
from toprovar.fast import FastOptions, RowInputs, row_views
from toprovar.fast.decode import decode
from toprovar.fast.text import pad_text
from toprovar.generation_call import GenerationCall, GenerationResult, call_result, prepare_call
from toprovar.models.registry import Backbone
from toprovar.models.vae import BSQVAE
from toprovar.pruning import PrunerContext
from toprovar.renames import renamed_keywords
from toprovar.sampling import make_generators
from toprovar.scale_paths import run_scale
from toprovar.schedules import tokens_per_scale
from toprovar.trace import Timer

# Official inference defaults (tools/run_infinity.py).
DEFAULT_TOP_K = 900
DEFAULT_TOP_P = 0.97


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


# -- the loop --------------------------------------------------------------------------------------


def _encode_text(call: GenerationCall, prompts: list[str]) -> tuple[Tensor, list[int]]:
    """Text features on the device and prompt lengths; the time goes to `trace.text_encode_ms`."""
    t0 = time.perf_counter()
    features, lengths = encode_prompts(call.backbone.text_encoder, prompts, call.model.config.text_maxlen)
    features = features.to(call.backbone.device)
    if call.static and call.backbone.device.type == "cuda":
        features = pad_text(features, call.model.config.text_maxlen)
    _sync(call.backbone.device)
    call.trace.text_encode_ms = (time.perf_counter() - t0) * 1e3
    return features, lengths


def _condition(call: GenerationCall, features: Tensor, lengths: list[int], seeds: list[int]) -> Tensor:
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


def _next_input(call: GenerationCall, si: int, bits: Tensor, summed: Tensor | None) -> tuple[Tensor | None, Tensor]:
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


def _decode(call: GenerationCall, summed: Tensor | None) -> Tensor:
    """The VAE's image of the summed codes (zeros when no scale ran); `toprovar.fast.decode` on the
    fast CUDA path."""
    vae, device, opts = call.backbone.vae, call.backbone.device, call.opts
    if summed is None:  # stopped before the first scale: nothing was generated
        _, fh, fw = call.vae_schedule[-1]
        summed = torch.zeros(call.batch, vae.codebook_dim, 1, fh, fw, device=device)
    if opts is not None and device.type == "cuda" and isinstance(vae, BSQVAE):
        return decode(vae, summed, opts)
    if device.type == "cpu" and isinstance(vae, BSQVAE):
        # oneDNN's NHWC convolutions: tiny's decode of 8 images 690 -> 480 ms on 2 cores (the decode
        # is a fifth of an unpruned generation there). One image a call: oneDNN's NHWC blocking
        # depends on the batch, and an image must not depend on its batch (tests/test_pipeline_cli.py);
        # one at a time measured as fast as eight (477-565 vs 522 ms).
        return torch.cat([vae.decode(one, channels_last=True) for one in summed.split(1)])
    return vae.decode(summed)


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
    settings = renamed_keywords(renamed, "generate()", guidance_scale=guidance_scale, temperature=temperature)
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    call = prepare_call(
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
                bits.append(run_scale(call, si, x))
                # sum the sampled codes; the sum, resized to the next grid, is the next input
                x, summed = _next_input(call, si, bits[-1], summed)
                scale_marks.append((mark, timer.mark()))
            decode_start = timer.mark()
            images = _decode(call, summed)
            end = timer.mark()
        timer.finish()
    return call_result(call, timer, scale_marks, start, decode_start, end, images, bits)
