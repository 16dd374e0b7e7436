"""Several search workers in one calibration (`search.workers=N`): this process is worker 0 and
starts workers 1..N-1 as child processes — one per GPU (`cuda:k`, `cuda:k+1`, ...) or N processes
sharing the CPU cores. Every worker opens the same Optuna study and adds trials to it; the storage
is the only coordination (calibrate.search). This module only starts, watches and stops processes.

Why child processes started here rather than Hydra multirun with a launcher: a multirun job is a
whole app run per configuration — each would pre-sample, select and export on its own, and Hydra
has no step that runs once before and once after all jobs with the jobs' results (its callbacks
run in the launching process; the joblib and submitit launchers are extra plugins with their own
process model). What is needed is Optuna's own recipe for parallel optimization — several
processes sharing a storage — plus one pre-sampling before and one selection after, which a
parent process gives directly. On other machines the same worker is a plain
`python -m calibrate stages=[search] storage.url=postgresql+psycopg://...`.

The children are spawned (not forked: CUDA cannot be forked) while this process pre-samples, so
their start-up (imports, model, unpruned reference) overlaps it; they wait until `go()`. Ctrl-C
reaches every process of the terminal's group; SIGTERM to this process is passed on. Either way
each worker marks its running trial `interrupted` and ends its MLflow child run. A child killed
outright leaves its trial RUNNING; the next worker that looks fails it and queues it again
(calibrate.search.reclaim), and a warning here names the worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calibrate.config import CalibrationConfig
from calibrate.tracking import TrackerAddress
from toprovar.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 120.0  # after Ctrl-C, how long a worker may take to record its interrupted trial


def worker_devices(device: torch.device, workers: int) -> list[torch.device]:
    """The device of each worker: consecutive GPUs from the configured one, or the CPU for all."""
    if workers == 1 or device.type != "cuda":
        return [device] * workers
    first, visible = device.index or 0, torch.cuda.device_count()
    if first + workers > visible:
        raise UserError(
            f"search.workers={workers} needs GPUs cuda:{first}..cuda:{first + workers - 1} but "
            f"{visible} are visible; lower search.workers or set CUDA_VISIBLE_DEVICES"
        )
    return [torch.device("cuda", first + i) for i in range(workers)]


def use_device(cfg: CalibrationConfig) -> torch.device:
    """The configured device, made the current one: CUDA events (latency) and Triton kernels act on
    the current device, which is cuda:0 unless set — wrong for worker i on cuda:i. Caps torch's
    threads at the CPUs this process may use (a CPU quota is not what torch counts), and quiets the
    libraries' INFO logs."""
    import optuna

    from toprovar.models.registry import resolve_device

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cap_torch_threads()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def check_shared_storage(url: str | None, workers: int) -> None:
    """Several workers need a storage other processes can open (UserError), and SQLite is risky."""
    if workers > 1 and url is None:
        raise UserError(
            f"search.workers={workers} share the study through its storage, but storage=memory "
            f"keeps it inside one process; use the default storage=journal (or a database URL)"
        )
    if workers > 1 and url.startswith("sqlite"):
        logging.getLogger("calibrate").warning(
            "SQLite with %d workers: concurrent writers can fail with 'database is locked'; "
            "the default storage=journal (one host) or PostgreSQL are safe",
            workers,
        )


def _read(path: str) -> str:
    return Path(path).read_text()


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers
    limited to N cores often show every core of the host, and torch sizes its thread pool by
    those: 2 allowed cores running 16+ spinning threads)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = _read("/sys/fs/cgroup/cpu.max").split()
    except (OSError, ValueError):
        try:  # cgroup v1: quota -1 = none
            quota, period = (_read(f"/sys/fs/cgroup/cpu/cpu.cfs_{name}_us").strip() for name in ("quota", "period"))
        except OSError:
            quota, period = "max", "1"
    if quota not in ("max", "-1"):
        cpus = min(cpus, max(1, int(quota) // int(period)))
    return max(1, cpus)


def cap_torch_threads() -> int:
    """torch's intra-op threads at most `usable_cpus()` (the program sets them, not the user)."""
    cpus = usable_cpus()
    if torch.get_num_threads() > cpus:
        log.info("torch threads %d -> %d (the CPUs this process may use)", torch.get_num_threads(), cpus)
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def cpu_threads(device: torch.device, workers: int) -> int | None:
    """Threads per worker when N workers share the CPU cores (None: leave torch's default).

    GPU workers keep torch's default: capping their threads at cores / N did not move the 2-worker
    rate on the H200 pair (1.31x with the cap, 1.44x without, 12 trials each; docs/benchmarks.md)."""
    if device.type != "cpu" or workers == 1:
        return None
    return max(1, usable_cpus() // workers)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a child worker needs (picklable): the calibration's config on its own device."""

    cfg: CalibrationConfig
    run_dir: Path
    launch_dir: Path
    overrides: list[str]
    index: int
    threads: int | None
    tracking: TrackerAddress | None


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt once; later ones are ignored, so the cleanup
    after the first (recording the interrupted trial, ending MLflow runs) is not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# What a child worker runs: `work(spec, released, orphaned)` (calibrate.app.run_search_worker); passed
# in rather than imported, so this module does not import the app that imports it.
WorkerBody = Callable[[WorkerSpec, Callable[[], bool], Callable[[], bool]], None]


class WorkerPool:
    """Child workers 1..N-1 of a calibration: start, release (`go`), watch, stop."""

    def __init__(self, specs: list[WorkerSpec], work: WorkerBody):
        context = multiprocessing.get_context("spawn")
        self._go = context.Event()
        self.processes = [
            context.Process(target=_child_main, args=(spec, self._go, work), name=f"calibrate-worker-{spec.index}")
            for spec in specs
        ]
        self.indices = [spec.index for spec in specs]
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> WorkerPool:
        with _environment(TQDM_DISABLE="1"):  # one progress bar (this process's) for the whole study
            for process in self.processes:
                process.start()
        log.info(
            "started %d more search worker(s): %s",
            len(self.processes),
            ", ".join(f"{i} (pid {p.pid})" for i, p in zip(self.indices, self.processes)),
        )
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self

    def go(self) -> None:
        """Let the workers start trials (the study is prepared and has its pre-sampling summary)."""
        self._go.set()

    def _watch(self) -> None:
        pending = {p.sentinel: (i, p) for i, p in zip(self.indices, self.processes)}
        while pending:
            for sentinel in multiprocessing.connection.wait(list(pending)):
                index, process = pending.pop(sentinel)
                process.join()
                if process.exitcode == 130:
                    log.info("search worker %d (pid %d) stopped after an interruption", index, process.pid)
                elif process.exitcode not in (0, None):
                    how = (
                        f"was killed by {signal.Signals(-process.exitcode).name}"
                        if process.exitcode < 0
                        else f"exited with status {process.exitcode}"
                    )
                    log.warning(
                        "search worker %d (pid %d) %s; a trial it was running is queued again by the other workers",
                        index,
                        process.pid,
                        how,
                    )

    def finish(self) -> None:
        """Wait for the workers: they stop by themselves once the study is complete (or at
        `search.timeout_s`)."""
        for process in self.processes:
            process.join()
        if self._watcher is not None:
            self._watcher.join()

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        """Normal end: `finish`. After an error or an interruption: ask the workers to stop
        (SIGTERM: they record their trial as interrupted), wait a while, then kill."""
        if kind is None:
            self.finish()
            return
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                log.warning("search worker pid %d did not stop within %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.join()
        if self._watcher is not None:
            self._watcher.join()


class NoPool:
    """`search.workers=1`: this process is the only worker."""

    def __enter__(self) -> NoPool:
        return self

    def go(self) -> None: ...

    def finish(self) -> None: ...

    def __exit__(self, *exc: Any) -> None: ...


def start_workers(
    cfg: CalibrationConfig,
    devices: list[torch.device],
    run_dir: Path,
    launch_dir: Path,
    overrides: list[str],
    tracking: TrackerAddress | None,
    work: WorkerBody,
) -> WorkerPool | NoPool:
    """The pool of child workers 1..N-1 (a context manager); worker 0 is the calling process. `work` is
    what a child runs (a module-level function, so the spawned process can import it)."""
    if len(devices) == 1:
        return NoPool()
    threads = cpu_threads(devices[0], len(devices))
    return WorkerPool(
        [
            WorkerSpec(
                dataclasses.replace(cfg, device=str(device)), run_dir, launch_dir, overrides, index, threads, tracking
            )
            for index, device in enumerate(devices)
            if index > 0
        ],
        work,
    )


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- in the child process ----------------------------------------------------------------------
def _child_main(spec: WorkerSpec, go: Any, work: WorkerBody) -> None:
    """A child worker: log to workers/worker-<i>.log (warnings also to stderr), run the search."""
    folder = spec.run_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(folder / f"worker-{spec.index}.log")
    to_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    to_stderr.setFormatter(logging.Formatter(f"[worker {spec.index}][%(levelname)s] %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_stderr], force=True)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)

    def released() -> bool:
        """Wait for the coordinator's go; False when it died first."""
        parent = multiprocessing.parent_process()
        while not go.wait(1.0):
            if parent is not None and not parent.is_alive():
                return False
        return True

    try:
        with interrupt_on_signals(), exit_on_user_error(f"calibrate worker {spec.index}"):
            work(spec, released, orphaned)
    except KeyboardInterrupt:
        logging.getLogger(__name__).info("worker %d interrupted", spec.index)
        sys.exit(130)


def orphaned() -> bool:
    """True in a child worker whose coordinator is gone (killed): it starts no more trials."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()
