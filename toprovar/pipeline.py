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
except what a pruner itself does (and `torch.multinomial`'s validity checks on the plain path).

Fast path (`fast=`, default on for CUDA, see `FastOptions`): the same function with
  * fused elementwise stages per block (`CrossAttnBlock.forward_fast`, Triton on CUDA);
  * one CUDA graph per scale (blocks, head, guidance, top-k/top-p, softmax), captured on the first
    call for a key (schedule, rows, text length and mask, cfg/tau/top-k/top-p per scale) and
    replayed after; the KV cache and the text/AdaLN inputs live in static buffers kept on the
    transformer (`release_fast_state` frees them);
  * SDPA preferring cuDNN attention; sampling without host syncs; the FFN's GELU in the matmul
    epilogue; the VAE decode on NHWC activations with split-statistics GroupNorm + SiLU kernels
    (`FastOptions.vae_channels_last`, `vae_fused_norm`).
Pruned runs (`record_entropy=False`): a pruner with `static_plan(si)` (ToProVAR, fixed exit)
says that after the first P blocks of scale si (its probe layers: every token, entropy
observed) the keep indices of all later blocks are fixed. Such a scale runs as three units on the
static buffers — probe blocks, planned blocks (gathered kept tokens through the fused stages,
scattered back in place), head + sampling probabilities — with the pruner's decision between the
first two. A unit is keyed by its shapes (kept counts per block, KV-cache fills); on CUDA a key
met a second time is captured as a CUDA graph and replayed from then on, so a plan that recurs
costs no launches and a one-off plan costs no capture. Scales without a static plan (FastVAR,
the representative scale of online layer scores) and `record_entropy` run block by block
eagerly, fused where `kv_policy='kept'`. On CPU every switch keeps the
eager float32 arithmetic: the fused stages fall back to the block's own ops and the per-scale
graph is a direct call on the static buffers, so `fast=True` is bit-identical to `fast=False`.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from toprovar.attention import prefer_cudnn_attention
from toprovar.errors import UserError
from toprovar.models.registry import Backbone
from toprovar.models.vae import BSQVAE
from toprovar.models.transformer import KV_POLICIES, InfinityTransformer, RopeSlice, TextKV
from toprovar.sampling import bit_probs, draw_bits, make_generators, sample_bits
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
    runtime: dict = field(default_factory=dict)  # which path ran: fast options, graphs, capture


# -- fast path -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastOptions:
    """Switches of the fast unpruned path; `fast=True` takes all of them, ablations turn some off."""

    fused: bool = True  # fused AdaLN / LayerNorm / residual and q,k norm + RoPE + cache write
    graphs: bool = True  # one CUDA graph per scale (only with no pruner and no entropy recording)
    cudnn_attention: bool = True  # SDPA tries cuDNN attention first (CUDA)
    sync_free_sampling: bool = True  # draw bits without torch.multinomial's host-side checks
    gelu_epilogue: bool = True  # FFN GELU inside the first FFN matmul (cuBLASLt epilogue, CUDA)
    # VAE decode (CUDA): NHWC activations with split-statistics GroupNorm + SiLU kernels
    # (kernels.group_norm). At batch 1 PyTorch's GroupNorm runs one thread block per group: the
    # 1024x1024 decode took 100 ms, 32 ms with these two switches (H100, docs/benchmarks.md). NHWC
    # alone, with PyTorch's GroupNorm, is slower than NCHW (131 ms): the switches go together.
    vae_channels_last: bool = True  # VAE decode on NHWC activations
    vae_fused_norm: bool = True  # VAE GroupNorm + SiLU as split-statistics Triton kernels (NHWC only)
    vae_cudnn_benchmark: bool = False  # let cuDNN time the VAE's convolution algorithms


def resolve_fast(fast: bool | FastOptions | None, device: torch.device) -> FastOptions | None:
    """None -> on for CUDA, off elsewhere; True -> every switch; False -> the plain loop."""
    if fast is None:
        fast = device.type == "cuda"
    if isinstance(fast, FastOptions):
        return fast
    if fast is True:
        return FastOptions()
    if fast is False:
        return None
    raise UserError(f"fast={fast!r}; give True, False, None (auto: on for CUDA) or a FastOptions")


class _ScaleGraphs:
    """Static buffers (KV cache, AdaLN vectors, text K/V, pooled text, per-scale inputs) and one
    CUDA graph per scale for one key. On CPU the per-scale step is a direct call on the buffers."""

    def __init__(self, model: InfinityTransformer, key: tuple, *, schedule, rows: int, batch: int,
                 cond, rope: Tensor, dtype: torch.dtype, device: torch.device, cfg_list: list[float],
                 tau_list: list[float], top_k: int, top_p: float, fused: bool, gelu_epilogue: bool = False):
        self.model, self.key, self.rows, self.batch = model, key, rows, batch
        self.cfg_list, self.tau_list, self.top_k, self.top_p, self.fused = cfg_list, tau_list, top_k, top_p, fused
        self.gelu_epilogue = gelu_epilogue
        self.tokens = tokens_per_scale(schedule)
        self.offsets = [sum(self.tokens[:i]) for i in range(len(self.tokens))]
        self.cuda = device.type == "cuda"
        self.cache = model.new_cache(rows, sum(self.tokens), dtype, device)
        self.rope = rope
        self.gss = torch.empty_like(cond.gss)
        self.ada = torch.empty((model.depth, *cond.gss.shape), dtype=torch.float32, device=device)
        self.cond_BD = torch.empty_like(cond.cond_BD)
        self.text = [TextKV(torch.empty_like(t.k), torch.empty_like(t.v),
                            None if t.mask is None else torch.empty_like(t.mask)) for t in cond.text]
        self.x_in: dict[int, Tensor] = {}
        self.graphs: dict[int, tuple[Any, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.capture_ms = 0.0
        # Units of pruned scales (`run_layers`, `run_head`): key -> (graph, static inputs, outputs).
        self.units: dict[tuple, tuple[Any, list[Tensor], Any]] = {}
        self.sightings: set[tuple] = set()
        self.unit_counts = {"eager": 0, "captured": 0, "replayed": 0}
        for block in model.blocks:  # constants made on the main stream, before any capture
            block._fast_constants()

    def load(self, cond) -> None:
        """Copy this call's text-dependent inputs into the static buffers."""
        self.gss.copy_(cond.gss)
        with torch.autocast(self.gss.device.type, enabled=False):
            for li, block in enumerate(self.model.blocks):
                self.ada[li].copy_(block.ada(cond.gss))
        self.cond_BD.copy_(cond.cond_BD)
        for dst, src in zip(self.text, cond.text):
            dst.k.copy_(src.k)
            dst.v.copy_(src.v)
            if dst.mask is not None:
                dst.mask.copy_(src.mask)

    def _body(self, si: int) -> Tensor:
        model, x, n, off = self.model, self.x_in[si], self.tokens[si], self.offsets[si]
        self.cache.set_fill(off)
        rope_si = RopeSlice(self.rope[0, off:off + n], self.rope[1, off:off + n])
        for li, block in enumerate(model.blocks):
            if self.fused:
                x, _ = block.forward_fast(x, self.ada[li], self.text[li], rope_si, self.cache[li],
                                          gelu_epilogue=self.gelu_epilogue)
            else:
                x, _ = block(x, self.gss, self.text[li], rope_si, self.cache[li])
        return _guided_probs(model.logits(x, self.cond_BD), si, self.batch, self.cfg_list, self.tau_list,
                             self.top_k, self.top_p)

    def run(self, si: int, x: Tensor) -> Tensor:
        """Bit probabilities `(B, n * d, 2)` of scale `si` from its input tokens `x`."""
        if si not in self.x_in:
            self.x_in[si] = torch.empty_like(x)
        self.x_in[si].copy_(x)
        if not self.cuda:
            return self._body(si)
        if si not in self.graphs:
            self.graphs[si] = self._capture(lambda: self._body(si))
        graph, out = self.graphs[si]
        graph.replay()
        self.cache.set_fill(self.offsets[si] + self.tokens[si])
        return out

    def _capture(self, body) -> tuple[Any, Any]:
        """`(graph, outputs)` of `body()` captured in this state's memory pool, after one warm-up
        run on a side stream (compiles kernels, builds cuBLAS/cuDNN plans)."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = body()
        self.capture_ms += (time.perf_counter() - t0) * 1e3
        return graph, out

    # -- pruned scales: blocks with fixed keep indices, then the head, each as one unit ----------

    def _unit(self, key: tuple, fn, inputs: list[Tensor], prepare) -> Any:
        """`fn(*inputs)`. On CUDA a key seen for the second time is captured as a CUDA graph and
        replayed from then on: pruned shapes depend on the data, so a plan met once runs eagerly
        and only a plan that recurs pays for a capture. `prepare()` restores the host-side state
        that fn reads (KV-cache fills) before each execution."""
        unit = self.units.get(key)
        if unit is None and (not self.cuda or key not in self.sightings):
            self.sightings.add(key)
            self.unit_counts["eager"] += 1
            prepare()
            return fn(*inputs)
        if unit is None:
            static = [t.clone() for t in inputs]

            def body() -> Any:
                prepare()
                return fn(*static)

            graph, out = self._capture(body)
            unit = self.units[key] = (graph, static, out)
            self.unit_counts["captured"] += 1
        else:
            self.unit_counts["replayed"] += 1
        graph, static, out = unit
        for dst, src in zip(static, inputs):  # fn may update its inputs in place: copy every time
            dst.copy_(src)
        graph.replay()
        return out

    def run_layers(self, si: int, x: Tensor, layers: range, keeps: list[Tensor | None], wants: list[bool],
                   kv_policy: str) -> tuple[Tensor, list[Tensor | None]]:
        """Blocks `layers` of scale si, block j on the tokens `keeps[j]` (None: all; zero kept:
        skipped), entropy where `wants[j]`. Returns the hidden states and the entropies."""
        n, off = self.tokens[si], self.offsets[si]
        counts = [n if k is None else int(k.shape[1]) for k in keeps]
        fills = [self.cache[li].fill for li in layers]
        grow = [n if kv_policy == "all" and k is not None and c else c for k, c in zip(keeps, counts)]
        gathered = [j for j, k in enumerate(keeps) if k is not None and counts[j]]
        # Keep lists that are views of one tensor (a pruner's batched plan) enter the unit as that
        # tensor, copied once per replay, and are re-viewed inside: one copy, not one per block.
        bases: list[Tensor] = []
        geometry: list[tuple[int, tuple, tuple, int]] = []
        for j in gathered:
            keep = keeps[j]
            if keep._base is not None and keep._base.is_contiguous():
                base = keep._base
            else:
                keep = base = keep.contiguous()
            slot = next((b for b, t in enumerate(bases) if t is base), None)
            if slot is None:
                slot = len(bases)
                bases.append(base)
            geometry.append((slot, tuple(keep.shape), keep.stride(), keep.storage_offset() - base.storage_offset()))
        key = ("layers", si, layers.start, layers.stop, tuple(None if k is None else c for k, c in zip(keeps, counts)),
               tuple(wants), tuple(fills), kv_policy, x.dtype, tuple(tuple(b.shape) for b in bases), tuple(geometry))
        rope_si = RopeSlice(self.rope[0, off:off + n], self.rope[1, off:off + n])
        model = self.model

        def prepare() -> None:
            for li, fill in zip(layers, fills):
                self.cache[li].fill = fill

        def fn(x: Tensor, *base: Tensor) -> tuple[Tensor, list[Tensor | None]]:
            given = {j: base[b].as_strided(size, stride, base[b].storage_offset() + offset)
                     for j, (b, size, stride, offset) in zip(gathered, geometry)}
            ents: list[Tensor | None] = []
            for j, li in enumerate(layers):
                keep, ent = given.get(j), None
                if counts[j]:
                    x, ent = _run_block(model.blocks[li], x, self.ada[li], self.gss, self.text[li], rope_si,
                                        self.cache[li], keep=keep, entropy=wants[j], kv_policy=kv_policy,
                                        fused=self.fused, gelu_epilogue=self.gelu_epilogue)
                ents.append(ent)
            return x, ents

        x, ents = self._unit(key, fn, [x, *bases], prepare)
        for li, fill, g in zip(layers, fills, grow):
            self.cache[li].fill = fill + g
        return x, ents

    def run_head(self, si: int, x: Tensor) -> Tensor:
        """Bit probabilities of scale si from the final hidden states (head, guidance, top-k/p)."""
        def fn(x: Tensor) -> Tensor:
            return _guided_probs(self.model.logits(x, self.cond_BD), si, self.batch, self.cfg_list, self.tau_list,
                                 self.top_k, self.top_p)

        return self._unit(("head", si, x.dtype), fn, [x], lambda: None)


def release_fast_state(model: InfinityTransformer) -> None:
    """Free the static buffers and CUDA graphs the fast path keeps on `model`."""
    model.__dict__.pop("_toprovar_scale_graphs", None)


def _scale_graphs(model: InfinityTransformer, key: tuple, **kw) -> tuple[_ScaleGraphs, bool]:
    """The static state of `key` (one kept per model: a new key frees the previous one)."""
    current = model.__dict__.get("_toprovar_scale_graphs")
    if current is not None and current.key == key:
        return current, False
    release_fast_state(model)
    state = _ScaleGraphs(model, key, **kw)
    model.__dict__["_toprovar_scale_graphs"] = state
    return state, True


def _guided_probs(logits: Tensor, si: int, batch: int, cfg_list: list[float], tau_list: list[float],
                  top_k: int, top_p: float) -> Tensor:
    """Temperature, classifier-free guidance on the logits, top-k/top-p, softmax (official order)."""
    logits = logits.mul(1 / tau_list[si])
    if logits.shape[0] != batch and cfg_list[si] != 1:
        logits = cfg_list[si] * logits[:batch] + (1 - cfg_list[si]) * logits[batch:]
    else:
        logits = logits[:batch]
    return bit_probs(logits, top_k=top_k, top_p=top_p)


def _run_block(block, x: Tensor, ada: Tensor | None, gss: Tensor, text: TextKV, rope: RopeSlice, cache, *,
               keep: Tensor | None, entropy: bool, kv_policy: str, fused: bool,
               gelu_epilogue: bool) -> tuple[Tensor, Tensor | None]:
    """One block on the tokens `keep` (None: all): the fused stages where they apply (every token,
    or kept tokens whose K/V alone enter the cache), the reference block otherwise."""
    if fused and (keep is None or kv_policy == "kept"):
        return block.forward_fast(x, ada, text, rope, cache, keep=keep, entropy=entropy, gelu_epilogue=gelu_epilogue)
    return block(x, gss, text, rope, cache, keep=keep, entropy=entropy, kv_policy=kv_policy)


def _planned_scale(graphs: _ScaleGraphs, pruner: Pruner, si: int, x: Tensor, probe: int, kv_policy: str,
                   trace: Trace) -> tuple[Tensor, Tensor]:
    """One scale of a pruner with a static plan: the probe layers on every token (their entropy
    observed), the pruner's plan for the other layers read once, those layers, `end_scale`, the
    head. Returns the final hidden states and the bit probabilities."""
    depth, n = graphs.model.depth, graphs.tokens[si]
    probes = range(min(probe, depth))
    if len(probes) and pruner.keep_tokens(si, 0, x) is not None:  # block 0 sees the scale's input
        raise RuntimeError(f"{type(pruner).__name__}.static_plan({si}) = {probe} probe layers, "
                           "but keep_tokens returned indices for block 0: probe layers run every token")
    wants = [pruner.wants_entropy(si, li) for li in probes]
    ents: list[Tensor | None] = []
    if len(probes):
        x, ents = graphs.run_layers(si, x, probes, [None] * len(probes), wants, kv_policy)
    for li, ent in zip(probes, ents):
        trace.layers.append(LayerRecord(si, li, n, n))
        if ent is not None:
            pruner.observe(si, li, ent)
    planned = range(len(probes), depth)
    keeps = [pruner.keep_tokens(si, li, x) for li in planned]  # (block 0 included when there is no probe)
    trace.layers.extend(LayerRecord(si, li, n, n if keep is None else int(keep.shape[1]))
                        for li, keep in zip(planned, keeps))
    if len(planned):
        x, _ = graphs.run_layers(si, x, planned, keeps, [False] * len(planned), kv_policy)
    pruner.end_scale(si, x)
    return x, graphs.run_head(si, x)


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


def generate(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], *,
             cfg: float | Sequence[float] | None = None, tau: float | Sequence[float] | None = None,
             top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P, h_div_w: float = 1.0,
             pixels: str | None = None, policy: Any = None, record_entropy: bool = False,
             kv_policy: str = "kept", progress: bool = False,
             fast: bool | FastOptions | None = None) -> GenerationResult:
    """Generate one image per (prompt, seed).

    cfg / tau: one value or one per scale (defaults: the backbone's). pixels: a budget of the
    backbone's schedule family, e.g. '0.06M', '0.25M', '0.60M' or '1M' (default: the backbone's).
    policy: None/'none', a Pruner, or a policy that `toprovar.pruning.build_pruner` understands.
    record_entropy: request every block's attention entropy and record its mean in the trace.
    fast: None (on for CUDA, off elsewhere), True / False, or a `FastOptions` (see module docs).
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
    opts = resolve_fast(fast, device)
    fused = opts is not None and opts.fused
    sync_free = opts is not None and opts.sync_free_sampling
    # Static buffers + CUDA graphs: the whole scale as one graph without a pruner; with a pruner
    # whose scales follow a plan fixed after their probe layers (`static_plan`), the probe layers,
    # the planned layers and the head as three units (graphs once a plan recurs).
    plans = type(pruner) is not NoPruner and callable(getattr(pruner, "static_plan", None))
    graph_state = opts is not None and opts.graphs and not record_entropy and (type(pruner) is NoPruner or plans)
    graph_loop = graph_state and type(pruner) is NoPruner
    runtime: dict[str, Any] = {"fast": None if opts is None else vars(opts).copy(), "graph_loop": graph_loop,
                               "planned_units": graph_state and plans, "device": str(device)}
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
        attention_ctx = prefer_cudnn_attention(opts is not None and opts.cudnn_attention and device.type == "cuda")
        autocast = _autocast(device, backbone.dtype, cache_enabled=False) if graph_state else \
            _autocast(device, backbone.dtype)
        with autocast, attention_ctx:
            start = timer.mark()
            cond = model.encode_condition(features, lengths, with_uncond=use_cfg)
            rope = model.rope_table(spec.schedules.full_schedule(h_div_w), device)
            graphs: _ScaleGraphs | None = None
            if graph_state:
                key = (tuple(schedule), rows, batch, tuple(cond.text[0].k.shape), cond.text[0].mask is not None,
                       tuple(cfg_list), tuple(tau_list), top_k, top_p, fused, opts.cudnn_attention,
                       opts.gelu_epilogue, backbone.dtype, str(device))
                graphs, fresh = _scale_graphs(model, key, schedule=schedule, rows=rows, batch=batch, cond=cond,
                                              rope=rope, dtype=backbone.dtype, device=device, cfg_list=cfg_list,
                                              tau_list=tau_list, top_k=top_k, top_p=top_p, fused=fused,
                                              gelu_epilogue=opts.gelu_epilogue)
                graphs.load(cond)
                cache = graphs.cache
                cache.set_fill(0)
                units_before = dict(graphs.unit_counts)
                runtime["graphs_captured"] = fresh and device.type == "cuda"
            else:
                cache = model.new_cache(rows, sum(tokens), backbone.dtype, device)
            ada = [block.ada(cond.gss) for block in model.blocks] if fused and not graph_loop else None
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
                x = model.add_level(x, si)
                probe = pruner.static_plan(si) if graphs is not None and plans else None
                if graph_loop:
                    trace.layers.extend(LayerRecord(si, li, n, n) for li in range(model.depth))
                    probs = graphs.run(si, x)
                    bits = draw_bits(probs, generators, n, sync_free=sync_free)
                elif probe is not None:
                    x, probs = _planned_scale(graphs, pruner, si, x, probe, kv_policy, trace)
                    bits = draw_bits(probs, generators, n, sync_free=sync_free)
                else:
                    rope_si = RopeSlice(rope[0, offset:offset + n], rope[1, offset:offset + n])
                    for li, block in enumerate(model.blocks):
                        keep = pruner.keep_tokens(si, li, x)
                        kept = n if keep is None else keep.shape[1]
                        record = LayerRecord(si, li, n, kept)
                        trace.layers.append(record)
                        if kept == 0:
                            continue
                        want = record_entropy or pruner.wants_entropy(si, li)
                        x, ent = _run_block(block, x, ada[li] if fused else None, cond.gss, cond.text[li], rope_si,
                                            cache[li], keep=keep, entropy=want, kv_policy=kv_policy, fused=fused,
                                            gelu_epilogue=fused and opts.gelu_epilogue)
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
                    if sync_free:
                        bits = draw_bits(bit_probs(logits, top_k=top_k, top_p=top_p), generators, n, sync_free=True)
                    else:
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
            if opts is not None and device.type == "cuda" and isinstance(vae, BSQVAE):
                images = vae.decode(summed, channels_last=opts.vae_channels_last, fused_norm=opts.vae_fused_norm,
                                    cudnn_benchmark=opts.vae_cudnn_benchmark)
            else:
                images = vae.decode(summed)
            end = timer.mark()
        timer.finish()

    for si, (a, b) in enumerate(scale_marks):
        trace.scales[si].time_ms = timer.elapsed_ms(a, b)
    trace.decode_ms = timer.elapsed_ms(decode_start, end)
    trace.total_ms = timer.elapsed_ms(start, end)
    for record, value in entropy_means:
        record.entropy_mean = float(value)
    if graphs is not None:
        runtime["capture_ms"] = graphs.capture_ms
        if plans:
            runtime["units"] = {k: v - units_before[k] for k, v in graphs.unit_counts.items()}
    return GenerationResult(images=_to_uint8(images), trace=trace, bits=[b.cpu() for b in bits_per_scale],
                            runtime=runtime)
