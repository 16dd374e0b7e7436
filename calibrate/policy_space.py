"""Search parameters + pre-sampling facts -> a ToProVAR policy the runtime loads.

The only place that knows how the searched knobs map onto the policy schema of `toprovar.policy`:
τ, min_scale, action (scale stage), β with the pre-sampled static layer ratios (layer stage),
α_min, α_max, min_keep, protect_layers, restore, order (token stage). The crossing direction
comes from pre-sampling; the rest of the schema keeps its defaults, and so does any knob missing
from `params` (studies made before a knob was searched).
"""
from __future__ import annotations

from typing import Any, Mapping

from calibrate.presample import PresampleSummary
from toprovar.policy import SCHEMA_VERSION, Policy, ScaleStage, TokenStage, policy_from_dict
from toprovar.policy import paper_defaults as policy_defaults


def paper_defaults() -> dict[str, float]:
    """The default ToProVAR knobs (the paper's τ = 0.4 and this project's gate defaults)."""
    return {**policy_defaults(), "min_scale": ScaleStage.min_scale, "protect_layers": TokenStage.protect_layers,
            "restore": TokenStage.restore, "order": TokenStage.order, "action": ScaleStage.action}


def policy_document(params: Mapping[str, float], summary: PresampleSummary, backbone: str) -> dict[str, Any]:
    """The policy as YAML-ready data (schema version of toprovar.policy)."""
    return {
        "version": SCHEMA_VERSION,
        "method": "toprovar",
        "variant": "full",
        "backbone": backbone,
        "scale": {"tau": float(params["tau"]), "crossing": summary.crossing,
                  "action": str(params.get("action", ScaleStage.action)), "min_scale": int(params["min_scale"])},
        "layer": {"mode": "static", "beta": float(params["beta"]),
                  "ratios": [max(1.0, float(r)) for r in summary.layer_ratios]},
        "token": {"alpha_min": float(params["alpha_min"]), "alpha_max": float(params["alpha_max"]),
                  "min_keep": float(params["min_keep"]),
                  "protect_layers": int(params.get("protect_layers", TokenStage.protect_layers)),
                  "restore": str(params.get("restore", TokenStage.restore)),
                  "order": str(params.get("order", TokenStage.order))},
    }


class PolicyFactory:
    """`params -> Policy` for one backbone and one pre-sampling summary."""

    def __init__(self, summary: PresampleSummary, backbone: str):
        self.summary, self.backbone = summary, backbone

    def document(self, params: Mapping[str, float]) -> dict[str, Any]:
        return policy_document(params, self.summary, self.backbone)

    def __call__(self, params: Mapping[str, float]) -> Policy:
        return policy_from_dict(self.document(params))
