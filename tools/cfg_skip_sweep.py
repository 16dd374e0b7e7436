"""CFG skip on `tiny`: what dropping the unconditional rows from scale s on does to the images.

    python -m tools.cfg_skip_sweep                      # 96 fresh prompts, every starting scale, CPU
    python -m tools.cfg_skip_sweep --prompts 16 --scales 8,9,10 --out /tmp/sweep   # a quick look

For every starting scale s of the schedule (and "never", the unpruned baseline) the same prompts
and seeds are generated with the policy `{method: none, guidance: {skip_uncond_from_scale: s}}`
(`python -m toprovar compare methods=[cfg_skip:s]` runs one such row). Reported per s: FLOP
speedup (`toprovar.flops`, executed / unpruned transformer FLOPs; exact, no noise), SSIM against
the baseline image of the same prompt and seed (mean ± standard error over prompts),
geneval-lite (`toprovar.metrics.geneval_scorer`: `binary`, every check of the caption holds, and
`share`, the share of its checks that hold) and each one's paired difference to the baseline
(mean ± standard error of the per-prompt differences; "+/−": prompts whose binary score went up /
down). Images of each setting are
kept in `--out` (`images_<s>.pt`), so an interrupted sweep resumes where it stopped. Prints a
markdown table and writes it with the per-prompt rows (CSV) and a JSON summary into `--out`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

import torch


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.cfg_skip_sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=96, help="fresh tiny scene prompts (default 96)")
    ap.add_argument("--prompt-seed", type=int, default=20261201, help="scene sampler seed (default 20261201)")
    ap.add_argument("--scales", default=None, help="comma-separated starting scales (default: every scale)")
    ap.add_argument("--batch", type=int, default=16, help="images per generate call (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    ap.add_argument("--out", default="outputs/cfg_skip_sweep", help="folder for images and tables")
    return ap.parse_args(argv)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), se


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    import toprovar.tiny  # noqa: F401  (registers the tiny backbone)
    from toprovar.flops import trace_flops
    from toprovar.metrics import geneval_scorer, ssim
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate
    from toprovar.policy import policy_from_dict
    from toprovar.tiny.scenes import sample_scenes

    torch.set_num_threads(args.threads)
    backbone = build_backbone("tiny", device="cpu")
    n_scales = len(backbone.spec.schedules.scale_schedule(1.0, backbone.spec.pixels))
    scales = list(range(n_scales)) if args.scales is None else [int(s) for s in args.scales.split(",")]
    scenes = sample_scenes(args.prompts, seed=args.prompt_seed)
    prompts, seeds = [s.caption for s in scenes], list(range(args.prompts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def images_of(skip: int | None) -> tuple[torch.Tensor, float, float]:
        """Images, executed and unpruned FLOPs of one setting (from `out` when already generated)."""
        path = out / f"images_{'never' if skip is None else skip}.pt"
        if path.exists():
            saved = torch.load(path)
            if saved["prompts"] == prompts and saved["seeds"] == seeds:
                return saved["images"], saved["executed"], saved["unpruned"]
        policy = policy_from_dict({"method": "none", "guidance": {"skip_uncond_from_scale": skip}})
        images, executed, unpruned = [], 0.0, 0.0
        for start in tqdm(range(0, len(prompts), args.batch), desc=f"skip from {skip}", leave=False):
            res = generate(
                backbone, prompts[start : start + args.batch], seeds[start : start + args.batch], policy=policy
            )
            images.append(res.images)
            e, u = trace_flops(res.trace)
            executed, unpruned = executed + e, unpruned + u
        images = torch.cat(images)
        torch.save(
            {"prompts": prompts, "seeds": seeds, "images": images, "executed": executed, "unpruned": unpruned}, path
        )
        return images, executed, unpruned

    score = geneval_scorer("tiny")
    base, _, _ = images_of(None)
    base_g = {k: v.tolist() for k, v in score(base, scenes).items()}
    rows, per_prompt = [], []
    for skip in tqdm([None, *scales], desc="settings"):
        images, executed, unpruned = images_of(skip)
        s = ssim(images, base).tolist()
        g = {k: v.tolist() for k, v in score(images, scenes).items()}
        row = {"skip_uncond_from_scale": "never" if skip is None else skip, "flop_speedup": unpruned / executed}
        row["ssim"], row["ssim_se"] = mean_se(s)
        for kind, values in g.items():
            diff = [a - b for a, b in zip(values, base_g[kind])]
            row[kind], row[f"{kind}_se"] = mean_se(values)
            row[f"{kind}_diff"], row[f"{kind}_diff_se"] = mean_se(diff)
            if kind == "binary":
                row["up"], row["down"] = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
        rows.append(row)
        per_prompt += [
            {
                "skip_uncond_from_scale": row["skip_uncond_from_scale"],
                "prompt": p,
                "seed": sd,
                "ssim": a,
                **{kind: g[kind][i] for kind in g},
            }
            for i, (p, sd, a) in enumerate(zip(prompts, seeds, s))
        ]
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join(["python -m tools.cfg_skip_sweep", *sys.argv[1:]]),
        "backbone": "tiny",
        "scales": n_scales,
        "guidance_scale": backbone.spec.guidance_scale,
        "prompts": len(prompts),
        "prompt_seed": args.prompt_seed,
        "seeds": f"0..{len(prompts) - 1}",
        "rows": rows,
        "per_prompt": per_prompt,
    }


def markdown(result: dict) -> str:
    lines = [
        "| CFG skip from scale | FLOP speedup | SSIM vs unpruned (± SE) | geneval-lite binary "
        "| Δ binary (± SE) | prompts +/− | geneval-lite share | Δ share (± SE) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['skip_uncond_from_scale']} | {r['flop_speedup']:.3f} "
            f"| {r['ssim']:.3f} ± {r['ssim_se']:.3f} | {r['binary']:.3f} "
            f"| {r['binary_diff']:+.3f} ± {r['binary_diff_se']:.3f} | {r['up']}/{r['down']} "
            f"| {r['share']:.3f} | {r['share_diff']:+.3f} ± {r['share_diff_se']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.prompts < 2 or args.batch < 1 or args.threads < 1:
        sys.exit("cfg_skip_sweep: error: need --prompts >= 2, --batch >= 1 and --threads >= 1")
    result = run(args)
    table = markdown(result)
    out = Path(args.out)
    (out / "cfg_skip_sweep.md").write_text(
        f"{table}\n\n{result['prompts']} prompts (tiny scenes, sampler seed {result['prompt_seed']}), seeds "
        f"{result['seeds']}, guidance scale {result['guidance_scale']}, {result['date']}, torch {result['torch']}\n"
    )
    (out / "cfg_skip_sweep.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=1)
    )
    import pandas as pd

    pd.DataFrame(result["per_prompt"]).to_csv(out / "cfg_skip_sweep_per_prompt.csv", index=False)
    print(table)


if __name__ == "__main__":
    main()
