"""Counting accuracy of `tiny`: the held-out counting prompts, a per-count table computed from the
detector's checks (right on ground-truth renders, 0 on renders of the wrong count), the command."""

import dataclasses
import json
import random
import re
import subprocess
import sys

import pytest
from scipy import stats

from benchmarks import counting as command
from toprovar.errors import UserError
from toprovar.tiny import counting as C
from toprovar.tiny.evaluate import geneval_lite
from toprovar.tiny.scenes import COUNTS, HELDOUT_PAIRS, render_uint8, sample_scenes

SEED = random.randrange(1 << 30)  # fresh each run; failing asserts show it
PER_COUNT = 24


@pytest.fixture(scope="module")
def scenes():
    return C.counting_scenes(PER_COUNT, SEED)


def test_heldout_counting_scenes_are_the_first_of_each_count_in_draw_order(scenes):
    assert C.COUNT_VALUES == tuple(sorted(COUNTS))
    assert sorted(len(s.objects) for s in scenes) == sorted(list(C.COUNT_VALUES) * PER_COUNT)
    assert all(s.kind == "counting" and (s.objects[0].color, s.objects[0].shape) in HELDOUT_PAIRS for s in scenes)
    drawn = [s for s in sample_scenes(40 * PER_COUNT, SEED, "heldout") if s.kind == "counting"]
    taken = {c: 0 for c in C.COUNT_VALUES}
    first = []
    for s in drawn:
        if taken[len(s.objects)] < PER_COUNT:
            taken[len(s.objects)] += 1
            first.append(s)
    assert min(taken.values()) == PER_COUNT, SEED  # the reference draw was long enough
    assert scenes == first and C.counting_scenes(PER_COUNT, SEED) == scenes, SEED
    train = C.counting_scenes(4, SEED, "train")
    assert sorted(len(s.objects) for s in train) == sorted(list(C.COUNT_VALUES) * 4)
    assert all(s.kind == "counting" and (o.color, o.shape) not in HELDOUT_PAIRS for s in train for o in s.objects)
    with pytest.raises(ValueError, match="per_count"):
        C.counting_scenes(0, SEED)


def test_ground_truth_renders_count_right_and_the_table_comes_from_the_checks(scenes):
    images = render_uint8(scenes)
    outcomes = C.count_outcomes(images, scenes)
    assert outcomes.correct.tolist() == [bool(x) for x in geneval_lite(images, scenes)]  # the category's score
    assert ((outcomes.detected == outcomes["count"]) == outcomes.exact_count).all()
    table = C.count_table(outcomes)
    assert list(table.columns) == list(C.TABLE_COLUMNS)
    assert table["count"].tolist() == [*C.COUNT_VALUES, "overall"]
    assert table.n.tolist() == [PER_COUNT] * len(C.COUNT_VALUES) + [len(scenes)]
    assert (table.accuracy >= 0.9).all() and table.accuracy.iloc[-1] >= 0.97, (SEED, table)
    for row in table.itertuples():
        ci = stats.binomtest(row.correct, row.n).proportion_ci(0.95, method="wilson")
        assert (row.ci_low, row.ci_high) == pytest.approx((ci.low, ci.high))
        assert row.ci_low <= row.accuracy <= row.ci_high
        assert row.exact_count + row.fewer + row.more == pytest.approx(1.0)


def _recaptioned(scene, drop: int):
    """The scene's caption with `drop` fewer objects asked for (the image keeps all of them)."""
    return dataclasses.replace(scene, objects=scene.objects[: len(scene.objects) - drop]).caption


def test_renders_of_the_wrong_count_score_zero(scenes):
    fewer = [dataclasses.replace(s, objects=s.objects[:-1]) for s in scenes]  # one object missing
    table = C.count_table(C.count_outcomes(render_uint8(fewer), scenes)).set_index("count")
    assert (table.accuracy == 0).all() and (table.exact_count == 0).all(), (SEED, table)
    assert table.loc["overall", "fewer"] == 1.0
    many = [s for s in scenes if len(s.objects) > min(C.COUNT_VALUES)]
    table = C.count_table(C.count_outcomes(render_uint8(many), [_recaptioned(s, 1) for s in many]))
    assert table["count"].tolist() == [*C.COUNT_VALUES[:-1], "overall"]  # four shown, three asked, ...
    assert (table.accuracy == 0).all() and table.more.iloc[-1] == 1.0, (SEED, table)


def test_outcomes_refuse_other_prompts_and_mismatched_lengths(scenes):
    images = render_uint8(scenes[:2])
    with pytest.raises(ValueError, match="not a counting prompt"):
        C.count_outcomes(images, [scenes[0].caption, "a red circle"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        C.count_outcomes(images, scenes[:1])
    with pytest.raises(ValueError, match="no outcomes"):
        C.count_table(C.count_outcomes(images[:0], []))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--per-count", "0"], "--per-count=0"),
        (["--prompt", "a red circle"], "is a colors prompt"),
        (["--prompt", "three red dogs"], "not a tiny-scene caption"),
        (["--prompt", "three red stars", "--seeds", "0"], "--seeds=0"),
        (["--batch", "0"], "--batch=0"),
        (["--device", "tpu:x"], "--device"),
        (["--weights", "/nonexistent"], "--weights /nonexistent: no"),
    ],
)
def test_command_mistakes_are_found_before_weights_load(monkeypatch, args, message):
    def no_weights(*_, **__):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr("toprovar.models.registry.build_backbone", no_weights)
    with pytest.raises(UserError, match=re.escape(message)):
        command.main(args)


def test_command_mistake_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.counting", "--prompt", "a red circle"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"{command.PROG}: error: --prompt 'a red circle' is a colors prompt")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_command_generates_and_tabulates_one_prompt(tmp_path, capsys):
    out = tmp_path / "counting.json"
    command.main(["--prompt", "three red stars", "--seeds", "3", "--batch", "2", "--json-out", str(out)])
    printed = capsys.readouterr().out
    meta = json.loads(out.read_text())
    assert json.loads(printed.strip().splitlines()[-1]) == meta
    assert [row["count"] for row in meta["table"]] == [3, "overall"]
    assert meta["table"][0]["n"] == 3 and meta["command"].endswith("--json-out " + str(out))
    assert "| 3 | 3 |" in printed and "objects of the shape found per image (seeds 0..2)" in printed
