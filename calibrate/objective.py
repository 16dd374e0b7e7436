"""Scores of a policy on a prompt set: real generations compared with the unpruned ones, prompt by prompt.

speedup, the search objective: on CPU (`model`) the wall clock predicted by the study's cost model
(calibrate.cost_model) from the traces, unpruned / policy (deterministic, independent of machine
load); with `flops` the FLOP ratio; on CUDA (`latency`) the ratio of generation times read off the
scoring generation itself: each chunk's trace time (CUDA events around the scale
loop and the VAE decode, text encoding excluded). A chunk whose call captured CUDA graphs (a
plan new to the static buffers) runs again, up to `search.latency.warmup` times, until a call
captures nothing, so capture never counts; before the first policy a scorer times, one untimed
batch of it compiles the pruned path's kernels; `search.latency.repeats` > 1 adds whole timed
passes (the median counts). The unpruned reference is timed once per prompt set, with its images.
Every score also carries the three side by side: `wall_speedup` (measured, the traces' times: CUDA
events on GPU, the host clock on CPU), `flop_speedup` (the FLOP ratio, named as such) and, with a
cost model, `predicted_speedup` and its `prediction_error` against the measured one. What a report
states as a policy's speedup is `wall_speedup` on the validating device.
quality, per prompt: SSIM against the unpruned image of the same prompt and seed (on the
generation's device), and where available the geneval-lite scores (`tiny`) and the CLIPScore
(`quality.clip`) of both images — the paired values that acceptance bounds (calibrate.acceptance).

The unpruned reference is generated lazily, batch by batch, only as far as some policy needed
it, so a sequential validation that decides early spends nothing on the prompts it never reached.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calibrate.acceptance import SequentialTest, Verdict
from calibrate.backend import CalibrationBackend, Generation, chunk_plan
from calibrate.config import LatencyConfig
from calibrate.cost_model import CostModel, prediction_error
from calibrate.costs import flop_totals, trace_summary
from calibrate.prompts import PromptSet
from calibrate.quality import ClipScorer, Evaluator, ssim_per_image
from calibrate.search import Scores

PolicyBuilder = Callable[[dict[str, float]], Any]


def resolve_cost(objective: str, device: torch.device) -> str:
    if objective == "auto":
        return "latency" if device.type == "cuda" else "model"
    return objective


def executed_flops(gen: Generation, backend: CalibrationBackend) -> float:
    """FLOPs the prompts' images executed (a padded chunk's copies left out, see `Generation`)."""
    return sum(
        flop_totals([trace], backend)[0] * real / size for trace, real, size in zip(gen.traces, gen.chunks, gen.sizes)
    )


@dataclass
class Run:
    """One policy (or the unpruned model) on the first `len(self)` prompts of a set."""

    images: torch.Tensor  # (n, H, W, 3) uint8
    traces: list[Any]  # one per generated chunk
    flops: float  # executed, summed
    latency_ms: float | None  # generation time of the prompts, summed over chunks
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # evaluator scores per prompt, by name
    predicted_ms: float | None = None  # the cost model's time of the prompts (None: no model)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def extended(self, more: Run) -> Run:
        latency = None if self.latency_ms is None else self.latency_ms + more.latency_ms
        predicted = None if self.predicted_ms is None else self.predicted_ms + more.predicted_ms
        return Run(
            torch.cat([self.images, more.images]),
            self.traces + more.traces,
            self.flops + more.flops,
            latency,
            {k: np.concatenate([v, more.scores[k]]) for k, v in self.scores.items()},
            predicted,
        )


@dataclass
class Validation:
    """A sequential held-out validation: the scores on the prompts it used and its verdict."""

    scores: Scores
    verdict: Verdict
    paired: dict[str, np.ndarray]  # the per-prompt values the verdict rests on


class PolicyScorer:
    """`params -> Scores` for one prompt set, against its unpruned reference (generated lazily).

    `geneval_score` names the evaluator score (quality.GENEVAL_SCORES) whose drop is
    `Scores.geneval_drop` — the one the search constraint and acceptance use. `clip`: the
    CLIPScore evaluator (`quality.clip`), whose paired drop is `clip_drop`. `cost_model`: the
    study's (calibrate.cost_model), required by the `model` cost.
    """

    def __init__(
        self,
        backend: CalibrationBackend,
        prompts: PromptSet,
        build_policy: PolicyBuilder,
        *,
        cost: str,
        latency: LatencyConfig,
        evaluator: Evaluator | None,
        geneval_score: str = "binary",
        desc: str = "search",
        clip: ClipScorer | None = None,
        cost_model: CostModel | None = None,
    ):
        if cost == "model" and cost_model is None:
            raise ValueError("the model cost needs a cost model (calibrate.cost_model)")
        self.cost_model = cost_model
        self.backend, self.prompts, self.build_policy = backend, prompts, build_policy
        self.cost, self.latency, self.evaluator, self.desc = cost, latency, evaluator, desc
        self.geneval_score, self.clip = geneval_score, clip
        self._reference: Run | None = None
        self._warm = False  # a policy ran here already (the pruned path's kernels are compiled)

    def _quality_time(self):
        clock = self.backend.clock
        return nullcontext() if clock is None else clock.section("quality")

    # -- generation ---------------------------------------------------------------------------
    def _run(self, policy: Any, start: int, stop: int, desc: str | None = None) -> Run:
        texts, seeds = self.prompts.texts[start:stop], self.prompts.seeds[start:stop]
        timed = self.cost == "latency"
        if timed and policy is not None and not self._warm:
            # The first policy's first call compiles the pruned path's kernels (Triton JIT): one
            # untimed batch first. Later policies reuse them; new CUDA graphs are handled by `retime`.
            self._warm = True
            size = chunk_plan(len(texts), self.backend.batch_size)[0]
            self.backend.generate(texts[:size], seeds[:size], policy=policy, timing_only=True)
        gen = self.backend.generate(texts, seeds, policy=policy, desc=desc, retime=self.latency.warmup if timed else 0)
        latency = gen.total_latency_ms
        if timed and self.latency.repeats > 1:  # more timed passes for a noisy device; the median counts
            passes = [latency] + [
                self.backend.generate(texts, seeds, policy=policy, timing_only=True).total_latency_ms
                for _ in range(self.latency.repeats - 1)
            ]
            latency = statistics.median(passes)
        scores = {}
        with self._quality_time():
            if self.evaluator is not None:
                scores.update(self.evaluator(gen.images, self.prompts.specs[start:stop]))
            if self.clip is not None:
                scores.update(self.clip(gen.images, texts))
        predicted = None
        if self.cost_model is not None:
            shares = [real / size for real, size in zip(gen.chunks, gen.sizes)]
            predicted = self.cost_model.predict_total_ms(gen.traces, self.backend.backbone.spec, shares)
        return Run(gen.images, gen.traces, executed_flops(gen, self.backend), latency, scores, predicted)

    def reference(self, n: int | None = None) -> Run:
        """The unpruned run of the first `n` prompts (all by default), generated as far as needed."""
        n = len(self.prompts) if n is None else min(n, len(self.prompts))
        done = 0 if self._reference is None else len(self._reference)
        if done < n:
            more = self._run(None, done, n, f"{self.desc}: unpruned reference")
            self._reference = more if self._reference is None else self._reference.extended(more)
        ref = self._reference
        if len(ref) == n:
            return ref
        # Unpruned, every prompt costs the same FLOPs; its latency share is taken as proportional.
        part = n / len(ref)
        latency = None if ref.latency_ms is None else ref.latency_ms * part
        predicted = None if ref.predicted_ms is None else ref.predicted_ms * part
        return Run(ref.images[:n], [], ref.flops * part, latency, {k: v[:n] for k, v in ref.scores.items()}, predicted)

    # -- scoring ------------------------------------------------------------------------------
    def __call__(self, params: dict[str, float]) -> Scores:
        return self.score_policy(self.build_policy(params))

    def score_policy(self, policy: Any) -> Scores:
        """Scores on every prompt of the set."""
        run, ref, paired = self.run_paired(policy)
        return self.compare(run, ref, paired)

    def run_paired(self, policy: Any, desc: str | None = None) -> tuple[Run, Run, dict[str, np.ndarray]]:
        """The policy's run on every prompt of the set, the reference and their paired values."""
        run = self._run(policy, 0, len(self.prompts), desc)
        ref = self.reference()
        return run, ref, self.paired(run, ref)

    def paired(self, run: Run, ref: Run) -> dict[str, np.ndarray]:
        """Per-prompt paired values: `ssim` of each image against its unpruned one and, with an
        evaluator, `geneval_drop.<score>` = unpruned score − policy score for every score; with
        CLIP, `clip_drop` = unpruned CLIPScore − policy CLIPScore."""
        with self._quality_time():
            values = {"ssim": ssim_per_image(run.images, ref.images, self.backend.device).double().numpy()}
        for name, score in run.scores.items():
            values["clip_drop" if name == ClipScorer.name else f"geneval_drop.{name}"] = ref.scores[name] - score
        return values

    def compare(self, run: Run, ref: Run, paired: dict[str, np.ndarray] | None = None) -> Scores:
        """The policy's Scores against the reference of the same prompts (means of the paired values)."""
        flop_speedup = ref.flops / max(run.flops, 1.0)
        measured = (
            None if run.latency_ms is None or ref.latency_ms is None else ref.latency_ms / max(run.latency_ms, 1e-9)
        )
        predicted = None if run.predicted_ms is None else ref.predicted_ms / max(run.predicted_ms, 1e-9)
        speedup = {"flops": flop_speedup, "latency": measured, "model": predicted}[self.cost]
        paired = self.paired(run, ref) if paired is None else paired
        extra = {
            "flop_speedup": flop_speedup,
            "ssim_min": float(paired["ssim"].min()),
            "prompts": float(len(run)),
            "flops_executed": run.flops,
            "flops_unpruned": ref.flops,
            **trace_summary(run.traces),
        }
        if run.latency_ms is not None and ref.latency_ms is not None:
            extra.update(
                latency_ms=run.latency_ms,
                latency_unpruned_ms=ref.latency_ms,
                wall_speedup=measured,
            )
        if predicted is not None:
            extra.update(
                predicted_ms=run.predicted_ms, predicted_unpruned_ms=ref.predicted_ms, predicted_speedup=predicted
            )
            if measured is not None:
                extra["prediction_error"] = prediction_error(predicted, measured)
        for name in run.scores:
            if name == ClipScorer.name:
                diff = paired["clip_drop"]
                extra.update(
                    clip=float(run.scores[name].mean()),
                    clip_unpruned=float(ref.scores[name].mean()),
                    clip_drop=float(diff.mean()),
                    clip_prompts_lost=float((diff > 0).sum()),
                    clip_prompts_won=float((diff < 0).sum()),
                )
                continue
            prefix = "geneval" if name == "binary" else f"geneval_{name}"
            extra.update(
                {
                    prefix: float(run.scores[name].mean()),
                    f"{prefix}_unpruned": float(ref.scores[name].mean()),
                    f"{prefix}_drop": float(paired[f"geneval_drop.{name}"].mean()),
                }
            )
        drop = None
        if self.geneval_score in run.scores:
            diff = paired[f"geneval_drop.{self.geneval_score}"]
            drop = float(diff.mean())
            # How many prompts went each way: a drop near 0 can hide losses offset by gains.
            extra.update(prompts_lost=float((diff > 0).sum()), prompts_won=float((diff < 0).sum()))
        return Scores(
            speedup=float(speedup), ssim=float(paired["ssim"].mean()), geneval_drop=drop, extra=extra, images=run.images
        )

    def validate(self, policy: Any, test: SequentialTest, desc: str | None = None) -> Validation:
        """Sequential paired validation: generate the next batch of prompts (and, as far as no
        earlier validation did, their unpruned reference), decide, stop once decided or at the
        budget. `test.budget` must not exceed the prompt set."""
        if test.budget > len(self.prompts):
            raise ValueError(f"acceptance budget {test.budget} exceeds the {len(self.prompts)} prompts of the set")
        run = None
        for look, size in enumerate(test.sizes(), start=1):
            more = self._run(policy, 0 if run is None else len(run), size, desc)
            run = more if run is None else run.extended(more)
            ref = self.reference(size)
            paired = self.paired(run, ref)
            verdict = test.decide(self.criteria_values(paired), look)
            if verdict.final:
                break
        return Validation(self.compare(run, ref, paired), verdict, paired)

    def criteria_values(self, paired: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The per-prompt values acceptance's criteria read (calibrate.acceptance.criteria)."""
        values = {"ssim": paired["ssim"]}
        key = f"geneval_drop.{self.geneval_score}"
        if key in paired:
            values["geneval_drop"] = paired[key]
        if "clip_drop" in paired:
            values["clip_drop"] = paired["clip_drop"]
        return values
