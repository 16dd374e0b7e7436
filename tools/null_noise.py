"""Null noise of the geneval-lite scores on `tiny`: how much the paired drop moves with no pruning.

    python tools/null_noise.py                                   # 192 fresh prompts, ~6 generation passes
    python tools/null_noise.py --prompts 96 --policies tiny docs/policies/tiny/s7_a35-65_edge.yaml

Generates the same fresh prompts (scenes never used by a calibration: `--seed`) unpruned at the
backbone's guidance scale (the reference), then under null perturbations — guidance 3.05 instead
of 3.0, and other seed sets (+1000, +2000) — and optionally with pruning policies, and prints per
condition and per geneval-lite score (binary success; share of the prompt's checks) the paired
per-prompt differences against the reference: mean drop, their SD, the standard error at n, the
prompts lost / won, the number of prompts a one-sided 95 % t bound needs to be 0.01 above the
mean, and the upper bound acceptance would put on the drop from this sample (one look, 95 %);
then, per condition and score, how often the sequential acceptance rule would accept it under a
few budget/batch plans (bootstrap of the measured per-prompt drops). SSIM against the reference
image is reported beside them. The per-prompt values land in
`<out>/per_prompt.csv` (one file per condition while running, so an interrupted run keeps what it
measured and a rerun with the same arguments skips finished conditions), the table in `<out>/null_noise.md`.
A measurement command, not a test (docs/benchmarks.md, "Null noise of the geneval-lite scores").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from calibrate.acceptance import Criterion, SequentialTest, mean_bounds
from calibrate.backend import CalibrationBackend, load_backend
from calibrate.quality import ssim_per_image
from toprovar.policy import load_policy
from toprovar.tiny.evaluate import geneval_lite_scores
from toprovar.tiny.scenes import sample_scenes

SCORES = ("binary", "share")


def _conditions(args: argparse.Namespace) -> list[tuple[str, dict, int, str | None]]:
    """(label, generation settings, seed offset, policy) per condition; the reference first."""
    base = {} if args.guidance is None else {"cfg": args.guidance}
    rows = [("reference", base, 0, None), (f"guidance {args.null_guidance}", {"cfg": args.null_guidance}, 0, None)]
    rows += [(f"seeds +{k}", base, k, None) for k in args.seed_offsets]
    rows += [(f"policy {p}", base, 0, p) for p in args.policies]
    return rows


def _measure(
    backend: CalibrationBackend, scenes, seeds: list[int], settings: dict, policy
) -> tuple[torch.Tensor, dict]:
    run = dataclasses.replace(backend, settings={**backend.settings, **settings})
    gen = run.generate([s.caption for s in scenes], seeds, policy=policy, desc="generate")
    binary, share = geneval_lite_scores(gen.images, scenes)
    return gen.images, {"binary": binary, "share": share}


def _summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (condition, score): paired drop statistics against the reference."""
    ref = frame[frame.condition == "reference"].set_index("prompt")
    rows = []
    for condition, part in frame[frame.condition != "reference"].groupby("condition", sort=False):
        part = part.set_index("prompt")
        n = len(part)
        for name in SCORES:
            diff = ref.loc[part.index, name].to_numpy() - part[name].to_numpy()  # > 0: the condition lost
            sd = float(diff.std(ddof=1))
            rows.append(
                {
                    "condition": condition,
                    "score": name,
                    "n": n,
                    "mean": float(part[name].mean()),
                    "drop": float(diff.mean()),
                    "sd": sd,
                    "se": sd / math.sqrt(n),
                    "lost": int((diff > 0).sum()),
                    "won": int((diff < 0).sum()),
                    "n_for_0.01": math.ceil((1.645 * sd / 0.01) ** 2),
                    # The acceptance bound this one sample would give (one look, 95 %).
                    "upper_95": float(mean_bounds(diff, 0.05, whole_prompts=True)[1]),
                    "ssim": float(part.ssim.mean()),
                }
            )
    return pd.DataFrame(rows)


def _power(frame: pd.DataFrame, plans: list[tuple[int, int]], margin: float, rows: int = 4000) -> pd.DataFrame:
    """How often the sequential rule (confidence 0.95, `margin`) accepts each condition, and after
    how many prompts on average, resampling its measured per-prompt drops (bootstrap, seed 0)."""
    rng = np.random.default_rng(0)
    ref = frame[frame.condition == "reference"].set_index("prompt")
    out = []
    for condition, part in frame[frame.condition != "reference"].groupby("condition", sort=False):
        for name in SCORES:
            diff = ref.loc[part.prompt, name].to_numpy() - part[name].to_numpy()
            row = {"condition": condition, "score": name}
            for budget, batch in plans:
                test = SequentialTest((Criterion("geneval_drop", margin, whole_prompts=True),), 0.95, batch, budget)
                decision, used = test.simulate({"geneval_drop": rng.choice(diff, (rows, budget))})
                row[f"{budget}/{batch}"] = f"{(decision == 'accept').mean():.2f} ({used.mean():.0f})"
            out.append(row)
    return pd.DataFrame(out)


def _markdown(table: pd.DataFrame) -> str:
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = [list(table.columns), ["---"] * len(table.columns), *cells]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--seed", type=int, default=20280101, help="scene seed (fresh: no calibration uses it)")
    parser.add_argument("--guidance", type=float, default=None, help="reference guidance scale (default: backbone's)")
    parser.add_argument("--null-guidance", type=float, default=3.05)
    parser.add_argument("--seed-offsets", type=int, nargs="*", default=[1000, 2000])
    parser.add_argument("--policies", nargs="*", default=[], help="policy names or YAML paths to compare")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--margin", type=float, default=0.02, help="acceptance margin for the power table")
    parser.add_argument(
        "--plans",
        nargs="*",
        default=["288:96", "384:128", "384:192", "576:192"],
        help="budget:batch of the sequential plans in the power table",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/null_noise"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    backend = load_backend({"name": "tiny", "weights": {}}, torch.device("cpu"), None, batch_size=args.batch_size)
    policies = {p: load_policy(p, "tiny") for p in args.policies}  # fail before any generation
    scenes = sample_scenes(args.prompts, seed=args.seed)
    seeds = [args.seed + i for i in range(args.prompts)]
    reference = None
    parts = []
    for index, (label, settings, offset, policy) in enumerate(_conditions(args)):
        path = args.out / f"condition_{index}.csv"
        ref_path = args.out / "reference_images.npy"
        if path.exists() and (index > 0 or ref_path.exists()):
            print(f"{label}: reusing {path}")
            parts.append(pd.read_csv(path))
            if index == 0:
                reference = torch.from_numpy(np.load(ref_path))
            continue
        print(f"{label}: generating {args.prompts} images")
        images, scores = _measure(
            backend, scenes, [s + offset for s in seeds], settings, None if policy is None else policies[policy]
        )
        if index == 0:
            reference = images
            np.save(ref_path, images.numpy())
        part = pd.DataFrame(
            {
                "condition": label,
                "prompt": range(args.prompts),
                "seed": [s + offset for s in seeds],
                "category": [s.kind for s in scenes],
                "caption": [s.caption for s in scenes],
                **scores,
                "ssim": ssim_per_image(images, reference).numpy(),
            }
        )
        part.to_csv(path, index=False)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    frame.to_csv(args.out / "per_prompt.csv", index=False)
    table = _summary(frame)
    header = (
        f"{dt.date.today()}, {args.prompts} prompts (scene seed {args.seed}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n\n"
    )
    power = _power(frame, [tuple(int(x) for x in plan.split(":")) for plan in args.plans], args.margin)
    (args.out / "null_noise.md").write_text(header + _markdown(table) + "\n" + _markdown(power))
    print(header + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nacceptance at margin {args.margin}, 95 %: share of bootstrap validations accepted (mean prompts used)")
    print(power.to_string(index=False))


if __name__ == "__main__":
    main()
