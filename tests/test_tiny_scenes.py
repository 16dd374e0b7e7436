"""Procedural scenes: sampling rules, captions and their parser, rendering."""

import collections
import dataclasses
import math
import random

import pytest
import torch

from toprovar.tiny import scenes as S
from toprovar.tiny.scenes import (
    COLORS,
    HELDOUT_KINDS,
    HELDOUT_PAIRS,
    KINDS,
    MAX_CAPTION_WORDS,
    VOCABULARY,
    Scene,
    SceneObject,
    parse_caption,
    render,
    render_uint8,
    sample_scenes,
)

SEED = random.randrange(1 << 30)  # fresh each run; the message of a failing assert shows it


@pytest.fixture(scope="module")
def pools():
    return {split: sample_scenes(1500, SEED, split) for split in S.SPLITS}


def test_sampling_is_deterministic_and_prefix_stable():
    a = sample_scenes(40, SEED, "train")
    assert a == sample_scenes(40, SEED, "train")
    assert a == sample_scenes(300, SEED, "train")[:40]
    assert a != sample_scenes(40, SEED + 1, "train")
    assert [s.caption for s in a] == [s.caption for s in sample_scenes(40, SEED, "train")]


def test_bad_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        sample_scenes(3, 0, "test")


def test_kinds_are_balanced(pools):
    for split, kinds in (("train", KINDS), ("all", KINDS), ("heldout", HELDOUT_KINDS)):
        counts = collections.Counter(s.kind for s in pools[split])
        assert set(counts) == set(kinds), (split, counts)
        expected = len(pools[split]) / len(kinds)
        assert all(abs(c - expected) < 0.25 * expected for c in counts.values()), (SEED, split, counts)


def test_train_never_holds_a_heldout_pair(pools):
    bad = [s.caption for s in pools["train"] if any((o.color, o.shape) in HELDOUT_PAIRS for o in s.objects)]
    assert not bad, (SEED, bad[:3])


def test_heldout_scenes_name_a_heldout_pair(pools):
    for s in pools["heldout"]:
        assert s.kind in HELDOUT_KINDS and s.mention_color
        named = {(o.color, o.shape) for o in parse_caption(s.caption).objects}
        assert named & set(HELDOUT_PAIRS), (SEED, s.caption)


def test_all_split_reaches_heldout_pairs(pools):
    assert any((o.color, o.shape) in HELDOUT_PAIRS for s in pools["all"] for o in s.objects)


def _extent(o: SceneObject) -> float:
    return S.SIZES[o.size] * S.SHAPE_EXTENT[o.shape]


def test_scene_geometry_and_kind_rules(pools):
    for s in (s for pool in pools.values() for s in pool):
        objs = s.objects
        for o in objs:
            e = _extent(o)
            assert e + S.MARGIN - 1e-9 <= o.cx <= 1 - e - S.MARGIN + 1e-9, (SEED, s)
            assert e + S.MARGIN - 1e-9 <= o.cy <= 1 - e - S.MARGIN + 1e-9, (SEED, s)
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= _extent(a) + _extent(b) + S.GAP - 1e-9, (SEED, s)
        if s.kind in ("single_object", "colors"):
            assert len(objs) == 1 and s.mention_color == (s.kind == "colors")
        elif s.kind == "counting":
            assert 2 <= len(objs) <= 4 and len({o.shape for o in objs}) == 1
            assert all(o.size != "large" for o in objs)
            if s.mention_color:
                assert len({o.color for o in objs}) == 1
        else:
            assert len(objs) == 2 and objs[0].shape != objs[1].shape
            if s.kind == "attribute_binding":
                assert objs[0].color != objs[1].color and s.mention_color
            if s.kind == "two_objects":
                assert not s.mention_color
        if s.kind == "position":
            a, b = objs
            main = {"left_of": b.cx - a.cx, "right_of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
            assert main[s.relation] >= S.RELATION_MARGIN, (SEED, s)
        if s.location is not None:
            o = objs[0]
            assert {
                "left": o.cx <= 0.3 + 1e-9,
                "right": o.cx >= 0.7 - 1e-9,
                "top": o.cy <= 0.3 + 1e-9,
                "bottom": o.cy >= 0.7 - 1e-9,
                "center": abs(o.cx - 0.5) < 0.1 and abs(o.cy - 0.5) < 0.1,
            }[s.location]


def test_captions_use_the_vocabulary(pools):
    lengths = []
    for s in (s for pool in pools.values() for s in pool):
        words = s.caption.split()
        assert set(words) <= set(VOCABULARY), (SEED, s.caption)
        lengths.append(len(words))
    assert max(lengths) <= MAX_CAPTION_WORDS
    longest = Scene(
        objects=(
            SceneObject("circle", "red", "large", "striped", 0.2, 0.5),
            SceneObject("square", "blue", "large", "dotted", 0.8, 0.5),
        ),
        background="gradient",
        bg_seed=1,
        kind="position",
        relation="right_of",
        mention_color=True,
        mention_size=True,
        mention_texture=True,
        mention_background=True,
    )
    assert len(longest.caption.split()) == MAX_CAPTION_WORDS
    assert longest.caption == (
        "a large red striped circle to the right of a large blue dotted square on a gradient background"
    )
    assert len(VOCABULARY) == len(set(VOCABULARY))


def test_plain_english_articles():
    s = Scene((SceneObject("circle", "orange", "small", "plain", 0.5, 0.5),), "flat", 0, "colors", mention_color=True)
    assert s.caption == "an orange circle"


def test_parse_caption_round_trips(pools):
    for s in (s for pool in pools.values() for s in pool):
        spec = parse_caption(s.caption)
        assert spec.category == s.kind, (SEED, s.caption)
        assert spec.relation == s.relation and spec.location == s.location
        assert spec.background == (s.background if s.mention_background else None)
        if s.kind == "counting":
            (o,) = spec.objects
            first = s.objects[0]
            assert (o.shape, o.count) == (first.shape, len(s.objects))
            assert o.color == (first.color if s.mention_color else None)
            assert o.size == (first.size if s.mention_size else None)
            assert o.texture == (first.texture if s.mention_texture else None)
        else:
            assert len(spec.objects) == len(s.objects)
            for o, t in zip(spec.objects, s.objects):
                assert (o.shape, o.count) == (t.shape, 1)
                assert o.color == (t.color if s.mention_color else None)
                assert o.size == (t.size if s.mention_size else None)
                assert o.texture == (t.texture if s.mention_texture else None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "a dog",
        "three",
        "three circle",
        "a circle and",
        "a circle and a circle",
        "a red circle and a square",
        "a circle to the left of",
        "a circle on a blue background",
        "a circle on the moon",
        "two red stars please",
        "5 circles",
        "a circle near a square",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="not a tiny-scene caption"):
        parse_caption(text)


def test_parse_caption_is_lenient_about_case_and_full_stop():
    spec = parse_caption("A Red circle to the left of a blue square.")
    assert spec.category == "position" and spec.relation == "left_of"
    assert [(o.shape, o.color) for o in spec.objects] == [("circle", "red"), ("square", "blue")]


def test_render_shapes_ranges_and_conventions(pools):
    scenes = pools["all"][:20]
    x = render(scenes)
    assert x.shape == (20, 3, 128, 128) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    u = render_uint8(scenes)
    assert u.shape == (20, 128, 128, 3) and u.dtype == torch.uint8
    assert torch.equal(u, ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    assert render(scenes[:3], size=64).shape == (3, 3, 64, 64)


def test_render_is_deterministic_and_batch_independent(pools):
    scenes = pools["all"][:70]  # more than one CPU chunk
    a = render_uint8(scenes)
    assert torch.equal(a, render_uint8(scenes))
    assert torch.equal(a[5], render_uint8([scenes[5]])[0])
    assert torch.equal(a[66], render_uint8(scenes[60:])[6])


def test_plain_object_has_its_colour_and_backgrounds_are_desaturated(pools):
    scenes = [s for s in pools["all"] if s.kind == "colors"][:40]
    scenes = [dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], texture="plain"),)) for s in scenes]
    img = render_uint8(scenes)
    for s, im in zip(scenes, img):
        o = s.objects[0]
        px = im[int(o.cy * 128), int(o.cx * 128)]
        assert torch.equal(px, torch.tensor(COLORS[o.color], dtype=torch.uint8)), (SEED, s.caption)
    empty = [dataclasses.replace(s, objects=()) for s in pools["all"][:200]]
    bg = render_uint8(empty).float() / 255
    chroma = bg.max(-1).values - bg.min(-1).values
    assert chroma.max() < 0.13
    assert {s.background for s in empty} == set(S.BACKGROUNDS)


def test_textures_use_a_darker_shade_of_the_same_colour():
    obj = SceneObject("square", "blue", "large", "striped", 0.5, 0.5)
    im = render_uint8(Scene((obj,), "flat", 3, "single_object"))[0, 50:78, 50:78].reshape(-1, 3).float()
    fill = torch.tensor(COLORS["blue"]).float()
    ratio = im.sum(-1) / fill.sum()
    assert ratio.max() > 0.99 and ratio.min() < 0.6  # fill and dark stripes both present
    assert torch.allclose(im / ratio[:, None], fill.expand_as(im), atol=3)  # same hue and saturation


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_render_on_gpu_matches_cpu(pools):
    scenes = pools["all"][:64]
    gpu = render(scenes, device="cuda")
    assert gpu.is_cuda
    assert (gpu.cpu() - render(scenes)).abs().max() < 1e-4


def test_kind_weights_shift_the_mix_and_uniform_is_unchanged():
    uniform = sample_scenes(60, SEED, "train")
    assert sample_scenes(60, SEED, "train", kind_weights={}) == uniform
    assert sample_scenes(60, SEED, "train", kind_weights={k: 2.0 for k in KINDS}) == uniform
    weighted = sample_scenes(1200, SEED, "train", kind_weights={"position": 4.0, "colors": 0.0})
    counts = collections.Counter(s.kind for s in weighted)
    assert counts["colors"] == 0
    share = counts["position"] / len(weighted)  # 4 / (4 + 4 others) = 0.5
    assert 0.45 < share < 0.55, counts
    with pytest.raises(ValueError, match="unknown kinds"):
        sample_scenes(3, 0, "train", kind_weights={"colour": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        sample_scenes(3, 0, "train", kind_weights={"position": -1.0})


def test_relation_contrast_is_a_true_caption_of_its_mirror_image():
    from toprovar.tiny.evaluate import geneval_lite

    scenes = [s for s in sample_scenes(400, SEED, "train") if s.kind == "position"][:24]
    variants = [S.relation_contrast(s, swap_order=i % 2 == 0) for i, s in enumerate(scenes)]
    for i, (s, v) in enumerate(zip(scenes, variants)):
        assert v.caption != s.caption
        if i % 2 == 0:  # swapped noun phrases: the same words in another order
            assert v.relation == s.relation and sorted(v.caption.split()) == sorted(s.caption.split())
        else:  # swapped relation word: the same subject
            assert v.relation != s.relation and v.objects[0].shape == s.objects[0].shape
    # Each variant's caption holds for its own picture, and the original caption fails on it.
    images = render_uint8(variants)
    assert geneval_lite(images, [v.caption for v in variants]) == [1.0] * len(variants)
    assert sum(geneval_lite(images, [s.caption for s in scenes])) == 0
    with pytest.raises(ValueError, match="position"):
        S.relation_contrast(next(s for s in sample_scenes(20, SEED) if s.kind != "position"), True)
