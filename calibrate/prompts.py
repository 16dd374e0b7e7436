"""Calibration prompt sets: pre-sampling, search and held-out validation, disjoint, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrate.config import PromptsConfig
from toprovar.errors import UserError


@dataclass(frozen=True)
class PromptSet:
    name: str
    texts: list[str]
    seeds: list[int]
    specs: list[Any]  # what an evaluator needs per prompt (tiny: the scene); texts otherwise

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class PromptSets:
    presample: PromptSet
    search: PromptSet
    validate: PromptSet


def _read_list(cfg: PromptsConfig) -> list[str]:
    if cfg.file is None:
        return [str(p).strip() for p in cfg.items if str(p).strip()]
    path = Path(cfg.file)
    if not path.is_file():
        raise UserError(f"prompts.file={cfg.file} does not exist; give a text file with one prompt a line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tiny_scenes(count: int, seed: int) -> tuple[list[str], list[Any]]:
    from toprovar.tiny.scenes import sample_scenes  # lazy: only the tiny backbone has scenes

    scenes = sample_scenes(count, seed=seed)
    return [scene.caption for scene in scenes], list(scenes)


def load_prompt_sets(cfg: PromptsConfig) -> PromptSets:
    """Split the configured prompts into the three disjoint sets (seed i of a set: cfg.seed + offset + i)."""
    counts = {"presample": cfg.presample, "search": cfg.search, "validate": cfg.validate}
    total = sum(counts.values())
    if cfg.source == "tiny_scenes":
        texts, specs = _tiny_scenes(total, cfg.seed)
    elif cfg.source == "list":
        texts = _read_list(cfg)
        specs = list(texts)
    else:
        raise UserError(f"prompts.source={cfg.source!r}; choose tiny_scenes or list")
    if len(texts) < total:
        raise UserError(
            f"prompts: {len(texts)} prompts given but presample+search+validate = {total}; "
            f"lower the counts or add prompts"
        )
    sets, offset = {}, 0
    for name, count in counts.items():
        sets[name] = PromptSet(
            name,
            texts[offset : offset + count],
            [cfg.seed + offset + i for i in range(count)],
            specs[offset : offset + count],
        )
        offset += count
    return PromptSets(**sets)
