"""MLflow tracking for a calibration: one parent run, one child run per Optuna trial.

Uses `MlflowClient` with explicit run ids (no fluent global state), so trials of several studies
or threads never log into the wrong run; every run still carries the source and git tags that
`mlflow.start_run` adds (MLflow's context providers resolve them). Local tracking by default (SQLite `mlflow.db` and
`mlruns/` in the launch directory); any tracking URI by override. A remote server is probed with a
short timeout first: if it does not answer, one warning line says so and the run tracks locally in
its run folder instead, with everything it would have sent.
"""
from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

from calibrate.config import TrackingConfig

log = logging.getLogger(__name__)

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


class Tracker:
    """Parent/child MLflow runs behind plain methods; every call names its run id."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        # MLflow prints a "View run" line per finished run against a server; it would break the
        # progress bars, and the parent run's address is logged once below instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow  # imported here: it is slow to import and optional for `tracking=off`
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # MLflow sets its loggers to INFO on import
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri = uri
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (found.experiment_id if found is not None else
                              self.client.create_experiment(experiment, artifact_location=artifact_location))
        self.parent_id: str | None = None

    # -- runs -------------------------------------------------------------------------------
    def _create_run(self, name: str, tags: Mapping[str, Any]) -> str:
        """A run with the tags `mlflow.start_run` would give it (user, source name and type, git
        commit/branch/repo URL of the entry script) from MLflow's own context providers."""
        from mlflow.tracking.context.registry import resolve_tags

        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags=resolve_tags({k: str(v) for k, v in tags.items()}))
        return run.info.run_id

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        self.parent_id = self._create_run(name, tags or {})
        self.log_params(self.parent_id, params)
        log.info("MLflow: run %s in experiment %s at %s", self.parent_id, self.experiment_id, self.uri)
        return self.parent_id

    def start_child(self, name: str, params: Mapping[str, Any]) -> str:
        run_id = self._create_run(name, {"mlflow.parentRunId": self.parent_id} if self.parent_id else {})
        self.log_params(run_id, params)
        return run_id

    def end(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    # -- data -------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in _flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step) for k, v in _flatten(metrics).items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_image(self, run_id: str, path: Path, key: str, step: int = 0) -> None:
        """A picture file as an MLflow image under `key` at `step` (the UI shows its steps on a slider)."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(run_id, image.convert("RGB"), key=key, step=step)

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            elif path.exists():
                self.client.log_artifact(run_id, str(path), artifact_path)


class NullTracker:
    """`tracking.enabled=false`: same methods, nothing recorded."""

    uri = None
    parent_id = None

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        return ""

    def start_child(self, name: str, params: Mapping[str, Any]) -> str:
        return ""

    def end(self, run_id: str, ok: bool = True) -> None: ...
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None: ...
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None: ...
    def log_image(self, run_id: str, path: Path, key: str, step: int = 0) -> None: ...
    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None: ...


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
        log.warning("MLflow server %s did not answer within %.1f s; tracking locally in %s instead",
                    cfg.uri, cfg.probe_timeout_s, uri)
        return Tracker(uri, cfg.experiment, artifacts)
    return Tracker(cfg.uri, cfg.experiment, _artifacts_beside(cfg.uri))


def _artifacts_beside(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to its file (MLflow's default is ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return None
