"""Pruning methods side by side on one backbone: `python -m toprovar compare` (toprovar/conf/compare.yaml).

One run generates the same prompts and seeds with the unpruned baseline and every listed method
and writes, into the run folder:
  * `compare.md` — the table (latency, speedup, FLOP ratio and speedup, SSIM/PSNR against the
    baseline image of the same prompt and seed, geneval-lite where the backbone has it), the
    settings and every method's policy;
  * `compare.csv` (the table) and `compare_per_image.csv` (one row per method and prompt);
  * `compare_grid.png` — rows = prompts, columns = methods, every cell labelled;
  * `pruned_tokens_<method>.png` — for every pruning method, the first prompt's image beside its
    kept/pruned token map per scale (the paper's Fig. 9, `toprovar.plots.plot_pruned_tokens`).

Methods (`methods:` in the config, a list) are policy names or YAML paths as
`toprovar.policy.load_policy` reads them, `none` (the baseline, always run first), and the
built-in peers `fastvar` (the ToProVAR paper's Table 8 configuration), `fastvar_authors` (the
configuration csguoh/FastVAR ships for Infinity), `fixed_exit`, `toprovar` and the Table 10
ablations `toprovar-scale`, `toprovar-scale_token`, `toprovar-scale_layer`, `toprovar-full`. A
built-in resolves to the backbone's shipped policy (`fastvar-<backbone>`,
`fastvar_authors-<backbone>`, `fixed_exit-<backbone>`, `<backbone>`) when the package has one,
otherwise to defaults scaled to the backbone's schedule and depth (`default_policies`), which
the table marks "defaults, not calibrated". `<policy>@<variant>` runs a ToProVAR policy as one of
the Table 10 variants. The `scale` variant stops refining after D (`scale.action: exit`, "Scale
Depth Loc."); the others keep the policy's action. Every method's policy must fit the run (its
backbone unless `allow_other_backbone`, the schedule's scales, the depth:
`toprovar.policy.check_policy_for_backbone`); one that does not is a one-line error before any
weights load.

CFG skip (SkipVAR, StageVAR and LD-Pruning drop the unconditional branch at late scales):
`cfg_skip` is the baseline with only the conditional rows from `default_cfg_skip(n_scales)` on
(`guidance.skip_uncond_from_scale`), `cfg_skip:<s>` from scale s; any other entry followed by
`+cfg_skip` or `+cfg_skip:<s>` runs that method with the skip (e.g. `toprovar-full+cfg_skip:10`).

Latency: the median over prompts of the milliseconds per image of the call that generated it
(`Trace.total_ms`: scale loop + VAE decode, text encoding excluded; CUDA events on GPU), after `warmup`
warm-up calls per method at each batch size (the first also records the kept tokens for the
figure, so no timed call carries the recorder); timed calls go batch by batch with the methods
interleaved, so slow drift of the machine hits every method alike. FLOPs: `toprovar.flops.trace_flops`, executed /
unpruned, summed over the prompts. PSNR: from the mean squared error pooled over the prompts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toprovar.cli import generation_settings, prompts_and_seeds
from toprovar.errors import UserError
from toprovar.policy import (
    VARIANTS,
    GuidanceStage,
    Policy,
    check_policy_for_backbone,
    load_policy,
    policy_from_dict,
    shipped_policies,
)
from toprovar.schemas import CompareConfig

BUILTIN_BASES = ("fastvar", "fastvar_authors", "fixed_exit", "toprovar")
CFG_SKIP = "cfg_skip"
DEFAULT_METHODS = (
    "none",
    "fastvar",
    "fastvar_authors",
    "fixed_exit",
    "toprovar-scale",
    "toprovar-scale_token",
    "toprovar-scale_layer",
    "toprovar-full",
    CFG_SKIP,
)
DEFAULT_PROMPTS = (
    "a red fox sitting in fresh snow, morning light",
    "an old lighthouse on a rocky coast during a storm",
    "a bowl of ramen with a soft boiled egg, top view",
    "a bicycle leaning against a yellow wall",
    "a cat wearing a tiny wizard hat, studio photo",
    "a mountain lake reflecting pine trees at sunset",
    "a steam locomotive crossing a stone bridge",
    "a vintage camera on a stack of books",
)
UNCALIBRATED_DEFAULTS = "defaults, not calibrated"


# -- methods ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    label: str  # row label (the entry of `methods`, a file's stem for paths)
    policy: Policy
    source: str  # where the policy came from, and whether it was calibrated

    @property
    def prunes(self) -> bool:
        """Runs less than the baseline: a pruning method, or the baseline with a CFG skip."""
        return self.policy.method != "none" or self.policy.guidance.skip_uncond_from_scale is not None


def fastvar_layers(depth: int) -> tuple[int, int]:
    """FastVAR's blocks 3..27 of 32 (official), scaled to `depth` and kept off the first block."""
    if depth <= 1:
        return 0, depth
    start = max(1, round(3 * depth / 32))
    end = max(start + 1, min(depth, round(28 * depth / 32)))
    return start, end


def default_cfg_skip(n_scales: int) -> int:
    """The built-in `cfg_skip`'s first conditional-only scale: the last two scales (n − 2).

    On Infinity's 13-scale 1M schedule that is the 48×48 and 64×64 scales, 61 % of the tokens. On
    `tiny` (11 scales): 1.43× fewer FLOPs at SSIM 0.996 and geneval-lite within noise (binary
    −0.005 ± 0.009, share −0.004 ± 0.008, 192 prompts); earlier starts save more, from scale 4 on
    ~1.95× (docs/benchmarks.md, "CFG skip and FastVAR's keep plan on `tiny`").
    """
    return max(n_scales - 2, 0)


def default_policies(n_scales: int, depth: int) -> dict[str, Policy]:
    """The peers for a backbone without shipped policies, scaled to its schedule and depth.

    * fixed_exit: the second-to-last scale is the last that runs.
    * fastvar: the last two scales at the paper's ratios (0.4, 0.6; Table 8), the middle blocks
      (`fastvar_layers`), branch outputs cached at the scale before, scored once per scale
      (`plan: per_scale`, so its pruned scales run as the fast path's planned units: re-scoring
      before every block fixes each block's tokens only after the block before it has run).
    * fastvar_authors: csguoh/FastVAR's Infinity configuration moved to the schedule's end: the
      4th and 3rd scales from the end at 0.4 and 0.5 (Infinity 1M: the 32×32 and 40×40 scales),
      the last two scales skipped (`exit_after_scale`), the middle blocks, the cache before.
    * toprovar: the paper's knobs (τ 0.4, β 1, α 0.1–0.6, min_keep 0.1, one probe layer), online
      layer scores at the scale before min_scale, min_scale = the middle scale n // 2, and
      `crossing: above` (section 4: D = first scale ≥ min_scale with ρ_s ≥ τ). Without measured
      ρ_s curves this starts pruning at about min_scale; `below` (appendix A.5) only fires where
      ρ_s drops under 0.4, which an uncalibrated backbone need not ever do. Calibration picks
      the direction from data (toprovar-method.md, gap 1).
    """
    last = n_scales - 1
    source = {"calibrated": False, "source": f"toprovar.compare.default_policies({n_scales} scales, depth {depth})"}
    start, end = fastvar_layers(depth)
    fastvar_ratios = {last - 1: 0.4, last: 0.6} if n_scales >= 3 else {last: 0.6}
    authors_ratios = {last - 3: 0.4, last - 2: 0.5} if n_scales >= 5 else {last: 0.5}
    return {
        "fixed_exit": policy_from_dict(
            {"method": "fixed_exit", "fixed_exit": {"exit_scale": max(last - 1, 0)}, "provenance": source},
            name="fixed_exit",
        ),
        "fastvar": policy_from_dict(
            {
                "method": "fastvar",
                "provenance": source,
                "fastvar": {
                    "ratios": fastvar_ratios,
                    "layers": [start, end],
                    "plan": "per_scale",
                    "cache_scale": max(min(fastvar_ratios) - 1, 0),
                },
            },
            name="fastvar",
        ),
        "fastvar_authors": policy_from_dict(
            {
                "method": "fastvar",
                "provenance": source,
                "fastvar": {
                    "ratios": authors_ratios,
                    "layers": [start, end],
                    "plan": "per_scale",
                    "cache_scale": min(authors_ratios) - 1 if min(authors_ratios) > 0 else None,
                    "exit_after_scale": max(authors_ratios),
                },
            },
            name="fastvar_authors",
        ),
        "toprovar": policy_from_dict(
            {
                "method": "toprovar",
                "variant": "full",
                "provenance": source,
                "scale": {"tau": 0.4, "crossing": "above", "action": "start_pruning", "min_scale": n_scales // 2},
                "layer": {"mode": "online", "beta": 1.0},
                "token": {
                    "alpha_min": 0.1,
                    "alpha_max": 0.6,
                    "min_keep": 0.1,
                    "normalize": "mean",
                    "protect_layers": 1,
                },
            },
            name="toprovar",
        ),
    }


def with_variant(policy: Policy, variant: str) -> Policy:
    """A ToProVAR policy run as a Table 10 variant (`scale`: stop refining after D)."""
    if variant not in VARIANTS:
        raise UserError(f"variant '{variant}' is not one of {', '.join(VARIANTS)}")
    if policy.method != "toprovar":
        raise UserError(
            f"policy {policy.name or ''} is a {policy.method} policy; only toprovar policies "
            f"have the variants {', '.join(VARIANTS)}"
        )
    scale = dataclasses.replace(policy.scale, action="exit") if variant == "scale" else policy.scale
    return dataclasses.replace(policy, variant=variant, scale=scale)


def _provenance(policy: Policy) -> str:
    calibrated = policy.provenance.get("calibrated")
    return {True: "calibrated", False: "not calibrated"}.get(calibrated, "calibration not recorded")


def _cfg_skip_suffix(text: str, n_scales: int) -> tuple[str, int | None]:
    """`X+cfg_skip[:s]` -> (X, s); `cfg_skip[:s]` -> ('none', s); anything else -> (text, None)."""
    head, plus, tail = text.rpartition("+")
    entry, skip = (head, tail) if plus else ("none", text)
    name, colon, scale = skip.partition(":")
    if name != CFG_SKIP:
        return text, None
    if not colon:
        return entry, default_cfg_skip(n_scales)
    if not scale.isdigit() or int(scale) >= n_scales:
        raise UserError(
            f"methods: {text}: the CFG skip's scale must be an integer in [0, {n_scales - 1}] (the "
            f"first scale that runs only the conditional rows), e.g. {CFG_SKIP}:{default_cfg_skip(n_scales)}"
        )
    return entry, int(scale)


def resolve_method(
    entry: Any,
    backbone: str,
    n_scales: int,
    depth: int,
    *,
    pixels: str | None = None,
    allow_other_backbone: bool = False,
) -> Method:
    """One entry of `methods` -> Method. One-line UserErrors, before any weights load, for unknown
    names and for policies that do not fit the run: made for another backbone (unless
    `allow_other_backbone`), scales past the schedule of `n_scales`, layers past `depth`
    (`toprovar.policy.check_policy_for_backbone`)."""
    text = str(entry).strip()
    inner, skip = _cfg_skip_suffix(text, n_scales)
    if skip is not None:
        method = resolve_method(
            inner, backbone, n_scales, depth, pixels=pixels, allow_other_backbone=allow_other_backbone
        )
        policy = dataclasses.replace(method.policy, guidance=GuidanceStage(skip_uncond_from_scale=skip))
        return Method(text, policy, f"{method.source}; conditional rows only from scale {skip} (CFG skip)")
    if text in ("none", "baseline"):
        return Method("none", Policy(method="none", name="none"), "baseline (no pruning)")
    base, _, variant = text.partition("@")
    if base.startswith("toprovar-") and base[len("toprovar-") :] in VARIANTS and not variant:
        base, variant = "toprovar", base[len("toprovar-") :]
    if base in BUILTIN_BASES:
        shipped = {
            "fastvar": f"fastvar-{backbone}",
            "fastvar_authors": f"fastvar_authors-{backbone}",
            "fixed_exit": f"fixed_exit-{backbone}",
            "toprovar": backbone,
        }[base]
        method = "fastvar" if base == "fastvar_authors" else base
        policy = load_policy(shipped) if shipped in shipped_policies() else None
        if policy is not None and policy.method == method:
            source = f"shipped {shipped}, {_provenance(policy)}"
        else:
            policy = default_policies(n_scales, depth)[base]
            source = UNCALIBRATED_DEFAULTS
    else:
        try:
            policy = load_policy(base)
        except UserError as err:
            if str(err).startswith("unknown policy"):
                raise UserError(
                    f"methods: {err}; or a built-in: none, {', '.join(BUILTIN_BASES)}, "
                    f"{', '.join('toprovar-' + v for v in VARIANTS)}, {CFG_SKIP}[:<scale>], "
                    f"<method>+{CFG_SKIP}[:<scale>]"
                ) from None
            raise UserError(f"methods: {err}") from None
        where = "file" if Path(base).suffix or Path(base).exists() else "shipped"
        source = f"{where} {base}, {_provenance(policy)}"
    if variant:
        policy = with_variant(policy, variant)
    try:
        check_policy_for_backbone(
            policy,
            backbone=backbone,
            n_scales=n_scales,
            depth=depth,
            pixels=pixels,
            allow_other_backbone=allow_other_backbone,
        )
    except UserError as err:
        raise UserError(f"methods: {text}: {err}") from None
    label = text if not Path(base).suffix else Path(base).stem + (f"@{variant}" if variant else "")
    return Method(label, policy, source)


def resolve_methods(
    entries: Sequence[Any] | None,
    backbone: str,
    n_scales: int,
    depth: int,
    *,
    pixels: str | None = None,
    allow_other_backbone: bool = False,
) -> list[Method]:
    """The baseline first, then every other entry once (duplicate labels are an error); each entry
    as `resolve_method` checks it."""
    if entries is None:
        entries = DEFAULT_METHODS
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, (list, tuple)) or not entries:
        raise UserError("methods must be a non-empty list, e.g. methods='[none,fastvar,fixed_exit,toprovar-full]'")
    methods = [
        resolve_method(e, backbone, n_scales, depth, pixels=pixels, allow_other_backbone=allow_other_backbone)
        for e in entries
    ]
    seen: set[str] = set()
    for m in methods:
        if m.label in seen and m.label != "none":
            raise UserError(f"methods lists '{m.label}' twice; give each method once")
        seen.add(m.label)
    baseline = [m for m in methods if not m.prunes][:1] or [resolve_method("none", backbone, n_scales, depth)]
    return baseline + [m for m in methods if m.prunes]


def schedule_notes(method: Method, n_scales: int, guided: bool = True) -> list[str]:
    """Settings of a policy that fit the run but do nothing on it (shown, not fatal; what does not
    fit was refused by `resolve_method`). `guided`: the run has classifier-free guidance."""
    p, notes = method.policy, []
    if p.method == "fixed_exit" and p.fixed_exit.exit_scale == n_scales - 1:
        notes.append(
            f"{method.label}: fixed_exit.exit_scale={p.fixed_exit.exit_scale} is the last scale of "
            f"{n_scales}: it exits nothing"
        )
    if p.method == "fastvar" and p.fastvar.exit_after_scale == n_scales - 1:
        notes.append(
            f"{method.label}: fastvar.exit_after_scale={p.fastvar.exit_after_scale} is the last scale of "
            f"{n_scales}: it exits nothing"
        )
    skip = p.guidance.skip_uncond_from_scale
    if skip is not None and not guided:
        notes.append(
            f"{method.label}: guidance.skip_uncond_from_scale={skip} saves nothing: the run has no "
            "classifier-free guidance (guidance_scale 1)"
        )
    return notes


def guided(guidance_scale: Any) -> bool:
    """Whether a guidance_scale setting (one number or one per scale) runs classifier-free guidance."""
    try:
        many = isinstance(guidance_scale, Sequence) and not isinstance(guidance_scale, str)
        values = [float(v) for v in guidance_scale] if many else [float(guidance_scale)]
    except (TypeError, ValueError):
        return True  # not a number: generate reports it
    return any(v != 1 for v in values)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class CompareResult:
    table: Any  # pandas DataFrame, one row per method
    per_image: Any  # pandas DataFrame, one row per method and prompt
    markdown: str  # the table as markdown
    files: dict[str, Path]
    notes: list[str]


def _prompts(cfg: CompareConfig, spec: Any) -> tuple[list[str], list[int], list[Any]]:
    """The prompts, their seeds and what the evaluator reads for each (the backbone's built-in
    prompts' specs, e.g. tiny's scenes; else the prompt)."""
    if cfg.n_prompts < 1:
        raise UserError(f"n_prompts={cfg.n_prompts}; give at least 1")
    prompts, specs = cfg.text_prompts, None
    if prompts is None:
        if spec.prompt_source is not None:  # e.g. tiny: captions of procedural scenes, which geneval-lite reads
            prompts, specs = spec.prompt_source.sample(cfg.n_prompts, cfg.prompt_seed)
        else:
            prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(cfg.n_prompts)]
    prompts, seeds = prompts_and_seeds(prompts, cfg.seeds)
    return prompts, seeds, specs if specs is not None else list(prompts)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def policy_sections(policy: Policy) -> dict[str, Any]:
    """The policy as a dict with only the sections its method reads."""
    used = {
        "toprovar": ("variant", "scale", "layer", "token"),
        "fastvar": ("fastvar",),
        "fixed_exit": ("fixed_exit",),
    }.get(policy.method, ())
    if policy.guidance.skip_uncond_from_scale is not None:
        used = (*used, "guidance")
    full = policy.to_dict()
    return {k: v for k, v in full.items() if k in ("version", "method", "backbone", "provenance") or k in used}


def _short(decisions: dict[str, Any]) -> str:
    out = []
    for key, value in decisions.items():
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.2g}" for v in value) + "]"
        out.append(f"{key}={value}")
    return ", ".join(out) or "none recorded"


def markdown_table(frame, columns: dict[str, tuple[str, int]]) -> str:
    """`columns`: frame column -> (header, digits)."""
    head = "| " + " | ".join(h for h, _ in columns.values()) + " |"
    rule = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"
    lines = [head, rule]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], d) for c, (_, d) in columns.items()) + " |")
    return "\n".join(lines)


def run_compare(cfg: CompareConfig, out_dir: Path, *, progress: bool = True) -> CompareResult:
    """Run every method of `cfg` (toprovar/conf/compare.yaml) and write the report into `out_dir`."""
    import pandas as pd
    import torch
    import yaml
    from tqdm.auto import tqdm

    from toprovar.batching import BatchLimit, Chunk, resolve_batch_size, run_in_chunks
    from toprovar.fast import release_fast_runtime
    from toprovar.flops import trace_flops
    from toprovar.metrics import geneval_scorer, psnr, ssim
    from toprovar.models import registry
    from toprovar.pipeline import generate
    from toprovar.plots import plot_pruned_tokens, save_labelled_grid, slug
    from toprovar.pruning.recording import record_kept_tokens

    group = cfg.backbone
    name = group["name"]
    spec = registry.get_backbone(name)
    settings = generation_settings(group, dataclasses.asdict(cfg), prog="toprovar compare")
    schedule = spec.schedules.scale_schedule(settings.get("h_div_w", 1.0), settings.get("pixels") or spec.pixels)
    n_scales, depth = len(schedule), spec.transformer.depth
    methods = resolve_methods(
        cfg.methods, name, n_scales, depth, pixels=settings.get("pixels"), allow_other_backbone=cfg.allow_other_backbone
    )
    with_cfg = guided(settings.get("guidance_scale", spec.guidance_scale))
    notes = [n for m in methods for n in schedule_notes(m, n_scales, with_cfg)]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    prompts, seeds, specs = _prompts(cfg, spec)
    warmup = cfg.warmup
    if warmup < 0:
        raise UserError(f"warmup={warmup}; give 0 or more")
    scorer = geneval_scorer(name)
    device, dtype = registry.resolve_device(cfg.device), registry.resolve_dtype(cfg.dtype)
    batch = resolve_batch_size(
        cfg.batch_size, group, spec, device, pixels=settings.get("pixels"), h_div_w=settings.get("h_div_w")
    )

    backbone = registry.build_backbone(spec, group.get("weights"), device=device, dtype=dtype)
    runs: dict[str, dict[str, Any]] = {
        m.label: {"images": [], "latency": [], "executed": 0.0, "unpruned": 0.0, "first": None} for m in methods
    }
    bar = tqdm(total=len(methods) * len(prompts), desc="compare", unit="image", disable=not progress)
    warmed: set[int] = set()  # batch sizes warmed up: each new size captures its own graphs

    def call(method: Method, chunk: Chunk):
        """One generate call; a pruning method's first call (a warm-up unless warmup=0) records its
        kept tokens for the figure, so no timed call carries the recorder."""
        run = runs[method.label]
        policy = method.policy if method.prunes else None
        record = method.prunes and run["first"] is None
        texts, chunk_seeds = [prompts[i] for i in chunk.padded], [seeds[i] for i in chunk.padded]
        res = generate(
            backbone, texts, chunk_seeds, policy=record_kept_tokens(policy) if record else policy, **settings
        )
        run["first"] = run["first"] or res
        return res

    def chunk_of_every_method(chunk: Chunk) -> dict[str, Any]:
        """Every method on one chunk (methods interleaved: slow drift of the machine hits all alike),
        after `warmup` calls each where the chunk's batch size is new (its graphs are captured then)."""
        if chunk.size not in warmed:
            for method in methods:
                bar.set_postfix_str(f"warm-up {method.label}")
                for _ in range(warmup):
                    call(method, chunk)
            warmed.add(chunk.size)
        results = {}
        for method in methods:
            bar.set_postfix_str(method.label)
            results[method.label] = call(method, chunk)
        return results

    def release() -> None:  # after an out-of-memory error: the fast path's buffers of the failed size
        release_fast_runtime(backbone)

    limit = BatchLimit(batch, "toprovar compare")
    for chunk, results in run_in_chunks(len(prompts), limit, chunk_of_every_method, release=release):
        share = len(chunk) / chunk.size  # padded copies of the last prompt are left out
        for label, res in results.items():
            run = runs[label]
            run["images"].append(res.images[: len(chunk)])
            run["latency"] += [res.trace.total_ms / chunk.size] * len(chunk)
            e, u = trace_flops(res.trace)
            run["executed"], run["unpruned"] = run["executed"] + e * share, run["unpruned"] + u * share
        bar.update(len(methods) * len(chunk))
    bar.close()
    for run in runs.values():
        run["images"] = torch.cat(run["images"])

    # -- quality and the table
    base = runs[methods[0].label]
    base_ms = float(torch.tensor(base["latency"]).median())
    rows, per_image = [], []
    for method in methods:
        run = runs[method.label]
        s = ssim(run["images"], base["images"]).tolist()
        p = psnr(run["images"], base["images"]).tolist()  # per image; the table's is of the pooled MSE
        g = scorer(run["images"], specs)["binary"].tolist() if scorer is not None else [None] * len(prompts)
        ms = float(torch.tensor(run["latency"]).median())
        ratio = run["executed"] / run["unpruned"]
        rows.append(
            {
                "method": method.label,
                "policy": method.source,
                "latency_ms": ms,
                "speedup": base_ms / ms,
                "flop_ratio": ratio,
                "flop_speedup": 1 / ratio if ratio > 0 else math.inf,
                "ssim": sum(s) / len(s),
                "psnr_db": float(psnr(run["images"], base["images"], "pooled")),
                "geneval_lite": (sum(g) / len(g)) if scorer is not None else None,
            }
        )
        for i, prompt in enumerate(prompts):
            per_image.append(
                {
                    "method": method.label,
                    "prompt": prompt,
                    "seed": seeds[i],
                    "latency_ms": run["latency"][i],
                    "ssim": s[i],
                    "psnr_db": p[i],
                    "geneval_lite": g[i],
                }
            )
        if method.prunes and run["executed"] >= run["unpruned"]:
            decisions = {k: v for k, v in run["first"].trace.pruning.items() if k in ("D", "R", "exit_scale")}
            notes.append(
                f"{method.label} pruned nothing on these prompts (FLOP ratio 1; first prompt's "
                f"decisions: {_short(decisions)})"
            )
    table, per_image_frame = pd.DataFrame(rows), pd.DataFrame(per_image)
    columns = {
        "method": ("method", 0),
        "policy": ("policy", 0),
        "latency_ms": ("latency ms/image", 1),
        "speedup": ("speedup", 2),
        "flop_ratio": ("FLOP ratio", 3),
        "flop_speedup": ("FLOP speedup", 2),
        "ssim": ("SSIM", 3),
        "psnr_db": ("PSNR dB", 2),
    }
    if scorer is not None:
        columns["geneval_lite"] = ("geneval-lite", 3)
    else:
        table = table.drop(columns="geneval_lite")
        per_image_frame = per_image_frame.drop(columns="geneval_lite")
    markdown = markdown_table(table, columns)

    # -- files
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out_dir / "compare.md",
        "csv": out_dir / "compare.csv",
        "per_image": out_dir / "compare_per_image.csv",
        "grid": out_dir / "compare_grid.png",
    }
    table.to_csv(files["csv"], index=False)
    per_image_frame.to_csv(files["per_image"], index=False)
    notes_ssim = [[f"SSIM {v:.2f}" for v in per_image_frame[per_image_frame.method == m.label].ssim] for m in methods]
    save_labelled_grid(
        [runs[m.label]["images"] for m in methods],
        [m.label for m in methods],
        prompts,
        files["grid"],
        cell_notes=notes_ssim,
    )
    for method in methods:
        if method.prunes:
            first = runs[method.label]["first"]
            path = out_dir / f"pruned_tokens_{slug(method.label)}.png"
            plot_pruned_tokens(
                first.trace,
                first.images[0],
                path,
                title=f"{method.label}: kept tokens per scale, prompt 0 ({prompts[0][:60]})",
            )
            files[f"pruned_tokens:{method.label}"] = path
    device = backbone.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    setting_lines = [
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- backbone: {name} (weights: {group.get('weights') or 'registry defaults'})",
        f"- device: {device_name} ({device}), dtype {backbone.dtype}, torch {torch.__version__}",
        f"- schedule: {n_scales} scales, {' '.join(f'{h}x{w}' for _, h, w in schedule)}; depth {depth}",
        f"- generation settings: {settings or 'backbone defaults'} (guidance_scale "
        f"{settings.get('guidance_scale', spec.guidance_scale)}, "
        f"temperature {settings.get('temperature', spec.temperature)})",
        f"- prompts: {len(prompts)}, batch size {' then '.join(map(str, limit.history))} (equal chunks), "
        f"warm-up calls per method and batch size {warmup}",
        "- latency: median over prompts of ms per image (scale loop + VAE decode, text encoding excluded; "
        "CUDA events on GPU); speedup = baseline latency / latency",
        "- FLOP ratio: executed / unpruned transformer FLOPs (toprovar.flops), summed over prompts; "
        "FLOP speedup = 1 / ratio",
        "- SSIM / PSNR: against the baseline image of the same prompt and seed (mean SSIM; PSNR of the pooled MSE)",
        "- geneval-lite: "
        + (
            "share of prompts whose every check holds (binary score)"
            if scorer is not None
            else "not available for this backbone"
        ),
    ]
    policies = "\n\n".join(
        f"### {m.label} ({m.source})\n\n```yaml\n{yaml.safe_dump(policy_sections(m.policy), sort_keys=False)}```"
        for m in methods
        if m.prunes
    )
    prompt_lines = "\n".join(f"{i}. seed {s}: {p}" for i, (p, s) in enumerate(zip(prompts, seeds)))
    note_lines = "".join(f"- {n}\n" for n in notes)
    files["markdown"].write_text(
        f"# Pruning methods compared on {name}\n\n{markdown}\n\n"
        + (f"Notes:\n{note_lines}\n" if notes else "")
        + "## Settings\n\n"
        + "\n".join(setting_lines)
        + "\n\n## Prompts\n\n"
        + prompt_lines
        + "\n\n## Policies\n\n"
        + (policies or "(baseline only)")
        + "\n"
    )
    return CompareResult(table, per_image_frame, markdown, files, notes)
