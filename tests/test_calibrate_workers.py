"""`python -m calibrate search.workers=N`, and workers on several machines through PostgreSQL: the
study ends with exactly n_trials COMPLETE trials, none repeated or lost, all under one MLflow parent
run; a worker killed with SIGKILL mid-trial has its trial run once more.

Kills land deterministically: with CALIBRATE_TEST_HOLD=trial every worker process stops in its
first trial (after drawing the parameters and opening its MLflow child run) and writes its pid to
$CALIBRATE_TEST_HOLD_DIR/trial-<worker>.pid; the test kills one and lets the others go on by
deleting their files (calibrate.search.hold_for_crash_test).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 600  # a guard against a hung process, not a speed claim

# A small calibration of the random-weight test backbone; min_ssim 0 so every trial is feasible. One
# held-out prompt cannot decide the acceptance bound, so the export is marked not validated (exit 3).
# FLOPs rank the trials: on test-small's few tiny tensors the predicted wall clock can put every
# pruned trial below the unpruned model, and these tests are about processes, not the objective.
SMALL = [
    "backbone=test-small",
    "prompts.presample=1",
    "prompts.search=1",
    "prompts.validate=1",
    "search.validate_candidates=1",
    "search.constraints.min_ssim=0.0",
    "search.objective=flops",
    "tracking=local",
]


class Calibrate:
    """A `python -m calibrate` process (output in files: a full pipe must not block it)."""

    def __init__(self, cwd: Path, *overrides: str, hold: str | None = None, hold_dir: Path | None = None):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if hold is not None:
            hold_dir.mkdir(parents=True, exist_ok=True)
            env.update(CALIBRATE_TEST_HOLD=hold, CALIBRATE_TEST_HOLD_DIR=str(hold_dir))
        self.hold_dir = hold_dir
        self.log = Path(tempfile.mkstemp(dir=cwd, prefix="calibrate-", suffix=".log")[1])
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "calibrate", *overrides], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text()

    def held(self, name: str) -> int:
        """Wait until a process of this calibration holds at `name` (e.g. trial-1); its pid."""
        marker = self.hold_dir / f"{name}.pid"
        deadline = time.monotonic() + HANG_GUARD_S
        while not (marker.exists() and marker.read_text()):
            if self.process.poll() is not None:
                pytest.fail(
                    f"calibrate exited ({self.process.returncode}) before holding at {name}:\n{self.output()[-4000:]}"
                )
            assert time.monotonic() < deadline, f"nothing held at {name}:\n{self.output()[-4000:]}"
            time.sleep(0.1)
        return int(marker.read_text())

    def release(self, name: str) -> None:
        (self.hold_dir / f"{name}.pid").unlink()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"calibrate did not finish:\n{self.output()[-4000:]}")


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # gone, or a zombie of its parent
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.05)


def study_trials(storage: str | optuna.storages.BaseStorage, name: str = "test-small") -> list:
    if isinstance(storage, str) and storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(storage[len("journal:") :]))
    return optuna.load_study(study_name=name, storage=storage).trials


def check_trials(trials: list, n_trials: int, killed: list[int]) -> list:
    """Exactly n_trials COMPLETE, nothing RUNNING or queued, no finished trial repeated, and each
    killed trial (FAIL) run once more with its parameters. Returns the COMPLETE trials."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == n_trials
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({tuple(sorted(t.params.items())) for t in done}) == n_trials  # no two alike
    for number in killed:
        assert trials[number].state == TrialState.FAIL
        retries = [t for t in trials if t.system_attrs.get("replaces") == number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == trials[number].params
    failed = {t.number for t in trials if t.state == TrialState.FAIL}
    assert failed == set(killed)
    return done


def mlflow_runs(store: Path) -> tuple[object, list]:
    """The one parent run of the calibration and its children (the store holds nothing else)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def check_children(children: list, trials: list) -> None:
    """One child run per trial that drew parameters: FINISHED when the trial completed, KILLED when
    its process was killed; none left RUNNING."""
    status = {int(r.data.params["trial"]): r.info.status for r in children}
    assert len(status) == len(children)
    expected = {t.number: "FINISHED" if t.state == TrialState.COMPLETE else "KILLED" for t in trials if t.params}
    assert status == expected


def test_workers_share_one_journal_study_and_survive_a_killed_worker(tmp_path):
    """search.workers=3 on CPU: worker 2 is killed in its first trial; workers 0 and 1 finish the study."""
    n_trials = random.randint(5, 7)
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    calibrate = Calibrate(
        tmp_path,
        *SMALL,
        f"search.n_trials={n_trials}",
        "search.workers=3",
        f"seed={random.randrange(1000)}",
        f"hydra.run.dir={run_dir}",
        hold="trial",
        hold_dir=hold,
    )
    pids = {worker: calibrate.held(f"trial-{worker}") for worker in range(3)}  # three trials running at once
    kill(pids[2])
    calibrate.release("trial-0")
    calibrate.release("trial-1")
    assert calibrate.wait() == 3, calibrate.output()[-4000:]  # exported, not validated: 1 held-out prompt
    output = calibrate.output()
    assert f"search worker 2 (pid {pids[2]}) was killed by SIGKILL" in output

    trials = study_trials(f"journal:{run_dir / 'optuna.journal'}")
    killed = [t.number for t in trials if t.user_attrs.get("worker", {}).get("pid") == pids[2]]
    assert len(killed) == 1
    done = check_trials(trials, n_trials, killed)
    by_worker = {t.user_attrs["worker"]["pid"] for t in done}
    assert by_worker == {pids[0], pids[1]}  # both survivors added trials
    assert sum(bool(t.user_attrs.get("warm_start")) for t in trials) == 1
    assert (run_dir / "policy.yaml").exists() and (run_dir / "workers" / "worker-1.log").exists()

    parent, children = mlflow_runs(tmp_path / "mlflow.db")
    assert parent.info.status == "FINISHED"
    check_children(children, trials)


# --- several machines: PostgreSQL ----------------------------------------------------------------
def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server from the distribution's package on a free loopback port, in a temporary
    data folder (as the `postgres` user when running as root: the server refuses root); stopped after."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg", reason="PostgreSQL driver not installed: pip install -e '.[postgres]'")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="calibrate-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to start the server as")
        os.chmod(folder, 0o755)
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def run(*args):
        return subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)

    init = run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")
    assert init.returncode == 0, init.stderr
    start = run(
        bin_dir / "pg_ctl",
        "-D",
        data,
        "-l",
        folder / "server.log",
        "-w",
        "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off",
        "start",
    )
    assert start.returncode == 0, start.stderr + (folder / "server.log").read_text()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_machines_share_a_study_through_postgresql(tmp_path, postgres):
    """The multi-host recipe on one host: one full calibration and one `stages=[search]` worker,
    separate processes and run folders, one PostgreSQL study; the joining worker waits for the
    pre-sampling summary, both add trials, the first selects and exports."""
    n_trials = random.randint(4, 6)
    common = [
        *SMALL,
        f"search.n_trials={n_trials}",
        f"storage.url={postgres}",
        "study_name=two-hosts",
        f"seed={random.randrange(1000)}",
    ]
    joiner = Calibrate(
        tmp_path,
        *common,
        "stages=[search]",
        f"hydra.run.dir={tmp_path / 'joiner'}",
        hold="trial",
        hold_dir=tmp_path / "hold-joiner",
    )  # started first: it waits
    main = Calibrate(
        tmp_path, *common, f"hydra.run.dir={tmp_path / 'main'}", hold="trial", hold_dir=tmp_path / "hold-main"
    )
    pids = [main.held("trial-0"), joiner.held("trial-0")]  # both in a trial at once
    main.release("trial-0")
    joiner.release("trial-0")
    assert joiner.wait() == 0, joiner.output()[-4000:]
    assert main.wait() == 3, main.output()[-4000:]  # exported, not validated: 1 held-out prompt
    assert "waiting for study 'two-hosts' to get its pre-sampling summary" in joiner.output()

    trials = study_trials(postgres, "two-hosts")
    done = check_trials(trials, n_trials, killed=[])
    assert {t.user_attrs["worker"]["pid"] for t in done} == set(pids)
    assert (tmp_path / "main" / "policy.yaml").exists() and not (tmp_path / "joiner" / "policy.yaml").exists()
    parent, children = mlflow_runs(tmp_path / "mlflow.db")  # the joiner logged into the main run's parent
    assert parent.info.status == "FINISHED"
    check_children(children, trials)


# --- one study, several processes (docs/calibration.md, "One study, several processes") -----------
def _two_at_once(tmp_path: Path, url: str, study: str) -> None:
    """Two full calibrations of one study started at the same moment, with a fresh MLflow store: one
    coordinates (searches, exports; exit 3: one held-out prompt cannot validate), the other is
    refused in one line naming it, before any weights load, leaving no run folder."""
    n_trials = random.randint(2, 3)
    common = [*SMALL, f"search.n_trials={n_trials}", f"storage.url={url}", f"study_name={study}"]
    runs = [Calibrate(tmp_path, *common, f"hydra.run.dir={tmp_path / f'run-{i}'}") for i in range(2)]
    codes = [run.wait() for run in runs]
    assert sorted(codes) == [2, 3], [run.output()[-3000:] for run in runs]
    winner, loser = (0, 1) if codes[0] == 3 else (1, 0)
    output = runs[loser].output()
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert "Traceback" not in output and len(errors) == 1, output
    assert errors[0].startswith(f"calibrate: error: study '{study}'")
    assert f"is being calibrated by process {runs[winner].process.pid} on {socket.gethostname()}" in errors[0]
    assert not (tmp_path / f"run-{loser}").exists()
    assert (tmp_path / f"run-{winner}" / "policy.yaml").exists()

    trials = study_trials(url, study)
    check_trials(trials, n_trials, killed=[])
    parent, children = mlflow_runs(tmp_path / "mlflow.db")  # one parent run: the loser opened none
    assert parent.info.status == "FINISHED"
    check_children(children, trials)


def test_two_calibrations_at_once_on_a_fresh_sqlite_study(tmp_path):
    _two_at_once(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}", "shared")


def test_two_calibrations_at_once_on_postgresql(tmp_path, postgres):
    _two_at_once(tmp_path, postgres, "shared-pg")


_OPEN_FRESH_STORES = """
import os, sys, time
from pathlib import Path
import mlflow
from calibrate.config import StorageConfig
from calibrate.search import open_study
from calibrate.tracking import Tracker
go, folder, url = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
Path(folder, f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.002)
Tracker(f"sqlite:///{folder}/mlflow.db", "race")
open_study("race", StorageConfig(url, 10, 60), "tpe", 0, 4)
"""


@pytest.mark.parametrize("optuna_db", ["sqlite", "postgresql"])
def test_processes_opening_fresh_databases_at_once_get_no_traceback(tmp_path, request, optuna_db):
    """Three processes open the same fresh MLflow store and Optuna database at one moment (imports
    done, then released together): each opens them, none fails in the schema race."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if optuna_db == "sqlite" else request.getfixturevalue("postgres")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_FRESH_STORES, str(go), str(tmp_path), url],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    deadline = time.monotonic() + HANG_GUARD_S
    while len(list(tmp_path.glob("ready-*"))) < len(started):  # imports done: all wait for `go`
        assert time.monotonic() < deadline and all(p.poll() is None for p in started)
        time.sleep(0.05)
    go.touch()
    for process in started:
        _, err = process.communicate(timeout=HANG_GUARD_S)
        assert process.returncode == 0, err[-3000:]
    from mlflow.tracking import MlflowClient

    assert [e.name for e in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()].count("race") == 1
    assert len(optuna.get_all_study_names(url)) == 1


@pytest.mark.parametrize(
    ("files", "affinity", "expected"),
    [
        ({"/sys/fs/cgroup/cpu.max": "200000 100000\n"}, 16, 2),  # cgroup v2 quota of 2 CPUs on a 16-core host
        ({"/sys/fs/cgroup/cpu.max": "max 100000\n"}, 16, 16),  # no quota
        ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "150000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 8, 1),
        ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 4, 4),
        ({}, 3, 3),  # no cgroup files: the affinity mask
    ],
)
def test_usable_cpus_follow_the_cgroup_quota_and_torch_is_capped(monkeypatch, files, affinity, expected):
    import torch

    import calibrate.workers as workers

    def read(path):
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    monkeypatch.setattr(workers, "_read", read)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert workers.usable_cpus() == expected
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(expected + 3)
        assert workers.cap_torch_threads() == expected
    finally:
        torch.set_num_threads(before)
