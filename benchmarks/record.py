"""How every benchmark writes its result: the numbers plus where they came from, atomically.

    from record import write_result          # benchmarks/ is the script's own directory on sys.path
    write_result(args.out, res)

A result file is evidence only with its provenance: the command that produced it, the commit (and
whether the tree had uncommitted changes), the machine, when. `write_result` adds them under the key
"provenance" (a key of that name in the result itself is an error, not overwritten), writes to a
temporary file beside the target and renames it into place, so an interrupted benchmark never leaves
a half-written JSON where an earlier result was. Standard library only: peer benchmarks run it from
the peers' own virtual environments too.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(argv: list[str] | None = None) -> dict:
    """The command, commit, machine and time of this benchmark run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"command": [os.path.relpath(sys.argv[0], REPO) if sys.argv[0].startswith(REPO) else sys.argv[0],
                        *(sys.argv[1:] if argv is None else argv)],
            "commit": _git("rev-parse", "HEAD"),
            "uncommitted_changes": None if status is None else bool(status),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_result(path: str, result: dict, quiet: bool = False) -> None:
    """result + {"provenance": ...} as indented JSON at path, renamed into place; prints where."""
    if "provenance" in result:
        raise ValueError("a benchmark result must not carry its own 'provenance' key")
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({**result, "provenance": provenance()}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if not quiet:
        print(f"wrote {path}")
