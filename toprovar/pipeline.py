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

Pruning plugs in through the hooks of a `toprovar.pruning.Pruner` (docs/architecture.md); `NoPruner`
runs the unpruned model. Everything inside the scale loop stays on the device: no host synchronization
except what a pruner itself does (and `torch.multinomial`'s validity checks on the plain path).

Fast path (`fast=`, default on for CUDA, see `FastOptions`): the same function with
  * fused elementwise stages per block (`CrossAttnBlock.forward_fast`, Triton on CUDA);
  * one CUDA graph per scale (blocks, head, guidance, top-k/top-p, softmax), captured on the first
    call for a key (schedule, rows, text length and mask, the `GuidedSampling` settings) and
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
from typing import Any

import torch
from torch import Tensor

from toprovar.attention import prefer_cudnn_attention
from toprovar.errors import UserError
from toprovar.models.registry import Backbone
from toprovar.models.transformer import (
    KV_POLICIES,
    Condition,
    FastStep,
    InfinityTransformer,
    KVCache,
    RopeSlice,
    TextKV,
    run_fast_blocks,
)
from toprovar.models.vae import BSQVAE
from toprovar.pruning import NoPruner, Pruner, PrunerContext, as_pruner
from toprovar.renames import RENAMED, renamed_settings
from toprovar.sampling import GuidedSampling, bit_probs, draw_bits, make_generators, sample_bits
from toprovar.schedules import tokens_per_scale
from toprovar.trace import LayerRecord, ScaleRecord, Timer, Trace, entropy_summary

# Official inference defaults (tools/run_infinity.py).
DEFAULT_TOP_K = 900
DEFAULT_TOP_P = 0.97
# Static path on CUDA: text padded to a multiple of this many tokens (`_pad_text`); T5 prompts of
# up to 32 tokens (most captions) share one set of graphs.
TEXT_BUCKET = 32
# Captured pruned-scale units kept per scale of the schedule (`_ScaleGraphs.max_units`).
UNITS_PER_SCALE_KEPT = 6


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
    # (toprovar.kernels.group_norm). At batch 1 PyTorch's GroupNorm runs one thread block per group: the
    # 1024x1024 decode took 100 ms, 32 ms with these two switches (H100, docs/benchmarks.md). NHWC
    # alone, with PyTorch's GroupNorm, is slower than NCHW (131 ms): the switches go together.
    vae_channels_last: bool = True  # VAE decode on NHWC activations
    vae_fused_norm: bool = True  # VAE GroupNorm + SiLU as split-statistics Triton kernels (NHWC only)
    vae_cudnn_benchmark: bool = False  # let cuDNN time the VAE's convolution algorithms
    # Fewer kernels per block (issue 16; off until measured on the GPU: benchmarks.pruning and
    # benchmarks.latency time them against the defaults, tools/block_kernels.py counts them):
    index_io: bool = False  # a pruned block's gather, scatter and RoPE rows inside its fused kernels
    chain_blocks: bool = False  # a block's last stage makes the next one's LayerNorm; equal keeps stay gathered
    host_plan: bool = False  # pruners whose policy fixes the keep counts plan without reading the device
    # Scales of at most this many rows (batch rows x tokens) run each matrix product with its
    # LayerNorm before and residual add after fused in (toprovar.kernels.fused_linear): 9 launches a block.
    small_m_rows: int = 0


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


@dataclass(frozen=True)
class _Rows:
    """What the blocks and the head read for the rows one scale runs: every row, or from a CFG
    skip's scale on only the conditional ones (`first_rows`: views of the same tensors, so the
    dropped rows' KV cache is neither read nor written and nothing is copied)."""

    cond: Condition  # text condition: pooled text, shared AdaLN vectors, text K/V per block
    ada: Sequence[Tensor] | None  # per block `block.ada(cond.gss)` (fused blocks), else None
    cache: KVCache

    def first_rows(self, rows: int) -> _Rows:
        if rows == self.cond.rows:
            return self
        return _Rows(
            self.cond.first_rows(rows),
            None if self.ada is None else [a[:rows] for a in self.ada],
            self.cache.first_rows(rows),
        )


def _views(full: _Rows, scale_rows: Sequence[int]) -> dict[int, _Rows]:
    """Row count -> the inputs of that many rows, for every row count of the schedule."""
    return {rows: full.first_rows(rows) for rows in set(scale_rows)}


class _ScaleGraphs:
    """Static buffers (KV cache, AdaLN vectors, text K/V, pooled text, per-scale inputs) and one
    CUDA graph per scale for one key. On CPU the per-scale step is a direct call on the buffers.
    A scale after a CFG skip runs on views of the first `batch` rows of the buffers."""

    def __init__(
        self,
        model: InfinityTransformer,
        key: tuple,
        *,
        schedule,
        batch: int,
        cond,
        rope: Tensor,
        dtype: torch.dtype,
        device: torch.device,
        fused: bool,
        gelu_epilogue: bool = False,
        index_io: bool = False,
        chain: bool = False,
        small_m_rows: int = 0,
    ):
        self.model, self.key, self.batch = model, key, batch
        self.fused = fused
        self.sampling: GuidedSampling | None = None  # the current call's, set by `load`
        self.gelu_epilogue, self.index_io, self.chain, self.small_m_rows = gelu_epilogue, index_io, chain, small_m_rows
        self.tokens = tokens_per_scale(schedule)
        self.offsets = [sum(self.tokens[:i]) for i in range(len(self.tokens))]
        self.cuda = device.type == "cuda"
        self.cache = model.new_cache(cond.rows, sum(self.tokens), dtype, device)
        self.rope = rope
        self.cond = Condition(
            torch.empty_like(cond.cond_BD),
            torch.empty_like(cond.gss),
            [
                TextKV(
                    torch.empty_like(t.k), torch.empty_like(t.v), None if t.mask is None else torch.empty_like(t.mask)
                )
                for t in cond.text
            ],
        )
        self.ada = torch.empty((model.depth, *cond.gss.shape), dtype=torch.float32, device=device)
        # Every row count a call may run: all rows, and the conditional ones after a CFG skip. One
        # state serves calls with and without a skip (compare alternates them), graphs per row count.
        self.views = _views(_Rows(self.cond, list(self.ada), self.cache), (cond.rows, batch))
        self.x_in: dict[tuple[int, int], Tensor] = {}
        self.graphs: dict[tuple, tuple[Any, Tensor]] = {}  # (scale, rows, sampling constants) -> graph
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.capture_ms = 0.0
        self.captures = 0  # CUDA graphs captured so far (whole scales and units)
        # Units of pruned scales (`run_layers`, `run_head`): key -> (graph, static inputs, outputs).
        self.units: dict[tuple, tuple[Any, list[Tensor], Any]] = {}
        self.sightings: set[tuple] = set()
        self.unit_counts = {"eager": 0, "captured": 0, "replayed": 0, "evicted": 0}
        # Pruned plans depend on the data (kept counts), so a search meets new ones with every policy;
        # captured units are kept least recently used first up to this many (each holds its output
        # buffers): room for the probe, planned and head units of every scale of a few policies.
        self.max_units = UNITS_PER_SCALE_KEPT * len(self.tokens)
        for block in model.blocks:  # constants made on the main stream, before any capture
            block._fast_constants()

    def at(self, x: Tensor) -> _Rows:
        """The static inputs of the rows of `x` (all, or the conditional ones after a CFG skip)."""
        return self.views[x.shape[0]]

    def load(self, cond, sampling: GuidedSampling) -> None:
        """Copy this call's text-dependent inputs into the static buffers; its sampling (guidance,
        temperature, top-k/p per scale) selects the graphs and head units captured with it."""
        self.sampling = sampling
        static = self.cond
        static.gss.copy_(cond.gss)
        with torch.autocast(static.gss.device.type, enabled=False):
            for li, block in enumerate(self.model.blocks):
                self.ada[li].copy_(block.ada(cond.gss))
        static.cond_BD.copy_(cond.cond_BD)
        for dst, src in zip(static.text, cond.text):
            dst.k.copy_(src.k)
            dst.v.copy_(src.v)
            if dst.mask is not None:
                dst.mask.copy_(src.mask)

    def _body(self, si: int, rows: int) -> Tensor:
        model, x, n, off = self.model, self.x_in[(si, rows)], self.tokens[si], self.offsets[si]
        r = self.at(x)
        self.cache.set_fill(off)
        rope_si = RopeSlice(self.rope[0, off : off + n], self.rope[1, off : off + n])
        if self.fused:
            steps = [FastStep(block, r.ada[li], r.cond.text[li], r.cache[li]) for li, block in enumerate(model.blocks)]
            x, _ = run_fast_blocks(
                steps, x, rope_si, gelu_epilogue=self.gelu_epilogue, chain=self.chain, small_m_rows=self.small_m_rows
            )
        else:
            for li, block in enumerate(model.blocks):
                x, _ = block(x, r.cond.gss, r.cond.text[li], rope_si, r.cache[li])
        return self.sampling.probs(model.logits(x, r.cond.cond_BD), si, self.batch)

    def run(self, si: int, x: Tensor) -> Tensor:
        """Bit probabilities `(B, n * d, 2)` of scale `si` from its input tokens `x`."""
        at, sampling = (si, x.shape[0]), self.sampling
        if at not in self.x_in:
            self.x_in[at] = torch.empty_like(x)
        self.x_in[at].copy_(x)
        if not self.cuda:
            return self._body(*at)
        key = (*at, sampling.at_scale(si))  # the call's sampling constants are captured with the graph
        if key not in self.graphs:
            self.graphs[key] = self._capture(lambda: self._body(*at))
        graph, out = self.graphs[key]
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
        self.captures += 1
        return graph, out

    # -- pruned scales: blocks with fixed keep indices, then the head, each as one unit ----------

    def _unit(self, key: tuple, fn, inputs: list[Tensor], prepare) -> Any:
        """`fn(*inputs)`. On CUDA a key seen for the second time is captured as a CUDA graph and
        replayed from then on: pruned shapes depend on the data, so a plan met once runs eagerly
        and only a plan that recurs pays for a capture. `prepare()` restores the host-side state
        that fn reads (KV-cache fills) before each execution."""
        unit = self.units.pop(key, None)  # re-inserted below: the dict runs least recently used first
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
            unit = (graph, static, out)
            self.unit_counts["captured"] += 1
            if len(self.units) >= self.max_units:  # plans of earlier policies: free their graphs and buffers
                self.units.pop(next(iter(self.units)))
                self.unit_counts["evicted"] += 1
        else:
            self.unit_counts["replayed"] += 1
        self.units[key] = unit
        graph, static, out = unit
        for dst, src in zip(static, inputs):  # fn may update its inputs in place: copy every time
            dst.copy_(src)
        graph.replay()
        return out

    def run_layers(
        self, si: int, x: Tensor, layers: range, keeps: list[Tensor | None], wants: list[bool], kv_policy: str
    ) -> tuple[Tensor, list[Tensor | None]]:
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
        key = (
            "layers",
            si,
            layers.start,
            layers.stop,
            tuple(None if k is None else c for k, c in zip(keeps, counts)),
            tuple(wants),
            tuple(fills),
            kv_policy,
            tuple(x.shape),
            x.dtype,
            tuple(tuple(b.shape) for b in bases),
            tuple(geometry),
        )
        rope_si = RopeSlice(self.rope[0, off : off + n], self.rope[1, off : off + n])
        model, r = self.model, self.at(x)

        def prepare() -> None:
            for li, fill in zip(layers, fills):
                self.cache[li].fill = fill

        def fn(x: Tensor, *base: Tensor) -> tuple[Tensor, list[Tensor | None]]:
            given = {
                j: base[b].as_strided(size, stride, base[b].storage_offset() + offset)
                for j, (b, size, stride, offset) in zip(gathered, geometry)
            }
            if self.fused and kv_policy == "kept":  # the fused chain (equal keeps are views of one base slot)
                live = [j for j in range(len(layers)) if counts[j]]
                steps = [
                    FastStep(
                        model.blocks[layers[j]],
                        r.ada[layers[j]],
                        r.cond.text[layers[j]],
                        r.cache[layers[j]],
                        given.get(j),
                        wants[j],
                    )
                    for j in live
                ]
                x, live_ents = run_fast_blocks(
                    steps,
                    x,
                    rope_si,
                    gelu_epilogue=self.gelu_epilogue,
                    index_io=self.index_io,
                    chain=self.chain,
                    small_m_rows=self.small_m_rows,
                )
                ents = [None] * len(layers)
                for j, ent in zip(live, live_ents):
                    ents[j] = ent
                return x, ents
            ents: list[Tensor | None] = []
            for j, li in enumerate(layers):
                keep, ent = given.get(j), None
                if counts[j]:
                    x, ent = _run_block(
                        model.blocks[li],
                        x,
                        r.ada[li],
                        r.cond.gss,
                        r.cond.text[li],
                        rope_si,
                        r.cache[li],
                        keep=keep,
                        entropy=wants[j],
                        kv_policy=kv_policy,
                        fused=self.fused,
                        gelu_epilogue=self.gelu_epilogue,
                    )
                ents.append(ent)
            return x, ents

        x, ents = self._unit(key, fn, [x, *bases], prepare)
        for li, fill, g in zip(layers, fills, grow):
            self.cache[li].fill = fill + g
        return x, ents

    def run_head(self, si: int, x: Tensor) -> Tensor:
        """Bit probabilities of scale si from the final hidden states (head, guidance, top-k/p)."""
        cond_BD, sampling = self.at(x).cond.cond_BD, self.sampling

        def fn(x: Tensor) -> Tensor:
            return sampling.probs(self.model.logits(x, cond_BD), si, self.batch)

        return self._unit(("head", si, tuple(x.shape), x.dtype, sampling.at_scale(si)), fn, [x], lambda: None)


def release_fast_state(model: InfinityTransformer) -> None:
    """Free the static buffers and CUDA graphs the fast path keeps on `model`, and on CUDA hand the
    cached memory back to the driver: the next key (another batch size) allocates a KV cache of
    another size, which freed blocks of the old size cannot serve (at 1024² the cache is ~2.8 GB
    per row for 2B, ~6 GB for 8B)."""
    state = model.__dict__.pop("_toprovar_scale_graphs", None)
    if state is not None and state.cuda:
        del state
        torch.cuda.empty_cache()


def _scale_graphs(model: InfinityTransformer, key: tuple, **kw) -> tuple[_ScaleGraphs, bool]:
    """The static state of `key` (one kept per model: a new key frees the previous one)."""
    current = model.__dict__.get("_toprovar_scale_graphs")
    if current is not None and current.key == key:
        return current, False
    release_fast_state(model)
    state = _ScaleGraphs(model, key, **kw)
    model.__dict__["_toprovar_scale_graphs"] = state
    return state, True


def _run_block(
    block,
    x: Tensor,
    ada: Tensor | None,
    gss: Tensor,
    text: TextKV,
    rope: RopeSlice,
    cache,
    *,
    keep: Tensor | None,
    entropy: bool,
    kv_policy: str,
    fused: bool,
    gelu_epilogue: bool,
    index_io: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One block on the tokens `keep` (None: all): the fused stages where they apply (every token,
    or kept tokens whose K/V alone enter the cache), the reference block otherwise."""
    if fused and (keep is None or kv_policy == "kept"):
        return block.forward_fast(
            x, ada, text, rope, cache, keep=keep, entropy=entropy, gelu_epilogue=gelu_epilogue, index_io=index_io
        )
    return block(x, gss, text, rope, cache, keep=keep, entropy=entropy, kv_policy=kv_policy)


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


def _pad_text(features: Tensor, max_len: int, bucket: int = TEXT_BUCKET) -> Tensor:
    """Text features `(B, L, C)` zero-padded to a multiple of `bucket` tokens (at most `max_len`).

    The static buffers and CUDA graphs are keyed by the text length, so without this every batch
    whose longest prompt differs re-allocates the KV cache and re-captures every graph. The padded
    tokens are masked (the prompt lengths are unchanged), so they take no part in attention or
    pooling; only the rounding of the attention kernels may differ."""
    length = min(max_len, -(-features.shape[1] // bucket) * bucket)
    return torch.nn.functional.pad(features, (0, 0, 0, length - features.shape[1]))


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
    whole_scale: bool  # static buffers, no pruner: every scale is one CUDA graph
    planned: bool  # static buffers, a pruner with static plans: scales run as units
    record_entropy: bool
    kv_policy: str
    trace: Trace
    runtime: dict[str, Any]
    rope: Tensor | None = None
    graphs: _ScaleGraphs | None = None  # the static buffers (whole_scale or planned)
    # Text condition, AdaLN vectors (fused eager blocks) and KV cache (the static one when there
    # are static buffers), per row count of the schedule: views of the first rows after a CFG skip.
    views: dict[int, _Rows] = field(default_factory=dict)
    generators: list[torch.Generator] = field(default_factory=list)
    vae_schedule: list = field(default_factory=list)
    units_before: dict[str, int] = field(default_factory=dict)
    captures_before: int = 0
    entropy_means: list[tuple[LayerRecord, Tensor]] = field(default_factory=list)

    @property
    def model(self) -> InfinityTransformer:
        return self.backbone.transformer

    def at(self, si: int) -> _Rows:
        """The condition, AdaLN vectors and KV cache of the rows scale si runs."""
        return self.views[self.scale_rows[si]]

    @property
    def static(self) -> bool:
        return self.whole_scale or self.planned

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
    # Static buffers + CUDA graphs: the whole scale as one graph without a pruner; with a pruner
    # whose scales follow a plan fixed after their probe layers (`static_plan`), the probe layers,
    # the planned layers and the head as three units (graphs once a plan recurs).
    plans = type(pruner) is not NoPruner and type(pruner).static_plan is not Pruner.static_plan
    static = opts is not None and opts.graphs and not record_entropy and (type(pruner) is NoPruner or plans)
    whole_scale, planned = static and type(pruner) is NoPruner, static and plans
    runtime = {
        "fast": None if opts is None else vars(opts).copy(),
        "graph_loop": whole_scale,
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
        whole_scale,
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
        features = _pad_text(features, call.model.config.text_maxlen)
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
        key = (
            tuple(call.schedule),
            call.rows,
            call.batch,
            tuple(text.k.shape),
            text.mask is not None,
            call.fused,
            call.opts.cudnn_attention,
            call.opts.gelu_epilogue,
            call.opts.index_io,
            call.opts.chain_blocks,
            call.opts.small_m_rows,
            bb.dtype,
            str(bb.device),
        )
        call.graphs, fresh = _scale_graphs(
            model,
            key,
            schedule=call.schedule,
            batch=call.batch,
            cond=cond,
            rope=call.rope,
            dtype=bb.dtype,
            device=bb.device,
            fused=call.fused,
            gelu_epilogue=call.opts.gelu_epilogue,
            index_io=call.opts.index_io,
            chain=call.opts.chain_blocks,
            small_m_rows=call.opts.small_m_rows,
        )
        call.graphs.load(cond, call.sampling)
        call.graphs.cache.set_fill(0)
        call.units_before = dict(call.graphs.unit_counts)
        call.runtime["graphs_captured"] = fresh and bb.device.type == "cuda"
        call.captures_before = call.graphs.captures
    # The eager blocks read the call's own condition (the static buffers hold a copy of it).
    cache = (
        call.graphs.cache
        if call.static
        else model.new_cache(call.rows, sum(tokens_per_scale(call.schedule)), bb.dtype, bb.device)
    )
    ada = [block.ada(cond.gss) for block in model.blocks] if call.fused and not call.whole_scale else None
    call.views = _views(_Rows(cond, ada, cache), call.scale_rows)
    call.generators = make_generators(seeds, bb.device)
    call.vae_schedule = bb.vae.vae_schedule(call.schedule)
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
            host_plan=call.opts is not None and call.opts.host_plan,
        )
    )
    return model.first_tokens(cond)


def _scale_graph(call: _Call, si: int, x: Tensor) -> Tensor:
    """Scale si as one CUDA graph (a direct call on CPU): every block on every token, the head,
    guidance, top-k/top-p. Returns the sampled bits `(B, n, d)`."""
    n = call.trace.scales[si].tokens
    call.trace.layers.extend(LayerRecord(si, li, n, n) for li in range(call.model.depth))
    return draw_bits(call.graphs.run(si, x), call.generators, n, sync_free=call.sync_free)


def _scale_planned(call: _Call, si: int, x: Tensor, probe: int) -> Tensor:
    """Scale si of a pruner with a static plan: the probe layers on every token (their entropy
    observed), the pruner's plan for the other layers read once, those layers, `end_scale`, the
    head, each as a unit of the static buffers. Returns the sampled bits."""
    graphs, pruner, trace = call.graphs, call.pruner, call.trace
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
        x, ents = graphs.run_layers(si, x, probes, [None] * len(probes), wants, call.kv_policy)
    for li, ent in zip(probes, ents):
        trace.layers.append(LayerRecord(si, li, n, n))
        if ent is not None:
            pruner.observe(si, li, ent)
    planned = range(len(probes), depth)
    keeps = [pruner.keep_tokens(si, li, x) for li in planned]  # (block 0 included when there is no probe)
    trace.layers.extend(
        LayerRecord(si, li, n, n if keep is None else int(keep.shape[1])) for li, keep in zip(planned, keeps)
    )
    if len(planned):
        x, _ = graphs.run_layers(si, x, planned, keeps, [False] * len(planned), call.kv_policy)
    pruner.end_scale(si, x)
    return draw_bits(graphs.run_head(si, x), call.generators, n, sync_free=call.sync_free)


def _scale_eager(call: _Call, si: int, x: Tensor) -> Tensor:
    """Scale si block by block: the pruner picks each block's tokens from the hidden states it
    sees, entropy where it (or `record_entropy`) asks. Returns the sampled bits."""
    model, pruner, n, r = call.model, call.pruner, call.trace.scales[si].tokens, call.at(si)
    offset = sum(rec.tokens for rec in call.trace.scales[:si])
    rope_si = RopeSlice(call.rope[0, offset : offset + n], call.rope[1, offset : offset + n])
    gelu_epilogue = call.fused and call.opts.gelu_epilogue
    for li, block in enumerate(model.blocks):
        keep = pruner.keep_tokens(si, li, x)
        record = LayerRecord(si, li, n, n if keep is None else keep.shape[1])
        call.trace.layers.append(record)
        if record.kept == 0:
            continue
        want = call.record_entropy or pruner.wants_entropy(si, li)
        x, ent = _run_block(
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
    """The VAE's image of the summed codes (zeros when no scale ran), NHWC fused on the fast CUDA path."""
    vae, device, opts = call.backbone.vae, call.backbone.device, call.opts
    if summed is None:  # stopped before the first scale: nothing was generated
        _, fh, fw = call.vae_schedule[-1]
        summed = torch.zeros(call.batch, vae.codebook_dim, 1, fh, fw, device=device)
    if opts is not None and device.type == "cuda" and isinstance(vae, BSQVAE):
        return vae.decode(
            summed,
            channels_last=opts.vae_channels_last,
            fused_norm=opts.vae_fused_norm,
            cudnn_benchmark=opts.vae_cudnn_benchmark,
        )
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
    if call.graphs is not None:
        call.runtime["capture_ms"] = call.graphs.capture_ms
        call.runtime["captures"] = call.graphs.captures - call.captures_before  # this call's: its time includes them
        if call.planned:
            call.runtime["units"] = {k: v - call.units_before[k] for k, v in call.graphs.unit_counts.items()}
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
                probe = pruner.static_plan(si) if call.planned else None
                if call.whole_scale:  # one graph: blocks, head, guidance, top-k/top-p
                    bits.append(_scale_graph(call, si, x))
                elif probe is not None:  # probe blocks, the pruner's plan, planned blocks, head
                    bits.append(_scale_planned(call, si, x, probe))
                else:  # block by block, the pruner deciding at each
                    bits.append(_scale_eager(call, si, x))
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
