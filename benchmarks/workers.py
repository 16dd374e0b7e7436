"""Trials per minute of the calibration search with 1, 2, ... workers (`search.workers=N`).

    python -m benchmarks.workers --smoke                              # CPU, test-small: checks the tool
    python -m benchmarks.workers --workers 1 2 --n-trials 16 -- backbone=infinity-2b \\
        backbone.weights.transformer=... backbone.weights.vae=... backbone.weights.text_encoder=...

For each N it runs `python -m calibrate stages=[presample,search] search.workers=N tracking=off`
(plus the overrides after `--`) in a run folder of its own, then reads the study's trials:

* span — first trial start to last trial end; trials/min = COMPLETE trials / span;
* steady — after every worker has started its first trial (a child's start-up — imports, model,
  unpruned reference — runs while the coordinator pre-samples, and is left out here): the rate of
  trial completions, (k - 1) / (last - first) over the k completions after that moment.

Prints one markdown row per N and the speedup of each against the first N. The study, its trials
and each worker's log stay in the run folders (`--out`); a folder whose study is finished is read
again instead of rerun, so `--workers 1` and `--workers 1 2` can be two commands.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["backbone=test-small", "prompts.presample=1", "prompts.search=2", "prompts.validate=1"]


def run(workers: int, n_trials: int, overrides: list[str], out: Path) -> Path:
    run_dir = out / f"workers-{workers}"
    if (run_dir / "optuna.journal").exists() and rates(run_dir)["trials"] >= n_trials:
        print(f"  {workers} worker(s): reusing the finished study in {run_dir}", file=sys.stderr)
        return run_dir
    command = [
        sys.executable,
        "-m",
        "calibrate",
        "stages=[presample,search]",
        f"search.workers={workers}",
        f"search.n_trials={n_trials}",
        "tracking=off",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(
        command,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    print(f"  {workers} worker(s): {time.perf_counter() - started:.0f} s in all", file=sys.stderr)
    return run_dir


def rates(run_dir: Path) -> dict[str, float]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    done = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
    first_start: dict[int, float] = {}
    for trial in done:
        pid = trial.user_attrs["worker"]["pid"]
        first_start[pid] = min(first_start.get(pid, float("inf")), trial.datetime_start.timestamp())
    start = min(t.datetime_start.timestamp() for t in done)
    end = max(t.datetime_complete.timestamp() for t in done)
    all_started = max(first_start.values())
    steady = sorted(t.datetime_complete.timestamp() for t in done if t.datetime_complete.timestamp() > all_started)
    return {
        "workers_seen": len(first_start),
        "trials": len(done),
        "span_s": end - start,
        "per_min": 60 * len(done) / (end - start),
        "startup_s": all_started - start,
        "steady_per_min": (60 * (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_workers" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--smoke", action="store_true", help="test-small on the CPU (prompts 1/2/1, 8 trials)")
    parser.add_argument("overrides", nargs="*", help="python -m calibrate overrides (after --)")
    args = parser.parse_args()
    if args.smoke:
        from tests.backbones import use_test_backbones  # test-small is registered from the checkout only

        use_test_backbones()  # the calibrate subprocesses inherit it
    overrides = [*SMOKE, *args.overrides] if args.smoke else args.overrides
    n_trials = 8 if args.smoke else args.n_trials
    rows = [(n, rates(run(n, n_trials, overrides, args.out))) for n in args.workers]
    base = rows[0][1]
    print(
        "| workers | trials | span s | trials/min | worker start-up s | steady trials/min | speedup (span) "
        "| speedup (steady) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, r in rows:
        print(
            f"| {n} ({r['workers_seen']} ran trials) | {r['trials']} | {r['span_s']:.1f} | {r['per_min']:.2f} "
            f"| {r['startup_s']:.1f} | {r['steady_per_min']:.2f} | {r['per_min'] / base['per_min']:.2f}x "
            f"| {r['steady_per_min'] / base['steady_per_min']:.2f}x |"
        )


if __name__ == "__main__":
    main()
