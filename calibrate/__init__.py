"""`python -m calibrate`: tune a ToProVAR pruning policy for one backbone (docs/calibration.md).

app orders the stages (calibrate/stages/: presample, search, validate, report, export, evaluate),
each a function of the frozen run context (context) and of what earlier stages returned. Beneath
them: config (typed Hydra groups), inputs (checks before any weights load, loading), backend (the
backbone, generating through `toprovar.pipeline`), prompts, presample (+ probes, stats), objective
(+ costs, quality: scores of a policy vs the unpruned run), search (Optuna study), select, export,
tracking and parent_run (MLflow), record (timings, artifacts), locks, workers, plots; __main__ is
the entry point.
"""
