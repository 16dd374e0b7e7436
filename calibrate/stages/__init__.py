"""The stages of a calibration, one module each, in the order a run uses them: presample, search,
validate (selection and held-out validation), report, export; evaluate measures given policies.

Each offers `run(ctx, ...)`: it reads the frozen `calibrate.context.RunContext` and what earlier stages
returned, and returns its own result. Which stages run, in which order and in which process is
calibrate.app's decision alone.
"""
