"""`FastRuntime`: the fast path's state of one backbone, held by its `Backbone` (not on the model).

It keeps one `FastState` at a time (the static buffers, graphs and planned units of one key:
schedule, rows, text shape, options, dtype, device); a call with another key frees it first.
`release()` frees everything and on CUDA hands the cached memory back to the driver: the calibrate
backend calls it between stages, the benchmarks between batch sizes.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from toprovar.fast.buffers import StaticBuffers
from toprovar.fast.capture import GraphCapture, UnitCache
from toprovar.fast.graphs import WholeScales
from toprovar.fast.options import FastOptions
from toprovar.fast.units import PlannedUnits
from toprovar.models.transformer import InfinityTransformer


class FastState:
    """Static buffers of one key with its whole-scale graphs and planned units; capture: None on CPU
    (every unit a direct call)."""

    def __init__(self, key: tuple, opts: FastOptions, buffers: StaticBuffers, capture: GraphCapture | None):
        self.key, self.buffers, self.capture = key, buffers, capture
        self.whole = WholeScales(self.buffers, opts, self.capture)
        self.unit_cache = UnitCache(self.capture, len(self.buffers.tokens))
        self.planned = PlannedUnits(self.buffers, opts, self.unit_cache)

    @property
    def captures(self) -> int:
        return 0 if self.capture is None else self.capture.captures

    @property
    def capture_ms(self) -> float:
        return 0.0 if self.capture is None else self.capture.capture_ms


class FastRuntime:
    """The fast path's state of one backbone (see the module docs)."""

    def __init__(self) -> None:
        self.state: FastState | None = None
        self._pool: Any = None  # CUDA graph pool shared by the states of every key (`FastOptions.shared_pool`)

    def state_for(self, model: InfinityTransformer, key: tuple, opts: FastOptions, **kw) -> tuple[FastState, bool]:
        """The state of `key`, and whether it was made now (a new key frees the previous state).
        kw: the keywords of `StaticBuffers` (schedule, batch, cond, rope, dtype, device)."""
        if self.state is not None and self.state.key == key:
            return self.state, False
        self._drop_state()
        device: torch.device = kw["device"]
        pool = None
        if device.type == "cuda":
            if not opts.shared_pool:
                pool = torch.cuda.graph_pool_handle()
            else:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                pool = self._pool
        buffers = StaticBuffers(model, **kw)
        capture = GraphCapture(pool) if device.type == "cuda" else None  # CPU: direct calls
        self.state = FastState(key, opts, buffers, capture)
        return self.state, True

    def _drop_state(self) -> None:
        """Free the current state; on CUDA hand its cached memory back: the next key (another batch
        size) allocates a KV cache of another size, which freed blocks of the old size cannot
        serve (at 1024² the cache is ~2.8 GB per row for 2B, ~6 GB for 8B)."""
        state, self.state = self.state, None
        if state is not None and state.capture is not None:
            del state
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Free the static buffers, graphs and their pool; on CUDA return the cached memory to the
        driver (between calibration stages and batch sizes)."""
        self._drop_state()
        if self._pool is not None:
            self._pool = None
            gc.collect()
            torch.cuda.empty_cache()


def release_fast_runtime(backbone: Any) -> None:
    """Free what the fast path keeps for `backbone` (a `toprovar.models.registry.Backbone`): its
    static buffers, CUDA graphs and graph pool, and on CUDA the allocator's cached memory."""
    backbone.fast_runtime.release()
