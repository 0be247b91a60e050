"""Shared command-line plumbing: the `cli_main` wrapper (one-line errors), --config parsing, the
distributed flags every program that runs a model takes, compilation cache."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from typing import Callable, Sequence

import jax

from nla_jax import configlib, distributed, hostmem
from nla_jax.errors import UserError, disk_full, disk_full_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config value can be overridden with --config.KEY=VALUE "
                                       "(e.g. --config.model.dtype=bfloat16).")
    p.add_argument("--config", required=config_required, metavar="FILE.py[:ARG]",
                   help="config file and optional variant, e.g. configs/smollm2_135m.py")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """(args, cfg): argparse for the CLI's own flags, configlib for --config.* overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = configlib.split_config_args(argv)
    args = p.parse_args(rest)
    cfg = configlib.get(args.config, overrides) if args.config else None
    if cfg is None and overrides:
        raise UserError("--config.* overrides need --config")
    return args, cfg


def add_distributed_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The multi-process flags of every program that runs a model (one process per host / GPU node):
    explicit (--coordinator/--num-processes/--process-id) or discovered (--distributed-auto)."""
    g = p.add_argument_group("several processes (one per host; see WORKSPACE.md, \"Running on a cluster\")")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, default=1, metavar="N", help="processes in the run (default 1)")
    g.add_argument("--process-id", type=int, default=0, metavar="I", help="this process, 0..N-1")
    g.add_argument("--distributed-auto", action="store_true",
                   help="discover the processes from the environment (SLURM, TPU VM pods): "
                        "launch/slurm_gpu.sbatch, launch/tpu_vm.sh")
    return p


def start_distributed(args: argparse.Namespace) -> None:
    """jax.distributed from the flags `add_distributed_flags` added (nothing for one process).
    Call it before anything touches a JAX backend."""
    if args.distributed_auto and (args.coordinator is not None or args.num_processes != 1 or args.process_id != 0):
        raise UserError("--distributed-auto discovers the processes: drop --coordinator/--num-processes/--process-id")
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed_auto)


def quiet_orbax_readonly() -> None:
    """Orbax logs "Given directory is read only" for every read-only checkpoint manager, which is
    what reading a finished run means (evaluate, explain, export); drop that one message."""
    logging.getLogger("absl").addFilter(lambda r: not str(r.getMessage()).startswith("Given directory is read only"))


def enable_compilation_cache() -> None:
    """Persistent XLA cache inside the repo's ignored build/ dir: a speed-up, never required."""
    if os.environ.get("NLA_NO_COMPILE_CACHE"):
        return
    d = os.environ.get("NLA_COMPILE_CACHE", os.path.join(REPO, "build", "jax_cache"))
    try:
        os.makedirs(d, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except OSError:
        pass


# ============================================================================= one-line errors

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
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


def _fail(msg: str) -> None:
    """The one line a user mistake gets: progress bars closed first, exit status 2 (NLA_TRACEBACK=1
    re-raises instead, for debugging; called inside the `except` block, so a bare raise works)."""
    _close_progress_bars()
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if os.environ.get("NLA_TRACEBACK"):
        raise
    _mute_abandoned_work()
    sys.exit(2)


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
                hostmem.tune_malloc()
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e).strip().replace("\n", " "))
        except OSError as e:
            if not disk_full(e):
                raise
            _fail(disk_full_error(getattr(e, "filename", None) or "a file", e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
