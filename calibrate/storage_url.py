"""What an Optuna storage URL names on this machine's disk: a journal file or a SQLite file."""

from __future__ import annotations

from pathlib import Path

JOURNAL_SCHEME = "journal:"


def journal_path(url: str) -> Path | None:
    """The file of a `journal:<path>` storage URL (`journal:///abs/path` works too), else None."""
    if not url.startswith(JOURNAL_SCHEME):
        return None
    rest = url[len(JOURNAL_SCHEME) :]
    return Path(rest[2:] if rest.startswith("//") else rest)


def sqlite_file(url: str | None) -> Path | None:
    """The database file of a `sqlite:///path` URL (None for other URLs and in-memory SQLite)."""
    if not url or not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def storage_file(url: str | None) -> Path | None:
    """The file a journal or SQLite storage keeps its studies in; None for servers and memory."""
    if not url:
        return None
    return journal_path(url) or sqlite_file(url)
