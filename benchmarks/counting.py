"""Counting accuracy of `tiny` per asked count: `python -m benchmarks.counting`.

    python -m benchmarks.counting                                   # 100 held-out prompts per count
    python -m benchmarks.counting --split train --per-count 60       # colour/shape pairs seen in training
    python -m benchmarks.counting --prompt "three red stars" --seeds 16   # one prompt, seeds 0..15

Generates with the shipped weights (or `--weights DIR`), `policy=none` and the backbone's default
settings (guidance scale, temperature, top-p), through `toprovar.pipeline.generate` in batches of
`--batch`; image i gets seed i. The prompts are the first `--per-count` counting scenes of each
count (2, 3, 4: the grammar has no other) of `sample_scenes(.., --seed, --split)`
(`toprovar.tiny.counting.counting_scenes`; `heldout` by default: every prompt names a held-out
colour/shape pair). Scoring: `toprovar.tiny.counting.count_table`
(geneval-lite's counting score with a Wilson interval, exact-count / fewer / more shares).

Prints a markdown table, with `--prompt` the number of the shape found in each image, and one
JSON line (command, date, device, versions and threads: toprovar.environment.run_record; the
table); `--json-out` and `--csv-out` (one row per image) also write them to files. Measured
numbers: toprovar/assets/tiny/MODEL_CARD.md, "Counting".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import toprovar.openmp  # noqa: F401  (first: sets OpenMP's spin-wait before torch loads)
from toprovar.environment import run_record
from toprovar.errors import UserError, exit_on_user_error

PROG = "python -m benchmarks.counting"


def markdown(table) -> str:
    lines = ["| count | n | accuracy | 95 % interval | exact count | fewer | more |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(
            f"| {r.count} | {r.n} | {r.accuracy:.2f} ({r.correct}/{r.n}) | {r.ci_low:.2f}–{r.ci_high:.2f} | "
            f"{r.exact_count:.2f} | {r.fewer:.2f} | {r.more:.2f} |"
        )
    return "\n".join(lines)


def _prompts(args) -> list[str]:
    """Checked before any weights load: one line and exit status 2 for a wrong argument."""
    from toprovar.tiny.counting import counting_scenes
    from toprovar.tiny.scenes import parse_caption

    if args.batch < 1:
        raise UserError(f"--batch={args.batch}: give a positive number of images per generate call")
    if args.prompt is None:
        if args.per_count < 1:
            raise UserError(f"--per-count={args.per_count}: give a positive number of prompts per count")
        return [s.caption for s in counting_scenes(args.per_count, args.seed, args.split)]
    if args.seeds < 1:
        raise UserError(f"--seeds={args.seeds}: give a positive number of seeds")
    try:
        category = parse_caption(args.prompt).category
    except ValueError as err:
        raise UserError(str(err)) from None
    if category != "counting":
        raise UserError(f"--prompt {args.prompt!r} is a {category} prompt; give a counting one, e.g. 'three red stars'")
    return [args.prompt] * args.seeds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--per-count", type=int, default=100, help="prompts per asked count (2, 3, 4)")
    ap.add_argument("--seed", type=int, default=None, help="scene seed (default: the model card's held-out seed)")
    ap.add_argument("--split", choices=("heldout", "train"), default="heldout", help="prompts of this split")
    ap.add_argument("--prompt", help="one counting caption instead of the split's prompts")
    ap.add_argument("--seeds", type=int, default=16, help="with --prompt: images, seeds 0..N-1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--weights", help="a folder with transformer/vae/text_encoder.safetensors (default: shipped)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out")
    ap.add_argument("--csv-out")
    args = ap.parse_args(argv)

    import torch

    from toprovar.models.registry import build_backbone
    from toprovar.tiny.counting import HELDOUT_SEED, count_outcomes, count_table, generate_images

    if args.seed is None:
        args.seed = HELDOUT_SEED
    captions = _prompts(args)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r}: give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    weights = None
    if args.weights is not None:
        folder = Path(args.weights)
        weights = {p: str(folder / f"{p}.safetensors") for p in ("transformer", "vae", "text_encoder")}
        missing = [w for w in weights.values() if not Path(w).is_file()]
        if missing:
            raise UserError(
                f"--weights {folder}: no {missing[0]}; give a folder that `python -m toprovar.tiny.train` exported"
            )
    backbone = build_backbone("tiny", weights, device=device)
    seeds = list(range(len(captions)))

    def progress(done: int, total: int) -> None:
        print(f"{done}/{total} images", file=sys.stderr, flush=True)

    images = generate_images(backbone, captions, seeds, args.batch, progress)
    outcomes = count_outcomes(images, captions).assign(prompt=captions, seed=seeds)
    table = count_table(outcomes)
    spec = backbone.spec
    what = f"'{args.prompt}', seeds 0..{len(seeds) - 1}" if args.prompt else f"split {args.split} (seed {args.seed})"
    print(
        f"### tiny counting, {what}, policy none, guidance scale {spec.guidance_scale:g}, "
        f"temperature {spec.temperature:g}\n"
    )
    print(markdown(table))
    if args.prompt:
        print(f"\nobjects of the shape found per image (seeds 0..{len(seeds) - 1}): {outcomes.detected.tolist()}")
    meta = {
        **run_record(PROG, argv, device=device),
        "weights": args.weights or "shipped",
        "table": table.to_dict(orient="records"),
    }
    print(json.dumps(meta))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(meta, indent=1) + "\n")
    if args.csv_out:
        outcomes.to_csv(args.csv_out, index=False)


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        main()
