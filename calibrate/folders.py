"""The folders a calibration writes to: checked before any work (a folder that cannot be written is
a one-line error, not a traceback after the run), and the run folder removed again when the input
was wrong."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from toprovar.errors import UserError


def check_writable_folder(folder: Path, key: str) -> None:
    """UserError unless `folder` is, or can be made as, a folder this process may write in: not a
    file, not under a file, on a file system that takes new entries (not /proc). Tried by making
    and removing an empty folder in the deepest part that exists (as root, access bits say nothing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{key}={folder} is a file; give a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={folder} lies under {existing}, which is a file; give a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".calibrate-write-check-", dir=existing)).rmdir()
    except OSError as err:
        raise UserError(f"{key}={folder} cannot be written: {err.strerror or err} in {existing}") from None


@contextlib.contextmanager
def discard_unused_run_dir(run_dir: Path, launch_dir: Path) -> Iterator[None]:
    """On a UserError (a mistake in the input, found before any work), remove the run folder Hydra
    made when it holds nothing but Hydra's own files (.hydra/, the log), timings.json and empty files — and the
    folders above it up to outputs/ that are left empty — so a wrong argument leaves no folder."""
    try:
        yield
    except UserError:
        files = [f for f in run_dir.rglob("*") if f.is_file()] if run_dir.is_dir() else []
        if all(
            f.relative_to(run_dir).parts[0] == ".hydra"
            or f.suffix == ".log"
            or f.name == "timings.json"
            or f.stat().st_size == 0
            for f in files
        ):
            shutil.rmtree(run_dir, ignore_errors=True)
            outputs = (launch_dir / "outputs").resolve()
            parent = run_dir.resolve().parent
            while parent.is_relative_to(outputs) and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        raise
