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
    specs: list[Any]  # what an evaluator needs per prompt (a built-in source's spec, e.g. a scene); texts otherwise

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


def load_prompt_sets(cfg: PromptsConfig) -> PromptSets:
    """Split the configured prompts into the three disjoint sets (seed i of a set: cfg.seed + offset + i)."""
    counts = {"presample": cfg.presample, "search": cfg.search, "validate": cfg.validate}
    total = sum(counts.values())
    from toprovar.models.registry import prompt_sources  # lazy: loads the models

    sources = prompt_sources()  # a backbone's built-in prompts, e.g. tiny_scenes
    if cfg.source == "list":
        texts = _read_list(cfg)
        specs = list(texts)
    elif cfg.source in sources:
        texts, specs = sources[cfg.source].sample(total, cfg.seed)
    else:
        raise UserError(f"prompts.source={cfg.source!r}; choose list or {' or '.join(sorted(sources))}")
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
