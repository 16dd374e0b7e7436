"""Procedural captioned scenes for the `tiny` backbone: sampling, captions, caption parser, rendering.

A scene is a few flat shapes (circle, square, triangle, star) in saturated colours on a desaturated
background, captioned from a small closed grammar whose six kinds are GenEval's six categories.
Saturated objects on a desaturated background let `evaluate.py` find objects by colour alone, and
the closed vocabulary lets a word-level text encoder cover every caption.

Everything is deterministic and free of global state: `sample_scenes(count, seed, split)` draws from
its own `random.Random`, and the pixels of a scene depend only on the scene (the noise background is
drawn from `scene.bg_seed`). Rendering is one batched torch program (analytic signed distances,
anti-aliased edges) that runs on any device.
"""

from __future__ import annotations

import colorsys
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.nn.functional as F

__all__ = [
    "SHAPES",
    "PLURALS",
    "COLORS",
    "COLOR_NAMES",
    "SIZES",
    "TEXTURES",
    "BACKGROUNDS",
    "KINDS",
    "HELDOUT_KINDS",
    "RELATIONS",
    "LOCATIONS",
    "COUNTS",
    "HELDOUT_PAIRS",
    "SPLITS",
    "VOCABULARY",
    "MAX_CAPTION_WORDS",
    "SceneObject",
    "Scene",
    "ObjectSpec",
    "PromptSpec",
    "sample_scenes",
    "relation_contrast",
    "scene_caption",
    "parse_caption",
    "render",
    "render_uint8",
]

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

# Saturated palette separated by hue (HSV s=0.85, v=0.95); the evaluator classifies by hue.
COLOR_HUES: dict[str, float] = {
    "red": 0.0,
    "orange": 28.0,
    "yellow": 55.0,
    "green": 120.0,
    "cyan": 185.0,
    "blue": 225.0,
    "purple": 275.0,
    "pink": 325.0,
}
OBJECT_SATURATION, OBJECT_VALUE = 0.85, 0.95
COLORS: dict[str, tuple[int, int, int]] = {
    name: tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h / 360, OBJECT_SATURATION, OBJECT_VALUE))
    for name, h in COLOR_HUES.items()
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHADE = 0.55  # texture colour = SHADE x fill colour: same hue, darker

# Radius of an object as a fraction of the image side; each shape's extent (circumradius) is a
# multiple of it so the four shapes look about equally big.
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.12, "large": 0.16}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
SHAPE_EXTENT: dict[str, float] = {"circle": 1.0, "square": 1.2, "triangle": 1.35, "star": 1.35}
SQUARE_HALF = 0.85  # square half-side / radius (corner at 1.2 radius)
STAR_INNER = 0.45  # star inner radius / outer radius
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
STRIPE_PERIOD, DOT_PERIOD = 6.0, 7.0  # pixels at 128^2, scaled with the image size
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise")
BACKGROUND_WORDS: dict[str, str] = {"flat": "flat", "gradient": "gradient", "noise": "noisy"}

KINDS: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colors",
    "position",
    "attribute_binding",
)
HELDOUT_KINDS: tuple[str, ...] = ("colors", "attribute_binding", "counting", "position")
RELATIONS: dict[str, tuple[str, ...]] = {
    "left_of": ("to", "the", "left", "of"),
    "right_of": ("to", "the", "right", "of"),
    "above": ("above",),
    "below": ("below",),
}
LOCATIONS: dict[str, tuple[str, ...]] = {
    "left": ("on", "the", "left"),
    "right": ("on", "the", "right"),
    "top": ("at", "the", "top"),
    "bottom": ("at", "the", "bottom"),
    "center": ("in", "the", "center"),
}
COUNTS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

# (colour, shape) pairs never seen in training: one per shape, so every shape and every colour
# still appears in training, only the combination is new.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "star"),
    ("green", "triangle"),
    ("orange", "circle"),
    ("cyan", "square"),
)
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "an", "and", "on", "background"}
        | set(SHAPES)
        | set(PLURALS.values())
        | set(COLORS)
        | set(SIZES)
        | set(TEXTURES)
        | set(BACKGROUND_WORDS.values())
        | set(COUNTS.values())
        | {w for ws in RELATIONS.values() for w in ws}
        | {w for ws in LOCATIONS.values() for w in ws}
    )
)
# Longest caption: "a large red striped circle to the left of a large blue striped square on a
# gradient background" = 5 + 4 + 5 + 4 words.
MAX_CAPTION_WORDS = 18

# Placement: objects stay GAP (fraction of the side) apart and MARGIN inside the border; the two
# objects of a `position` scene differ by at least RELATION_MARGIN along the relation's axis.
GAP, MARGIN, RELATION_MARGIN = 0.03, 0.02, 0.2

P_SIZE, P_TEXTURE, P_BACKGROUND, P_LOCATION, P_COLOR = 0.4, 0.4, 0.3, 0.4, 0.5

_HELDOUT_SET = frozenset(HELDOUT_PAIRS)
_SHAPE_PAIRS = tuple((a, b) for a in SHAPES for b in SHAPES if a != b)
_RELATION_NAMES, _LOCATION_NAMES = tuple(RELATIONS), tuple(LOCATIONS)
_SMALLER = {"large": "medium", "medium": "small", "small": "small"}
_TRAIN_COLORS = {s: tuple(c for c in COLOR_NAMES if (c, s) not in _HELDOUT_SET) for s in SHAPES}


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape; (cx, cy) is its centroid in [0, 1] image coordinates, y pointing down."""

    shape: str
    color: str
    size: str
    texture: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    """Objects, background and which optional attributes the caption mentions.

    `kind` is the GenEval category. For `position`, the caption reads
    "objects[0] <relation> objects[1]". `location` is the mentioned place of a single object.
    """

    objects: tuple[SceneObject, ...]
    background: str
    bg_seed: int
    kind: str
    relation: str | None = None
    mention_color: bool = False
    mention_size: bool = False
    mention_texture: bool = False
    location: str | None = None
    mention_background: bool = False

    @cached_property
    def caption(self) -> str:
        return scene_caption(self)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _mentioned_attributes(obj: SceneObject, scene: Scene) -> list[str]:
    """The words of obj's size, color and texture that the scene's caption mentions, in that order."""
    mentioned = ((scene.mention_size, obj.size), (scene.mention_color, obj.color), (scene.mention_texture, obj.texture))
    return [word for mention, word in mentioned if mention]


def _noun_phrase(obj: SceneObject, scene: Scene) -> list[str]:
    words = [*_mentioned_attributes(obj, scene), obj.shape]
    return [_article(words[0])] + words


def scene_caption(scene: Scene) -> str:
    """The caption of a scene (also `scene.caption`)."""
    objs = scene.objects
    if scene.kind == "counting":
        first = objs[0]
        words = [COUNTS[len(objs)], *_mentioned_attributes(first, scene), PLURALS[first.shape]]
    elif scene.kind in ("single_object", "colors"):
        words = _noun_phrase(objs[0], scene)
        if scene.location is not None:
            words += LOCATIONS[scene.location]
    elif scene.kind == "position":
        words = _noun_phrase(objs[0], scene) + list(RELATIONS[scene.relation]) + _noun_phrase(objs[1], scene)
    else:  # two_objects, attribute_binding
        words = _noun_phrase(objs[0], scene) + ["and"] + _noun_phrase(objs[1], scene)
    if scene.mention_background:
        words += ["on", "a", BACKGROUND_WORDS[scene.background], "background"]
    return " ".join(words)


def _extent(shape: str, size: str) -> float:
    return SIZES[size] * SHAPE_EXTENT[shape]


def _uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _place_single(rng: random.Random, ext: float, location: str | None) -> tuple[float, float]:
    lo, hi = ext + MARGIN, 1.0 - ext - MARGIN
    if location is None:
        return _uniform(rng, lo, hi), _uniform(rng, lo, hi)
    near, mid = (lo, max(lo, 0.3)), (0.38, 0.62)
    far = (min(hi, 0.7), hi)
    x, y = {
        "left": (near, mid),
        "right": (far, mid),
        "top": (mid, near),
        "bottom": (mid, far),
        "center": ((0.43, 0.57), (0.43, 0.57)),
    }[location]
    return _uniform(rng, *x), _uniform(rng, *y)


def _place_many(rng: random.Random, exts: list[float]) -> list[tuple[float, float]] | None:
    """Rejection-sample non-overlapping centres; None when this set of sizes did not fit."""
    rnd = rng.random
    for _ in range(50):
        pts: list[tuple[float, float, float]] = []
        for e in exts:
            lo, span = e + MARGIN, 1.0 - 2 * (e + MARGIN)
            for _ in range(30):
                x, y = lo + span * rnd(), lo + span * rnd()
                for px, py, pe in pts:
                    if (x - px) ** 2 + (y - py) ** 2 < (e + pe + GAP) ** 2:
                        break
                else:
                    pts.append((x, y, e))
                    break
            else:
                break
        if len(pts) == len(exts):
            return [(x, y) for x, y, _ in pts]
    return None


def _place_pair(rng: random.Random, ea: float, eb: float, relation: str) -> list[tuple[float, float]] | None:
    """Centres of a <relation> b: apart by RELATION_MARGIN or more along the relation's axis, and
    more along it than across it, so the relation is the obvious reading of the picture."""
    rnd = rng.random
    lo = max(ea, eb) + MARGIN
    span = 1.0 - 2 * lo
    for _ in range(200):
        u1, u2, v1, v2 = lo + span * rnd(), lo + span * rnd(), lo + span * rnd(), lo + span * rnd()
        main = abs(u1 - u2)
        if main < RELATION_MARGIN or abs(v1 - v2) > main or main * main + (v1 - v2) ** 2 < (ea + eb + GAP) ** 2:
            continue
        first, second = min(u1, u2), max(u1, u2)  # a before b along the axis
        if relation in ("right_of", "below"):
            first, second = second, first
        if relation in ("left_of", "right_of"):
            return [(first, v1), (second, v2)]
        return [(v1, first), (v2, second)]
    return None


def _draw_kind(rng: random.Random, kinds: tuple[str, ...], cumulative: tuple[float, ...] | None) -> str:
    u = rng.random()
    if cumulative is None:  # uniform: the original draw, so unweighted sequences never change
        return kinds[int(u * len(kinds))]
    u *= cumulative[-1]
    return next((k for k, c in zip(kinds, cumulative) if u < c), kinds[-1])


def _sample_scene(rng: random.Random, split: str, cumulative: tuple[float, ...] | None = None) -> Scene:
    heldout, train = split == "heldout", split == "train"
    kinds = HELDOUT_KINDS if heldout else KINDS
    kind = _draw_kind(rng, kinds, cumulative)
    rnd = rng.random

    def choice(seq):  # rng.choice, at a third of the cost
        return seq[int(rnd() * len(seq))]

    def color_for(shape: str, exclude: str | None = None) -> str:
        while True:
            c = choice(_TRAIN_COLORS[shape] if train else COLOR_NAMES)
            if c != exclude:
                return c

    mention_color = False
    relation = location = None
    if kind in ("single_object", "colors"):
        mention_color = kind == "colors"
        if heldout:
            color, shape = choice(HELDOUT_PAIRS)
        else:
            shape = choice(SHAPES)
            color = color_for(shape)
        shapes, colors = [shape], [color]
    elif kind == "counting":
        n = 2 + int(rnd() * 3)
        mention_color = heldout or rnd() < P_COLOR
        if heldout:
            color, shape = choice(HELDOUT_PAIRS)
        else:
            shape = choice(SHAPES)
            color = color_for(shape)
        shapes = [shape] * n
        colors = [color] * n if mention_color else [color_for(shape) for _ in range(n)]
    else:  # two objects of different shapes
        shapes = list(choice(_SHAPE_PAIRS))
        if kind == "position":
            relation = choice(_RELATION_NAMES)
            mention_color = heldout or rnd() < P_COLOR
        else:
            mention_color = kind == "attribute_binding"
        distinct = kind == "attribute_binding"
        if heldout:
            i = int(rnd() * 2)
            color, shapes[i] = choice(HELDOUT_PAIRS)
            other = choice([s for s in SHAPES if s != shapes[i]])
            shapes[1 - i] = other
            colors = [color, color]
            colors[1 - i] = color_for(other, color if distinct else None)
        else:
            colors = [color_for(shapes[0])]
            colors.append(color_for(shapes[1], colors[0] if distinct else None))

    mention_size = rnd() < P_SIZE
    mention_texture = rnd() < P_TEXTURE
    n = len(shapes)
    if kind == "counting":
        size_names = SIZE_NAMES[:2]
        if mention_size:
            sizes = [choice(size_names)] * n
        else:
            sizes = [choice(size_names) for _ in range(n)]
        textures = [choice(TEXTURES)] * n if mention_texture else [choice(TEXTURES) for _ in range(n)]
    else:
        sizes = [choice(SIZE_NAMES) for _ in range(n)]
        textures = [choice(TEXTURES) for _ in range(n)]

    if n == 1:
        location = choice(_LOCATION_NAMES) if rnd() < P_LOCATION else None
        pts = [_place_single(rng, _extent(shapes[0], sizes[0]), location)]
    else:
        while (
            pts := _place_many(rng, [_extent(s, z) for s, z in zip(shapes, sizes)])
            if relation is None
            else _place_pair(rng, _extent(shapes[0], sizes[0]), _extent(shapes[1], sizes[1]), relation)
        ) is None:
            sizes = [_SMALLER[z] for z in sizes]  # rare: shrink and retry
    objects = tuple(SceneObject(s, c, z, t, x, y) for s, c, z, t, (x, y) in zip(shapes, colors, sizes, textures, pts))
    return Scene(
        objects=objects,
        background=choice(BACKGROUNDS),
        bg_seed=rng.getrandbits(31),
        kind=kind,
        relation=relation,
        mention_color=mention_color,
        mention_size=mention_size,
        mention_texture=mention_texture,
        location=location,
        mention_background=rnd() < P_BACKGROUND,
    )


def sample_scenes(
    count: int, seed: int, split: str = "all", kind_weights: Mapping[str, float] | None = None
) -> list[Scene]:
    """`count` scenes; the same (seed, split, kind_weights) always gives the same sequence.

    split "train": no object anywhere is a held-out (colour, shape) pair; "heldout": every scene
    has a held-out pair and its caption names that colour; "all": unrestricted.
    kind_weights: relative frequency per kind (missing kinds weigh 1); None or {}: kinds uniform.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kinds = HELDOUT_KINDS if split == "heldout" else KINDS
    cumulative = None
    if kind_weights:
        unknown = sorted(set(kind_weights) - set(KINDS))
        if unknown:
            raise ValueError(f"kind_weights names unknown kinds {unknown}; kinds are {KINDS}")
        weights = [float(kind_weights.get(k, 1.0)) for k in kinds]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"kind_weights must be >= 0 with a positive sum, got {dict(kind_weights)}")
        if len(set(weights)) > 1:  # equal weights keep the uniform draw exactly
            cumulative = tuple(itertools.accumulate(weights))
    rng = random.Random(f"toprovar-tiny-scenes:{split}:{int(seed)}")
    return [_sample_scene(rng, split, cumulative) for _ in range(count)]


_INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def relation_contrast(scene: Scene, swap_order: bool) -> Scene:
    """The mirror image of a `position` scene along its relation's axis, captioned so that it
    differs from the original's caption in one thing only: the order of the two noun phrases
    (`swap_order`: "B left of A") or the relation word ("A right of B"). Trained side by side
    with the original, the pair says that word order and the relation word decide the layout."""
    if scene.kind != "position" or scene.relation is None:
        raise ValueError(f"relation_contrast needs a position scene, got kind {scene.kind!r}")
    horizontal = scene.relation in ("left_of", "right_of")
    objects = tuple(replace(o, cx=1.0 - o.cx) if horizontal else replace(o, cy=1.0 - o.cy) for o in scene.objects)
    if swap_order:
        return replace(scene, objects=objects[::-1])
    return replace(scene, objects=objects, relation=_INVERSE_RELATION[scene.relation])


# ---------------------------------------------------------------------------------------------
# Caption parser
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption asks for about one shape (colour None: any colour)."""

    shape: str
    color: str | None = None
    count: int = 1
    size: str | None = None
    texture: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A parsed caption: its GenEval category, objects (position: subject first) and relation."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    location: str | None = None
    background: str | None = None


_SINGULAR = {p: s for s, p in PLURALS.items()}
_BACKGROUND_OF_WORD = {w: b for b, w in BACKGROUND_WORDS.items()}
_NUMBER = {w: n for n, w in COUNTS.items()}


class _Words:
    def __init__(self, text: str):
        self.text, self.words, self.i = text, text.lower().strip().rstrip(".").split(), 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.words[j] if j < len(self.words) else None

    def take(self, options) -> str | None:
        w = self.peek()
        if w is not None and w in options:
            self.i += 1
            return w
        return None

    def match(self, seq: Sequence[str]) -> bool:
        if tuple(self.words[self.i : self.i + len(seq)]) == tuple(seq):
            self.i += len(seq)
            return True
        return False

    def fail(self, expected: str) -> ValueError:
        got = self.peek()
        where = f"word {self.i + 1} ({got!r})" if got is not None else "the end"
        return ValueError(f"not a tiny-scene caption: {self.text!r}: expected {expected} at {where}")


def _attributes(w: _Words) -> tuple[str | None, str | None, str | None]:
    return w.take(SIZES), w.take(COLORS), w.take(TEXTURES)


def _parse_noun_phrase(w: _Words) -> ObjectSpec:
    if w.take(("a", "an")) is None:
        raise w.fail("'a' or 'an'")
    size, color, texture = _attributes(w)
    shape = w.take(SHAPES)
    if shape is None:
        raise w.fail(f"a shape {SHAPES}")
    return ObjectSpec(shape, color, 1, size, texture)


def parse_caption(text: str) -> PromptSpec:
    """Turn a caption of the scene grammar back into a `PromptSpec`; ValueError for other text."""
    w = _Words(text)
    relation = location = None
    if (number := w.take(_NUMBER)) is not None:
        size, color, texture = _attributes(w)
        plural = w.take(_SINGULAR)
        if plural is None:
            raise w.fail(f"a plural shape {tuple(_SINGULAR)}")
        objects = (ObjectSpec(_SINGULAR[plural], color, _NUMBER[number], size, texture),)
        category = "counting"
    else:
        first = _parse_noun_phrase(w)
        relation = next((r for r, seq in RELATIONS.items() if w.match(seq)), None)
        if relation is not None or w.take(("and",)):
            second = _parse_noun_phrase(w)
            objects = (first, second)
            if first.shape == second.shape:
                raise ValueError(f"not a tiny-scene caption: {text!r}: the two shapes must differ")
            if (first.color is None) != (second.color is None):
                raise ValueError(f"not a tiny-scene caption: {text!r}: name the colour of both objects or neither")
            category = "position" if relation else ("attribute_binding" if first.color else "two_objects")
        else:
            location = next((loc for loc, seq in LOCATIONS.items() if w.match(seq)), None)
            objects = (first,)
            category = "colors" if first.color else "single_object"
    background = None
    if w.match(("on", "a")):
        word = w.take(_BACKGROUND_OF_WORD)
        if word is None or not w.take(("background",)):
            raise w.fail(f"a background {tuple(_BACKGROUND_OF_WORD)} + 'background'")
        background = _BACKGROUND_OF_WORD[word]
    if w.peek() is not None:
        raise w.fail("the end of the caption")
    return PromptSpec(category, objects, relation, location, background)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_SHAPE_ID = {s: i for i, s in enumerate(SHAPES)}
_TEXTURE_ID = {t: i for i, t in enumerate(TEXTURES)}
_BG_ID = {b: i for i, b in enumerate(BACKGROUNDS)}
_NOISE_GRID = 5
_SQRT3 = math.sqrt(3.0)
_COLORS_01 = {name: tuple(c / 255 for c in rgb) for name, rgb in COLORS.items()}
_CPU_CHUNK = 64  # scenes per step on the CPU: keeps the working set in cache


def _hash_uniform(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(N, count) uniforms in [0, 1) from int64 seeds by an integer hash: exact integer arithmetic
    (no product exceeds 2**62), so every device draws the same numbers."""
    mask = 0x7FFFFFFF
    k = torch.arange(1, count + 1, device=seeds.device, dtype=torch.int64)
    x = (seeds.view(-1, 1) & mask) ^ ((k * 0x2545F491) & mask)
    for _ in range(3):
        x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & mask
        x = ((x ^ (x >> 13)) * 0x297A2D39) & mask
    return (x >> 7).to(torch.float32) / float(1 << 24)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = (torch.tensor([5.0, 3.0, 1.0], device=h.device) + 6 * h.unsqueeze(-1)) % 6
    return v.unsqueeze(-1) * (1 - s.unsqueeze(-1) * torch.minimum(k, 4 - k).clamp(0, 1))


def _backgrounds(scenes: Sequence[Scene], size: int, device: torch.device) -> torch.Tensor:
    """(N, size, size, 3) in [0, 1]: tone c1 -> c2 along t, t = 0 (flat), a linear ramp at a random
    angle (gradient) or a bicubically upsampled 5x5 grid (noise: smooth, so a VAE can rebuild it).
    Tones are desaturated (HSV saturation <= 0.12) and every number comes from the scene's bg_seed."""
    seeds = torch.tensor([s.bg_seed for s in scenes], dtype=torch.int64, device=device)
    u = _hash_uniform(seeds, 7 + _NOISE_GRID**2)
    v1 = 0.35 + 0.57 * u[:, 0]
    v2 = v1 + torch.where(v1 < 0.6, 1.0, -1.0) * (0.2 + 0.2 * u[:, 1])
    c1 = _hsv_to_rgb(u[:, 2], 0.12 * u[:, 3], v1)
    c2 = _hsv_to_rgb(u[:, 4], 0.12 * u[:, 5], v2)
    angle = 2 * math.pi * u[:, 6]
    kind = [_BG_ID[s.background] for s in scenes]
    t = torch.zeros(len(scenes), size, size, 1, device=device)
    p = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size - 0.5
    if grad := [i for i, k in enumerate(kind) if k == 1]:
        a = angle[grad].view(-1, 1, 1)
        t[grad, :, :, 0] = 0.5 + (p.view(1, 1, -1) * a.cos() + p.view(1, -1, 1) * a.sin()) / 1.2
    if noise := [i for i, k in enumerate(kind) if k == 2]:
        grid = u[noise, 7:].view(-1, 1, _NOISE_GRID, _NOISE_GRID)
        t[noise, :, :, 0] = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[:, 0]
    return torch.lerp(c1.view(-1, 1, 1, 3), c2.view(-1, 1, 1, 3), t.clamp_(0, 1))


def _sdf(name: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of a shape of radius r centred at x = y = 0;
    x (M, 1, P), y (M, P, 1), r (M, 1, 1) -> (M, P, P)."""
    if name == "circle":
        return torch.sqrt(x * x + y * y) - r
    if name == "square":
        qx, qy = x.abs() - SQUARE_HALF * r, y.abs() - SQUARE_HALF * r
        return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    if name == "triangle":  # equilateral, apex up, centroid at the origin: max of 3 edge planes
        half_r = 0.5 * SHAPE_EXTENT["triangle"] * r
        return torch.maximum(y - half_r, 0.5 * _SQRT3 * x.abs() - 0.5 * y - half_r)
    # five-pointed star, a point up: Inigo Quilez's exact sdStar5 with y flipped
    R = SHAPE_EXTENT["star"] * r
    k1x, k1y = 0.809016994375, -0.587785252292
    x, y = x.abs(), -y
    for kx in (k1x, -k1x):  # fold the plane into one arm
        dot = (kx * x + k1y * y).clamp(min=0)
        x, y = x - 2 * dot * kx, y - 2 * dot * k1y
    x, y = x.abs(), y - R
    bax, bay = STAR_INNER * -k1y, STAR_INNER * k1x - 1.0
    h = torch.minimum(((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(min=0), R)
    dx, dy = x - bax * h, y - bay * h
    return torch.sqrt(dx * dx + dy * dy) * torch.sign(y * bax - x * bay)


def _darkening(texture: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor, unit: float) -> torch.Tensor:
    """Weight of the dark shade per pixel (0 for plain): 45-degree stripes or a grid of dots."""
    period = STRIPE_PERIOD * unit
    s = ((ax + ay) / (math.sqrt(2) * period)).frac()
    stripes = (period * (0.25 - (s - 0.5).abs()) + 0.5).clamp(0, 1)
    period = DOT_PERIOD * unit
    dx, dy = (ax / period).frac() - 0.5, (ay / period).frac() - 0.5
    dots = (period * (0.3 - torch.sqrt(dx * dx + dy * dy)) + 0.5).clamp(0, 1)
    texture = texture.view(-1, 1, 1)
    return torch.where(texture == 1, stripes, torch.where(texture == 2, dots, 0.0))


def _render_nhwc(scenes: Sequence[Scene], size: int, device: torch.device) -> torch.Tensor:
    """(N, size, size, 3) in [0, 1].

    Objects are drawn in groups of one shape, each in a square patch around it (analytic SDF,
    coverage clamp(0.5 - sdf, 0, 1)), and the patches are added onto the canvas. Objects never
    overlap, so each pixel receives at most one non-zero coverage: the sum is exact and does not
    depend on the order. On the CPU groups are split by size too (patches fit each size: fewer
    pixels); on a GPU fewer, larger groups mean fewer kernel launches.
    """
    n = len(scenes)
    bg = _backgrounds(scenes, size, device)
    per_size = device.type == "cpu"
    rows = sorted(
        (
            _SHAPE_ID[o.shape],
            SIZES[o.size] if per_size else 0.0,
            i,
            _TEXTURE_ID[o.texture],
            o.cx * size,
            o.cy * size,
            SIZES[o.size] * size,
            *_COLORS_01[o.color],
        )
        for i, s in enumerate(scenes)
        for o in s.objects
    )
    if not rows:
        return bg
    data = torch.tensor(rows, dtype=torch.float64, device=device)  # one host -> device copy
    rgb_acc = torch.zeros(n * size * size, 3, device=device)  # premultiplied colour
    cov_acc = torch.zeros(n * size * size, device=device)  # coverage
    unit = size / 128
    start = 0
    for _, group in itertools.groupby(rows, key=lambda r: r[:2]):
        group = list(group)
        d, start = data[start : start + len(group)], start + len(group)
        shape = SHAPES[group[0][0]]
        patch = int(math.ceil(2 * max(r[6] for r in group) * SHAPE_EXTENT[shape])) + 4
        offs = torch.arange(patch, device=device) - patch // 2
        scene_id, texture = d[:, 2].long(), d[:, 3].long()
        cx, cy, radius = d[:, 4:5].float(), d[:, 5:6].float(), d[:, 6].float().view(-1, 1, 1)
        gx, gy = cx.floor().long() + offs, cy.floor().long() + offs  # (M, P) image pixel indices
        x = (gx + 0.5 - cx).view(-1, 1, patch)  # broadcast to (M, P, P)
        y = (gy + 0.5 - cy).view(-1, patch, 1)
        inside = ((gx >= 0) & (gx < size)).view(-1, 1, patch) & ((gy >= 0) & (gy < size)).view(-1, patch, 1)
        alpha = (0.5 - _sdf(shape, x, y, radius)).clamp_(0, 1) * inside
        shade = 1 - (1 - SHADE) * _darkening(texture, x + cx.view(-1, 1, 1), y + cy.view(-1, 1, 1), unit)
        flat = (
            (scene_id.view(-1, 1, 1) * size + gy.clamp(0, size - 1).view(-1, patch, 1)) * size
            + gx.clamp(0, size - 1).view(-1, 1, patch)
        ).reshape(-1)
        rgb = d[:, 7:10].float().view(-1, 1, 1, 3)
        rgb_acc.index_add_(0, flat, ((alpha * shade).unsqueeze(-1) * rgb).reshape(-1, 3))
        cov_acc.index_add_(0, flat, alpha.reshape(-1))
    cov = cov_acc.view(n, size, size, 1)
    return torch.addcmul(rgb_acc.view(n, size, size, 3), bg, 1 - cov)


def _render_chunked(scenes: Scene | Sequence[Scene], size: int, device) -> torch.Tensor:
    if isinstance(scenes, Scene):
        scenes = [scenes]
    device = torch.device(device)
    chunk = _CPU_CHUNK if device.type == "cpu" else max(len(scenes), 1)
    if len(scenes) <= chunk:
        return _render_nhwc(scenes, size, device)
    return torch.cat([_render_nhwc(scenes[i : i + chunk], size, device) for i in range(0, len(scenes), chunk)])


def render(scenes: Scene | Sequence[Scene], size: int = 128, device="cpu") -> torch.Tensor:
    """Render scenes to a float32 (N, 3, size, size) tensor in [-1, 1] on `device`."""
    img = _render_chunked(scenes, size, device)
    return (img * 2 - 1).clamp_(-1, 1).permute(0, 3, 1, 2).contiguous()


def render_uint8(scenes: Scene | Sequence[Scene], size: int = 128, device="cpu") -> torch.Tensor:
    """Render to the pipeline's image convention: uint8 (N, size, size, 3) RGB on the CPU."""
    img = _render_chunked(scenes, size, device)
    return (img * 255).round_().clamp_(0, 255).to(torch.uint8).cpu()
