"""Pictures of what pruning did: the pruned-token map (the paper's Fig. 9) and labelled image grids.

Files only (matplotlib's Agg backend, no display). The data behind each picture is returned, so
tests and reports can check it against the trace.
"""
from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402


def slug(text: str) -> str:
    """A file-name-safe version of a method label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "method"


def pruned_token_maps(trace, image_index: int = 0) -> dict[int, np.ndarray]:
    """Per pruned scale: the (h, w) map of how many layers ran each token of one image.

    A scale counts as pruned when some token ran fewer than all layers (a scale that did not run
    at all, after an exit, is all zeros). Needs the trace of a call run under
    `toprovar.trace.KeptTokenRecorder` when layers ran only part of their tokens.
    """
    depth = trace.depth or max((r.layer for r in trace.layers), default=-1) + 1
    maps = trace.kept_maps(image_index)
    return {si: m.numpy() for si, m in maps.items() if int(m.min()) < depth}


def plot_pruned_tokens(trace, image: Tensor | np.ndarray, path: str | Path, *, image_index: int = 0,
                       title: str | None = None) -> dict[int, np.ndarray]:
    """The generated image beside one panel per pruned scale, each token coloured by the number of
    layers that ran it (0 = pruned everywhere / scale not run, depth = never pruned).

    `image`: the (H, W, 3) uint8 image of `image_index` in the traced call. Returns the maps drawn
    (`pruned_token_maps`).
    """
    depth = trace.depth or max((r.layer for r in trace.layers), default=-1) + 1
    maps = pruned_token_maps(trace, image_index)
    exited = {s.scale for s in trace.scales if s.exited}
    n = 1 + max(len(maps), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.8, 3.0), squeeze=False)
    axes = axes[0]
    pixels = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    axes[0].imshow(pixels)
    axes[0].set_title("generated image", fontsize=9)
    last = None
    cmap = plt.get_cmap("viridis", depth + 1)  # one colour per layer count 0..depth
    for ax, (si, counts) in zip(axes[1:], sorted(maps.items())):
        h, w = counts.shape
        last = ax.imshow(counts, cmap=cmap, vmin=-0.5, vmax=depth + 0.5, interpolation="nearest")
        if si in exited:
            label = "not run (exit)"
        else:
            label = f"{counts.sum() / (depth * counts.size):.0%} of token-layers ran"
        ax.set_title(f"scale {si} ({h}×{w})\n{label}", fontsize=9)
    if not maps:
        axes[1].text(0.5, 0.5, "no token pruned", ha="center", va="center", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if last is not None:
        ticks = np.unique(np.linspace(0, depth, min(depth + 1, 9)).round().astype(int))
        bar = fig.colorbar(last, ax=list(axes[1:]), fraction=0.025, pad=0.02, ticks=ticks)
        bar.set_label("layers that ran the token", fontsize=8)
    fig.suptitle(title or f"kept / pruned tokens per scale ({trace.pruning.get('method', 'none')})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return maps


def save_labelled_grid(images: Sequence[Tensor], columns: Sequence[str], rows: Sequence[str], path: str | Path,
                       cell_notes: Sequence[Sequence[str]] | None = None) -> Path:
    """A grid with one row per prompt and one column per method: `images[c]` is the (N, H, W, 3)
    uint8 batch of column c; every cell is titled with its column label (and `cell_notes[c][r]`),
    every row with its prompt."""
    n_rows, n_cols = len(rows), len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols + 1.2, 2.15 * n_rows), squeeze=False)
    for c, (label, batch) in enumerate(zip(columns, images)):
        for r in range(n_rows):
            ax = axes[r][c]
            ax.imshow(batch[r].numpy() if isinstance(batch[r], Tensor) else batch[r])
            note = f"\n{cell_notes[c][r]}" if cell_notes is not None else ""
            ax.set_title(f"{label}{note}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(rows[r], 22)[:4]), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
