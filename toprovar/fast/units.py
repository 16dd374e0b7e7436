"""`PlannedUnits`: the blocks of a pruned scale with fixed keep indices, and its head, each as one
unit of the static buffers (a CUDA graph once its key recurs, `UnitCache`)."""

from __future__ import annotations

from torch import Tensor

from toprovar.fast.blocks import FastStep, run_block, run_fast_blocks
from toprovar.fast.buffers import StaticBuffers
from toprovar.fast.capture import UnitCache
from toprovar.fast.options import FastOptions


class PlannedUnits:
    def __init__(self, buffers: StaticBuffers, opts: FastOptions, cache: UnitCache):
        self.buffers, self.opts, self.cache = buffers, opts, cache

    def run_layers(
        self, si: int, x: Tensor, layers: range, keeps: list[Tensor | None], wants: list[bool], kv_policy: str
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Blocks `layers` of scale si, block j on the tokens `keeps[j]` (None: all; zero kept:
        skipped), entropy where `wants[j]`. Returns the hidden states and the entropies."""
        buf, opts = self.buffers, self.opts
        n = buf.tokens[si]
        counts = [n if k is None else int(k.shape[1]) for k in keeps]
        fills = [buf.cache[li].fill for li in layers]
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
        rope_si = buf.rope_at(si)
        model, r = buf.model, buf.at(x)

        def prepare() -> None:
            for li, fill in zip(layers, fills):
                buf.cache[li].fill = fill

        def fn(x: Tensor, *base: Tensor) -> tuple[Tensor, list[Tensor | None]]:
            given = {
                j: base[b].as_strided(size, stride, base[b].storage_offset() + offset)
                for j, (b, size, stride, offset) in zip(gathered, geometry)
            }
            if opts.fused and kv_policy == "kept":  # the fused chain (equal keeps are views of one base slot)
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
                x, live_ents = run_fast_blocks(steps, x, rope_si, opts)
                ents = [None] * len(layers)
                for j, ent in zip(live, live_ents):
                    ents[j] = ent
                return x, ents
            ents: list[Tensor | None] = []
            for j, li in enumerate(layers):
                keep, ent = given.get(j), None
                if counts[j]:
                    x, ent = run_block(
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
                        fused=opts.fused,
                        gelu_epilogue=opts.gelu_epilogue,
                    )
                ents.append(ent)
            return x, ents

        x, ents = self.cache.run(key, fn, [x, *bases], prepare)
        for li, fill, g in zip(layers, fills, grow):
            buf.cache[li].fill = fill + g
        return x, ents

    def run_head(self, si: int, x: Tensor) -> Tensor:
        """Bit probabilities of scale si from the final hidden states (head, guidance, top-k/p)."""
        buf = self.buffers
        cond_BD, sampling = buf.at(x).cond.cond_BD, buf.sampling

        def fn(x: Tensor) -> Tensor:
            return sampling.probs(buf.model.logits(x, cond_BD), si, buf.batch)

        return self.cache.run(("head", si, tuple(x.shape), x.dtype, sampling.at_scale(si)), fn, [x], lambda: None)
