"""toprovar: entropy-guided scale/layer/token pruning for next-scale VAR models (Infinity)."""
__version__ = "0.1.0"
