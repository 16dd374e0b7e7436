"""Generation latency of Infinity-2B / 8B: `python -m benchmarks.latency`.

Random weights of the real shapes (transformer drawn on the GPU, VAE of the real config with its
default init), random text features of T5 width (no T5 needed), 1024x1024 (13 scales), batch 1,
guidance scale 3, the backbone's temperature. For every backbone:

* `--check` (default on): teacher-forced numerics against the float32 eager path on the same GPU:
  every bf16 variant is fed the float32 run's bits, so each scale compares like with like; per
  scale the relative L2 error of the guided logits and the share of bits that the variant's own
  draw (same generator state) agrees on; the CUDA-graph path must draw exactly the bits of the
  eager fused path (same kernels).
* timing of a ladder of variants, each adding one optimization to the one before (`plain` is the
  pre-optimization loop: eager PyTorch, bf16 autocast, default SDPA, torch.multinomial, NCHW VAE),
  then issue 16's fewer-kernels variants of the fast path (`FastOptions.chain_blocks`, then with
  `small_m_rows=64`: the linears of scales 0-2 with LayerNorm and residual fused in), and with
  `--variants all` the leave-one-out variants measured before; the 1-token scale's time (the
  fixed cost of a scale: launches and weight streaming, whatever its tokens) for each; median
  wall clock of `--reps` calls after `--warmup` calls (text encoding excluded and reported),
  per-scale times from CUDA events, VAE decode time;
* the FLOP floor of the transformer (28·C²·depth per token for the linear layers, 4·C·Lq·Lk per
  layer for attention, CFG batch 2; ../shared/reference/anchors.md) over the bf16 matrix rate
  measured in the same run (8192³ product), and the achieved fraction floor / time;
* `--profile`: one profiled call of the fast path without graphs (same kernels): GPU time by
  kernel family and the top kernels.
* `--profile-scales` (issue 24 item 3, where a scale's fixed cost goes): after one call of the
  default fast path, the whole-scale graph of the 1-token first scale and of the last scale is
  replayed alone under torch.profiler (`--reps` times, after a warm-up replay): kernels per
  replay, GPU busy time, the span from the first kernel's start to the last one's end, the gaps
  between consecutive kernels (total, median, largest) and the kernels that take the most time.
  The graph holds the blocks, the head, guidance and top-k/top-p, plus one copy of the scale's
  input into its static buffer; the trace's per-scale time of the same call (which adds the draw
  and the next scale's input) is printed beside it. On CPU (`--smoke`) there are no graphs: the
  rows count the direct call's top-level operators instead of kernels.

Prints a markdown table and one JSON line (device, versions, date, command); `--json-out` and
`--md-out` also write them to files. `--smoke` runs the same code on CPU with the `test-small`
backbone (its 0.06M schedule; on CPU every variant is the float32 eager arithmetic).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from toprovar.environment import run_record
from toprovar.errors import UserError, exit_on_user_error

PROG = "python -m benchmarks.latency"


# (name, fast argument) — cumulative ladder ending at the default fast path, issue 16's
# fewer-kernels variants, then (with `ablations`) leave-one-out and opt-in variants measured
# before (`--variants all`).
def variants(*, ablations: bool = True) -> list[tuple[str, Any]]:
    from toprovar.fast import FastOptions

    full = FastOptions()
    opts = FastOptions(**{f: False for f in FastOptions.__dataclass_fields__})
    ladder: list[tuple[str, Any]] = [("plain", False)]
    steps = [
        ("+ sync-free sampling", ("sync_free_sampling",)),
        ("+ cuDNN attention", ("cudnn_attention",)),
        ("+ fused block kernels", ("fused",)),
        ("+ CUDA graph per scale", ("graphs",)),
        ("+ GELU in matmul epilogue", ("gelu_epilogue",)),
        (FAST_NAME, ("vae_channels_last", "vae_fused_norm")),
    ]
    for name, flags in steps:
        opts = replace(opts, **{f: True for f in flags})
        if name == FAST_NAME:  # memory bounds (issue 22) that do not change a batch-1 call's work
            opts = replace(opts, shared_pool=full.shared_pool, vae_decode_images=full.vae_decode_images)
        ladder.append((name, opts))
    assert opts == full, "the ladder must end at the default fast path"
    mechanics = [
        (CHAIN_NAME, replace(full, chain_blocks=True)),
        (SMALL_NAME, replace(full, chain_blocks=True, small_m_rows=64)),
    ]
    others = [
        ("fast without cuDNN attention", replace(full, cudnn_attention=False)),
        ("fast without fused block kernels", replace(full, fused=False)),
        ("fast, VAE NHWC with PyTorch GroupNorm", replace(full, vae_fused_norm=False)),
        ("fast + cuDNN benchmark in the VAE", replace(full, vae_cudnn_benchmark=True)),
    ]
    return ladder + mechanics + (others if ablations else [])


FAST_NAME = "+ VAE NHWC + split-statistics GroupNorm (= fast)"
CHAIN_NAME = "fast + chain_blocks (next LayerNorm in the residual kernel)"
SMALL_NAME = "fast + chain_blocks + small_m_rows 64 (scales 0-2: LayerNorm/residual in the linears)"


# ---------------------------------------------------------------------------------------- backbones


class RandomTextEncoder:
    """Random features of T5 width, `length` tokens per prompt (seeded by the prompt's index)."""

    def __init__(self, channels: int, length: int, device: torch.device):
        self.channels, self.length, self.device = channels, length, device
        self.hidden_size = channels

    def encode(self, prompts: list[str]):
        from toprovar.models.text_encoder import TextFeatures

        gen = torch.Generator(device="cpu").manual_seed(1234)
        feats = torch.randn(len(prompts), self.length, self.channels, generator=gen) * 0.2
        mask = torch.ones(len(prompts), self.length, dtype=torch.bool)
        lens = torch.full((len(prompts),), self.length, dtype=torch.int32)
        return TextFeatures(feats, mask, lens).to(self.device)


def random_backbone(name: str, device: torch.device, *, text_len: int, blocks_dtype: torch.dtype, seed: int = 0):
    """A `Backbone` with random weights of `name`'s shapes, built on `device` (float32 everywhere
    except the transformer blocks and the VAE, which take `blocks_dtype`)."""
    from toprovar.models.registry import Backbone, get_backbone
    from toprovar.models.transformer import InfinityTransformer, random_state_dict
    from toprovar.models.vae import build_vae

    spec = get_backbone(name)
    cfg = spec.transformer
    with torch.device("meta"):
        model = InfinityTransformer(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=seed, device=device), strict=True, assign=True)
    model = model.to(device=device, dtype=torch.float32)
    model.blocks.to(dtype=blocks_dtype)
    model.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        vae = build_vae(spec.vae, device=device).to(dtype=blocks_dtype).eval().requires_grad_(False)
    text = RandomTextEncoder(cfg.text_channels, min(text_len, cfg.text_maxlen), device)
    return Backbone(spec, model, vae, text, device, blocks_dtype)


def to_dtype(backbone, dtype: torch.dtype):
    """The same backbone with its blocks and VAE in `dtype` (in place)."""
    backbone.transformer.blocks.to(dtype=dtype)
    backbone.vae.to(dtype=dtype)
    backbone.dtype = dtype
    return backbone


# ---------------------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, smoke: bool) -> float:
    """Measured dense matrix rate in FLOP/s: bf16 8192³ on CUDA (random data), fp32 512³ on CPU."""
    n, dtype, reps = (512, torch.float32, 3) if smoke else (8192, torch.bfloat16, 20)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    if device.type == "cuda":  # events over a batch of products: no host timing noise
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1e3 / reps]
    return 2 * n**3 / statistics.median(times)


def floor_flops(trace) -> tuple[float, float]:
    """(linear, attention) FLOPs of the unpruned transformer for this trace (anchors.md formula)."""
    from toprovar.flops import linear_flops_per_token

    c, f, rows = trace.embed_dim, trace.ffn_hidden, trace.rows
    per_token = linear_flops_per_token(c, f)
    linear = attn = 0.0
    seen = 0
    for s in trace.scales:
        seen += s.tokens
        linear += rows * per_token * s.tokens * trace.depth
        attn += rows * 4.0 * c * s.tokens * seen * trace.depth
    return linear, attn


def run_once(backbone, fast, prompt: str, seed: int):
    from toprovar.pipeline import generate

    sync(backbone.device)
    t = time.perf_counter()
    res = generate(backbone, [prompt], [seed], fast=fast)
    wall = time.perf_counter() - t  # generate returns CPU tensors: the device work is done
    return wall - res.trace.text_encode_ms / 1e3, res


def time_variant(backbone, fast, *, warmup: int, reps: int, prompt: str = "a photo", seed: int = 0) -> dict:
    first = None
    for i in range(warmup):
        w, res = run_once(backbone, fast, prompt, seed)
        if i == 0:
            first = w
    walls, traces = [], []
    for _ in range(reps):
        w, res = run_once(backbone, fast, prompt, seed)
        walls.append(w)
        traces.append(res.trace)
    med = statistics.median(walls)
    idx = walls.index(sorted(walls)[len(walls) // 2])
    tr = traces[idx]
    per_scale = [statistics.median(t.scales[si].time_ms for t in traces) for si in range(len(tr.scales))]
    return {
        "median_s": med,
        "runs_s": walls,
        "first_call_s": first,
        "per_scale_ms": per_scale,
        "decode_ms": statistics.median(t.decode_ms for t in traces),
        "text_encode_ms": statistics.median(t.text_encode_ms for t in traces),
        "events_total_ms": statistics.median(t.total_ms for t in traces),
        "runtime": res.runtime,
        "_trace": tr,
    }


# ---------------------------------------------------------------------------------------- checking


class _Recorder:
    """Patches the generation loop's sampling functions: records each scale's logits (or probabilities)
    and own bits, and returns the forced bits (teacher forcing) when given."""

    def __init__(self, forced: list[torch.Tensor] | None, record_logits: bool = True):
        self.forced, self.record_logits, self.logits, self.bits = forced, record_logits, [], []

    def _out(self, bits: torch.Tensor) -> torch.Tensor:
        self.bits.append(bits.cpu())
        if self.forced is None:
            return bits
        return self.forced[len(self.bits) - 1].to(bits.device)

    def install(self, monkey: list):
        import toprovar.scale_paths as pl  # where the loop samples its bits

        orig_sample, orig_probs, orig_draw = pl.sample_bits, pl.bit_probs, pl.draw_bits

        def sample_bits(logits, generators, top_k=0, top_p=0.0):
            self.logits.append(logits.float().cpu().clone())
            return self._out(orig_sample(logits, generators, top_k=top_k, top_p=top_p))

        def bit_probs(logits, top_k=0, top_p=0.0):
            self.logits.append(logits.float().cpu().clone())
            return orig_probs(logits, top_k=top_k, top_p=top_p)

        def draw_bits(probs, generators, n, sync_free=False):
            return self._out(orig_draw(probs, generators, n, sync_free=sync_free))

        patches = [("draw_bits", draw_bits)]
        if self.record_logits:  # never inside a CUDA graph capture (reads back to the host)
            patches += [("sample_bits", sample_bits), ("bit_probs", bit_probs)]
        for name, fn in patches:
            monkey.append((pl, name, getattr(pl, name)))
            setattr(pl, name, fn)


def _with_recorder(forced, fn: Callable[[], Any], record_logits: bool = True):
    rec, monkey = _Recorder(forced, record_logits), []
    rec.install(monkey)
    try:
        res = fn()
    finally:
        for mod, name, orig in reversed(monkey):
            setattr(mod, name, orig)
    return rec, res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_numerics(backbone, fast_dtype: torch.dtype, *, prompt: str = "a photo", seed: int = 0) -> dict:
    """Teacher-forced comparison of the bf16 variants with the float32 eager path (in place: the
    backbone ends in `fast_dtype`)."""
    from toprovar.fast import FastOptions
    from toprovar.metrics import psnr
    from toprovar.pipeline import generate

    to_dtype(backbone, torch.float32)
    ref, ref_res = _with_recorder(None, lambda: generate(backbone, [prompt], [seed], fast=False))
    vae, device = backbone.vae, backbone.device
    fh, fw = vae.vae_schedule(backbone.spec.schedules.scale_schedule(1.0, backbone.spec.pixels))[-1][1:]
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randn(1, vae.codebook_dim, fh, fw, generator=gen, device=device) * 0.6  # ~ summed codes
    with torch.inference_mode():
        vae_ref = vae.decoder(codes).float()
    to_dtype(backbone, fast_dtype)
    vae_err: dict[str, Any] = {
        "fp32 output std": float(vae_ref.std()),
        "fp32 share clamped": float((vae_ref.abs() > 1).float().mean()),
    }
    cuda = device.type == "cuda"
    for name, kw in (
        ("plain bf16", {}),
        ("NHWC bf16", {"channels_last": cuda}),
        ("NHWC fused GroupNorm bf16", {"channels_last": cuda, "fused_norm": cuda}),
    ):
        try:
            with torch.inference_mode():
                vae_err[name] = _rel(vae.decode(codes, **kw).float(), vae_ref.clamp(-1, 1))
        except Exception as err:  # an opt-in kernel failing must not hide the rest of the check
            vae_err[name] = f"{type(err).__name__}: {err}"
    out: dict[str, Any] = {"scales": len(ref.bits), "vae_rel_err": vae_err}
    runs = {"plain bf16": False, "fused eager bf16": FastOptions(graphs=False), "fast (graphs) bf16": True}
    recs = {}
    for name, fast in runs.items():
        rec, res = _with_recorder(
            ref.bits, partial(generate, backbone, [prompt], [seed], fast=fast), record_logits=fast is not True
        )
        recs[name] = rec
        row: dict[str, Any] = {
            "bits_agree": [float((a == b).float().mean()) for a, b in zip(rec.bits, ref.bits)],
            "image_psnr_db_vs_fp32": float(psnr(res.images, ref_res.images, "pooled")),
        }
        if rec.logits:
            row["logits_rel_err"] = [_rel(a, b) for a, b in zip(rec.logits, ref.logits)]
        out[name] = row
    g, e = recs["fast (graphs) bf16"], recs["fused eager bf16"]
    out["graph_bits_equal_eager_fused"] = all(torch.equal(a, b) for a, b in zip(g.bits, e.bits))
    out["bits_total"] = sum(b.numel() for b in ref.bits)
    return out


# ---------------------------------------------------------------------------------------- profiling

FAMILIES = (
    ("attention", ("cudnn", "flash", "fmha", "attention", "sdpa", "fwd_kernel")),
    ("fused (triton)", ("_add_ln_kernel", "_qk_norm_rope_kernel", "_ln_linear_kernel")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas", "matmul", "splitk")),
    ("conv", ("conv", "implicit", "winograd", "fprop", "dgrad", "nhwc", "nchw")),
    ("norm", ("layer_norm", "group_norm", "norm")),
)


def kernel_family(name: str) -> str:
    """The family of a GPU kernel by its name (FAMILIES, first match; attention before matmul: flash
    kernels name cutlass types)."""
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other elementwise/copy"


def profile_call(backbone, fast, prompt: str = "a photo", seed: int = 0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from toprovar.pipeline import generate

    generate(backbone, [prompt], [seed], fast=fast)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        generate(backbone, [prompt], [seed], fast=fast)
        wall = time.perf_counter() - t
    kernels: dict[str, list[float]] = {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) is None or "cuda" not in str(evt.device_type).lower():
            continue
        us = evt.time_range.elapsed_us()
        k = kernels.setdefault(evt.name, [0.0, 0])
        k[0] += float(us)
        k[1] += 1
    fam: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        fam[kernel_family(name)] = fam.get(kernel_family(name), 0.0) + us / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "wall_ms": wall * 1e3,
        "gpu_busy_ms": sum(v[0] for v in kernels.values()) / 1e3,
        "kernels": sum(v[1] for v in kernels.values()),
        "families_ms": fam,
        "top": [(n[:90], round(us / 1e3, 3), c) for n, (us, c) in top],
    }


def _replay_trace(run: Callable[[], Any], device: torch.device) -> dict:
    """Kernels of one `run()` under torch.profiler (top-level operators on CPU): count, busy time,
    span and the gaps between consecutive kernels, the five longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    if on_gpu:
        events = [e for e in prof.events() if "cuda" in str(getattr(e, "device_type", "")).lower()]
    else:
        events = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    gaps = [max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:])]
    longest = sorted(spans, key=lambda s: s[0] - s[1])[:5]
    return {
        "kernels": len(spans),
        "busy_ms": sum(end - start for start, end, _ in spans) / 1e3,
        "span_ms": (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0,
        "gaps_ms": sum(gaps) / 1e3,
        "gap_median_us": statistics.median(gaps) if gaps else 0.0,
        "gap_max_us": max(gaps, default=0.0),
        "top": [(name[:80], round((end - start) / 1e3, 4)) for start, end, name in longest],
    }


def profile_scales(backbone, *, reps: int, prompt: str = "a photo", seed: int = 0) -> dict:
    """`--profile-scales` (module docs): per profiled scale the median of `reps` replays."""
    from toprovar.pipeline import generate

    device = backbone.device
    res = generate(backbone, [prompt], [seed], fast=True)  # captures the whole-scale graphs (CUDA)
    state = backbone.fast_runtime.state
    buf = state.buffers
    last = len(buf.tokens) - 1
    out = {}
    for si in sorted({0, last}):
        x = next(x for (s, _), x in buf.x_in.items() if s == si).clone()

        def replay(si: int = si, x: torch.Tensor = x) -> None:
            buf.cache.set_fill(buf.offsets[si])  # the unpruned call's fills before scale si
            with torch.inference_mode():  # the static buffers are inference tensors
                state.whole.run(si, x)

        replay()
        sync(device)
        runs = [_replay_trace(replay, device) for _ in range(reps)]
        mid = sorted(runs, key=lambda r: r["span_ms"])[len(runs) // 2]
        out[f"scale {si}"] = {"tokens": buf.tokens[si], "trace_scale_ms": res.trace.scales[si].time_ms, **mid}
    return out


# ---------------------------------------------------------------------------------------- reporting


def profile_markdown(name: str, scales: dict) -> str:
    lines = [
        f"#### {name}: one scale's graph replayed alone (median of the replays)\n",
        "| scale | tokens | kernels | GPU busy ms | span ms | gaps ms | median / largest gap µs "
        "| scale in the call's trace ms | longest kernels (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scale, p in scales.items():
        top = "; ".join(f"{n} {ms}" for n, ms in p["top"])
        lines.append(
            f"| {scale} | {p['tokens']} | {p['kernels']} | {p['busy_ms']:.3f} | {p['span_ms']:.3f} "
            f"| {p['gaps_ms']:.3f} | {p['gap_median_us']:.1f} / {p['gap_max_us']:.1f} "
            f"| {p['trace_scale_ms']:.3f} | {top} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict, anchors: dict) -> str:
    lines = []
    for bb, r in results["backbones"].items():
        lines.append(f"### {bb} ({r['schedule_desc']}, batch 1, guidance scale 3, temperature {r['temperature']})\n")
        fl = r.get("floor")
        if fl is None:
            lines.append("no variant ran\n")
            continue
        lines.append(
            f"FLOP floor: linear {fl['linear_tflop']:.1f} + attention {fl['attention_tflop']:.1f} TFLOP "
            f"at the measured {results['matmul_tflops']:.0f} TFLOP/s = {fl['floor_s'] * 1e3:.1f} ms. "
            f"Text encoding is outside the timed region (random T5-width features here: "
            f"{r['text_encode_ms']:.2f} ms).\n"
        )
        lines.append(
            "| variant | end to end (median) | runs | scale loop | 1-token scale (fixed cost) | VAE decode "
            "| floor fraction | vs plain |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        if bb in anchors:
            a = anchors[bb]
            lines.append(f"| official code (anchors.md) | {a * 1e3:.0f} ms | | | | | {fl['floor_s'] / a:.2f} | |")
        plain = r["variants"].get("plain", {}).get("median_s")
        for name, v in r["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | failed: {v['error'][:80]} | | | | | | |")
                continue
            runs = f"{min(v['runs_s']) * 1e3:.0f}–{max(v['runs_s']) * 1e3:.0f}"
            loop = sum(v["per_scale_ms"])
            speed = f"{plain / v['median_s']:.2f}x" if plain else ""
            lines.append(
                f"| {name} | {v['median_s'] * 1e3:.1f} ms | {runs} | {loop:.1f} ms "
                f"| {v['per_scale_ms'][0]:.2f} ms | {v['decode_ms']:.1f} ms "
                f"| {fl['floor_s'] / v['median_s']:.2f} | {speed} |"
            )
        names = [
            n
            for n in ("plain", FAST_NAME, CHAIN_NAME, SMALL_NAME)
            if n in r["variants"] and "per_scale_ms" in r["variants"][n]
        ]
        if names:
            lines.append("\nPer scale (ms, CUDA events; tokens per image):\n")
            lines.append("| scale | tokens | " + " | ".join(names) + " |")
            lines.append("|---|---|" + "---|" * len(names))
            for si, tok in enumerate(r["tokens"]):
                vals = " | ".join(f"{r['variants'][n]['per_scale_ms'][si]:.2f}" for n in names)
                lines.append(f"| {si} | {tok} | {vals} |")
        if "check" in r:
            c = r["check"]
            lines.append("\nNumerics vs the float32 eager path (teacher-forced; per scale, worst / last scale):\n")
            lines.append("| variant | logits rel. error (max / last) | bits agree (min / last) | image PSNR vs fp32 |")
            lines.append("|---|---|---|---|")
            for name in ("plain bf16", "fused eager bf16", "fast (graphs) bf16"):
                row = c[name]
                le = row.get("logits_rel_err")
                les = f"{max(le):.2e} / {le[-1]:.2e}" if le else "(inside the graph)"
                lines.append(
                    f"| {name} | {les} | {min(row['bits_agree']):.4f} / {row['bits_agree'][-1]:.4f} "
                    f"| {row['image_psnr_db_vs_fp32']:.1f} dB |"
                )
            lines.append(
                f"\nCUDA-graph path draws exactly the bits of the eager fused path: {c['graph_bits_equal_eager_fused']}"
            )
            v = c.get("vae_rel_err")
            if v:
                errs = ", ".join(
                    f"{k} {e:.2e}" if isinstance(e, float) else f"{k} failed ({e[:60]})"
                    for k, e in v.items()
                    if k.endswith("bf16")
                )
                lines.append(
                    f"\nVAE decode of the same random codes vs float32 (rel. L2 after clamp): {errs} "
                    f"(fp32 output std {v['fp32 output std']:.3f}, "
                    f"{100 * v['fp32 share clamped']:.1f} % clamped)"
                )
        if "profile" in r:
            p = r["profile"]
            lines.append(
                f"\nProfile of the fused path without graphs (same kernels): "
                f"GPU busy {p['gpu_busy_ms']:.1f} ms over {p['kernels']} kernels; "
                f"wall {p['wall_ms']:.1f} ms (profiler on)\n"
            )
            lines.append("| kernel family | GPU ms |\n|---|---|")
            for f, ms in sorted(p["families_ms"].items(), key=lambda kv: -kv[1]):
                lines.append(f"| {f} | {ms:.1f} |")
        lines.append("")
    return "\n".join(lines)


ANCHORS_S = {"infinity-2b": 1.41, "infinity-8b": 1.96}  # official code, one H100 (anchors.md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="infinity-2b,infinity-8b")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=32, help="text tokens of the random prompt features")
    ap.add_argument(
        "--variants",
        default="default",
        help="comma-separated variant names, 'default' (the ladder and issue 16's variants) or 'all'",
    )
    ap.add_argument("--no-check", action="store_true", help="skip the float32 teacher-forced comparison")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--profile-scales",
        action="store_true",
        help="per-kernel trace of the first and the last scale's graph (kernels, busy time, gaps)",
    )
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip what would start after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="CPU, test-small backbone, same code path")
    ap.add_argument("--json-out")
    ap.add_argument("--md-out")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    if args.smoke:
        from tests.backbones import use_test_backbones  # test-small is registered from the checkout only

        use_test_backbones()
        device, backbones, fast_dtype = torch.device("cpu"), ["test-small"], torch.float32
        args.reps, args.warmup = 1, 0
    else:
        if not torch.cuda.is_available():
            raise UserError(
                f"needs a CUDA GPU (torch {torch.__version__} sees none); run `{PROG} --smoke` for the CPU code path"
            )
        device, fast_dtype = torch.device("cuda"), torch.bfloat16
        backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    from toprovar.models.registry import get_backbone

    for b in backbones:
        get_backbone(b)  # one-line error for an unknown name
    chosen = variants(ablations=args.variants != "default")
    if args.variants not in ("default", "all"):
        wanted = [v.strip() for v in args.variants.split(",")]
        chosen = [v for v in chosen if v[0] in wanted]

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - t_start > args.budget_s

    results: dict[str, Any] = {"matmul_tflops": matmul_rate(device, args.smoke) / 1e12, "backbones": {}}
    print(f"matrix rate: {results['matmul_tflops']:.1f} TFLOP/s ({'fp32 CPU' if args.smoke else 'bf16'})", flush=True)
    for bb in backbones:
        if over_budget():
            print(f"{bb}: skipped (budget)", flush=True)
            continue
        t0 = time.perf_counter()
        backbone = random_backbone(
            bb, device, text_len=args.text_len, blocks_dtype=torch.float32 if not args.no_check else fast_dtype
        )
        sync(device)
        spec = backbone.spec
        from toprovar.schedules import tokens_per_scale

        schedule = spec.schedules.scale_schedule(1.0, spec.pixels)
        r: dict[str, Any] = {
            "temperature": spec.temperature,
            "tokens": tokens_per_scale(schedule),
            "schedule_desc": f"{schedule[-1][1] * 16}x{schedule[-1][2] * 16}, {len(schedule)} scales"
            if not args.smoke
            else f"{spec.pixels}, {len(schedule)} scales",
            "build_s": time.perf_counter() - t0,
            "variants": {},
        }
        results["backbones"][bb] = r
        print(f"{bb}: built in {r['build_s']:.1f} s", flush=True)
        if not args.no_check:
            t0 = time.perf_counter()
            try:
                r["check"] = check_numerics(backbone, fast_dtype)
            except Exception as err:  # report and go on to timing
                r["check_error"] = f"{type(err).__name__}: {err}"
                to_dtype(backbone, fast_dtype)
            print(
                f"{bb}: check in {time.perf_counter() - t0:.1f} s: "
                f"{json.dumps(r.get('check', r.get('check_error')), default=str)[:2000]}",
                flush=True,
            )
        for name, fast in chosen:
            if over_budget():
                r["variants"][name] = {"error": "skipped (budget)"}
                continue
            try:
                v = time_variant(backbone, fast, warmup=args.warmup, reps=args.reps)
            except Exception as err:
                r["variants"][name] = {"error": f"{type(err).__name__}: {err}"}
                print(f"{bb} {name}: FAILED {type(err).__name__}: {err}", flush=True)
                continue
            tr = v.pop("_trace")
            if "floor" not in r:
                lin, att = floor_flops(tr)
                r["floor"] = {
                    "linear_tflop": lin / 1e12,
                    "attention_tflop": att / 1e12,
                    "floor_s": (lin + att) / (results["matmul_tflops"] * 1e12),
                }
            r["variants"][name] = v
            r.setdefault("text_encode_ms", v["text_encode_ms"])
            print(
                f"{bb} {name}: {v['median_s'] * 1e3:.1f} ms (first call {v['first_call_s'] or 0:.2f} s, "
                f"decode {v['decode_ms']:.1f} ms)",
                flush=True,
            )
        if args.profile and not over_budget():
            from toprovar.fast import FastOptions

            try:
                r["profile"] = profile_call(backbone, FastOptions(graphs=False))
                print(f"{bb} profile: {json.dumps(r['profile'])}", flush=True)
            except Exception as err:
                r["profile_error"] = f"{type(err).__name__}: {err}"
        if args.profile_scales and not over_budget():
            to_dtype(backbone, fast_dtype)  # the timed variants' dtype (the check may have left float32)
            r["profile_scales"] = profile_scales(backbone, reps=max(args.reps, 1))
            print(profile_markdown(bb, r["profile_scales"]), flush=True)
        from toprovar.fast import release_fast_runtime

        release_fast_runtime(backbone)
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
            r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()

    results.update(run_record(PROG, argv, device=device))
    md = markdown(results, {} if args.smoke else ANCHORS_S)
    print(md)
    line = json.dumps(results, default=str)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(line + "\n")
    if args.md_out:
        with open(args.md_out, "w") as fh:
            fh.write(md + "\n")
    return 0


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        raise SystemExit(main())
