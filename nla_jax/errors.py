"""User-facing errors (depends on nothing in the package): one line, names the file/key/value, non-zero exit, no traceback.

Code raises `UserError` for anything a user can fix (bad path, bad config value, unsupported
model). CLIs wrap their `main` in `cli.cli_main`, which prints `error: <message>` to stderr and exits
with status 2. Programming errors keep their tracebacks.
"""
from __future__ import annotations

import errno


class UserError(Exception):
    """An error caused by input the user controls; its message is the whole report."""


def require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: BaseException) -> bool:
    """True if `e` (or an exception it was raised from / during) is a full disk or quota.

    tensorstore and orbax re-raise OS errors as ValueError / RuntimeError with the strerror in
    the message, so the message is checked too.
    """
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _FULL:
            return True
        if "No space left on device" in str(x) or "Disk quota exceeded" in str(x):
            return True
    return False


def disk_full_error(what: str, e: BaseException) -> UserError:
    """The one-line report of a full disk while writing `what` (names the file or directory)."""
    quota = any(isinstance(x, OSError) and x.errno == errno.EDQUOT or "Disk quota exceeded" in str(x)
                for x in _chain(e))
    why = "disk quota exceeded" if quota else "no space left on device"
    return UserError(f"{why} while writing {what}; free space and rerun the same command: it resumes "
                     f"from what was committed")


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
