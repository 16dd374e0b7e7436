"""Batched generation: many prompts in equal chunks, a batch size that fits the device, and a retry
at half the batch after a CUDA out-of-memory error.

Every command that generates more prompts than one call takes goes through `run_in_chunks` (or
`generate_in_batches`, its form for `toprovar.pipeline.generate`): `python -m calibrate`
(calibrate.backend), `generate`, `compare`, the benchmarks.

* Chunks are equal (`chunk_plan`): each new batch size allocates its own KV cache and captures its
  own CUDA graphs, so 12 prompts at batch 8 run as two calls of 6, not 8 + 4. A chunk short of the
  common size is padded by the caller with copies of its last prompt (`Chunk.padded`).
* `batch_size: auto` (`resolve_batch_size`) is the largest batch the backbone's memory model
  (`memory:` in its config group, toprovar/conf/backbone/) says fits the free memory of the CUDA
  device; on CPU it is the group's `memory.cpu_batch` (today's batch, so CPU runs are unchanged).
  An explicit batch that the model says cannot fit the device at all is a one-line UserError
  before any weights load.
* A CUDA out-of-memory error in a chunk (`torch.OutOfMemoryError`) halves the batch for the rest
  of the run (`BatchLimit`), frees memory (the caller's `release`, then `torch.cuda.empty_cache`)
  and redoes that chunk and the ones after it, re-planned at the new size; chunks already done
  are kept. A chunk's work must therefore keep its side effects until it returns (callers collect
  the returned values). One warning line on stderr says what happened.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from toprovar.errors import UserError

AUTO = "auto"
GIB = 1 << 30
T = TypeVar("T")


def batch_setting(value: Any, key: str = "batch_size") -> int | str:
    """A batch setting as the configs give it: `auto` or a positive integer; anything else is a
    one-line UserError naming `key`."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r}; give a positive integer or {AUTO}")
    return value


def chunk_plan(n: int, batch_size: int) -> tuple[int, list[range]]:
    """`(size, chunks)`: `n` prompts in as few calls of at most `batch_size` as possible, all of one
    size (the fewest images that still need that many calls); the last chunk may hold fewer prompts
    and is padded to `size` by the caller. One size means one set of static buffers and CUDA graphs
    for every call of a prompt set: each new batch size allocates its own KV cache and captures its
    own graphs (e.g. 12 prompts at batch_size 8: two calls of 6, not 8 + 4)."""
    calls = -(-n // batch_size)
    size = -(-n // calls)
    return size, [range(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass(frozen=True)
class Chunk:
    """One call's share of the prompts: `indices` into the prompt list, run as `size` images."""

    number: int  # 0, 1, 2, ... in the order the chunks ran
    indices: range
    size: int  # images in the call, padding included

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def padded(self) -> list[int]:
        """The prompt indices of the call: the chunk's, then copies of its last up to `size`."""
        return [*self.indices, *[self.indices[-1]] * (self.size - len(self.indices))]


class BatchLimit:
    """The batch size a run uses now; `halve` after an out-of-memory error (for the rest of the run).
    `history`: every size it has had, first to last (what a run records as its batch size)."""

    def __init__(self, size: int, prog: str = "toprovar"):
        self.size = batch_setting(size)
        self.prog = prog
        self.history = [self.size]

    def halve(self, redo: range) -> None:
        if self.size == 1:
            raise RuntimeError("BatchLimit.halve at batch 1")
        old, self.size = self.size, self.size // 2
        self.history.append(self.size)
        print(
            f"{self.prog}: warning: CUDA out of memory at batch {old}; batch {self.size} from now on, "
            f"redoing prompts {redo.start}..{redo.stop - 1}",
            file=sys.stderr,
        )


def free_memory(release: Callable[[], None] | None = None) -> None:
    """Drop what the failed call held: the caller's `release` (e.g. the fast path's static buffers),
    garbage, and CUDA's cached blocks."""
    if release is not None:
        release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_chunks(
    n: int,
    limit: BatchLimit,
    work: Callable[[Chunk], T],
    *,
    release: Callable[[], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[Chunk, T]]:
    """`work(chunk)` for equal chunks of `n` prompts at most `limit.size` each (`chunk_plan`), in
    order; returns each chunk with its result. After `torch.OutOfMemoryError` (CUDA) in a chunk,
    at a batch above 1: halve `limit`, `free_memory(release)`, re-plan the prompts from that chunk
    on at the new size and go on; at batch 1 the error propagates. `progress(k)`: k more prompts done."""
    done: list[tuple[Chunk, T]] = []
    start = 0
    while start < n:
        base = start
        size, plan = chunk_plan(n - base, limit.size)
        failed = None
        for part in plan:
            chunk = Chunk(len(done), range(base + part.start, base + part.stop), size)
            try:
                result = work(chunk)
            except torch.OutOfMemoryError:
                if limit.size == 1:
                    raise
                failed = chunk  # freed below, outside the handler: the traceback holds the call's tensors
                break
            done.append((chunk, result))
            start = chunk.indices.stop
            if progress is not None:
                progress(len(chunk))
        if failed is not None:
            limit.halve(range(failed.indices.start, n))
            free_memory(release)
    return done


def generate_in_batches(
    backbone: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    limit: BatchLimit,
    *,
    keep: Callable[[Chunk, Any], Any] | None = None,
    progress: Callable[[int], None] | None = None,
    **generate_kwargs: Any,
) -> list[tuple[Chunk, Any]]:
    """`toprovar.pipeline.generate` over `prompts` and `seeds` in equal chunks (`run_in_chunks`); a
    short chunk is padded with copies of its last prompt and seed. Returns each chunk with its
    `GenerationResult` (of the padded call: `images_of` drops the padding), or with what
    `keep(chunk, result)` made of it as soon as the chunk was done (e.g. its images written, its
    trace kept: memory stays one chunk's; `keep` runs once per chunk, after the call succeeded)."""
    from toprovar.fast import release_fast_runtime
    from toprovar.pipeline import generate

    def call(chunk: Chunk) -> Any:
        result = generate(
            backbone, [prompts[i] for i in chunk.padded], [seeds[i] for i in chunk.padded], **generate_kwargs
        )
        return result if keep is None else keep(chunk, result)

    return run_in_chunks(len(prompts), limit, call, release=lambda: release_fast_runtime(backbone), progress=progress)


def images_of(batches: Sequence[tuple[Chunk, Any]]) -> torch.Tensor:
    """The prompts' images of `generate_in_batches`, in prompt order, padding dropped."""
    return torch.cat([result.images[: len(chunk)] for chunk, result in batches])


# -- how many images fit ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryModel:
    """A backbone's GPU memory (GiB, reserved) at its default pixel budget (Infinity: 1024²):
    `weights + overhead + per_image * batch`, per_image scaled by the run's tokens (`token_share`).
    `cpu_batch`: the batch `auto` takes on CPU; `max_batch`: the most `auto` takes anywhere. From
    `memory:` of the backbone group."""

    weights_gib: float
    overhead_gib: float  # what does not grow with the batch, beyond the weights (text encoder, context)
    per_image_gib: float  # KV cache + activations + CUDA graphs, per image
    margin: float  # share of the free memory a batch may plan to use
    cpu_batch: int
    max_batch: int

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> MemoryModel:
        memory = group.get("memory")
        name = group.get("name", "?")
        if not isinstance(memory, Mapping):
            raise UserError(f"backbone '{name}' has no memory model (`memory:` in its config group); set batch_size")
        try:
            model = cls(**{key: memory[key] for key in cls.__dataclass_fields__})
        except KeyError as err:
            raise UserError(f"backbone '{name}': memory.{err.args[0]} is missing from its config group") from None
        if not 0 < model.margin <= 1 or model.per_image_gib <= 0 or min(model.cpu_batch, model.max_batch) < 1:
            raise UserError(
                f"backbone '{name}': memory needs 0 < margin <= 1, per_image_gib > 0, cpu_batch and max_batch >= 1"
            )
        return model

    def need_gib(self, batch: int, token_share: float = 1.0) -> float:
        """Planned peak for `batch` images whose schedule has `token_share` of the default's tokens."""
        return self.weights_gib + self.overhead_gib + self.per_image_gib * token_share * batch

    def largest_batch(self, free_gib: float, token_share: float = 1.0) -> int:
        """The most images (at least 1, at most max_batch) whose planned peak fits margin × free."""
        room = free_gib * self.margin - self.weights_gib - self.overhead_gib
        return max(1, min(self.max_batch, math.floor(room / (self.per_image_gib * token_share))))


def token_share(spec: Any, pixels: str | None, h_div_w: float | None) -> float:
    """Tokens of the run's schedule over those of the backbone's default one (square, `spec.pixels`:
    1M for Infinity), at which its memory model is given."""
    ours = spec.schedules.scale_schedule(h_div_w or 1.0, pixels or spec.pixels)
    reference = spec.schedules.scale_schedule(1.0, spec.pixels)
    return sum(h * w for _, h, w in ours) / sum(h * w for _, h, w in reference)


def device_memory_gib(device: torch.device) -> tuple[float, float]:
    """(free, total) GiB this process may use on a CUDA device: the driver's free memory, bounded by
    `torch.cuda.set_per_process_memory_fraction` when one is set (the driver does not know of it, and
    it is how a smaller card is emulated on a larger one: benchmarks.capped_calibration)."""
    free, total = torch.cuda.mem_get_info(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = torch.cuda.get_per_process_memory_fraction(index)
    if fraction < 1.0:
        total = total * fraction
        free = min(free, total - torch.cuda.memory_reserved(device))
    return free / GIB, total / GIB


def resolve_batch_size(
    setting: Any,
    group: Mapping[str, Any],
    spec: Any,
    device: torch.device,
    *,
    pixels: str | None = None,
    h_div_w: float | None = None,
    key: str = "batch_size",
) -> int:
    """The batch a run uses, before any weights load. `auto`: on CUDA the memory model's largest
    batch for the device's free memory, on CPU `memory.cpu_batch`. An explicit batch: itself, or a
    one-line UserError where the model's planned peak exceeds the CUDA device's total memory."""
    setting = batch_setting(setting, key)
    if setting != AUTO and (device.type != "cuda" or group.get("memory") is None):
        return setting  # nothing to check it against
    model = MemoryModel.from_group(group)
    if device.type != "cuda":
        return model.cpu_batch
    share = token_share(spec, pixels, h_div_w)
    free, total = device_memory_gib(device)
    if setting == AUTO:
        return model.largest_batch(free, share)
    need = model.need_gib(setting, share)
    if need > total:
        fits = model.largest_batch(total, share)
        raise UserError(
            f"{key}={setting} cannot fit {torch.cuda.get_device_name(device)} ({total:.0f} GiB): "
            f"backbone '{spec.name}' plans {need:.0f} GiB for it; use {key}={AUTO} or at most {fits}"
        )
    return setting
