"""toprovar.batching: equal chunks, the batch `auto` picks from a backbone's memory model, and the
retry at half the batch after a CUDA out-of-memory error (injected here: no GPU needed)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from toprovar.batching import (
    BatchLimit,
    MemoryModel,
    batch_setting,
    chunk_plan,
    generate_in_batches,
    images_of,
    resolve_batch_size,
    run_in_chunks,
)
from toprovar.errors import UserError
from toprovar.models.registry import get_backbone

GIB = 1 << 30


def _group(name: str) -> dict:
    """The backbone config group <conf>/backbone/<name>.yaml as the commands read it: the package's,
    or for the test-only backbones the checkout's tests/conf/."""
    import yaml

    from toprovar.cli import CONF_DIR

    path = CONF_DIR / "backbone" / f"{name}.yaml"
    if not path.is_file():
        path = Path(__file__).parent / "conf" / "backbone" / f"{name}.yaml"
    return yaml.safe_load(path.read_text())


class OutOfMemoryAbove:
    """A chunk's work that raises `torch.OutOfMemoryError` the first `times` calls of a batch above
    `most`, and records every call it saw."""

    def __init__(self, most: int, times: int = 1):
        self.most, self.times, self.calls = most, times, []

    def __call__(self, chunk):
        self.calls.append(chunk)
        if chunk.size > self.most and self.times > 0:
            self.times -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return [i * 10 for i in chunk.indices]


def test_without_an_error_the_chunks_are_chunk_plans():
    for _ in range(20):
        n, batch = random.randint(1, 40), random.randint(1, 12)
        size, plan = chunk_plan(n, batch)
        done = run_in_chunks(n, BatchLimit(batch), lambda chunk: None)
        assert [c.indices for c, _ in done] == plan and {c.size for c, _ in done} == {size}
        assert [c.number for c, _ in done] == list(range(len(plan)))


def test_out_of_memory_halves_the_batch_and_redoes_only_the_failed_work(capsys):
    freed = []
    work = OutOfMemoryAbove(most=4)
    limit = BatchLimit(8, "calibrate")
    # 20 prompts at 8: three calls of 7; the first fails, then 20 prompts at 4: five calls of 4
    done = run_in_chunks(20, limit, work, release=lambda: freed.append(True))
    assert [c.size for c, _ in done] == [4] * 5
    assert [i for c, _ in done for i in c.indices] == list(range(20))  # every prompt once, in order
    assert [r for _, r in done] == [[i * 10 for i in c.indices] for c, _ in done]
    assert len(work.calls) == 6 and work.calls[0].size == 7
    assert limit.size == 4 and limit.history == [8, 4] and freed == [True]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["calibrate: warning: CUDA out of memory at batch 8; batch 4 from now on, redoing prompts 0..19"]


def test_chunks_done_before_the_error_are_kept():
    work = OutOfMemoryAbove(most=100)  # fails nothing at first
    limit = BatchLimit(6)

    def second_chunk_fails(chunk):
        if chunk.number == 1 and limit.size == 6:
            raise torch.OutOfMemoryError("injected")
        return work(chunk)

    done = run_in_chunks(12, limit, second_chunk_fails)
    assert [c.indices for c, _ in done] == [range(0, 6), range(6, 9), range(9, 12)]
    assert [c.indices for c in work.calls] == [range(0, 6), range(6, 9), range(9, 12)]  # nothing repeated
    assert limit.history == [6, 3]


def test_out_of_memory_at_batch_one_propagates():
    with pytest.raises(torch.OutOfMemoryError):
        run_in_chunks(3, BatchLimit(1), OutOfMemoryAbove(most=0))
    limit = BatchLimit(4)
    with pytest.raises(torch.OutOfMemoryError):  # 4 -> 2 -> 1, still failing at 1
        run_in_chunks(3, limit, OutOfMemoryAbove(most=0, times=10))
    assert limit.history == [4, 2, 1]


def _generate_out_of_memory_above(most: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch `toprovar.pipeline.generate` to raise CUDA's out-of-memory error for more than `most`
    prompts a call (else generate as before); returns the list it records each call's size in."""
    import toprovar.pipeline as pipeline

    real, sizes = pipeline.generate, []

    def tight(backbone, texts, chunk_seeds, **kw):
        sizes.append(len(texts))
        if len(texts) > most:
            raise torch.OutOfMemoryError("injected")
        return real(backbone, texts, chunk_seeds, **kw)

    monkeypatch.setattr(pipeline, "generate", tight)
    return sizes


def test_generate_in_batches_after_an_out_of_memory_error_gives_the_same_images(small, monkeypatch):
    prompts = ["a red cube", "two blue balls", "a green cone", "a cat", "a dog"]
    seeds = [3, 1, 4, 1, 5]
    reference = images_of(generate_in_batches(small, prompts, seeds, BatchLimit(2)))
    sizes = _generate_out_of_memory_above(2, monkeypatch)
    batches = generate_in_batches(small, prompts, seeds, BatchLimit(4))
    assert sizes == [3, 2, 2, 2]  # 5 at 4: calls of 3 (fails), then 5 at 2: three calls of 2
    assert torch.equal(images_of(batches), reference)


def test_calibration_backend_retries_at_half_the_batch(monkeypatch):
    from calibrate.backend import load_backend
    from calibrate.timing import Clock

    prompts, seeds = [f"prompt {i}" for i in range(6)], list(range(6))
    reference = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=3)
    expected = reference.generate(prompts, seeds)
    clock = Clock(torch.device("cpu"))
    backend = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=6, clock=clock)
    calls = _generate_out_of_memory_above(3, monkeypatch)
    got = backend.generate(prompts, seeds)
    assert calls == [6, 3, 3] and backend.batch_size == 3 and backend.limit.history == [6, 3]
    assert got.chunks == [3, 3] and got.sizes == [3, 3] and torch.equal(got.images, expected.images)
    assert clock.counts["images"] == 6 and clock.counts["generate_calls"] == 2  # the failed call counts nothing
    assert backend.generate(prompts, seeds).sizes == [3, 3]  # later calls keep the smaller batch


@pytest.mark.parametrize("value", [0, -1, 2.5, "8", "AUTO", True, None])
def test_a_batch_setting_is_auto_or_a_positive_integer(value):
    with pytest.raises(UserError, match="give a positive integer or auto"):
        batch_setting(value)
    assert batch_setting("auto") == "auto" and batch_setting(3) == 3


@pytest.mark.parametrize("name", ["infinity-2b", "infinity-8b", "tiny", "test-small", "test-small-t5"])
def test_auto_on_cpu_keeps_each_backbones_batch_of_today(name):
    group = _group(name)
    today = {"infinity-8b": 2}.get(name, 8)
    assert resolve_batch_size("auto", group, get_backbone(name), torch.device("cpu")) == today
    assert resolve_batch_size(5, group, get_backbone(name), torch.device("cpu")) == 5


def _fake_cuda(
    monkeypatch, free_gib: float, total_gib: float, fraction: float = 1.0, reserved_gib: float = 0.0
) -> torch.device:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), int(total_gib * GIB)))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved_gib * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return torch.device("cuda")


@pytest.mark.parametrize(
    "name, free, batch",
    [
        # 2B: 4.9 + 8.2 + 9.2 B must fit 0.9 x free
        ("infinity-2b", 79.0, 6),
        ("infinity-2b", 39.0, 2),
        ("infinity-2b", 23.0, 1),
        ("infinity-2b", 141.0, 8),  # capped at max_batch
        # 8B: 16.6 + 26.5 B
        ("infinity-8b", 79.0, 2),
        ("infinity-8b", 39.0, 1),
        ("tiny", 10.0, 8),
    ],
)
def test_auto_on_cuda_is_the_largest_batch_the_memory_model_fits(name, free, batch, monkeypatch):
    device = _fake_cuda(monkeypatch, free, free + 1)
    group, spec = _group(name), get_backbone(name)
    assert resolve_batch_size("auto", group, spec, device) == batch
    model = MemoryModel.from_group(group)
    if batch < model.max_batch:
        assert model.need_gib(batch + 1) > model.margin * free
    assert batch == 1 or model.need_gib(batch) <= model.margin * free


def test_auto_respects_a_per_process_memory_cap(monkeypatch):
    """A card capped with set_per_process_memory_fraction (how a 24 GB card is emulated on an 80 GB
    one) plans with the cap, less what this process already holds, not the driver's free memory."""
    group, spec = _group("infinity-2b"), get_backbone("infinity-2b")
    uncapped = resolve_batch_size("auto", group, spec, _fake_cuda(monkeypatch, 79.0, 80.0))
    capped = resolve_batch_size("auto", group, spec, _fake_cuda(monkeypatch, 79.0, 80.0, fraction=0.3))
    held = resolve_batch_size("auto", group, spec, _fake_cuda(monkeypatch, 79.0, 80.0, fraction=0.6, reserved_gib=10))
    assert uncapped == resolve_batch_size("auto", group, spec, _fake_cuda(monkeypatch, 79.0, 80.0, fraction=1.0))
    assert capped == resolve_batch_size("auto", group, spec, _fake_cuda(monkeypatch, 24.0, 24.0))
    assert held == resolve_batch_size("auto", group, spec, _fake_cuda(monkeypatch, 38.0, 48.0))
    assert capped < held < uncapped


def test_a_smaller_pixel_budget_fits_more_images(monkeypatch):
    device = _fake_cuda(monkeypatch, 39.0, 40.0)
    group, spec = _group("infinity-2b"), get_backbone("infinity-2b")
    assert resolve_batch_size("auto", group, spec, device, pixels="0.25M") > resolve_batch_size(
        "auto", group, spec, device
    )


def test_an_explicit_batch_that_cannot_fit_is_a_one_line_error(monkeypatch):
    device = _fake_cuda(monkeypatch, 79.0, 80.0)
    group, spec = _group("infinity-8b"), get_backbone("infinity-8b")
    assert resolve_batch_size(2, group, spec, device) == 2  # fits the card (not the free memory alone)
    with pytest.raises(UserError) as caught:
        resolve_batch_size(4, group, spec, device)  # measured: batch 4 ran out of memory on the H100
    message = str(caught.value)
    assert "\n" not in message and message.startswith("batch_size=4 cannot fit Fake GPU (80 GiB)")
    assert "use batch_size=auto or at most 2" in message


def test_a_backbone_without_a_memory_model_needs_an_explicit_batch(monkeypatch):
    group = {k: v for k, v in _group("test-small").items() if k != "memory"}
    with pytest.raises(UserError, match="has no memory model"):
        resolve_batch_size("auto", group, get_backbone("test-small"), torch.device("cpu"))
    assert resolve_batch_size(3, group, get_backbone("test-small"), torch.device("cpu")) == 3
    assert resolve_batch_size(3, group, get_backbone("test-small"), _fake_cuda(monkeypatch, 1.0, 2.0)) == 3
