"""User-facing errors: one line, names the file/key/value, non-zero exit, no traceback.

Code raises `UserError` for anything a user can fix (bad path, bad config value, unsupported
model). CLIs wrap their `main` in `cli_main`, which prints `error: <message>` to stderr and exits
with status 2. Programming errors keep their tracebacks.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable


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


def _close_progress_bars() -> None:
    """Finish any tqdm bar still open, so the error line starts a line of its own (a bar's
    carriage-return updates would otherwise run into it)."""
    tq = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tq, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass


def _mute_abandoned_work() -> None:
    """Keep the error line the last line on stderr.

    A failed checkpoint write can leave orbax's async write coroutines unawaited; at interpreter
    exit Python then prints "RuntimeWarning: coroutine ... was never awaited" after the error
    (seen in the disk-full fault test, some runs). The failure is already reported.
    """
    import warnings
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int | None]:
    """Decorator for CLI entry points: UserError -> one line on stderr, exit 2.

    Run as a program (no arguments: argv comes from sys.argv) it first sets up host malloc
    (`hostmem.tune_malloc`), which has to precede JAX's worker threads; a caller passing argv
    in a process that has already run JAX (the tests) leaves malloc alone.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if not args and not kwargs:
                from nla_jax import hostmem
                hostmem.tune_malloc()
            return fn(*args, **kwargs)
        except UserError as e:
            msg = str(e).strip().replace("\n", " ")
            _close_progress_bars()
            print(f"error: {msg}", file=sys.stderr, flush=True)
            if os.environ.get("NLA_TRACEBACK"):
                raise
            _mute_abandoned_work()
            sys.exit(2)
        except OSError as e:
            if not disk_full(e):
                raise
            what = getattr(e, "filename", None) or "a file"
            _close_progress_bars()
            print(f"error: {disk_full_error(what, e)}", file=sys.stderr, flush=True)
            if os.environ.get("NLA_TRACEBACK"):
                raise
            _mute_abandoned_work()
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
