"""Scores of a policy on a prompt set: real generations compared with the unpruned ones.

speedup: on CPU (and `search.objective=flops`) the FLOP ratio unpruned / executed from the traces
(deterministic, independent of machine load); on CUDA (`latency`) the ratio of median wall times
measured with CUDA events after warm-up. quality: mean SSIM against the unpruned image of the same
prompt and seed; geneval-lite drop where the backbone has an evaluator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from calibrate.backend import CalibrationBackend, Generation
from calibrate.config import LatencyConfig
from calibrate.costs import flop_totals, trace_summary
from calibrate.prompts import PromptSet
from calibrate.quality import Scorer, ssim_per_image
from calibrate.search import Scores
from toprovar.trace import median_latency_ms

PolicyBuilder = Callable[[dict[str, float]], Any]


def resolve_cost(objective: str, device: torch.device) -> str:
    if objective == "auto":
        return "latency" if device.type == "cuda" else "flops"
    return objective


@dataclass
class Reference:
    """The unpruned run of a prompt set: images, FLOPs, optional latency and evaluator scores."""

    images: torch.Tensor
    flops: float
    latency_ms: float | None
    scores: torch.Tensor | None
    summary: dict[str, float]


class PolicyScorer:
    """`params -> Scores` for one prompt set, against its unpruned reference (generated once)."""

    def __init__(self, backend: CalibrationBackend, prompts: PromptSet, build_policy: PolicyBuilder, *,
                 cost: str, latency: LatencyConfig, evaluator: Scorer | None, desc: str = "search"):
        self.backend, self.prompts, self.build_policy = backend, prompts, build_policy
        self.cost, self.latency, self.evaluator, self.desc = cost, latency, evaluator, desc
        self.reference = self._measure(None, f"{desc}: unpruned reference")

    def _generate(self, policy: Any, desc: str | None = None) -> Generation:
        return self.backend.generate(self.prompts.texts, self.prompts.seeds, policy=policy, desc=desc)

    def _measure(self, policy: Any, desc: str | None = None) -> Reference:
        gen = self._generate(policy, desc)
        executed, _ = flop_totals(gen.traces, self.backend)
        latency = None
        if self.cost == "latency":
            latency = median_latency_ms(lambda: self._generate(policy), self.backend.device,
                                         self.latency.warmup, self.latency.repeats)
        scores = self.evaluator(gen.images, self.prompts.specs) if self.evaluator is not None else None
        return Reference(gen.images, executed, latency, scores, trace_summary(gen.traces))

    def __call__(self, params: dict[str, float]) -> Scores:
        return self.score_policy(self.build_policy(params))

    def score_policy(self, policy: Any) -> Scores:
        run = self._measure(policy)
        ref = self.reference
        flop_speedup = ref.flops / max(run.flops, 1.0)
        speedup = flop_speedup if self.cost == "flops" else ref.latency_ms / max(run.latency_ms, 1e-9)
        ssim = ssim_per_image(run.images, ref.images)
        extra = {"flop_speedup": flop_speedup, "ssim_min": float(ssim.min()),
                 "flops_executed": run.flops, "flops_unpruned": ref.flops, **run.summary}
        if run.latency_ms is not None:
            extra.update(latency_ms=run.latency_ms, latency_unpruned_ms=ref.latency_ms)
        drop = None
        if run.scores is not None and ref.scores is not None:
            drop = float(ref.scores.mean() - run.scores.mean())
            # How many prompts went each way: a drop near 0 can hide losses offset by gains.
            extra.update(geneval=float(run.scores.mean()), geneval_unpruned=float(ref.scores.mean()),
                         prompts_lost=float((run.scores < ref.scores).sum()),
                         prompts_won=float((run.scores > ref.scores).sum()))
        return Scores(speedup=float(speedup), ssim=float(ssim.mean()), geneval_drop=drop, extra=extra,
                      images=run.images)
