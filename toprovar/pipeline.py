"""The one generation loop: prompts + seeds -> images, bits per scale and a trace.

Next-scale generation as the official `Infinity.autoregressive_infer_cfg` does it (facts from the
official code): classifier-free guidance with a doubled batch (rows `[:B]` conditional, `[B:]`
with `cfg_uncond` text), guidance applied to the logits (official `cfg_insertion_layer=[0]`),
logits divided by the scale's tau before guidance, bitwise top-k/top-p sampling, then the BSQ
codes of the sampled bits are summed at full resolution and the sum, resized to the next grid,
is the next scale's input. After the last scale the VAE decodes the summed codes.

Differences from the official loop, all numerically neutral: the KV cache is preallocated for the
whole schedule (no concatenation per scale); the text keys/values of every cross-attention are
projected once per call, not once per scale; each image has its own seeded generator (see
`toprovar.sampling`). Images are returned RGB (the official loop flips to BGR for OpenCV).

Pruning plugs in through the hooks of a `Pruner` (docs/architecture.md); `NoPruner` runs the
unpruned model. Everything inside the scale loop stays on the device: no host synchronization
except what a pruner itself does.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from toprovar.errors import UserError
from toprovar.models.registry import Backbone
from toprovar.models.transformer import KV_POLICIES, RopeSlice
from toprovar.sampling import make_generators, sample_bits
from toprovar.schedules import tokens_per_scale
from toprovar.trace import LayerRecord, ScaleRecord, Timer, Trace, entropy_summary

# Official inference defaults (tools/run_infinity.py).
DEFAULT_TOP_K = 900
DEFAULT_TOP_P = 0.97


# -- pruning hooks ---------------------------------------------------------------------------------


@dataclass
class PrunerContext:
    schedule: list[tuple[int, int, int]]
    depth: int
    num_heads: int
    batch: int  # images
    rows: int  # rows of the transformer batch: 2 * batch under CFG (conditional rows first)
    device: torch.device
    trace: Trace


@runtime_checkable
class Pruner(Protocol):
    def begin(self, ctx: PrunerContext) -> None: ...
    def exit_before_scale(self, si: int) -> bool: ...
    def wants_entropy(self, si: int, li: int) -> bool: ...
    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None: ...
    def observe(self, si: int, li: int, entropy: Tensor) -> None: ...
    def end_scale(self, si: int, x: Tensor) -> None: ...


class NoPruner:
    """Runs every scale, every layer, every token."""

    def begin(self, ctx: PrunerContext) -> None:
        pass

    def exit_before_scale(self, si: int) -> bool:
        return False

    def wants_entropy(self, si: int, li: int) -> bool:
        return False

    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None:
        return None

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        pass

    def end_scale(self, si: int, x: Tensor) -> None:
        pass


def as_pruner(policy: Any) -> Pruner:
    """None / 'none' -> NoPruner; a Pruner as is; anything else -> `toprovar.pruning.build_pruner`."""
    if policy is None or policy == "none":
        return NoPruner()
    if isinstance(policy, Pruner):
        return policy
    from toprovar.pruning import build_pruner  # lazy: the pruning package builds pruners from policies

    return build_pruner(policy)


# -- results ---------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    images: Tensor  # (B, H, W, 3) uint8 RGB on CPU
    trace: Trace
    bits: list[Tensor]  # per scale that ran: (B, tokens, bits per token) int64 on CPU


# -- helpers ---------------------------------------------------------------------------------------


def _per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) < n:
        raise UserError(f"{name} lists {len(values)} values but the schedule has {n} scales; "
                        f"give one number or at least {n}")
    return values[:n]


def encode_prompts(text_encoder: Any, prompts: list[str], max_len: int) -> tuple[Tensor, list[int]]:
    """Text features `(B, L, C)` float32 and the number of real tokens of each prompt.

    `text_encoder.encode(prompts)` returns `toprovar.models.text_encoder.TextFeatures` (right-padded
    features, mask, lens). Reads the lengths on the host once, before the timed loop.
    """
    out = text_encoder.encode(prompts)
    features, lengths = out.features, [int(n) for n in out.lens.tolist()]
    if features.shape[1] > max_len:
        warnings.warn(f"text features of {features.shape[1]} tokens truncated to the model's limit of {max_len}")
        features, lengths = features[:, :max_len], [min(n, max_len) for n in lengths]
    return features[:, :max(lengths)].float(), lengths


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_uint8(img: Tensor) -> Tensor:
    """`(B, 3, H, W)` in [-1, 1] -> `(B, H, W, 3)` uint8 (official: truncation after scaling)."""
    return ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).mul(255).to(torch.uint8).cpu()


# -- the loop --------------------------------------------------------------------------------------


def generate(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], *,
             cfg: float | Sequence[float] | None = None, tau: float | Sequence[float] | None = None,
             top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P, h_div_w: float = 1.0,
             pixels: str | None = None, policy: Any = None, record_entropy: bool = False,
             kv_policy: str = "kept", progress: bool = False) -> GenerationResult:
    """Generate one image per (prompt, seed).

    cfg / tau: one value or one per scale (defaults: the backbone's). pixels: a budget of the
    backbone's schedule family, e.g. '0.06M', '0.25M', '0.60M' or '1M' (default: the backbone's). policy: None/'none', a Pruner, or a policy that
    `toprovar.pruning.build_pruner` understands. record_entropy: request every block's attention
    entropy and record its mean in the trace.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or len(prompts) != len(seeds):
        raise UserError(f"give one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if kv_policy not in KV_POLICIES:
        raise UserError(f"kv_policy={kv_policy!r}; choose one of {', '.join(KV_POLICIES)}")
    spec, model, vae, device = backbone.spec, backbone.transformer, backbone.vae, backbone.device
    schedule = spec.schedules.scale_schedule(h_div_w, pixels or spec.pixels)
    n_scales, tokens = len(schedule), tokens_per_scale(schedule)
    cfg_list = _per_scale(spec.cfg if cfg is None else cfg, n_scales, "cfg")
    tau_list = _per_scale(spec.tau if tau is None else tau, n_scales, "tau")
    batch = len(prompts)
    use_cfg = any(c != 1 for c in cfg_list)
    rows = 2 * batch if use_cfg else batch
    pruner = as_pruner(policy)
    trace = Trace(backbone=spec.name, batch=batch, schedule=schedule, rows=rows, kv_policy=kv_policy,
                  embed_dim=model.config.embed_dim, ffn_hidden=model.config.ffn_hidden, depth=model.depth,
                  scales=[ScaleRecord(si, h, w, tokens[si]) for si, (_, h, w) in enumerate(schedule)])

    with torch.inference_mode():
        t0 = time.perf_counter()
        features, lengths = encode_prompts(backbone.text_encoder, prompts, model.config.text_maxlen)
        features = features.to(device)
        _sync(device)
        trace.text_encode_ms = (time.perf_counter() - t0) * 1e3

        timer = Timer(device)
        with _autocast(device, backbone.dtype):
            start = timer.mark()
            cond = model.encode_condition(features, lengths, with_uncond=use_cfg)
            rope = model.rope_table(spec.schedules.full_schedule(h_div_w), device)
            cache = model.new_cache(rows, sum(tokens), backbone.dtype, device)
            generators = make_generators(seeds, device)
            vae_schedule = vae.vae_schedule(schedule)
            pruner.begin(PrunerContext(schedule, model.depth, model.config.num_heads, batch, rows, device, trace))

            x = model.first_tokens(cond)
            summed: Tensor | None = None
            bits_per_scale: list[Tensor] = []
            entropy_means: list[tuple[LayerRecord, Tensor]] = []
            scale_marks: list[tuple[int, int]] = []
            offset = 0
            scales = range(n_scales)
            if progress:
                from tqdm.auto import tqdm

                scales = tqdm(scales, desc="scales", leave=False)
            for si in scales:
                if pruner.exit_before_scale(si):
                    for rec in trace.scales[si:]:
                        rec.exited = True
                    break
                _, h, w = schedule[si]
                n = tokens[si]
                mark = timer.mark()
                rope_si = RopeSlice(rope[0, offset:offset + n], rope[1, offset:offset + n])
                x = model.add_level(x, si)
                for li, block in enumerate(model.blocks):
                    keep = pruner.keep_tokens(si, li, x)
                    kept = n if keep is None else keep.shape[1]
                    record = LayerRecord(si, li, n, kept)
                    trace.layers.append(record)
                    if kept == 0:
                        continue
                    want = record_entropy or pruner.wants_entropy(si, li)
                    x, ent = block(x, cond.gss, cond.text[li], rope_si, cache[li], keep=keep,
                                   entropy=want, kv_policy=kv_policy)
                    if ent is not None:
                        pruner.observe(si, li, ent)
                        if record_entropy:
                            entropy_means.append((record, entropy_summary(ent, batch)))
                pruner.end_scale(si, x)

                logits = model.logits(x, cond.cond_BD).mul(1 / tau_list[si])
                if use_cfg and cfg_list[si] != 1:
                    logits = cfg_list[si] * logits[:batch] + (1 - cfg_list[si]) * logits[batch:]
                else:
                    logits = logits[:batch]
                bits = sample_bits(logits, generators, top_k=top_k, top_p=top_p)
                bits_per_scale.append(bits)

                codes = vae.bits_to_codes(vae.tokens_to_bits(bits, (h, w)))
                if si != n_scales - 1:
                    up = vae.upsample_codes(codes, vae_schedule[-1])
                    summed = up if summed is None else summed + up
                    nxt = vae.codes_to_tokens(vae.upsample_codes(summed, vae_schedule[si + 1]))
                    x = model.embed_codes(nxt).repeat(rows // batch, 1, 1)
                else:
                    summed = codes if summed is None else summed + codes
                offset += n
                scale_marks.append((mark, timer.mark()))

            decode_start = timer.mark()
            if summed is None:  # stopped before the first scale: nothing was generated
                _, fh, fw = vae_schedule[-1]
                summed = torch.zeros(batch, vae.codebook_dim, 1, fh, fw, device=device)
            images = vae.decode(summed)
            end = timer.mark()
        timer.finish()

    for si, (a, b) in enumerate(scale_marks):
        trace.scales[si].time_ms = timer.elapsed_ms(a, b)
    trace.decode_ms = timer.elapsed_ms(decode_start, end)
    trace.total_ms = timer.elapsed_ms(start, end)
    for record, value in entropy_means:
        record.entropy_mean = float(value)
    return GenerationResult(images=_to_uint8(images), trace=trace, bits=[b.cpu() for b in bits_per_scale])
