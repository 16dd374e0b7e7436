"""Checkpoint files for backbones whose real weights are not at hand.

`python -m toprovar.checkpoints synth backbone=infinity-2b out=DIR [seed=0] [preset=full|small]`
writes random-weight files in the official release layout (`toprovar.checkpoints.synth`).
"""
