"""Pictures of what pruning did: the pruned-token map (the paper's Fig. 9) and labelled image grids.

Files only (matplotlib's Agg backend, no display). The data behind each picture is returned, so
tests and reports can check it against the trace.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402


def slug(text: str) -> str:
    """A file-name-safe version of a method label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "method"


def pruned_token_maps(trace, image_index: int = 0) -> dict[int, np.ndarray]:
    """Per pruned scale: the (h, w) map of how many layers ran each token of one image.

    A scale counts as pruned when some token ran fewer than all layers (a scale that did not run
    at all, after an exit, is all zeros). Needs the trace of a call run under
    `toprovar.pruning.recording.KeptTokenRecorder` when layers ran only part of their tokens.
    """
    depth = trace.depth or max((r.layer for r in trace.layers), default=-1) + 1
    maps = trace.kept_maps(image_index)
    return {si: m.numpy() for si, m in maps.items() if int(m.min()) < depth}


def plot_pruned_tokens(
    trace, image: Tensor | np.ndarray, path: str | Path, *, image_index: int = 0, title: str | None = None
) -> dict[int, np.ndarray]:
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


# Longest side of one image in a grid: a 1024² image is shown at 256 px (area-averaged), so a grid
# of a dozen prompts stays a few MB as PNG (MLflow artifacts included); smaller images keep their size.
CELL_PX = 256
MARK_COLOURS = {"lost": "tab:red", "won": "tab:green"}  # cell frames; None: no frame


@dataclass
class GridLayout:
    """What a grid shows, read back from the drawn figure (tests and reports check it)."""

    path: Path
    row_labels: list[str]  # the y label of each row's first cell
    column_labels: list[str]  # the title of each column's first cell
    notes: list[list[str]]  # the text under each cell
    marks: list[list[str | None]]  # each cell's frame: 'lost', 'won' or None
    cell_px: int  # longest side of a cell's image, in pixels
    size: tuple[int, int]  # the PNG's (width, height)


def thumbnail(image: Tensor | np.ndarray, cell_px: int = CELL_PX) -> np.ndarray:
    """An (H, W, 3) uint8 image scaled down (area average) so its longest side is at most `cell_px`."""
    pixels = torch.as_tensor(np.asarray(image.cpu() if isinstance(image, Tensor) else image))
    h, w = pixels.shape[:2]
    if max(h, w) <= cell_px:
        return pixels.numpy()
    scale = cell_px / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(pixels.permute(2, 0, 1)[None].float(), size=size, mode="area")
    return small[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def draw_grid(
    cells: Sequence[Sequence[Tensor | np.ndarray]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    path: str | Path,
    *,
    notes: Sequence[Sequence[str]] | None = None,
    marks: Sequence[Sequence[str | None]] | None = None,
    title: str | None = None,
    cell_px: int = CELL_PX,
    label_every_cell: bool = False,
) -> GridLayout:
    """Images `cells[r][c]` ((H, W, 3) uint8) in a grid: each row labelled on its left, each column
    on top (every cell with `label_every_cell`), `notes[r][c]` under a cell, `marks[r][c]` as a
    coloured frame ('lost' red, 'won' green). Images are shown at most `cell_px` on a side."""
    n_rows, n_cols = len(cells), len(cells[0]) if cells else 0
    shown = [[thumbnail(image, cell_px) for image in row] for row in cells]
    side = max(max(im.shape[:2]) for row in shown for im in row) if n_cols else cell_px
    dpi = 100
    inch = max(side, 96) / dpi  # small images (tiny's 128 px) are drawn at least ~1 inch
    width = n_cols * (inch + 0.15) + 1.4
    title_lines = textwrap.wrap(title, int(width * 14)) if title else []  # ~7 px a character at fontsize 9
    # Notes of several lines (SSIM and each score change) need room under their row: ~0.12 inch a line.
    note_lines = sum(max((str(n).count("\n") for n in row), default=0) for row in notes) if notes else 0
    height = n_rows * (inch + 0.65) + 0.12 * note_lines + 0.2 + 0.2 * len(title_lines)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, dpi=dpi, figsize=(width, height))
    wrap = max(12, int(inch * 14))  # characters per label line at fontsize 7
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(shown[r][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or label_every_cell:
                ax.set_title(_lines(str(column_labels[c]), wrap, 4), fontsize=7)
            if c == 0:
                ax.set_ylabel(_lines(str(row_labels[r]), 18, 4), fontsize=8)
            if notes is not None and notes[r][c]:
                ax.set_xlabel(notes[r][c], fontsize=7)
            mark = None if marks is None else marks[r][c]
            for spine in ax.spines.values():
                spine.set_visible(mark is not None)
                if mark is not None:
                    spine.set_edgecolor(MARK_COLOURS[mark])
                    spine.set_linewidth(3)
    if title_lines:
        fig.suptitle("\n".join(title_lines), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    layout = GridLayout(
        path,
        [axes[r][0].get_ylabel().replace("\n", " ") for r in range(n_rows)],
        [axes[0][c].get_title().replace("\n", " ") for c in range(n_cols)],
        [[axes[r][c].get_xlabel() for c in range(n_cols)] for r in range(n_rows)],
        [[_frame(axes[r][c]) for c in range(n_cols)] for r in range(n_rows)],
        cell_px,
        tuple(int(v) for v in fig.canvas.get_width_height()),
    )
    plt.close(fig)
    return layout


def _lines(text: str, width: int, most: int) -> str:
    """`text` wrapped to lines of `width` characters, at most `most` of them (the last ending in … if cut)."""
    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > most:
        lines = lines[:most]
        lines[-1] = lines[-1][: width - 1] + "…"
    return "\n".join(lines)


def _frame(ax) -> str | None:
    spine = ax.spines["left"]
    if not spine.get_visible():
        return None
    colour = matplotlib.colors.to_hex(spine.get_edgecolor())
    return next(name for name, value in MARK_COLOURS.items() if matplotlib.colors.to_hex(value) == colour)


def save_labelled_grid(
    images: Sequence[Tensor],
    columns: Sequence[str],
    rows: Sequence[str],
    path: str | Path,
    cell_notes: Sequence[Sequence[str]] | None = None,
) -> Path:
    """A grid with one row per prompt and one column per method: `images[c]` is the (N, H, W, 3)
    uint8 batch of column c; every cell is titled with its column label, noted with
    `cell_notes[c][r]`, every row labelled with its prompt."""
    cells = [[batch[r] for batch in images] for r in range(len(rows))]
    notes = None if cell_notes is None else [[cell_notes[c][r] for c in range(len(columns))] for r in range(len(rows))]
    return draw_grid(cells, rows, columns, path, notes=notes, label_every_cell=True).path
