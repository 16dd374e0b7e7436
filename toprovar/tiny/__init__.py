"""The embedded `tiny` backbone: a small Infinity trained here on procedural scenes.

Importing the package registers the backbone `tiny` (toprovar.tiny.model). Modules: `scenes`
(captioned procedural scenes, rendering), `evaluate` (geneval-lite), `text` (word-level text
encoder), `model` (configs, weights, registration), `train` (the training command).
"""

from toprovar.tiny.model import register as _register

_register()
