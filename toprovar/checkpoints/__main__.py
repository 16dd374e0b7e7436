"""`python -m toprovar.checkpoints synth backbone=NAME out=DIR [seed=0] [preset=full|small]`.

Writes random-weight checkpoints in the official release layout of `backbone` (infinity-2b,
infinity-8b) into DIR and prints the `python -m toprovar generate` overrides that load them.
`preset=small`: the same files at the shapes of a small test backbone (seconds on a CPU).
Mistakes (unknown backbone or argument, unwritable folder) are one line on stderr, exit status 2,
before any tensor is made.
"""

from __future__ import annotations

import sys
import time

from toprovar.errors import UserError, exit_on_user_error

PROG = "toprovar.checkpoints"
USAGE = "usage: python -m toprovar.checkpoints synth backbone=NAME out=DIR [seed=0] [preset=full|small]"
ARGS = {"backbone": None, "out": None, "seed": "0", "preset": "full"}  # None: required


def parse(argv: list[str]) -> dict[str, str]:
    """`synth key=value ...` -> the arguments, defaults filled in; a UserError on anything else."""
    if not argv or argv[0] != "synth":
        raise UserError(USAGE)
    args = dict(ARGS)
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in ARGS:
            raise UserError(f"unknown argument {item!r}; {USAGE}")
        args[key] = value
    missing = [k for k, v in args.items() if v in (None, "")]
    if missing:
        raise UserError(f"{missing[0]}= is required; {USAGE}")
    if not args["seed"].isdigit():
        raise UserError(f"seed={args['seed']!r} is not a non-negative integer")
    return args


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    with exit_on_user_error(PROG):
        args = parse(list(sys.argv[1:] if argv is None else argv))
        from toprovar.checkpoints.synth import check_output_folder, check_release, release_plan, size_text, synthesize

        # Cheap checks first; the plan builds the models on the meta device (seconds at full size).
        check_release(args["backbone"], args["preset"])
        out = Path(args["out"]).expanduser().resolve()
        check_output_folder(out)
        plan = release_plan(args["backbone"], args["preset"])
        start = time.perf_counter()
        weights = synthesize(plan, out, seed=int(args["seed"]))
    print(
        f"wrote {size_text(plan.nbytes)} of random weights ({len(plan.parts)} parts, seed {args['seed']}) "
        f"to {out} in {time.perf_counter() - start:.0f} s; load them with:"
    )
    overrides = [f"backbone={plan.backbone}"] + [
        f"backbone.weights.{role}={getattr(weights, role)}" for role in ("transformer", "vae", "text_encoder")
    ]
    print(" ".join(overrides))


if __name__ == "__main__":
    main()
