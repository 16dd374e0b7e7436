"""Benchmark (CPU): fit the search's cost model (calibrate.cost_model) for `tiny` and check it on
policies it was not fitted on; prints the coefficients for `toprovar/conf/backbone/tiny.yaml`.

    python -m benchmarks.cost_model [--batches 2] [--fit-policies 4] [--test-policies 8] [--seed 0]

Generations of batch 8 on the scene captions: for the fit, the unpruned model, the unpruned model
with entropy at every block, and `--fit-policies` random policies of the default search space
(calibrate.knobs.SearchSpace.random_params, around the shipped policy's pre-sampling summary); for the
check, `--test-policies` other random policies, each against the unpruned runs of the same prompts
(measured before and after them). Prints a table of measured vs predicted speedups, the mean and
largest error, then the model fitted on every call (what the backbone config stores). One JSON
object with the meta (device, threads, versions, date, command) goes to `--json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import toprovar.openmp  # noqa: F401  (first: OpenMP's spin-wait as the command lines set it)
from toprovar.environment import run_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=2, help="batches of 8 prompts per policy")
    parser.add_argument("--fit-policies", type=int, default=4)
    parser.add_argument("--test-policies", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import numpy as np
    import yaml
    from omegaconf import OmegaConf

    from calibrate.cost_model import fit_cost_model
    from calibrate.knobs import PolicyFactory, SearchSpace
    from calibrate.presample import PresampleSummary
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate
    from toprovar.policy import POLICY_DIR
    from toprovar.tiny import scenes

    root = Path(__file__).resolve().parents[1]
    shipped = yaml.safe_load((POLICY_DIR / "tiny.yaml").read_text())
    summary = PresampleSummary.from_json(shipped["provenance"]["presample"])
    space_cfg = OmegaConf.to_container(OmegaConf.load(root / "toprovar/conf/search/default.yaml").space)
    space, factory = SearchSpace.from_config(space_cfg, summary), PolicyFactory(summary, "tiny")
    draws = space.random_params(args.seed)
    backbone = build_backbone("tiny", device="cpu")
    spec = backbone.spec
    n = 8 * args.batches
    captions = [scenes.scene_caption(s) for s in scenes.sample_scenes(2 * n, args.seed)]

    def run(policy=None, part=0, **kw):
        texts, seeds = captions[part * n : (part + 1) * n], list(range(part * n, (part + 1) * n))
        return [
            generate(backbone, texts[i : i + 8], seeds[i : i + 8], policy=policy, **kw).trace for i in range(0, n, 8)
        ]

    run()  # warm-up: first-call allocations
    fit_calls = run() + run(record_entropy=True)
    for _ in range(args.fit_policies):
        fit_calls += run(factory(next(draws)))
    fit = fit_cost_model(fit_calls, spec, fitted_on="benchmarks.cost_model")
    model = fit.model
    before = run(part=1)
    tested = [run(factory(next(draws)), part=1) for _ in range(args.test_policies)]
    after = run(part=1)
    unpruned_ms = np.mean([t.total_ms for t in before + after])
    predicted_unpruned = np.mean([model.predict_ms(t, spec) for t in before + after])
    rows = []
    for traces in tested:
        measured = unpruned_ms / np.mean([t.total_ms for t in traces])
        predicted = predicted_unpruned / np.mean([model.predict_ms(t, spec) for t in traces])
        rows.append({"measured": measured, "predicted": predicted, "error": predicted / measured - 1.0})
    every = fit_cost_model(fit_calls + before + after + [t for ts in tested for t in ts], spec, "benchmarks.cost_model")
    print(f"{'measured':>9} {'predicted':>9} {'error':>7}")
    for row in rows:
        print(f"{row['measured']:9.2f} {row['predicted']:9.2f} {row['error']:+7.1%}")
    errors = np.abs([r["error"] for r in rows])
    print(f"speedup error on {len(rows)} unseen policies: mean {errors.mean():.1%}, largest {errors.max():.1%}")
    print(
        f"unpruned runs before / after the policies: {np.mean([t.total_ms for t in before]):.0f} / "
        f"{np.mean([t.total_ms for t in after]):.0f} ms a batch of 8 (the machine's drift)"
    )
    stored = {k: float(f"{v:.3g}") for k, v in every.model.to_json().items() if k != "fitted_on"}
    print("# fitted on every call (toprovar/conf/backbone/tiny.yaml, cost_model:)")
    print(yaml.safe_dump({"cost_model": stored}, sort_keys=False))
    result = {
        "meta": run_record("python -m benchmarks.cost_model", device="cpu"),
        "fit_on_fit_calls": {**model.to_json(), "mean_abs_error": fit.mean_abs_error},
        "unseen_policies": rows,
        "fit_on_every_call": {**every.model.to_json(), "mean_abs_error": every.mean_abs_error},
        "stored": stored,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
