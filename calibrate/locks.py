"""Locks that keep processes sharing one study or one tracking store apart.

* `claim_study`: the one process that coordinates a calibration of a study (pre-samples, selects,
  validates, exports, owns the MLflow parent run) holds this for its whole life; another process
  that asks for the same study is refused in one line that names the holder (docs/calibration.md,
  "One study, several processes"). Search-only workers (`stages=[search]`, `search.workers=N`)
  do not take it. A lock the operating system or the database server holds for the process, so it
  goes when the process dies (SIGKILL included) and a crashed run can be resumed at once:
  `flock` on a file beside a journal or SQLite study, a session advisory lock on PostgreSQL.
* `schema_lock`: around opening a SQLite database that may be new (the Optuna study, the MLflow
  store), so two processes started together do not both create its tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

from calibrate.export import redact_url
from calibrate.storage_url import sqlite_file, storage_file
from toprovar.errors import UserError

log = logging.getLogger("calibrate")


@contextlib.contextmanager
def schema_lock(url: str | None) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite database file while opening it (elsewhere: nothing)."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.schema.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(run_dir: Path) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "run_dir": str(run_dir)}


def _refusal(study: str, url: str, holder: dict | None) -> UserError:
    who = "another process"
    if holder:
        who = f"process {holder.get('pid')} on {holder.get('host')}"
        who += f" (run folder {holder['run_dir']})" if holder.get("run_dir") else ""
    return UserError(
        f"study {study!r} in {redact_url(url)} is being calibrated by {who}; add trials to it with "
        f"stages=[search], or run this again once that process has ended"
    )


@contextlib.contextmanager
def claim_study(study: str, url: str | None, run_dir: Path) -> Iterator[None]:
    """Hold the coordinator's lock of `study` in storage `url` while the body runs; UserError at once
    when another process holds it. In-memory studies (url None) are this process's alone."""
    if url is None:
        yield
        return
    path = storage_file(url)
    if path is not None:
        with _file_claim(path, study, url, run_dir):
            yield
    elif url.startswith("postgresql"):
        with _postgres_claim(study, url, run_dir):
            yield
    else:
        log.warning("storage %s: no coordinator lock on this database; start one calibration per study", url)
        yield


@contextlib.contextmanager
def _file_claim(storage_file: Path, study: str, url: str, run_dir: Path) -> Iterator[None]:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study)
    storage_file.parent.mkdir(parents=True, exist_ok=True)
    lock = storage_file.with_name(f"{storage_file.name}.{safe}.coordinator")
    handle = open(lock, "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "null")
            except ValueError:
                holder = None
            raise _refusal(study, url, holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder(run_dir)))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)  # an empty lock file names nobody
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


@contextlib.contextmanager
def _postgres_claim(study: str, url: str, run_dir: Path) -> Iterator[None]:
    """A session advisory lock keyed by the study name, on a connection of its own kept open; the
    holder's name is the connection's application_name, which the refused process reads."""
    import sqlalchemy

    key = zlib.crc32(f"calibrate-coordinator:{study}".encode())  # one bigint key: classid 0, objid key
    holder = _holder(run_dir)
    name = f"calibrate {holder['pid']}@{holder['host']}"[:63]
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        connection = engine.connect()
    except Exception as err:  # sqlalchemy raises many kinds for bad URLs / unreachable databases
        message = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot open Optuna storage storage.url={redact_url(url)!r}: {message}") from None
    try:
        connection.execute(sqlalchemy.text("SELECT set_config('application_name', :name, false)"), {"name": name})
        got = connection.execute(
            sqlalchemy.text("SELECT pg_try_advisory_lock(CAST(:key AS bigint))"), {"key": key}
        ).scalar()
        connection.commit()
        if not got:
            row = connection.execute(
                sqlalchemy.text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objsubid = 1 "
                    "AND CAST(CAST(l.objid AS text) AS bigint) = CAST(:key AS bigint)"
                ),
                {"key": key},
            ).first()
            raise _refusal(study, url, _parse_name(row[0]) if row else None)
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(CAST(:key AS bigint))"), {"key": key})
            connection.commit()
    finally:
        connection.close()
        engine.dispose()


def _parse_name(application_name: str) -> dict | None:
    found = re.fullmatch(r"calibrate (\d+)@(.*)", application_name or "")
    return {"pid": int(found[1]), "host": found[2]} if found else None
