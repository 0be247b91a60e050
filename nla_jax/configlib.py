"""Config files and command-line overrides (the ablation surface).

A config is a Python file with `get_config(arg: str | None) -> ml_collections.ConfigDict`.
It is named on the command line as `--config configs/NAME.py[:arg]`, and any leaf can be
overridden with `--config.a.b=value`. Values are parsed to the type of the existing leaf;
an unknown key or a value of the wrong type is a `UserError` naming the key, before any
compute happens.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections

from nla_jax.errors import UserError

ConfigDict = ml_collections.ConfigDict
# The repository root: config files import what they share as `from configs import common`.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(spec: str) -> ConfigDict:
    """Load `path.py[:arg]` and call its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)  # so that `from configs import common` resolves from any directory
    name = "nla_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"config file {path!r} has a syntax error at line {e.lineno}: {e.msg}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} defines no get_config(arg)")
    try:
        cfg = module.get_config(arg or None)
    except (KeyError, ValueError) as e:
        raise UserError(f"config {spec!r}: {e}") from e
    if not isinstance(cfg, ConfigDict):
        raise UserError(f"config file {path!r}: get_config must return an ml_collections.ConfigDict")
    return cfg


def _parse_value(key: str, raw: str, current: Any) -> Any:
    """Parse `raw` to the type of the leaf it replaces."""
    if isinstance(current, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise UserError(f"config key {key!r} expects a bool (true/false), got {raw!r}")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"config key {key!r} expects an int, got {raw!r}") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise UserError(f"config key {key!r} expects a float, got {raw!r}") from None
    if isinstance(current, str):
        return raw
    # tuples, lists, None and anything else: a Python literal, else the bare string.
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise UserError(f"config key {key!r} expects a sequence like {tuple(current)!r}, got {raw!r}")
        return type(current)(value)
    return value


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Apply `a.b=value` strings (the `--config.` prefix already stripped)."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"config override {item!r} must look like key=value")
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                known = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else ""
                raise UserError(f"unknown config key {key!r} (known at {'.'.join(parts[:i]) or 'top'}: {known})")
            if i < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        if isinstance(current, ConfigDict):
            raise UserError(f"config key {key!r} is a section, not a value")
        with node.ignore_type():
            node[leaf] = _parse_value(key, raw, current)
    return cfg


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.k=v` / `--config.k v` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise UserError(f"config override {a!r} has no value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def get(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    cfg = load_config_file(spec)
    apply_overrides(cfg, overrides)
    cfg.lock()
    return cfg
