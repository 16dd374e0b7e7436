"""Crash safety of `python -m calibrate`, MLflow included: a calibration killed with SIGKILL during
pre-sampling, during a trial, during validation and after export continues when the same command
runs again — exactly n_trials COMPLETE trials, none left RUNNING, no finished trial repeated, the
killed trial run once more, one exported policy, one MLflow parent run that ends FINISHED and no
child run left RUNNING.

One run folder goes through the four kills in turn (each rerun is killed at the next point, the
last one finishes), which checks every resume without paying for four separate calibrations. The
kills land deterministically (calibrate.search.hold_for_crash_test).
"""

from __future__ import annotations

import random

import yaml
from optuna.trial import TrialState

from tests.test_calibrate_workers import SMALL, Calibrate, check_children, check_trials, kill, mlflow_runs, study_trials

POINTS = ("presample", "trial", "validate", "export")


def test_sigkill_at_every_stage_then_the_same_command_finishes(tmp_path):
    n_trials = random.randint(2, 3)
    run_dir, shipped, hold = tmp_path / "run", tmp_path / "policies", tmp_path / "hold"
    command = [
        *SMALL,
        f"search.n_trials={n_trials}",
        f"seed={random.randrange(1000)}",
        f"hydra.run.dir={run_dir}",
        f"export_to={shipped}",
    ]
    journal = f"journal:{run_dir / 'optuna.journal'}"
    killed_trial = None
    for point in POINTS:
        calibrate = Calibrate(tmp_path, *command, hold=point, hold_dir=hold)
        kill(calibrate.held(f"{point}-0"))
        assert calibrate.wait() == -9
        parent, _ = mlflow_runs(tmp_path / "mlflow.db")  # one parent all along, left RUNNING by the kill
        assert parent.info.status == "RUNNING"
        trials = study_trials(journal) if point != "presample" else []
        if point == "trial":  # the first trial of the resumed run (the paper-default warm start)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            assert len(running) == 1 and running[0].user_attrs["warm_start"] and running[0].params
            killed_trial = running[0].number
        if point == "validate":  # the rerun after the trial kill queued that trial again and finished the search
            check_trials(trials, n_trials, killed=[killed_trial])
            assert "complete trials kept; queued again: 1 whose worker died, 0 interrupted" in calibrate.output()
        if point == "export":  # written, not yet tracked
            assert (run_dir / "policy.yaml").exists() and (shipped / "test-small.yaml").exists()

    final = Calibrate(tmp_path, *command)
    # Exit status 3: the policy is exported but not validated (one held-out prompt cannot decide the bound).
    assert final.wait() == 3, final.output()[-4000:]
    output = final.output()
    assert "pre-sampling: study 'test-small' has its summary already; not run again" in output
    assert f"{n_trials} complete trials kept; queued again: 0 whose worker died, 0 interrupted" in output

    trials = study_trials(journal)
    check_trials(trials, n_trials, killed=[killed_trial])
    parent, children = mlflow_runs(tmp_path / "mlflow.db")
    assert parent.info.status == "FINISHED" and int(parent.data.tags["resumed"]) == len(POINTS)
    check_children(children, trials)
    assert sorted(p.name for p in shipped.iterdir()) == ["test-small.yaml"]
    assert (shipped / "test-small.yaml").read_text() == (run_dir / "policy.yaml").read_text()
    policy = yaml.safe_load((run_dir / "policy.yaml").read_text())
    assert policy["provenance"]["validated"] is False  # one held-out prompt: undecided
    assert policy["provenance"]["mlflow"]["parent_run_id"] == parent.info.run_id
