"""`WholeScales`: a scale that prunes nothing as one CUDA graph (a direct call on CPU): every
block on every token, the head, guidance, top-k/top-p."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from toprovar.fast.blocks import FastStep, run_fast_blocks
from toprovar.fast.buffers import StaticBuffers
from toprovar.fast.capture import GraphCapture
from toprovar.fast.options import FastOptions


class WholeScales:
    """One graph per (scale, rows, KV-cache fills, the call's sampling constants at that scale),
    captured on its first call and replayed after. The fills are those every earlier scale left:
    all equal without pruning, fewer where an earlier pruned scale kept only its kept tokens' K/V."""

    def __init__(self, buffers: StaticBuffers, opts: FastOptions, capture: GraphCapture | None):
        self.buffers, self.opts, self.capture = buffers, opts, capture
        self.graphs: dict[tuple, tuple[Any, tuple[Tensor, Tensor]]] = {}

    def _body(self, si: int, rows: int, fills: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        buf, opts = self.buffers, self.opts
        model, x = buf.model, buf.x_in[(si, rows)]
        r = buf.at(x)
        for layer, fill in zip(buf.cache.layers, fills):
            layer.fill = fill
        rope_si = buf.rope_at(si)
        if opts.fused:
            steps = [FastStep(block, r.ada[li], r.cond.text[li], r.cache[li]) for li, block in enumerate(model.blocks)]
            x, _ = run_fast_blocks(steps, x, rope_si, opts)  # every token: index_io does not apply
        else:
            for li, block in enumerate(model.blocks):
                x, _ = block(x, r.cond.gss, r.cond.text[li], rope_si, r.cache[li])
        return buf.sampling.probs(model.logits(x, r.cond.cond_BD), si, buf.batch), x

    def run(self, si: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Bit probabilities `(B, n * d, 2)` of scale `si` from its input tokens `x`, and the last
        block's hidden states (`Pruner.end_scale` reads them)."""
        buf = self.buffers
        at, fills = buf.input_at(si, x), tuple(buf.cache.fills)
        if self.capture is None:
            return self._body(*at, fills)
        key = (*at, fills, buf.sampling.at_scale(si))  # the call's sampling constants are captured with the graph
        if key not in self.graphs:
            self.graphs[key] = self.capture.capture(lambda: self._body(*at, fills))
        graph, out = self.graphs[key]
        graph.replay()
        for layer, fill in zip(buf.cache.layers, fills):  # replays write slots the host never saw
            layer.fill = fill + buf.tokens[si]
        return out
