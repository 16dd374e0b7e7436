"""MLflow tracking for a calibration: one parent run, one child run per Optuna trial.

Uses `MlflowClient` with explicit run ids (no fluent global state), so trials of several studies
or threads never log into the wrong run; every run still carries the source and git tags that
`mlflow.start_run` adds (MLflow's context providers resolve them). Local tracking by default (SQLite `mlflow.db` and
`mlruns/` in the launch directory); any tracking URI by override. A remote server is probed with a
short timeout first: if it does not answer, one warning line says so and the run tracks locally in
its run folder instead, with everything it would have sent.

One calibration is one parent run, whichever processes add its trials: the parent's id is stored
with the Optuna study, worker processes log their trials as its children (`attach`), and a
resumed calibration reopens it (`resume_parent`) and marks the children its crashed processes
left RUNNING as KILLED (`close_children`), so no run stays RUNNING forever.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrate.config import TrackingConfig
from calibrate.locks import schema_lock

logger = logging.getLogger(__name__)

_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value is 6000 characters


def _local_store(folder: Path) -> tuple[str, str]:
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlruns").as_uri()


def server_answers(uri: str, timeout_s: float) -> bool:
    """True when an MLflow server at `uri` answers its health endpoint within `timeout_s`."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class RunLog:
    """What a run records, into MLflow runs named by id: params (flattened, cut to MLflow's length
    limit), finite metrics, tags, pictures and files. A `Tracker`'s `log`; it starts and ends no run."""

    def __init__(self, client: Any):
        self.client = client

    def params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in _flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    def metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, step)
            for k, v in _flatten(metrics).items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def image(self, run_id: str, path: Path, key: str, step: int = 0) -> None:
        """A picture file as an MLflow image under `key` at `step` (the UI shows its steps on a slider)."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(run_id, image.convert("RGB"), key=key, step=step)

    def artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            elif path.exists():
                self.client.log_artifact(run_id, str(path), artifact_path)


class Tracker:
    """Parent/child MLflow runs behind plain methods, every call naming its run id: the runs'
    lifecycle here, what they record through `log` (a `RunLog`)."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        # MLflow prints a "View run" line per finished run against a server; it would break the
        # progress bars, and the parent run's address is logged once below instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow  # imported here: it is slow to import and optional for `tracking=off`
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # MLflow sets its loggers to INFO on import
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self._mlflow = mlflow
        with schema_lock(uri):  # a new mlflow.db: one process makes its tables and the experiment
            self.client = MlflowClient(tracking_uri=uri)
            self.log = RunLog(self.client)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
        self.parent_id: str | None = None

    # -- runs -------------------------------------------------------------------------------
    def _create_run(self, name: str, tags: Mapping[str, Any]) -> str:
        """A run with the tags `mlflow.start_run` would give it (user, source name and type, git
        commit/branch/repo URL of the entry script) from MLflow's own context providers."""
        from mlflow.tracking.context.registry import resolve_tags

        run = self.client.create_run(
            self.experiment_id, run_name=name, tags=resolve_tags({k: str(v) for k, v in tags.items()})
        )
        return run.info.run_id

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        self.parent_id = self._create_run(name, tags or {})
        self.log.params(self.parent_id, params)
        logger.info("MLflow: run %s in experiment %s at %s", self.parent_id, self.experiment_id, self.uri)
        return self.parent_id

    def resume_parent(self, run_id: str, params: Mapping[str, Any]) -> bool:
        """Continue the parent run `run_id` of an earlier process of the same calibration: RUNNING
        again, params it lacks added (MLflow params cannot change: a changed value becomes the tag
        `resumed.<param>`). False when this store has no such live run in this experiment."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
            return False
        self.client.update_run(run_id, status="RUNNING")
        old = run.data.params
        new = {k: str(v)[:_MAX_PARAM_CHARS] for k, v in _flatten(params).items()}
        self.log.params(run_id, {k: v for k, v in new.items() if k not in old})
        self.log.tags(run_id, {f"resumed.{k}": v for k, v in new.items() if k in old and old[k] != v})
        self.log.tags(run_id, {"resumed": int(run.data.tags.get("resumed", "0")) + 1})
        self.parent_id = run_id
        logger.info("MLflow: continuing run %s in experiment %s at %s", run_id, self.experiment_id, self.uri)
        return True

    def attach(self, parent_id: str) -> None:
        """Log trials as children of `parent_id`, a parent run another process started and ends."""
        self.parent_id = parent_id

    def address(self) -> TrackerAddress:
        return TrackerAddress(self.uri, self.experiment, self.artifact_location, self.parent_id)

    def start_child(self, name: str, params: Mapping[str, Any]) -> str:
        run_id = self._create_run(name, {"mlflow.parentRunId": self.parent_id} if self.parent_id else {})
        self.log.params(run_id, params)
        return run_id

    def close_children(self, parent_id: str, running_trials: Callable[[], Iterable[int]]) -> int:
        """Mark KILLED the child runs still RUNNING whose trial (param `trial`) is not among
        `running_trials()`: their process died. The runs are listed first and the study's running
        trials read after, so a trial that starts in between (its child run comes after it) is
        not taken for dead."""
        runs = self.client.search_runs(
            [self.experiment_id],
            max_results=10000,
            filter_string=(f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"),
        )
        running = set(running_trials())
        # A run without its `trial` param yet is being created right now: not dead.
        dead = [r.info.run_id for r in runs if "trial" in r.data.params and int(r.data.params["trial"]) not in running]
        for run_id in dead:
            self.end(run_id, status="KILLED")
        return len(dead)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run: FINISHED, FAILED (an error) or KILLED (interrupted, or its process died)."""
        self.client.set_terminated(run_id, status=status)


@dataclass(frozen=True)
class TrackerAddress:
    """Where a calibration tracks and its parent run: what a worker process needs to log its
    trials as children of that run (picklable, unlike a Tracker)."""

    uri: str
    experiment: str
    artifact_location: str | None
    parent_id: str | None

    def open(self) -> Tracker:
        tracker = Tracker(self.uri, self.experiment, self.artifact_location)
        if self.parent_id:
            tracker.attach(self.parent_id)
        return tracker


class NullRunLog:
    """A `NullTracker`'s `log`: same methods as `RunLog`, nothing recorded."""

    def params(self, run_id: str, params: Mapping[str, Any]) -> None: ...
    def metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None: ...
    def tags(self, run_id: str, tags: Mapping[str, Any]) -> None: ...
    def image(self, run_id: str, path: Path, key: str, step: int = 0) -> None: ...
    def artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None: ...


class NullTracker:
    """`tracking.enabled=false`: same methods, nothing recorded."""

    uri = None
    parent_id = None
    log = NullRunLog()

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        return ""

    def resume_parent(self, run_id: str, params: Mapping[str, Any]) -> bool:
        return False

    def attach(self, parent_id: str) -> None: ...

    def address(self) -> None:
        return None

    def start_child(self, name: str, params: Mapping[str, Any]) -> str:
        return ""

    def close_children(self, parent_id: str, running_trials: Callable[[], Iterable[int]]) -> int:
        return 0

    def end(self, run_id: str, status: str = "FINISHED") -> None: ...


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def open_tracker(cfg: TrackingConfig, run_dir: Path, launch_dir: Path | None = None) -> Tracker | NullTracker:
    """The tracker the config asks for, falling back to local tracking in `run_dir`."""
    if not cfg.enabled:
        return NullTracker()
    if cfg.uri is None:
        uri, artifacts = _local_store(launch_dir or Path.cwd())
        return Tracker(uri, cfg.experiment, artifacts)
    if cfg.uri.startswith(("http://", "https://")) and not server_answers(cfg.uri, cfg.probe_timeout_s):
        uri, artifacts = _local_store(run_dir)
        logger.warning(
            "MLflow server %s did not answer within %.1f s; tracking locally in %s instead",
            cfg.uri,
            cfg.probe_timeout_s,
            uri,
        )
        return Tracker(uri, cfg.experiment, artifacts)
    return Tracker(cfg.uri, cfg.experiment, _artifacts_beside(cfg.uri))


def _artifacts_beside(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to its file (MLflow's default is ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
    return None
