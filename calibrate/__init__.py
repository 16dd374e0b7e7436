"""`python -m calibrate`: tune a ToProVAR pruning policy for one backbone (docs/calibration.md).

Modules, in the order a run uses them: config (typed Hydra groups), backend (build the backbone,
generate through `toprovar.pipeline`), prompts, presample (+ probes, stats), objective (+ costs,
quality: scores of a policy vs the unpruned run), search (Optuna study), select, export,
tracking (MLflow), plots; app wires them together and __main__ is the entry point.
"""
