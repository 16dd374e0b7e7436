"""Search parameters + pre-sampling facts -> a policy document the runtime loads.

The only place that knows how the searched knobs map onto the policy schema of `toprovar.policy`.
"""
from __future__ import annotations

from typing import Any, Mapping

from calibrate.presample import PresampleSummary

# Warm start when the policy module does not state defaults: τ from the paper (A.2); the others
# are this project's documented defaults for the gate of Eq. 6.
FALLBACK_DEFAULTS = {"tau": 0.4, "beta": 1.0, "alpha_min": 0.1, "alpha_max": 0.6, "min_keep": 0.1}


def paper_defaults() -> dict[str, float]:
    """τ, β, α_min, α_max, min_keep of the default ToProVAR policy (the paper's settings)."""
    try:
        from toprovar.policy import paper_defaults as library_defaults
    except ImportError:
        return dict(FALLBACK_DEFAULTS)
    return {**FALLBACK_DEFAULTS, **{k: float(v) for k, v in library_defaults().items() if k in FALLBACK_DEFAULTS}}


def policy_document(params: Mapping[str, float], summary: PresampleSummary, backbone: str) -> dict[str, Any]:
    """The policy as YAML-ready data (schema of toprovar.policy)."""
    return {
        "method": "toprovar",
        "backbone": backbone,
        "scale": {"tau": float(params["tau"]), "crossing": summary.crossing, "action": "start_pruning"},
        "layer": {"beta": float(params["beta"]), "mode": "static", "ratios": list(summary.layer_ratios)},
        "token": {"alpha_min": float(params["alpha_min"]), "alpha_max": float(params["alpha_max"]),
                  "min_keep": float(params["min_keep"])},
    }


def runtime_policy(document: Mapping[str, Any]) -> Any:
    """The object `toprovar.pipeline.generate(policy=...)` accepts for this document."""
    from toprovar.policy import policy_from_dict

    return policy_from_dict(dict(document))


class PolicyFactory:
    """`params -> runtime policy` for one backbone and one pre-sampling summary."""

    def __init__(self, summary: PresampleSummary, backbone: str):
        self.summary, self.backbone = summary, backbone

    def document(self, params: Mapping[str, float]) -> dict[str, Any]:
        return policy_document(params, self.summary, self.backbone)

    def __call__(self, params: Mapping[str, float]) -> Any:
        return runtime_policy(self.document(params))
