"""`python -m toprovar generate [overrides]`: prompts -> PNGs with one backbone (Hydra app).

Configs: toprovar/conf/generate.yaml and the group toprovar/conf/backbone/. The run folder is
outputs/generate/<date>/<time>/ (or `out_dir=`): one PNG per prompt (`<index>_seed<seed>.png`),
`trace.csv` (per-scale times and tokens of every batch) and `prompts.txt`.
`python -m toprovar compare [overrides]` (toprovar/conf/compare.yaml, toprovar/compare.py): baseline
and pruning methods side by side; its run folder is outputs/compare/<date>/<time>/ (or `out_dir=`).
Mistakes (bad override, unknown backbone, missing weights, a policy that does not fit) are one line
on stderr, exit status 2, before any weights load (toprovar.cli).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import toprovar.openmp  # noqa: F401  (first: sets OpenMP's spin-wait before torch loads)
from toprovar.cli import fail, generation_settings, prompts_and_seeds, run_hydra_app
from toprovar.renames import override_renames
from toprovar.schemas import SCHEMAS, CompareConfig, GenerateConfig, typed_config

COMMANDS = ("generate", "compare")
PROG = {command: f"toprovar {command}" for command in COMMANDS}
# toprovar/conf/prompts/ is the calibration prompt group, so Hydra would read `prompts=[...]` as a
# group choice; the generate / compare configs keep their list under `text_prompts`.
PROMPTS_ALIAS = {"prompts": "text_prompts"}


def run_generate(cfg: GenerateConfig, out_dir: Path) -> list[Path]:
    """Generate every prompt of `cfg` (toprovar/conf/generate.yaml) into `out_dir`."""
    import pandas as pd
    from PIL import Image
    from tqdm.auto import tqdm

    from toprovar.batching import BatchLimit, Chunk, generate_in_batches, resolve_batch_size
    from toprovar.models.registry import build_backbone, get_backbone, resolve_device, resolve_dtype
    from toprovar.policy import load_policy

    # Everything the user gave is checked before any weights load.
    prompts, seeds = prompts_and_seeds(cfg.text_prompts, cfg.seeds)
    group = cfg.backbone
    spec = get_backbone(group["name"])
    settings = generation_settings(group, asdict(cfg), prog=PROG["generate"])
    # A policy must fit this run: its backbone (unless allow_other_backbone), the schedule's scales, the depth.
    policy = (
        None
        if cfg.policy in (None, "none")
        else load_policy(
            cfg.policy,
            spec,
            pixels=settings.get("pixels"),
            h_div_w=settings.get("h_div_w"),
            allow_other_backbone=cfg.allow_other_backbone,
        )
    )
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    batch = resolve_batch_size(
        cfg.batch_size, group, spec, device, pixels=settings.get("pixels"), h_div_w=settings.get("h_div_w")
    )

    backbone = build_backbone(spec, group.get("weights"), device=device, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(chunk: Chunk, result: Any) -> Any:
        """The chunk's PNGs written (padding dropped); its trace as a frame kept."""
        for i, image in zip(chunk.indices, result.images):
            path = out_dir / f"{i:03d}_seed{seeds[i]}.png"
            Image.fromarray(image.numpy()).save(path)
            written.append(path)
        return result.trace.to_frame().assign(
            batch=chunk.number,
            text_encode_ms=result.trace.text_encode_ms,
            decode_ms=result.trace.decode_ms,
            total_ms=result.trace.total_ms,
        )

    with tqdm(total=len(prompts), desc="images", unit="image") as bar:
        batches = generate_in_batches(
            backbone,
            prompts,
            seeds,
            BatchLimit(batch, PROG["generate"]),
            keep=save,
            progress=bar.update,
            policy=policy,
            **settings,
        )
    pd.concat([frame for _, frame in batches]).to_csv(out_dir / "trace.csv", index=False)
    (out_dir / "prompts.txt").write_text("".join(f"{p.name}\t{t}\n" for p, t in zip(written, prompts)))
    return written


def _generate(cfg: GenerateConfig, out_dir: Path) -> None:
    written = run_generate(cfg, out_dir)
    print(f"wrote {len(written)} image(s) to {out_dir}")


def _compare(cfg: CompareConfig, out_dir: Path) -> None:
    from toprovar.compare import run_compare

    result = run_compare(cfg, out_dir)
    print(result.markdown)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(p.name for p in result.files.values())} to {out_dir}")


RUNNERS = {"generate": _generate, "compare": _compare}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        fail("toprovar", f"usage: python -m toprovar {{{'|'.join(COMMANDS)}}} [key=value ...]")
    command = argv[0]

    def app(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        typed = typed_config(cfg, SCHEMAS[command])  # every key from the YAML, none the schema lacks
        out_dir = Path(typed.out_dir) if typed.out_dir else Path(HydraConfig.get().runtime.output_dir)
        RUNNERS[command](typed, out_dir)

    run_hydra_app(
        PROG[command], command, app, argv[1:], renames=override_renames("", "backbone."), aliases=PROMPTS_ALIAS
    )


if __name__ == "__main__":
    main()
