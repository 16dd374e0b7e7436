"""The three paths a scale of the generation loop takes; `run_scale` picks one from the pruner's
declared hooks (never from its type):

  * `_scale_graph`: where the pruner does not act (`acts_at(si)` False; everywhere for `none`),
    the scale runs exactly as unpruned: on the fast path one CUDA graph (a direct call on CPU);
  * `_scale_planned`: a pruner that plans statically (`plans_statically`, `static_plan(si)` = P)
    runs the first P blocks on every token (its probe layers, entropy observed), reads its plan
    for the other blocks once, and runs those blocks and the head as units of the static buffers
    (`toprovar.fast.units`). A plan that keeps every token of every block runs the rest of the
    scale on the same kernels as the unpruned graph, so it costs nothing and draws the same bits;
  * `_scale_eager`: block by block, the pruner deciding at each (plans fixed only after each block,
    and `record_entropy`).

Each appends the name of its path to `call.paths` and returns the scale's sampled bits, all three
through the same `GuidedSampling` (temperature, guidance, top-k/top-p).
"""

from __future__ import annotations

from torch import Tensor

from toprovar.fast import run_block
from toprovar.generation_call import GenerationCall
from toprovar.models.transformer import RopeSlice
from toprovar.sampling import bit_probs, draw_bits, sample_bits
from toprovar.trace import LayerRecord, entropy_summary


def run_scale(call: GenerationCall, si: int, x: Tensor) -> Tensor:
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


def _scale_graph(call: GenerationCall, si: int, x: Tensor) -> Tensor:
    """Scale si as one CUDA graph (a direct call on CPU): every block on every token, the head,
    guidance, top-k/top-p. Returns the sampled bits."""
    n = call.trace.scales[si].tokens
    call.trace.layers.extend(LayerRecord(si, li, n, n) for li in range(call.model.depth))
    probs, x = call.fast.whole.run(si, x)
    call.pruner.end_scale(si, x)
    return draw_bits(probs, call.generators, n, sync_free=call.sync_free)


def _scale_planned(call: GenerationCall, si: int, x: Tensor, probe: int) -> Tensor:
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
    for li, ent, want in zip(probes, ents, wants):
        trace.layers.append(LayerRecord(si, li, n, n, entropy=want))
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


def _scale_eager(call: GenerationCall, si: int, x: Tensor, *, acting: bool) -> Tensor:
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
        record.entropy = bool(want)
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
