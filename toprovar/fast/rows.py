"""`RowInputs`: what the blocks and the head read for the rows one scale runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from toprovar.models.transformer import Condition, KVCache


@dataclass(frozen=True)
class RowInputs:
    """The inputs of every row, or from a CFG skip's scale on only the conditional ones
    (`first_rows`: views of the same tensors, so the dropped rows' KV cache is neither read nor
    written and nothing is copied)."""

    cond: Condition  # text condition: pooled text, shared AdaLN vectors, text K/V per block
    ada: Sequence[Tensor] | None  # per block `block.ada(cond.gss)` (fused blocks), else None
    cache: KVCache

    def first_rows(self, rows: int) -> RowInputs:
        if rows == self.cond.rows:
            return self
        return RowInputs(
            self.cond.first_rows(rows),
            None if self.ada is None else [a[:rows] for a in self.ada],
            self.cache.first_rows(rows),
        )


def row_views(full: RowInputs, scale_rows: Sequence[int]) -> dict[int, RowInputs]:
    """Row count -> the inputs of that many rows, for every row count of the schedule."""
    return {rows: full.first_rows(rows) for rows in set(scale_rows)}
