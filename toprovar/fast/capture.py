"""CUDA graph capture (`GraphCapture`) and the cache of planned units (`UnitCache`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Captured pruned-scale units kept per scale of the schedule (`UnitCache.max_units`).
UNITS_PER_SCALE_KEPT = 6


class GraphCapture:
    """Captures CUDA graphs into one memory pool and counts them (time, number)."""

    def __init__(self, pool: Any):
        self.pool = pool  # a `torch.cuda.graph_pool_handle()`, possibly shared with other states
        self.capture_ms = 0.0
        self.captures = 0  # CUDA graphs captured so far (whole scales and units)

    def capture(self, body: Callable[[], Any]) -> tuple[Any, Any]:
        """`(graph, outputs)` of `body()` captured in the pool, after one warm-up run on a side
        stream (compiles kernels, builds cuBLAS/cuDNN plans)."""
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


class UnitCache:
    """Planned units by key. On CUDA a key seen for the second time is captured as a CUDA graph
    and replayed from then on: pruned shapes depend on the data, so a plan met once runs eagerly
    and only a plan that recurs pays for a capture. On CPU every unit is a direct call.

    Pruned plans depend on the data (kept counts), so a search meets new ones with every policy;
    captured units are kept least recently used first up to `max_units` (each holds its output
    buffers): room for the probe, planned and head units of every scale of a few policies."""

    def __init__(self, capture: GraphCapture | None, n_scales: int):
        self.capture = capture  # None: no graphs (CPU)
        self.units: dict[tuple, tuple[Any, list[Tensor], Any]] = {}  # key -> (graph, static inputs, outputs)
        self.sightings: set[tuple] = set()
        self.counts = {"eager": 0, "captured": 0, "replayed": 0, "evicted": 0}
        self.max_units = UNITS_PER_SCALE_KEPT * n_scales

    def run(self, key: tuple, fn: Callable[..., Any], inputs: list[Tensor], prepare: Callable[[], None]) -> Any:
        """`fn(*inputs)`, eagerly or as the key's graph. `prepare()` restores the host-side state
        that fn reads (KV-cache fills) before each execution."""
        unit = self.units.pop(key, None)  # re-inserted below: the dict runs least recently used first
        if unit is None and (self.capture is None or key not in self.sightings):
            self.sightings.add(key)
            self.counts["eager"] += 1
            prepare()
            return fn(*inputs)
        if unit is None:
            static = [t.clone() for t in inputs]

            def body() -> Any:
                prepare()
                return fn(*static)

            graph, out = self.capture.capture(body)
            unit = (graph, static, out)
            self.counts["captured"] += 1
            if len(self.units) >= self.max_units:  # plans of earlier policies: free their graphs and buffers
                self.units.pop(next(iter(self.units)))
                self.counts["evicted"] += 1
        else:
            self.counts["replayed"] += 1
        self.units[key] = unit
        graph, static, out = unit
        for dst, src in zip(static, inputs):  # fn may update its inputs in place: copy every time
            dst.copy_(src)
        graph.replay()
        return out
