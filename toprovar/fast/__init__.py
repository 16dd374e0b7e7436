"""The fast path of the generation loop: options, static buffers, graph capture, planned units.

`toprovar.pipeline.generate(fast=...)` takes a `FastOptions` (`options`). Its static state lives
in a `FastRuntime` (`runtime`) that the `Backbone` holds (`backbone.fast_runtime`):

  * `StaticBuffers` (`buffers`): the KV cache, text condition and AdaLN vectors of one key at
    fixed addresses, with views of the conditional rows for scales after a CFG skip (`rows`);
  * `WholeScales` (`graphs`): a scale that prunes nothing as one CUDA graph (a direct call on CPU);
  * `PlannedUnits` (`units`): a pruned scale's probe blocks, planned blocks and head, each a unit
    that becomes a CUDA graph once its key recurs (`capture.UnitCache`);
  * `GraphCapture` (`capture`): warm-up and capture into the runtime's graph pool.

`release_fast_runtime(backbone)` frees all of it (between calibration stages, batch sizes).
On CPU every unit is a direct call on the buffers, so `fast=True` stays bit-identical to `fast=False`.
"""

from toprovar.fast.blocks import run_block
from toprovar.fast.options import FastOptions, resolve_fast
from toprovar.fast.rows import RowInputs, row_views
from toprovar.fast.runtime import FastRuntime, FastState, release_fast_runtime

__all__ = [
    "FastOptions",
    "FastRuntime",
    "FastState",
    "RowInputs",
    "release_fast_runtime",
    "resolve_fast",
    "row_views",
    "run_block",
]
