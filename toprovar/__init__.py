"""toprovar: entropy-guided scale/layer/token pruning for next-scale VAR models (Infinity)."""

__version__ = "0.1.0"


def load_policy(path_or_name, backbone=None, **options):
    """A pruning policy from a YAML path or a shipped name (see toprovar.policy.load_policy)."""
    from toprovar.policy import load_policy as _load

    return _load(path_or_name, backbone, **options)
