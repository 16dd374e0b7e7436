"""MLflow tracking of a calibration: a real `mlflow server` on loopback, and the local fallback."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from calibrate.backend import load_backend
from calibrate.knobs import SearchSpace
from calibrate.search import open_study, run_search
from calibrate.tracking import Tracker, open_tracker, server_answers
from tests.test_calibrate_search import SUMMARY, flops_scorer

MLFLOW = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(uri: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def _get(uri: str, endpoint: str) -> dict:
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{endpoint}", timeout=10) as reply:
        return json.loads(reply.read())


class Server:
    """An `mlflow server` subprocess on a free loopback port (started, not yet waited for)."""

    def __init__(self, folder: Path):
        self.uri = f"http://127.0.0.1:{_free_port()}"
        self.log = folder / "server.log"
        self.process = subprocess.Popen(
            [
                MLFLOW,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                self.uri.rsplit(":", 1)[1],
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(folder / "artifacts"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )

    def wait(self, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while not server_answers(self.uri, 1.0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.25)
        return self.uri

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started first, waited for inside the test: the server boots while the model fixture builds."""
    if not Path(MLFLOW).exists():
        pytest.skip("the `mlflow` executable is not installed")
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def config(calibrate_config):
    return calibrate_config(
        "backbone=test-small",
        "storage=memory",
        "tracking=server",
        "search.space.alpha_min=[0.0,0.8]",
        "search.constraints.min_ssim=0.5",
    )


@pytest.fixture(scope="module")
def scorer(config):
    backend = load_backend({"name": "test-small"}, torch.device("cpu"), None, batch_size=4)
    return flops_scorer(backend, config, [f"{random.choice(['red', 'blue'])} cube {i}" for i in range(2)])


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    points = _get(uri, f"metrics/get-history?run_id={run_id}&metric_key={key}").get("metrics", [])
    return sorted((int(p["step"]), p["value"]) for p in points)


def test_calibration_runs_reach_the_server(mlflow_server, scorer, config, tmp_path):
    from mlflow.tracking.context.registry import resolve_tags

    uri = mlflow_server.wait()
    experiment = f"calibration-{random.randrange(10**6)}"
    tracker = open_tracker(dataclasses.replace(config.tracking, uri=uri, experiment=experiment), tmp_path)
    assert isinstance(tracker, Tracker) and tracker.uri == uri
    parent = tracker.start_parent("tiny/test", {"search": {"n_trials": 3}, "backbone": "test-small"})
    n_trials = 4
    study = open_study("tracked", config.storage, "random", random.randrange(1000), n_trials)
    space = SearchSpace.from_config(config.search.space, SUMMARY)
    run_search(study, space, scorer, n_trials=n_trials, limits=config.search.constraints, tracker=tracker)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"tau: {random.random()}\n")
    tracker.log.artifacts(parent, [policy], "policy")
    tracker.log.metrics(parent, {"validation.speedup": 2.5})
    tracker.end(parent)

    runs = _post(uri, "runs/search", {"experiment_ids": [tracker.experiment_id], "max_results": 100})["runs"]
    by_id = {run["info"]["run_id"]: run for run in runs}
    assert parent in by_id and len(runs) == n_trials + 1
    children = [r for r in runs if {"key": "mlflow.parentRunId", "value": parent} in r["data"].get("tags", [])]
    assert len(children) == n_trials
    trials = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    # The tags `mlflow.start_run` would add here (source, user, git where the entry script is in a repository).
    context = resolve_tags()
    assert {"mlflow.source.name", "mlflow.source.type", "mlflow.user"} <= set(context)
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert {key: tags.get(key) for key in context} == context
    for child in children:
        trial = trials[child["info"]["run_id"]]
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert float(params["tau"]) == pytest.approx(trial.params["tau"])
        assert metrics["speedup"] == pytest.approx(trial.values[0])
        assert metrics["ssim"] == pytest.approx(trial.values[1])
        assert child["info"]["status"] == "FINISHED"
    parent_run = by_id[parent]["data"]
    assert {"key": "search.n_trials", "value": "3"} in parent_run["params"]
    # The search's progress: after each trial, the best speedup among the feasible trials so far.
    expected = []
    for trial in study.trials:
        feasible = [
            t.values[0] for t in study.trials[: trial.number + 1] if all(v <= 0 for v in t.constraints.values())
        ]
        if feasible:
            expected.append((trial.number, pytest.approx(max(feasible))))
    assert _history(uri, parent, "best_feasible_speedup") == expected
    assert {m["key"] for m in parent_run["metrics"]} == {"validation.speedup"} | (
        {"best_feasible_speedup"} if expected else set()
    )
    listed = _get(uri, f"artifacts/list?run_id={parent}&path=policy")["files"]
    assert [f["path"] for f in listed] == ["policy/policy.yaml"]


def test_unreachable_server_falls_back_to_local_tracking(tmp_path, caplog, config):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="calibrate.tracking"):
        tracker = open_tracker(dataclasses.replace(config.tracking, uri=uri, probe_timeout_s=1.0), tmp_path)
    assert time.monotonic() - started < 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and uri in warnings[0] and "\n" not in warnings[0]
    assert tracker.uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    value = random.random()
    run = tracker.start_parent("fallback", {"x": value})
    tracker.log.metrics(run, {"m": value})
    tracker.end(run)
    stored = tracker.client.get_run(run)
    assert stored.data.params["x"] == str(value) and stored.data.metrics["m"] == pytest.approx(value)
