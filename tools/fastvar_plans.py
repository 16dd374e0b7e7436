"""FastVAR's keep plan on `tiny`: how far `plan: per_scale` (one keep set per scale, the fast path's
planned units) moves the images from `plan: per_block` (FastVAR's score at every pruned block).

    python -m tools.fastvar_plans                       # 96 fresh prompts, both FastVAR configurations
    python -m tools.fastvar_plans --prompts 16 --out /tmp/plans

Both configurations are `toprovar.compare.default_policies` on tiny's schedule and depth (tiny has
no shipped FastVAR policy): `fastvar` (the ToProVAR paper's Table 8 ratios on the last two scales)
and `fastvar_authors` (csguoh/FastVAR's Infinity settings moved to the schedule's end: 0.4 and 0.5
on the 4th and 3rd scales from the end, the last two scales skipped). Each runs with either plan
on the same prompts and seeds. Reported: SSIM between the two plans' images (mean ± standard error
over prompts), each plan's SSIM against the unpruned image, geneval-lite (binary and share,
`toprovar.metrics.geneval_scorer`) of each plan and the paired differences per_scale − per_block
(± SE; prompts whose binary score went up/down), FLOP speedups. Images are kept in
`--out`, shared with tools/cfg_skip_sweep.py (same prompts: the unpruned images are reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from tools.cfg_skip_sweep import mean_se


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.fastvar_plans", description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=96, help="fresh tiny scene prompts (default 96)")
    ap.add_argument("--prompt-seed", type=int, default=20261201, help="scene sampler seed (default 20261201)")
    ap.add_argument("--batch", type=int, default=16, help="images per generate call (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    ap.add_argument("--out", default="outputs/cfg_skip_sweep", help="folder for images and tables")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    import toprovar.tiny  # noqa: F401  (registers the tiny backbone)
    from toprovar.compare import default_policies
    from toprovar.flops import trace_flops
    from toprovar.metrics import geneval_scorer, ssim
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate
    from toprovar.tiny.scenes import sample_scenes

    args = parse(argv)
    torch.set_num_threads(args.threads)
    backbone = build_backbone("tiny", device="cpu")
    n_scales = len(backbone.spec.schedules.scale_schedule(1.0, backbone.spec.pixels))
    scenes = sample_scenes(args.prompts, seed=args.prompt_seed)
    prompts, seeds = [s.caption for s in scenes], list(range(args.prompts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def images_of(name: str, policy) -> tuple[torch.Tensor, float]:
        path = out / f"images_{name}.pt"
        if path.exists():
            saved = torch.load(path)
            if saved["prompts"] == prompts and saved["seeds"] == seeds:
                return saved["images"], saved["unpruned"] / saved["executed"]
        images, executed, unpruned = [], 0.0, 0.0
        for start in tqdm(range(0, len(prompts), args.batch), desc=name, leave=False):
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
        return images, unpruned / executed

    score = geneval_scorer("tiny")
    base, _ = images_of("never", None)
    base_g = score(base, scenes)
    lines = [
        "| FastVAR | plan | FLOP speedup | SSIM vs unpruned (± SE) | geneval-lite binary / share "
        "| SSIM per_scale vs per_block (± SE) | Δ binary per_scale − per_block (± SE) | prompts +/− "
        "| Δ share (± SE) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines.append(f"| unpruned | – | 1.000 | 1 | {base_g['binary'].mean():.3f} / {base_g['share'].mean():.3f} | | | | |")
    policies = default_policies(n_scales, backbone.transformer.depth)
    for name in ("fastvar", "fastvar_authors"):
        runs = {}
        for plan in ("per_block", "per_scale"):
            policy = policies[name]
            policy = dataclasses.replace(policy, fastvar=dataclasses.replace(policy.fastvar, plan=plan))
            runs[plan] = images_of(f"{name}_{plan}", policy)
        scores = {plan: score(images, scenes) for plan, (images, _) in runs.items()}
        between = mean_se(ssim(runs["per_scale"][0], runs["per_block"][0]).tolist())
        diff = {k: (scores["per_scale"][k] - scores["per_block"][k]).tolist() for k in ("binary", "share")}
        (b_mean, b_se), (s_mean_d, s_se_d) = mean_se(diff["binary"]), mean_se(diff["share"])
        for plan, (images, speedup) in runs.items():
            s_mean, s_se = mean_se(ssim(images, base).tolist())
            extra = (
                (
                    f"{between[0]:.3f} ± {between[1]:.3f} | {b_mean:+.3f} ± {b_se:.3f} | "
                    f"{sum(d > 0 for d in diff['binary'])}/{sum(d < 0 for d in diff['binary'])} | "
                    f"{s_mean_d:+.3f} ± {s_se_d:.3f}"
                )
                if plan == "per_scale"
                else " | | |"
            )
            lines.append(
                f"| {name} {dict(policies[name].fastvar.ratios)} | {plan} | {speedup:.3f} | "
                f"{s_mean:.3f} ± {s_se:.3f} | {scores[plan]['binary'].mean():.3f} / "
                f"{scores[plan]['share'].mean():.3f} | {extra} |"
            )
    table = "\n".join(lines)
    (out / "fastvar_plans.md").write_text(
        f"{table}\n\n{len(prompts)} prompts (tiny scenes, sampler seed "
        f"{args.prompt_seed}), seeds 0..{len(prompts) - 1}, "
        f"torch {torch.__version__}\n"
    )
    print(table)


if __name__ == "__main__":
    sys.exit(main())
