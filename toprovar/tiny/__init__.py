"""The embedded `tiny` backbone: procedural scenes, geneval-lite, a small Infinity trained here."""
