"""`python -m toprovar generate [overrides]`: prompts -> PNGs with one backbone (Hydra app).

Configs: conf/generate.yaml and the group conf/backbone/. The run folder is
outputs/generate/<date>/<time>/ (or `out_dir=`): one PNG per prompt (`<index>_seed<seed>.png`),
`trace.csv` (per-scale times and tokens of every batch) and `prompts.txt`.
`python -m toprovar compare [overrides]` (conf/compare.yaml, toprovar/compare.py): baseline and
pruning methods side by side; its run folder is outputs/compare/<date>/<time>/ (or `out_dir=`).
Mistakes (bad override, unknown backbone, missing weights) are one line on stderr, exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from toprovar.renames import override_renames, renamed_overrides, renamed_settings

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
COMMANDS = ("generate", "compare")
# conf/prompts/ is the calibration prompt group, so Hydra would read `prompts=[...]` as a group
# choice; the generate config keeps its list under `text_prompts` and the CLI maps the alias.
ALIASES = {"prompts": "text_prompts"}
# Keywords of `toprovar.pipeline.generate` that the configs set (the command's value, else the backbone group's).
SETTINGS = ("guidance_scale", "temperature", "pixels", "h_div_w", "top_k", "top_p", "kv_policy")


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_overrides(command: str, overrides: list[str]) -> None:
    """Compose the config once without running, so a bad override is a one-line error."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=command):
            compose(config_name=command, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        _fail(f"toprovar {command}", "bad override: " + (" ".join(str(err).split()) or type(err).__name__))


def _device(name: str):
    from toprovar.models.registry import resolve_device  # lazy: keeps override checking torch-free

    return resolve_device(name)


def _dtype(name: str):
    import torch

    from toprovar.errors import UserError

    table = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise UserError(f"dtype={name!r}; choose one of {', '.join(table)}")
    return table[name]


def generation_settings(cfg: dict[str, Any], prog: str) -> dict[str, Any]:
    """The `generate` keywords of a composed generate / compare config: each of `SETTINGS` from the
    command's config, else from its backbone group, unset ones left out. The old names `cfg` / `tau`
    (e.g. in a backbone group file of one's own) still work, with a one-line warning."""
    def warn(message: str) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    top = renamed_settings(cfg, f"{prog} config", warn)
    group = renamed_settings(cfg["backbone"], "backbone config", warn)
    settings = {}
    for key in SETTINGS:
        value = top.get(key) if top.get(key) is not None else group.get(key)
        if value is not None:
            settings[key] = value
    return settings


def _policy(value: Any) -> Any:
    if value in (None, "none"):
        return None
    try:
        from toprovar.policy import load_policy
    except ImportError:
        from toprovar.errors import UserError

        raise UserError(f"policy={value!r} needs toprovar.policy, which is not available in this install") from None
    return load_policy(value)


def run_generate(cfg: dict[str, Any], out_dir: Path) -> list[Path]:
    """Generate every prompt of `cfg` (a plain dict of conf/generate.yaml) into `out_dir`."""
    import pandas as pd
    from PIL import Image
    from tqdm.auto import tqdm

    from toprovar.errors import UserError
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate

    prompts = cfg["text_prompts"]
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("prompts must be a non-empty list of strings, e.g. prompts='[\"a cat\", \"a dog\"]'")
    seeds = cfg["seeds"] if cfg["seeds"] is not None else list(range(len(prompts)))
    if isinstance(seeds, int):
        seeds = [seeds]
    if len(seeds) != len(prompts):
        raise UserError(f"give one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    group = cfg["backbone"]
    settings = generation_settings(cfg, "toprovar generate")
    backbone = build_backbone(group["name"], group.get("weights"), device=_device(cfg["device"]),
                              dtype=_dtype(cfg["dtype"]))
    policy = _policy(cfg["policy"])
    batch = max(1, int(cfg["batch_size"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    written, frames = [], []
    for start in tqdm(range(0, len(prompts), batch), desc="batches", unit="batch"):
        chunk, chunk_seeds = prompts[start:start + batch], seeds[start:start + batch]
        result = generate(backbone, chunk, chunk_seeds, policy=policy, **settings)
        for i, (image, seed) in enumerate(zip(result.images, chunk_seeds)):
            path = out_dir / f"{start + i:03d}_seed{seed}.png"
            Image.fromarray(image.numpy()).save(path)
            written.append(path)
        frame = result.trace.to_frame().assign(batch=start // batch, text_encode_ms=result.trace.text_encode_ms,
                                               decode_ms=result.trace.decode_ms, total_ms=result.trace.total_ms)
        frames.append(frame)
    pd.concat(frames).to_csv(out_dir / "trace.csv", index=False)
    (out_dir / "prompts.txt").write_text("".join(f"{p.name}\t{t}\n" for p, t in zip(written, prompts)))
    return written


def _generate(plain: dict[str, Any], out_dir: Path) -> None:
    written = run_generate(plain, out_dir)
    print(f"wrote {len(written)} image(s) to {out_dir}")


def _compare(plain: dict[str, Any], out_dir: Path) -> None:
    from toprovar.compare import run_compare

    result = run_compare(plain, out_dir)
    print(result.markdown)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(p.name for p in result.files.values())} to {out_dir}")


RUNNERS = {"generate": _generate, "compare": _compare}


def _hydra_run(command: str) -> None:
    """Compose conf/<command>.yaml with Hydra and run the command on the plain config."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from toprovar.errors import exit_on_user_error

    @hydra.main(config_path=str(CONF_DIR), config_name=command, version_base=None)
    def app(cfg: DictConfig) -> None:
        with exit_on_user_error(f"toprovar {command}"):
            plain = OmegaConf.to_container(cfg, resolve=True)
            out_dir = Path(plain["out_dir"]) if plain.get("out_dir") else Path(HydraConfig.get().runtime.output_dir)
            RUNNERS[command](plain, out_dir)

    app()


def _alias(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{ALIASES[key]}={value}" if sep and key in ALIASES else override


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _fail("toprovar", f"usage: python -m toprovar {{{'|'.join(COMMANDS)}}} [key=value ...]")
    command = argv[0]
    overrides = renamed_overrides([_alias(arg) for arg in argv[1:]], override_renames("", "backbone."),
                                  f"toprovar {command}")
    if not CONF_DIR.is_dir():
        _fail(f"toprovar {command}", f"config folder {CONF_DIR} not found; run from a checkout installed with "
                                     "`pip install -e .`")
    # Flags (--help, --cfg, -m ...) go straight to Hydra; plain overrides are checked first.
    if not any(arg.startswith("-") for arg in overrides):
        check_overrides(command, overrides)
    sys.argv = [f"toprovar {command}", *overrides]
    _hydra_run(command)


if __name__ == "__main__":
    main()
