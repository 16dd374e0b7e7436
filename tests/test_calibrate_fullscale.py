"""What full-scale calibration needs, on CPU: equal padded batches, the timing record, pictures a
reviewer can read (labels and marks read back from the drawn figures), the CLIPScore evaluator on
a small random CLIP saved to a folder (the real code path, unreal weights), text padding for the
CUDA graphs' key, and the whole `python -m calibrate` → `python -m toprovar generate` path from
checkpoint files in the official layout."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from calibrate.backend import chunk_plan, load_backend
from calibrate.timing import Clock, Timed
from toprovar.errors import UserError

REPO = Path(__file__).resolve().parent.parent


# -- batches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(5))
def test_chunk_plan_is_equal_sized_with_the_fewest_calls(trial):
    n, batch = random.randint(1, 200), random.randint(1, 16)
    size, chunks = chunk_plan(n, batch)
    assert size <= batch and len(chunks) == -(-n // batch)  # as few calls as batches of `batch` need
    assert [i for c in chunks for i in c] == list(range(n))
    assert all(len(c) == size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= size
    assert chunk_plan(12, 8) == (6, [range(6), range(6, 12)])  # not 8 + 4


def test_padded_chunk_runs_at_the_common_size_and_drops_its_copies():
    from toprovar.pipeline import generate

    clock = Clock(torch.device("cpu"))
    backend = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=2, clock=clock)
    prompts, seeds = (
        ["a red cube", "two dogs on a mat", "a green ball left of a blue cube"],
        random.sample(range(999), 3),
    )
    gen = backend.generate(prompts, seeds)
    assert gen.chunks == [2, 1] and gen.sizes == [2, 2] and [t.batch for t in gen.traces] == [2, 2]
    assert gen.images.shape[0] == 3 and len(gen.latency_ms) == 2 and all(v > 0 for v in gen.latency_ms)
    first = generate(backend.backbone, prompts[:2], seeds[:2])
    last = generate(backend.backbone, [prompts[2]] * 2, [seeds[2]] * 2)  # the chunk as it ran: the copy beside it
    assert torch.equal(gen.images[:2], first.images) and torch.equal(gen.images[2], last.images[0])
    # the copy's half of the last chunk's time is left out
    assert gen.latency_ms[1] == pytest.approx(gen.traces[1].total_ms / 2)
    assert clock.counts["images"] == 3 and clock.counts["padded_images"] == 1 and clock.counts["generate_calls"] == 2
    assert clock.counts["timing_only_images"] == 0


def test_a_chunk_whose_call_captured_graphs_is_timed_again(monkeypatch):
    """CUDA graphs are captured inside the call that first needs them, so that call's time holds the
    capture: the chunk runs again (at most `retime` times) until a call captures nothing, and that
    call's time counts. Simulated on CPU: the first `k` calls report captures."""
    from toprovar import pipeline

    real, calls = pipeline.generate, []
    k = random.randint(1, 3)

    def capturing(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        result.runtime["captures"] = 2 if len(calls) <= k else 0
        result.trace.total_ms = 1000.0 * len(calls)  # which call's time counts
        return result

    monkeypatch.setattr(pipeline, "generate", capturing)
    clock = Clock(torch.device("cpu"))
    backend = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=4, clock=clock)
    gen = backend.generate(["a red cube", "a cat"], [1, 2], retime=2)
    assert len(calls) == 1 + min(k, 2) and gen.latency_ms == [1000.0 * len(calls)]
    assert torch.equal(gen.images, calls[0].images) and gen.traces == [calls[0].trace]
    assert clock.counts["images"] == 2 and clock.counts["timing_only_images"] == 2 * min(k, 2)
    calls.clear()
    assert backend.generate(["a red cube"], [1], retime=0).latency_ms == [1000.0] and len(calls) == 1


def test_latency_scorer_warms_up_once_before_its_first_policy(calibrate_config):
    from calibrate.objective import PolicyScorer
    from calibrate.prompts import PromptSet
    from toprovar.policy import policy_from_dict

    config = calibrate_config("backbone=test-small", "storage=memory", "tracking=off")
    clock = Clock(torch.device("cpu"))
    backend = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=2, clock=clock)
    texts = ["a red cube", "a blue ball", "two trees"]
    scorer = PolicyScorer(
        backend,
        PromptSet("search", texts, [1, 2, 3], texts),
        lambda p: p,
        cost="latency",
        latency=config.search.latency,
        evaluator=None,
    )
    policy = policy_from_dict(
        {"version": 1, "method": "fixed_exit", "backbone": "test-small", "fixed_exit": {"exit_scale": 3}}
    )
    first = scorer.score_policy(policy)
    assert clock.counts["timing_only_images"] == 2  # one untimed batch of the common size, once
    scorer.score_policy(policy)
    assert clock.counts["timing_only_images"] == 2 and clock.counts["images"] == 9  # 3 unpruned + 2 x 3
    assert first.extra["latency_ms"] > 0 and first.speedup == pytest.approx(
        first.extra["latency_unpruned_ms"] / first.extra["latency_ms"]
    )


def test_clock_records_stage_shares():
    clock = Clock(torch.device("cpu"))
    start = clock.snapshot()
    with clock.section("generation"):
        sum(range(200_000))
    clock.count(images=4, generate_calls=1, gpu_ms=3.0)
    timed = Timed(type("T", (), {"uri": "x", "log": lambda self, v: v})(), clock, "tracking")
    assert timed.uri == "x" and timed.log(5) == 5 and clock.seconds["tracking"] > 0
    record = clock.record(start)
    assert record["images"] == 4 and record["generate_calls"] == 1 and record["generation_gpu_s"] == 0.003
    assert 0 < record["generation_share"] <= 1 and record["images_per_s_generating"] > 0
    parts = sum(record[f"{name}_s"] for name in ("generation", "quality", "pictures", "tracking"))
    assert record["other_s"] == pytest.approx(record["wall_s"] - parts, abs=2e-3)
    assert clock.peak_memory_gib() == {"peak_allocated_gib": None, "peak_reserved_gib": None}


# -- pictures --------------------------------------------------------------------------------------
def _images(n: int, side: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8)


def test_policy_grid_labels_rows_columns_and_marks_lost_and_won_prompts(tmp_path):
    from calibrate.plots import plot_policy_grid

    n = random.randint(3, 6)
    prompts = [f"prompt number {i} about a {random.choice(['cat', 'dog', 'cube'])}" for i in range(n)]
    paired = {
        "ssim": np.random.uniform(0.5, 1.0, n),
        "clip_drop": np.array([0.7, -0.4, 0.0] + [0.2] * (n - 3)),
        "geneval_drop.share": np.array([0.0, 0.5, -0.25] + [0.0] * (n - 3)),
    }
    layout = plot_policy_grid(
        _images(n, 1024),
        _images(n, 1024),
        prompts,
        paired,
        tmp_path / "grid.png",
        "Search prompts",
        policy_label="policy (trial 7)",
        mark_key="clip_drop",
    )
    assert layout.row_labels == ["unpruned", "policy (trial 7)"] and layout.column_labels == prompts
    assert layout.marks[0] == [None] * n
    assert layout.marks[1][:3] == ["lost", "won", None]  # by the sign of each prompt's CLIPScore drop
    for i, note in enumerate(layout.notes[1]):
        assert f"SSIM {paired['ssim'][i]:.3f}" in note and f"CLIP {0.0 - paired['clip_drop'][i]:+.2f}" in note
        assert f"share {0.0 - paired['geneval_drop.share'][i]:+.2f}" in note
    by_share = plot_policy_grid(
        _images(n, 64),
        _images(n, 64),
        prompts,
        paired,
        tmp_path / "share.png",
        "Held-out",
        mark_key="geneval_drop.share",
    )
    assert by_share.marks[1][:3] == [None, "lost", "won"]  # the score acceptance bounds decides the frame
    plain = plot_policy_grid(_images(n, 64), _images(n, 64), prompts, {"ssim": paired["ssim"]}, tmp_path / "p.png", "x")
    assert plain.marks[1] == [None] * n and plain.notes[1][0] == f"SSIM {paired['ssim'][0]:.3f}"
    # 1024² images are shown at <= 256 px: the PNG stays small whatever the generation size
    width, height = Image.open(layout.path).size
    assert (width, height) == layout.size and width < n * 300 + 200 and height < 2 * 340 + 120


def test_early_exit_grid_labels_scales_and_prompts(tmp_path):
    from calibrate.plots import plot_early_exits

    schedule = [(1, 1), (2, 2), (4, 4), (6, 6)]
    exits = {s: _images(3, 64) for s in range(3)}
    ssim = np.random.uniform(0, 1, (3, 4))
    layout = plot_early_exits(exits, _images(3, 64), schedule, ssim, ["a", "b", "c"], tmp_path / "exits.png")
    assert layout.row_labels == [
        "exit after scale 0 (1×1)",
        "exit after scale 1 (2×2)",
        "exit after scale 2 (4×4)",
        "full (4 scales)",
    ]
    assert layout.column_labels == ["a", "b", "c"] and layout.notes[1][2] == f"SSIM {ssim[2, 1]:.3f}"


def test_pareto_plot_names_the_violated_constraint_and_shows_held_out_results(tmp_path):
    from calibrate.plots import plot_pareto

    trials = pd.DataFrame(
        {
            "number": range(5),
            "state": ["COMPLETE"] * 4 + ["FAIL"],
            "metric.speedup": [1.0, 1.5, 2.0, 3.0, np.nan],
            "metric.ssim": [1.0, 0.9, 0.6, 0.85, np.nan],
            "feasible": [True, True, False, False, False],
            "violated": ["", "", "ssim", "clip_drop,geneval_drop", ""],
        }
    )
    validated = [
        {"number": 1, "speedup": 1.4, "ssim": 0.88, "decision": "accept"},
        {"number": 0, "speedup": 1.0, "ssim": 1.0, "decision": "undecided"},
    ]
    plot = plot_pareto(trials, [0, 1], 0.8, tmp_path / "pareto.png", chosen=1, validated=validated)
    assert {
        "infeasible: ssim (1)",
        "infeasible: clip_drop (1)",
        "feasible (2)",
        "Pareto front of feasible trials",
        "held-out: accept (1)",
        "held-out: undecided (1)",
        "selected (trial 1, search)",
    } <= set(plot.legend)
    assert plot.front == [0, 1] and plot.path.exists()


# -- CLIPScore ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from benchmarks.random_clip import write_random_clip

    return write_random_clip(tmp_path_factory.mktemp("clip"), "test", seed=random.randrange(1000))


def test_clip_scorer_is_clipscore_of_each_image_against_its_prompt(clip_folder):
    from transformers import CLIPModel, CLIPProcessor

    from calibrate.quality import ClipScorer

    scorer = ClipScorer(clip_folder, "cpu")
    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    images, texts = _images(3, 48), ["a red fox in the snow", "a bowl of ramen", "an old lighthouse"]

    def cosines(prompts: list[str]) -> np.ndarray:  # from the CLIP embeddings directly, image i with prompt i
        with torch.no_grad():
            pixels = processor(images=[im.permute(2, 0, 1) for im in images], return_tensors="pt")["pixel_values"]
            tokens = processor(text=prompts, return_tensors="pt", padding=True)
            a = model.get_image_features(pixels).pooler_output
            b = model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).pooler_output
        return torch.nn.functional.cosine_similarity(a, b).numpy()

    for prompts in (texts, texts[::-1]):  # each image scored against its own prompt
        scores = scorer(images, prompts)["clip"]
        assert scores.shape == (3,) and np.isfinite(scores).all()
        np.testing.assert_allclose(scores, np.maximum(100 * cosines(prompts), 0), rtol=1e-4, atol=1e-3)
    assert not np.allclose(cosines(texts), cosines(texts[::-1]))  # the prompt matters (random weights too)


def test_clip_folder_mistakes_are_one_line_errors(clip_folder, tmp_path):
    from calibrate.quality import check_clip_folder

    assert check_clip_folder(clip_folder) == clip_folder
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (t5 / "preprocessor_config.json").write_text("{}")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (no_tokenizer / name).write_text((clip_folder / name).read_text())
    for folder, message in (
        (tmp_path / "missing", "no such folder"),
        (t5, "not a CLIP model (config.json model_type"),
        (tmp_path, "config.json, its config, is missing"),
        (no_tokenizer, "no tokenizer"),
    ):
        with pytest.raises(UserError) as caught:
            check_clip_folder(folder)
        assert message in str(caught.value) and "\n" not in str(caught.value) and "quality.clip=" in str(caught.value)


def test_scorer_pairs_clipscores_and_bounds_their_drop(clip_folder, calibrate_config):
    from calibrate.acceptance import sequential_test
    from calibrate.objective import PolicyScorer
    from calibrate.prompts import PromptSet
    from calibrate.quality import ClipScorer
    from calibrate.search import violations
    from toprovar.policy import policy_from_dict

    config = calibrate_config("backbone=test-small", "storage=memory", "tracking=off")
    backend = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=4)
    texts = ["a red cube", "a blue ball on grass", "two trees", "a cat left of a dog"]
    prompts = PromptSet("validate", texts, random.sample(range(10**6), 4), texts)
    scorer = PolicyScorer(
        backend,
        prompts,
        lambda p: p,
        cost="flops",
        latency=config.search.latency,
        evaluator=None,
        clip=ClipScorer(clip_folder, "cpu"),
    )
    exit_early = policy_from_dict(
        {"version": 1, "method": "fixed_exit", "backbone": "test-small", "fixed_exit": {"exit_scale": 2}}
    )
    scores = scorer.score_policy(exit_early)
    ref = scorer.reference()
    assert ref.scores["clip"].shape == (4,)
    assert scores.extra["clip_unpruned"] == pytest.approx(ref.scores["clip"].mean())
    assert scores.extra["clip_drop"] == pytest.approx(scores.extra["clip_unpruned"] - scores.extra["clip"])
    assert scores.extra["clip_prompts_lost"] + scores.extra["clip_prompts_won"] <= 4
    assert "clip_drop" in violations(scores, config.search.constraints)
    test = sequential_test(config.search.acceptance, 4, geneval=False, clip=True)
    result = scorer.validate(exit_early, test)
    assert set(result.verdict.bounds) == {"ssim", "clip_drop"} and result.paired["clip_drop"].shape == (4,)
    bound = result.verdict.bounds["clip_drop"]
    assert bound.lower <= result.paired["clip_drop"].mean() <= bound.upper
    assert bound.margin == config.search.acceptance.max_clip_drop


# -- text padding for the CUDA graphs' key ---------------------------------------------------------
def test_padded_text_gives_the_same_condition(small):
    """`pad_text` (the CUDA static path): masked padding tokens change neither the pooled text
    condition nor what cross-attention reads, up to float rounding."""
    from toprovar.fast.text import pad_text
    from toprovar.pipeline import encode_prompts

    model = small.transformer
    prompts = ["a red cube", "two dogs on a mat near a tree"]
    with torch.no_grad():
        features, lengths = encode_prompts(small.text_encoder, prompts, model.config.text_maxlen)
        padded = pad_text(features, model.config.text_maxlen, bucket=random.choice([4, 8, 32]))
        assert padded.shape[1] % 4 == 0 or padded.shape[1] == model.config.text_maxlen
        assert padded.shape[1] >= features.shape[1] and torch.equal(padded[:, : features.shape[1]], features)
        a = model.encode_condition(features, lengths, with_uncond=True)
        b = model.encode_condition(padded, lengths, with_uncond=True)
        torch.testing.assert_close(b.cond_BD, a.cond_BD, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.gss, a.gss, rtol=1e-5, atol=1e-5)
        q = torch.randn(a.cond_BD.shape[0], 5, model.config.embed_dim)
        block = model.blocks[0]
        torch.testing.assert_close(block.ca(q, b.text[0]), block.ca(q, a.text[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prompts_of_other_lengths_reuse_the_cuda_graphs():
    from toprovar.fast import release_fast_runtime
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate

    backbone = build_backbone("test-small", device="cuda")
    generate(backbone, ["a cube", "a cat"], [1, 2])
    again = generate(backbone, ["a much longer prompt about a red cube", "a dog"], [3, 4])
    assert again.runtime["graphs_captured"] is False and again.runtime["captures"] == 0
    release_fast_runtime(backbone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_units_beyond_the_bound_are_evicted_and_replays_stay_exact():
    from toprovar.bench_pruning import fixed_policy

    from toprovar.fast import FastOptions, release_fast_runtime
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate

    backbone = build_backbone("test-small", device="cuda")
    policy = fixed_policy(backbone.transformer.depth, min_scale=3, alpha=0.5, protect_layers=1)
    eager = generate(backbone, ["a red cube"], [7], policy=policy, fast=FastOptions(graphs=False))
    first = generate(backbone, ["a red cube"], [7], policy=policy)
    units = backbone.fast_runtime.state.unit_cache
    units.max_units = 4  # far fewer than the call's units: captures evict the least recently used
    runs = [generate(backbone, ["a red cube"], [7], policy=policy) for _ in range(3)]
    assert units.counts["evicted"] > 0 and len(units.units) <= 4
    for r in [first, *runs]:
        assert all(torch.equal(a, b) for a, b in zip(eager.bits, r.bits))
    release_fast_runtime(backbone)
    assert backbone.fast_runtime.state is None


# -- the whole path from files in the official layout ----------------------------------------------
def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )  # a hang guard, not a speed claim


def test_calibrate_from_official_files_then_generate_with_the_policy(tmp_path):
    """`synth` writes small files in infinity-2b's release layout; `python -m calibrate
    backbone=test-small-t5 backbone.weights.*=...` runs every stage from them (MLflow tracked), and
    `python -m toprovar generate ... policy=<exported>` uses the result: the CPU dry run of the
    full-scale command."""
    from mlflow.tracking import MlflowClient

    synth = _run(
        "-m",
        "toprovar.checkpoints",
        "synth",
        "backbone=infinity-2b",
        "preset=small",
        f"out={tmp_path / 'weights'}",
        cwd=tmp_path,
    )
    assert synth.returncode == 0, synth.stderr[-2000:]
    weights = synth.stdout.strip().splitlines()[-1].split()
    assert weights[0] == "backbone=test-small-t5"
    run_dir = tmp_path / "run"
    result = _run(
        "-m",
        "calibrate",
        *weights,
        "search.n_trials=3",
        "search.validate_candidates=1",
        "search.constraints.min_ssim=0.3",
        f"hydra.run.dir={run_dir}",
        "tracking=local",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    timings = json.loads((run_dir / "timings.json").read_text())
    assert timings["backbone"] == "test-small-t5" and timings["peak_allocated_gib"] is None  # CPU: no GPU memory
    stages = timings["stages"]
    assert {"setup", "presample", "search", "validate", "report", "export", "total"} <= set(stages)
    for name in ("presample", "search", "validate"):
        record = stages[name]
        assert record["images"] > 0 and 0 < record["generation_share"] <= 1 and record["images_per_s_generating"] > 0
        assert record["generation_s"] <= record["wall_s"] and record["peak_allocated_gib"] is None
    assert stages["total"]["images"] == sum(stages[s]["images"] for s in stages if s != "total")
    assert 0 < timings["generation_share"] < timings["generation_share_after_setup"] <= 1
    for name in ("search_unpruned_vs_policy.png", "validate_unpruned_vs_policy.png"):
        assert (run_dir / "grids" / name).exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.metrics["time.total.wall_s"] == pytest.approx(stages["total"]["wall_s"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"timings.json", "images", "grids", "search", "presample"} <= logged
    images = {a.path.split("/")[-1] for a in client.list_artifacts(parent.info.run_id, "images")}
    assert any(name.startswith("grid_search+step+") for name in images), images  # MLflow: key+step+<n>+...

    out = tmp_path / "generated"
    generated = _run(
        "-m",
        "toprovar",
        "generate",
        *weights,
        f"policy={run_dir / 'policy.yaml'}",
        f"out_dir={out}",
        'prompts=["a red fox in the snow", "a lighthouse"]',
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert len(list(out.glob("*.png"))) == 2 and (out / "trace.csv").exists()
