"""Shared command-line plumbing: --config parsing, compilation cache, logging set-up."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from nla_jax import configlib
from nla_jax.errors import UserError

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


def enable_compilation_cache() -> None:
    """Persistent XLA cache inside the repo's ignored build/ dir: a speed-up, never required."""
    import jax
    if os.environ.get("NLA_NO_COMPILE_CACHE"):
        return
    d = os.environ.get("NLA_COMPILE_CACHE", os.path.join(REPO, "build", "jax_cache"))
    try:
        os.makedirs(d, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except OSError:
        pass
