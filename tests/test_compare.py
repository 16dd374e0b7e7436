"""`python -m toprovar compare` end to end on test-small, its method resolution, one-line errors,
and the pruned-token map (Fig. 9) against the trace."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.commands import run_module
from toprovar.__main__ import main
from toprovar.compare import (
    CFG_SKIP,
    DEFAULT_METHODS,
    UNCALIBRATED_DEFAULTS,
    default_cfg_skip,
    default_policies,
    resolve_methods,
)
from toprovar.pipeline import generate
from toprovar.plots import plot_pruned_tokens, pruned_token_maps
from toprovar.pruning.recording import record_kept_tokens


def _write_policy(path: Path) -> Path:
    # Layer 1 scores as a Detail layer (ϱ = 1.2 -> R ≈ 0.82 ≥ 0.5): the scale+layer variant skips it.
    path.write_text(
        "method: toprovar\nscale: {tau: 0.4, crossing: above, min_scale: 3}\n"
        "layer: {mode: static, ratios: [5.0, 1.2]}\n"
    )
    return path


def test_compare_command_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    policy = _write_policy(tmp_path / "detail.yaml")
    methods = [
        "none",
        "fastvar",
        "fixed_exit",
        "toprovar-scale",
        "toprovar-scale_token",
        f"'{policy}@scale_layer'",
        "toprovar-full",
    ]
    proc = run_module(
        "toprovar",
        "compare",
        "backbone=test-small",
        f"methods=[{','.join(methods)}]",
        'prompts=["a red cube", "two blue balls"]',
        "seeds=[3, 8]",
        "batch_size=2",
        "warmup=0",
        f"out_dir={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr
    with open(out / "compare.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    labels = [
        "none",
        "fastvar",
        "fixed_exit",
        "toprovar-scale",
        "toprovar-scale_token",
        "detail@scale_layer",
        "toprovar-full",
    ]
    assert list(rows) == labels
    base = rows["none"]
    assert float(base["speedup"]) == 1.0 and float(base["flop_ratio"]) == 1.0
    assert float(base["ssim"]) == pytest.approx(1.0, abs=1e-6) and base["psnr_db"] == "inf"
    for label in labels[1:]:
        assert float(rows[label]["flop_ratio"]) < 1.0, label
        assert float(rows[label]["flop_speedup"]) == pytest.approx(1 / float(rows[label]["flop_ratio"]))
        assert -1.0 <= float(rows[label]["ssim"]) <= 1.0 and float(rows[label]["latency_ms"]) > 0
    assert rows["fastvar"]["policy"] == UNCALIBRATED_DEFAULTS
    assert "file" in rows["detail@scale_layer"]["policy"]
    md = (out / "compare.md").read_text()
    assert all(f"| {label} |" in md for label in labels) and "defaults, not calibrated" in md
    assert all(f"| {label} |" in proc.stdout for label in labels)  # the table is printed too
    grid = Image.open(out / "compare_grid.png")
    assert grid.size[0] > grid.size[1]  # 7 columns (methods) x 2 rows (prompts)
    figures = sorted(p.name for p in out.glob("pruned_tokens_*.png"))
    assert figures == sorted(f"pruned_tokens_{label.replace('@', '_')}.png" for label in labels[1:])
    assert len((out / "compare_per_image.csv").read_text().splitlines()) == 1 + 2 * len(labels)


@pytest.mark.parametrize(
    "override, match",
    [
        ("foo=1", "bad override"),
        ("methods=[none,no-such-policy]", "unknown policy 'no-such-policy'"),
        ("methods=[fastvar-infinity-2b]", "made for backbone 'infinity-2b', not 'tiny'"),
        ("methods=[fastvar@full]", "only toprovar policies"),
        ("methods=[fastvar,fastvar]", "twice"),
    ],
)
def test_compare_errors_are_one_line_exit_2(
    override: str, match: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compare", override, f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("toprovar compare: error:") and match in err
    assert not (tmp_path / "compare.csv").exists()


def test_default_methods_are_scaled_to_the_backbone() -> None:
    methods = resolve_methods(None, "test-small", 7, 2)
    assert [m.label for m in methods] == list(DEFAULT_METHODS)
    assert all(m.source == UNCALIBRATED_DEFAULTS for m in methods[1:] if m.label != CFG_SKIP)
    by_label = {m.label: m.policy for m in methods}
    assert by_label[CFG_SKIP].method == "none" and by_label[CFG_SKIP].guidance.skip_uncond_from_scale == 5
    authors = by_label["fastvar_authors"].fastvar  # the authors' Infinity settings moved to the schedule's end
    assert dict(authors.ratios) == {3: 0.4, 4: 0.5} and authors.exit_after_scale == 4 and authors.cache_scale == 2
    assert by_label["fixed_exit"].fixed_exit.exit_scale == 5
    assert dict(by_label["fastvar"].fastvar.ratios) == {5: 0.4, 6: 0.6} and by_label["fastvar"].fastvar.layers == (1, 2)
    assert [by_label[f"toprovar-{v}"].variant for v in ("scale", "scale_token", "scale_layer", "full")] == [
        "scale",
        "scale_token",
        "scale_layer",
        "full",
    ]
    assert by_label["toprovar-scale"].scale.action == "exit" and by_label["toprovar-full"].scale.min_scale == 3
    # Infinity-2B ships its ToProVAR and FastVAR policies; fixed exit falls back to the defaults.
    entries = ["fastvar", "fixed_exit", "toprovar-scale_layer"]
    big = {m.label: m for m in resolve_methods(entries, "infinity-2b", 13, 32)}
    assert big["fastvar"].source.startswith("shipped fastvar-infinity-2b") and "not calibrated" in big["fastvar"].source
    assert big["toprovar-scale_layer"].policy.backbone == "infinity-2b"
    assert big["fixed_exit"].policy.fixed_exit.exit_scale == 11
    assert default_policies(13, 32)["fastvar"].fastvar.layers == (3, 28)  # FastVAR's official blocks at depth 32
    scaled = default_policies(13, 32)["fastvar_authors"].fastvar  # = the shipped authors' policy of Infinity-2B
    shipped = resolve_methods(["fastvar_authors"], "infinity-2b", 13, 32)[1]
    assert shipped.source.startswith("shipped fastvar_authors-infinity-2b") and shipped.policy.fastvar == scaled
    assert resolve_methods(["fastvar"], "test-small", 7, 2)[0].label == "none"  # the baseline always runs first


@pytest.mark.parametrize("method", ["fastvar", "toprovar", "fixed_exit"])
def test_pruned_token_map_matches_the_trace(method: str, small, tmp_path: Path) -> None:
    policy = default_policies(7, 2)[method]
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    plain = generate(small, ["a red cube"], [seed], policy=policy)
    recorded = generate(small, ["a red cube"], [seed], policy=record_kept_tokens(policy))
    assert torch.equal(plain.images, recorded.images)  # recording changes nothing
    assert plain.trace.kept_index is None and recorded.trace.kept_index is not None
    path = tmp_path / f"{method}.png"
    maps = plot_pruned_tokens(recorded.trace, recorded.images[0], path)
    assert path.stat().st_size > 0 and Image.open(path).size[0] > 0
    layers = recorded.trace.layers_frame()
    per_scale = layers.groupby("scale").kept.sum().to_dict()
    depth = small.transformer.depth
    assert maps and all(m.min() < depth for m in maps.values())
    for scale in recorded.trace.scales:
        full = recorded.trace.kept_maps()[scale.scale]
        assert full.shape == (scale.h, scale.w)
        assert int(full.sum()) == per_scale.get(scale.scale, 0)  # tokens x layers that ran
        assert (scale.scale in maps) == bool(full.min() < depth)
    if method == "fixed_exit":
        assert list(maps) == [6] and not maps[6].any()  # the last scale did not run
    else:
        pruned = [s for s, m in maps.items() if m.min() < depth]
        assert pruned and all(np.isin(maps[s], range(depth + 1)).all() for s in pruned)
    assert pruned_token_maps(recorded.trace).keys() == maps.keys()
    if method == "fixed_exit":  # whole scales only: the counts alone place every token
        assert all(
            torch.equal(a, b) for a, b in zip(plain.trace.kept_maps().values(), recorded.trace.kept_maps().values())
        )
    else:
        with pytest.raises(ValueError, match="record_kept_tokens"):
            plain.trace.kept_maps()


def test_geneval_lite_only_on_tiny() -> None:
    from toprovar.metrics import geneval_scorer

    assert geneval_scorer("test-small") is None and geneval_scorer("infinity-2b") is None
    scenes_mod = pytest.importorskip("toprovar.tiny.scenes")
    pytest.importorskip("toprovar.tiny.evaluate")
    scenes = scenes_mod.sample_scenes(3, seed=1)
    scores = geneval_scorer("tiny")(scenes_mod.render_uint8(scenes), scenes)
    assert set(scores) == {"binary", "share"}
    assert all(v.shape == (3,) and ((v >= 0) & (v <= 1)).all() for v in scores.values())
    assert (scores["binary"] <= scores["share"]).all()  # every check holds -> share 1
    # The compare command scores captions when the prompts are text.
    captions = geneval_scorer("tiny")(scenes_mod.render_uint8(scenes), [s.caption for s in scenes])
    assert all(np.array_equal(captions[k], scores[k]) for k in scores)


def test_cfg_skip_entries() -> None:
    """`cfg_skip[:s]` alone is the baseline with the skip; `<method>+cfg_skip[:s]` adds it to a method."""
    methods = {
        m.label: m
        for m in resolve_methods(
            ["cfg_skip:3", "toprovar-full+cfg_skip", "fastvar+cfg_skip:6", "toprovar@scale+cfg_skip:2", "cfg_skip"],
            "test-small",
            7,
            2,
        )
    }
    assert list(methods) == [
        "none",
        "cfg_skip:3",
        "toprovar-full+cfg_skip",
        "fastvar+cfg_skip:6",
        "toprovar@scale+cfg_skip:2",
        "cfg_skip",
    ]
    skips = {label: m.policy.guidance.skip_uncond_from_scale for label, m in methods.items()}
    assert skips == {
        "none": None,
        "cfg_skip:3": 3,
        "toprovar-full+cfg_skip": default_cfg_skip(7),
        "fastvar+cfg_skip:6": 6,
        "toprovar@scale+cfg_skip:2": 2,
        "cfg_skip": 5,
    }
    assert methods["toprovar-full+cfg_skip"].policy.variant == "full"
    assert methods["toprovar@scale+cfg_skip:2"].policy.scale.action == "exit"
    assert methods["fastvar+cfg_skip:6"].policy.fastvar == default_policies(7, 2)["fastvar"].fastvar
    assert "CFG skip" in methods["cfg_skip:3"].source and all(m.prunes for m in list(methods.values())[1:])


@pytest.mark.parametrize(
    "entry, match",
    [
        ("cfg_skip:7", r"integer in \[0, 6\]"),
        ("cfg_skip:x", "integer"),
        ("cfg_skip:-1", "integer"),
        ("nope+cfg_skip", "unknown policy 'nope'"),
    ],
)
def test_cfg_skip_entry_errors(entry: str, match: str) -> None:
    from toprovar.errors import UserError

    with pytest.raises(UserError, match=match) as err:
        resolve_methods([entry], "test-small", 7, 2)
    assert "\n" not in str(err.value)


def test_compare_runs_every_builtin_method_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The CPU smoke of `compare backbone=test-small` with every built-in (the GPU run uses infinity-2b)."""
    out = tmp_path / "cmp"
    methods = [*DEFAULT_METHODS, "toprovar-full+cfg_skip:4"]
    main(
        [
            "compare",
            "backbone=test-small",
            "methods=[" + ",".join(methods) + "]",
            "n_prompts=2",
            "batch_size=2",
            "warmup=0",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    with open(out / "compare.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(rows) == [*DEFAULT_METHODS, "toprovar-full+cfg_skip:4"]
    # (test-small's random layers all score Global: the scale+layer variant skips none of them.)
    assert all(float(rows[m]["flop_ratio"]) < 1.0 for m in list(rows)[1:] if m != "toprovar-scale_layer")
    # The skip halves the rows of the last two of 7 scales: a fixed share of the work, whatever the images.
    assert float(rows[CFG_SKIP]["flop_speedup"]) > 1.2
    assert float(rows["toprovar-full+cfg_skip:4"]["flop_ratio"]) < float(rows["toprovar-full"]["flop_ratio"])
    md = (out / "compare.md").read_text()
    assert "skip_uncond_from_scale: 5" in md and "exit_after_scale: 4" in md
    assert "| cfg_skip |" in capsys.readouterr().out


def test_backbone_specific_prompts_and_evaluator_come_from_the_spec(tmp_path: Path) -> None:
    """A backbone of one's own with built-in prompts and an evaluator gets them in compare, the
    metrics and calibration's prompt sets, by its spec alone (no name is tested in generic code)."""
    import dataclasses

    from calibrate.config import PromptsConfig
    from calibrate.prompts import load_prompt_sets
    from tests.conftest import compose
    from toprovar.compare import _prompts
    from toprovar.metrics import geneval_scorer
    from toprovar.models import registry
    from toprovar.schemas import CompareConfig

    def sample(count: int, seed: int) -> tuple[list[str], list[dict]]:
        return [f"shape {seed}-{i}" for i in range(count)], [{"seed": seed, "i": i} for i in range(count)]

    def geneval(images, prompts):
        n = len(prompts)
        return np.ones(n), np.full(n, 0.5)

    source = registry.PromptSource("own_shapes", sample)
    spec = dataclasses.replace(registry.get_backbone("test-small"), name="own", prompt_source=source, geneval=geneval)
    registry.register_backbone(spec, replace_existing=True)
    try:
        from omegaconf import OmegaConf

        cfg = compose("compare", ["backbone=test-small", "backbone.name=own", "n_prompts=3", "prompt_seed=7"], tmp_path)
        prompts, seeds, specs = _prompts(OmegaConf.to_object(cfg), spec)
        assert isinstance(OmegaConf.to_object(cfg), CompareConfig)
        assert (
            prompts == ["shape 7-0", "shape 7-1", "shape 7-2"]
            and seeds == [0, 1, 2]
            and specs[2] == {"seed": 7, "i": 2}
        )
        scores = geneval_scorer("own")(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ["a", "b"])
        assert scores["binary"].tolist() == [1, 1] and scores["share"].tolist() == [0.5, 0.5]
        sets = load_prompt_sets(
            PromptsConfig(source="own_shapes", seed=1, presample=1, search=2, validate=1, file=None, items=[])
        )
        assert sets.search.texts == ["shape 1-1", "shape 1-2"] and sets.validate.specs == [{"seed": 1, "i": 3}]
    finally:
        registry._BACKBONES.pop("own")


def test_compare_after_an_out_of_memory_error_redoes_the_chunk_at_half_the_batch(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    """An injected CUDA out-of-memory error on the first call of more than one image: the run goes on
    at batch 1, every prompt once per method, the warm-up (and the figure's record) at the new size."""
    import toprovar.pipeline as pipeline

    real, sizes, failed = pipeline.generate, [], []

    def tight(backbone, texts, chunk_seeds, **kw):
        sizes.append(len(texts))
        if len(texts) > 1 and not failed:
            failed.append(len(texts))
            raise torch.OutOfMemoryError("injected")
        return real(backbone, texts, chunk_seeds, **kw)

    monkeypatch.setattr(pipeline, "generate", tight)
    out = tmp_path / "cmp"
    main(
        [
            "compare",
            "backbone=test-small",
            "methods=[none,fixed_exit]",
            'prompts=["a red cube", "two blue balls", "a cat"]',
            "batch_size=4",
            "warmup=1",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    # 3 prompts at 4: one call of 3 fails (the first warm-up); at 2: calls of 2 (warm-ups, then timed)
    assert failed == [3] and sizes == [3, 2, 2, 2, 2, 2, 2]
    err = capsys.readouterr().err
    assert "toprovar compare: warning: CUDA out of memory at batch 4; batch 2 from now on, redoing prompts 0..2" in err
    rows = list(csv.DictReader((out / "compare_per_image.csv").open()))
    assert [(r["method"], r["prompt"]) for r in rows] == [
        (m, p) for m in ("none", "fixed_exit") for p in ("a red cube", "two blue balls", "a cat")
    ]
    assert "batch size 4 then 2 (equal chunks)" in (out / "compare.md").read_text()
    assert (out / "pruned_tokens_fixed_exit.png").exists()
