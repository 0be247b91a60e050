"""User-facing errors: one line, names the file/key/value, non-zero exit, no traceback.

Code raises `UserError` for anything a user can fix (bad path, bad config value, unsupported
model). CLIs wrap their `main` in `cli_main`, which prints `error: <message>` to stderr and exits
with status 2. Programming errors keep their tracebacks.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """An error caused by input the user controls; its message is the whole report."""


def require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int | None]:
    """Decorator for CLI entry points: UserError -> one line on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            msg = str(e).strip().replace("\n", " ")
            print(f"error: {msg}", file=sys.stderr, flush=True)
            if os.environ.get("NLA_TRACEBACK"):
                raise
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
