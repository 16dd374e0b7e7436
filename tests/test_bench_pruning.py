"""`python -m benchmarks.pruning`: the whole path on CPU (--smoke), the policy built to a FLOP
target, and the one-line refusal without CUDA. Numbers on CPU are not benchmarks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.pruning import fixed_policy, planned_flop_ratio, random_spec, solve_alpha
from toprovar.models.transformer import TRANSFORMER_PRESETS
from toprovar.schedules import scale_schedule

REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.pruning", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_smoke_runs_the_whole_path_on_cpu() -> None:
    proc = _bench("--smoke")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in (
        "device",
        "torch",
        "triton",
        "date",
        "command",
        "unpruned_ms",
        "pruned_ms",
        "replay_ms",
        "ideal_speedup",
        "measured_speedup",
        "measured_over_ideal",
        "decision_overhead_share",
    ):
        assert key in result, key
    assert result["backbone"] == "test-small" and result["command"].endswith("--smoke")
    assert result["guidance_scale"] == 3.0 and "guidance scale 3.0" in proc.stdout
    assert result["flop_ratio"] < 1 and result["ideal_speedup"] == pytest.approx(1 / result["flop_ratio"])
    assert result["flop_ratio"] == pytest.approx(result["policy"]["planned_flop_ratio"], abs=1e-6)  # plan = trace
    assert result["policy"]["D"] == result["policy"]["min_scale"]
    from benchmarks.pruning import variants

    options = dict(variants())
    assert list(result["variants"]) == list(options)  # every variant of the mechanics, the defaults first
    for name, v in result["variants"].items():
        assert f"| {name} |" in proc.stdout and v["fast"] == dataclasses.asdict(options[name])
        assert v["replay_bits_identical"] and v["flop_ratio"] == pytest.approx(result["flop_ratio"])
        assert v["scale_floor_ms"] > 0 and v["loop_over_floor_bound"] > 0
    assert result["variants"]["+ index_io"]["gather_scatter_ms"] == 0.0  # inside the fused kernels
    assert "| decision overhead ms (share)" in proc.stdout and "1-token scale ms" in proc.stdout


def test_smoke_with_a_cfg_skip() -> None:
    """The CFG skip joins the fixed policy: planned = executed FLOPs, and the replay (which carries the
    skip) runs the same bits."""
    proc = _bench("--smoke", "--skip-uncond-from", "5")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["policy"]["skip_uncond_from_scale"] == 5 and "CFG skip from scale 5" in proc.stdout
    assert result["flop_ratio"] == pytest.approx(result["policy"]["planned_flop_ratio"], abs=1e-6)
    assert result["replay_bits_identical"] is True
    bad = _bench("--smoke", "--skip-uncond-from", "7")  # test-small has 7 scales
    assert bad.returncode == 2 and "--skip-uncond-from 7 is outside" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_in_one_line() -> None:
    proc = _bench()
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "CUDA" in proc.stderr and "--smoke" in proc.stderr


def test_fixed_policy_removes_the_target_share_of_infinity_2b_flops() -> None:
    cfg = TRANSFORMER_PRESETS["infinity-2b"]
    schedule = scale_schedule(1.0, "1M")

    def ratio_of(alpha: float) -> float:
        return planned_flop_ratio(schedule, cfg.depth, cfg.embed_dim, cfg.ffn_hidden, 6, alpha)

    alpha, ratio = solve_alpha(0.70, ratio_of)
    assert 0 < alpha < 0.9 and ratio == pytest.approx(0.30, abs=0.005)
    # A CFG skip from the last scale halves its rows: the same α then executes fewer FLOPs.
    skipped = planned_flop_ratio(schedule, cfg.depth, cfg.embed_dim, cfg.ffn_hidden, 6, alpha, skip_uncond_from=12)
    assert ratio / 2 < skipped < ratio
    policy = fixed_policy(cfg.depth, 6, alpha)
    assert policy.token.alpha_min == policy.token.alpha_max == alpha and policy.scale.tau == 0.0
    spec = random_spec("infinity-2b")  # no files needed: random weights, hashed text at T5 width
    assert spec.random_init and spec.weights.transformer is None and spec.transformer == cfg


def test_prune_nothing_row_on_cpu() -> None:
    """`--prune-nothing`: a policy whose crossing never fires prunes no token-layer, draws the
    unpruned images, and every scale takes an unpruned path (a graph, or probe layers then the
    unpruned kernels)."""
    proc = _bench("--smoke", "--prune-nothing")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["identical"] is True and result["pruned_token_layers"] == 0 and not result["exited"]
    assert set(result["scale_paths"]) <= {"graph", "planned_all_kept"}
    assert "images identical" in proc.stdout and result["unpruned_ms"] > 0 and result["policy_ms"] > 0
