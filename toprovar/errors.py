"""Errors meant for people: one line that says what is wrong and how to fix it.

Every user mistake (bad override, missing file, malformed policy, unknown backbone) raises
`UserError`. Command-line entry points catch it, print the message on one line and exit non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in the input, reported as one line without a traceback."""

    def __init__(self, message: str):
        # Keep it on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Turn a UserError into `prog: error: <message>` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
