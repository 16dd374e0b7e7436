"""`python -m calibrate`: one-line errors, config typing, and the pre-sampling statistics."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibrate.cost_model import TERMS
from calibrate.stats import (
    crossing_direction,
    layer_score,
    low_entropy_ratio,
    principal_component_ratio,
    quantile_range,
    representative_scale,
)
from toprovar.schedules import full_schedule

REPO = Path(__file__).resolve().parent.parent


def _calibrate(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "calibrate", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # a hang guard, not a speed claim


# A backbone whose weights are missing: an error checked before loading it must come first.
_NO_WEIGHTS = [
    "backbone=infinity-2b",
    "tracking=off",
    "storage=memory",
    "backbone.weights.transformer=/nonexistent/infinity_2b_reg.pth",
]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["backbone=test-small", "search.no_such_key=1"], "no_such_key"),
        (["backbone=no-such-backbone"], "no-such-backbone"),
        (["search.n_trials=[1"], "bad override"),
        (["backbone=test-small", "search.n_trials=many"], "n_trials"),
        (["backbone=test-small", "search.sampler=grid"], "search.sampler"),
        (["backbone=test-small", "stages=[evaluate]"], "evaluate=["),
        (
            ["backbone=test-small", "tracking=off", "storage=memory", "stages=[evaluate]", "evaluate=[no_such_policy]"],
            "no_such_policy",
        ),
        (
            [
                "backbone=infinity-2b",
                "tracking=off",
                "storage=memory",
                "backbone.weights.transformer=/nonexistent/infinity_2b_reg.pth",
            ],
            "/nonexistent/infinity_2b_reg.pth",
        ),
        (["backbone=test-small", "tracking=off", "storage=memory", "search.workers=2"], "storage=memory"),
        # checked from the folder's files before the backbone (2B's missing weights) is even looked at
        (
            ["backbone=infinity-2b", "tracking=off", "storage=memory", "quality.clip=/nonexistent/clip"],
            "quality.clip=/nonexistent/clip: no such folder",
        ),
        (["backbone=test-small", "search.constraints.max_clip_drop=0"], "max_clip_drop"),
        (["backbone=test-small", "stages=[]"], "stages=[] runs nothing"),
        # The folders are checked before the backbone (2B's missing weights) is looked at, not after the run.
        ([*_NO_WEIGHTS, "export_to=/etc/passwd"], "export_to=/etc/passwd is a file"),
        ([*_NO_WEIGHTS, "export_to=/proc/x"], "export_to=/proc/x cannot be written"),
        (["backbone=test-small", "hydra.run.dir=/proc/x"], "hydra.run.dir=/proc/x cannot be written"),
        (["backbone=test-small", "hydra.run.dir=/proc/x/${now:%H-%M-%S}"], "hydra.run.dir=/proc/x cannot be written"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, overrides, expected):
    result = _calibrate(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("calibrate: error:") and expected in lines[0]
    assert not (tmp_path / "outputs").exists()  # a run that fails on its arguments leaves no folder


def _one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("calibrate: error:") and expected in lines[0], lines[0]


def test_a_run_folder_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    result = _calibrate(tmp_path, "backbone=test-small", f"hydra.run.dir={tmp_path / 'notes.txt' / 'run'}")
    _one_line_error(result, f"lies under {tmp_path / 'notes.txt'}, which is a file")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


@pytest.mark.parametrize("tracking", ["local", "off"])
def test_select_and_export_on_a_fresh_study_leave_nothing_behind(tmp_path, tracking):
    """stages=[select,export] needs a study that was pre-sampled and searched: on a fresh one it is a
    one-line error before the backbone loads (2B's weights are missing), with no run folder and no
    MLflow run (a FAILED one was left before)."""
    run_dir = tmp_path / "run"
    result = _calibrate(
        tmp_path,
        *_NO_WEIGHTS[:1],
        *_NO_WEIGHTS[3:],
        f"tracking={tracking}",
        "stages=[select,export]",
        f"hydra.run.dir={run_dir}",
    )
    _one_line_error(result, "study 'infinity-2b' has no pre-sampling summary yet")
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no tracking store opened, so no run in it


def test_select_on_a_study_without_summary_is_refused_without_touching_it(tmp_path, calibrate_config):
    """An existing study that was never pre-sampled (a SQLite file, a journal) is refused too, and a
    storage file that does not exist is not created by the check."""
    import dataclasses

    from calibrate.search import open_study
    from calibrate.stages.presample import check_summary_stored
    from toprovar.errors import UserError

    cfg = calibrate_config("backbone=test-small", "tracking=off")
    for url in (f"sqlite:///{tmp_path}/optuna.db", f"journal:{tmp_path}/optuna.journal"):
        storage = dataclasses.replace(cfg.storage, url=url)
        with pytest.raises(UserError, match="no pre-sampling summary"):
            check_summary_stored("s", storage)
        assert not list(tmp_path.iterdir())  # nothing created
    storage = dataclasses.replace(cfg.storage, url=f"journal:{tmp_path}/optuna.journal")
    study = open_study("s", storage, "tpe", 0, 4)
    with pytest.raises(UserError, match="no pre-sampling summary"):
        check_summary_stored("s", storage)
    study.set_user_attr("presample_summary", {"crossing": "below"})
    check_summary_stored("s", storage)  # stored: the run may go on


_RUN_DIR_SCRIPT = """
import os
import toprovar.cli  # registers the run folder's resolver, as `python -m calibrate` does
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tests.conftest import CONF_DIR
with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="calibrate"):
    cfg = compose(config_name="calibrate", return_hydra_config=True)
print(OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"], os.getpid())
"""


def test_run_folders_of_two_processes_differ_within_one_second(tmp_path):
    """The run folder's name ends in the process id: two calibrations started in the same second
    (same date and time stamp) get their own folders."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = [
        subprocess.Popen([sys.executable, "-c", _RUN_DIR_SCRIPT], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    folders = {}
    for process in started:
        out, _ = process.communicate(timeout=600)
        folder, pid = out.split()
        assert folder.startswith("outputs/calibrate/") and folder.endswith(f"-{pid}")
        folders[pid] = folder
    assert len(set(folders.values())) == 2


def test_exported_policy_that_did_not_validate_exits_3(tmp_path, calibrate_config, monkeypatch):
    """A script can tell: exit status 3 when the exported policy is marked NOT validated."""
    import dataclasses

    import calibrate.stages.validate as stage
    from calibrate.app import EXIT_NOT_VALIDATED, run_calibration
    from calibrate.context import RunPaths

    validate = stage.select_and_validate
    monkeypatch.setattr(stage, "select_and_validate", lambda *args: dataclasses.replace(validate(*args), passed=False))
    cfg = calibrate_config(
        "backbone=test-small",
        "storage=memory",
        "tracking=off",
        "search.n_trials=2",
        "prompts.presample=1",
        "prompts.search=1",
        "prompts.validate=1",
        "search.validate_candidates=1",
        "search.constraints.min_ssim=0.0",
    )
    outcome = run_calibration(cfg, RunPaths(tmp_path / "run", tmp_path, ()))
    path = outcome.policy
    assert outcome.exit_status == EXIT_NOT_VALIDATED == 3
    import yaml

    assert yaml.safe_load(path.read_text())["provenance"]["validated"] is False


def test_low_entropy_ratio_matches_definition():
    b, layers, n = random.randint(1, 4), random.randint(1, 5), random.randint(4, 64)
    entropy = torch.rand(b, layers, n) * 5
    per_token = entropy.numpy().mean(axis=1)
    expected = (per_token < per_token.mean(axis=1, keepdims=True)).mean(axis=1)
    np.testing.assert_allclose(low_entropy_ratio(entropy).numpy(), expected, rtol=0, atol=1e-6)


def test_principal_component_ratio_matches_numpy_svd():
    h, w = random.randint(2, 9), random.randint(2, 9)
    maps = torch.rand(3, 2, h * w) + 0.1
    sv = np.linalg.svd(maps.numpy().reshape(3, 2, h, w).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(principal_component_ratio(maps, h, w).numpy(), sv[..., 0] / sv[..., 1], rtol=1e-4)
    rank_one = torch.outer(torch.rand(h) + 0.5, torch.rand(w) + 0.5).reshape(1, h * w)
    assert principal_component_ratio(rank_one, h, w).item() > 1e3  # a pure Global map
    with pytest.raises(ValueError):
        principal_component_ratio(torch.rand(1, w), 1, w)


def test_layer_score_crossing_and_ranges():
    ratio = np.random.uniform(1, 10, size=5)
    beta = random.uniform(0.1, 3)
    np.testing.assert_allclose(layer_score(ratio, beta), np.exp(-beta * (ratio - 1)))
    assert layer_score(1.0, beta) == pytest.approx(1.0)
    scales = np.arange(1, 10)
    falling = 0.8 - 0.05 * scales + np.random.normal(0, 0.005, scales.size)
    assert crossing_direction(scales, falling) == "below"
    assert crossing_direction(scales, falling[::-1]) == "above"
    values = np.random.uniform(0.3, 0.5, 200)
    lo, hi = quantile_range(values, 0.1, 0.9, 0.05)
    assert 0.25 <= lo < hi <= 0.55
    assert quantile_range(np.array([np.nan]), 0.1, 0.9, 0.05) is None
    grids = [(h, w) for _, h, w in full_schedule(1.0)]  # the official square 1M schedule: 13 grids
    assert len(grids) == 13 and grids[-1] == (64, 64)
    assert representative_scale(grids) == 6  # the paper's scale 6 of 13
    assert min(grids[representative_scale(grids[:3])]) >= 2


def _has_pruning_runtime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("toprovar.policy", "toprovar.pruning"))


@pytest.mark.skipif(not _has_pruning_runtime(), reason="needs the pruning runtime (toprovar.policy, toprovar.pruning)")
def test_mini_calibration_end_to_end_and_resume(tmp_path):
    import pandas as pd
    import yaml

    from toprovar.policy import load_policy

    run_dir, shipped = tmp_path / "run", tmp_path / "policies"
    common = [
        "backbone=test-small",
        "search.n_trials=4",
        "search.validate_candidates=2",
        f"search.constraints.min_ssim={random.uniform(0.0, 0.3):.3f}",
        f"hydra.run.dir={run_dir}",
        f"seed={random.randrange(1000)}",
    ]
    result = _calibrate(tmp_path, *common, "tracking=local", f"export_to={shipped}")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_tracked_run(tmp_path / "mlflow.db", trials=4)
    policy_path = run_dir / "policy.yaml"
    assert (shipped / "test-small.yaml").read_text() == policy_path.read_text()
    document = yaml.safe_load(policy_path.read_text())
    provenance = document["provenance"]
    assert provenance["backbone"]["name"] == "test-small" and provenance["search"]["trials_complete"] == 4
    assert provenance["measured"]["validation"]["speedup"] >= 1.0
    # The stated speedup is the measured wall clock; the FLOP ratio and the cost model's prediction beside it.
    speed = provenance["speedup"]
    assert speed["wall_clock"] > 0 and speed["flop_ratio"] >= 1.0 and speed["search_objective"] == "model"
    assert speed["prediction_error"] == pytest.approx(speed["predicted"] / speed["wall_clock"] - 1)
    # test-small's stored cost model (FLOP-proportional: the same ranking on every machine)
    assert json.loads((run_dir / "presample" / "cost_model.json").read_text())["used"] == "backbone"
    acceptance = provenance["acceptance"]  # the promise: decision, confidence, prompts, bounds vs margins
    assert acceptance["decision"] in ("accept", "reject", "undecided") and acceptance["confidence"] == 0.95
    assert provenance["validated"] == (acceptance["decision"] == "accept")
    ssim_bound = acceptance["metrics"]["ssim"]
    assert (
        ssim_bound["lower"] <= ssim_bound["mean"] <= ssim_bound["upper"]
        and ssim_bound["n"] == acceptance["prompts_used"]
    )
    assert len(pd.read_csv(run_dir / "validation" / "per_prompt.csv")) >= acceptance["prompts_used"]
    assert load_policy(str(policy_path)) is not None
    trials = pd.read_csv(run_dir / "search" / "trials.csv")
    assert (trials.state == "COMPLETE").sum() == 4 and trials.warm_start.iloc[0]
    for name in ("presample_scales.parquet", "presample_layers.csv", "fig8_entropy_rho.png"):
        assert (run_dir / "presample" / name).exists()

    # Same run folder -> same journal study: the target is met, no trial runs again.
    again = _calibrate(tmp_path, *common, "tracking=off", "stages=[search]")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = pd.read_csv(run_dir / "search" / "trials.csv")
    assert len(trials) == 4

    # The evaluate stage measures policies on the held-out prompts the way validation did: the
    # exported policy's FLOP speedup and SSIM come out the same (same prompts, seeds, CPU FLOPs).
    # (Its stated speedup is the measured wall clock; the search ranked trials by the predicted one.)
    eval_dir = tmp_path / "evaluate_run"
    measured = _calibrate(
        tmp_path,
        "backbone=test-small",
        "tracking=off",
        "storage=memory",
        "stages=[evaluate]",
        f"evaluate=[none,{policy_path}]",
        f"hydra.run.dir={eval_dir}",
    )
    assert measured.returncode == 0, measured.stderr[-3000:]
    table = pd.read_csv(eval_dir / "evaluate" / "policies.csv").set_index("policy")
    assert list(table.index) == ["none", str(policy_path)]
    assert table.loc["none", "speedup"] == pytest.approx(1.0) and table.loc["none", "ssim"] == pytest.approx(1.0)
    validation = provenance["measured"]["validation"]
    assert table.loc[str(policy_path), "flop_speedup"] == pytest.approx(validation["flop_speedup"], rel=1e-6)
    assert table.loc[str(policy_path), "wall_speedup"] > 0  # measured: the wall clock, beside the FLOP ratio
    assert table.loc[str(policy_path), "ssim"] == pytest.approx(validation["ssim"], abs=1e-4)
    assert table.loc["none", "decision"] == "accept" and table.loc["none", "acceptance.ssim.lower"] == pytest.approx(
        1.0
    )
    assert (eval_dir / "evaluate" / "unpruned_vs_policies.png").exists()


def test_cost_model_source_fit_fits_on_the_presample_calls_and_random_policies(tmp_path):
    """`search.cost_model.source=fit`: the pre-sampling times its own calls plus `probes` random
    policies of the search space, fits non-negative coefficients and stores them with the study's
    summary (what the search then ranks by), whatever the backbone config stores."""
    probes = random.randint(1, 2)
    run_dir = tmp_path / "run"
    result = _calibrate(
        tmp_path,
        "backbone=test-small",
        "tracking=off",
        "stages=[presample]",
        "search.cost_model.source=fit",
        f"search.cost_model.probes={probes}",
        f"hydra.run.dir={run_dir}",
        f"seed={random.randrange(1000)}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "presample" / "cost_model.json").read_text())
    assert record["used"] == "fitted" and record["model"] == record["fitted"]
    coefficients = [record["model"][term] for term in TERMS]
    assert all(math.isfinite(c) and c >= 0 for c in coefficients) and any(c > 0 for c in coefficients)
    assert record["fit_calls"] >= probes + 2  # the unpruned call, the entropy call(s), the probes
    assert math.isfinite(record["fit_mean_abs_error"]) and record["fit_mean_abs_error"] >= 0
    assert record["model"]["fitted_on"].startswith(f"{record['fit_calls']} pre-sampling calls on cpu")


def _check_tracked_run(store: Path, trials: int) -> None:
    """The MLflow runs of a calibration carry what `mlflow.start_run` would add (this checkout's
    entry script and git commit) and the parent the search's progress, one point per trial."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert len(runs) == trials + 1
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    for run in runs:
        assert run.data.tags["mlflow.source.name"] == str(REPO / "calibrate" / "__main__.py")
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
        if head.returncode == 0:  # a git checkout (not an sdist)
            assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "best_feasible_speedup")]
    assert steps == sorted(set(steps)) and set(steps) <= set(range(trials)) and steps
    assert max(m.value for m in client.get_metric_history(parent.info.run_id, "best_feasible_speedup")) >= 1.0


def test_weight_paths_in_provenance_are_package_relative(tmp_path):
    """The shipped policy must not name this checkout's absolute paths (the hash is the identity)."""
    from pathlib import Path

    import yaml

    import toprovar
    from calibrate.export import portable_path
    from toprovar.policy import POLICY_DIR

    package = Path(toprovar.__file__).resolve().parent
    inside = package / "assets" / "tiny" / "transformer.safetensors"
    assert portable_path(str(inside)) == "toprovar/assets/tiny/transformer.safetensors"
    outside = tmp_path / "ckpt" / "infinity_2b_reg.pth"
    assert portable_path(str(outside)) == str(outside) and portable_path(None) is None
    shipped = yaml.safe_load((POLICY_DIR / "tiny.yaml").read_text())["provenance"]["backbone"]
    assert set(shipped["weights"]) == set(shipped["weight_hashes"])
    for part, path in shipped["weights"].items():
        assert path.startswith("toprovar/assets/tiny/") and not Path(path).is_absolute(), path
        assert (package.parent / path).is_file() and shipped["weight_hashes"][part].startswith("sha256:")


def test_a_resumed_study_keeps_its_presample_summary_and_says_so_only_when_it_differs(
    tmp_path, calibrate_config, caplog
):
    """The stored summary comes back from the storage as JSON (lists where the summary has tuples):
    an equal fresh summary is not reported as different (it was, before)."""
    import dataclasses
    import logging

    from calibrate.presample import PresampleSummary
    from calibrate.search import open_study
    from calibrate.stages.presample import shared_summary

    cfg = calibrate_config("backbone=test-small", "tracking=off")
    storage = dataclasses.replace(cfg.storage, url=f"journal:{tmp_path}/study.journal")
    summary = PresampleSummary(
        crossing="below",
        tau_range=(random.random(), 1.0),
        representative_scale=3,
        layer_ratios=[random.uniform(1, 3) for _ in range(2)],
        band_points=4,
        prompts=4,
        scales=7,
    )
    assert shared_summary(open_study("s", storage, "tpe", 0, 4), summary) == summary

    def said():
        return [r.getMessage() for r in caplog.records if r.name == "calibrate"]

    with caplog.at_level(logging.INFO, logger="calibrate"):
        stored = shared_summary(open_study("s", storage, "tpe", 0, 4), summary)  # read back from the file
        assert stored == summary and not said()
        other = dataclasses.replace(summary, band_points=5)
        assert shared_summary(open_study("s", storage, "tpe", 0, 4), other) == summary
    assert said() == ["study 's' keeps the pre-sampling summary it started with"]
