"""ROOT/manifest.json: joining the parts of a store (finalize_manifest) and rechecking them (verify).

The manifest is written once every writer is done: it records each part's row count and commit
checksum, the store's shape, and the per-split norm statistics summed over all parts (their sums
in ROOT/stats.npz). `verify` rereads everything the ledgers and the manifest claim, row data
included, and reports each disagreement as one line.
"""
from __future__ import annotations

import math

import numpy as np

from nla_jax import fileio, paths
from nla_jax.data.store import arrays as arrays_lib
from nla_jax.data.store import ledger as ledger_lib
from nla_jax.data.store import normstats
from nla_jax.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "nla_jax.store/1"
STATS_FILE = "stats.npz"


def finalize_manifest(root: str, meta: dict, *, num_parts: int | None = None) -> dict:
    """Join all parts of `root` into manifest.json (+ stats.npz); returns the manifest.

    Call once every writer is done. meta (JSON) is recorded as given; it must hold "split_names"
    and, if it holds "fingerprint", every part must have been written with the same one.
    """
    if "split_names" not in meta:
        raise UserError(f"store meta lacks 'split_names' (got keys {sorted(meta)})")
    names = arrays_lib.part_dirs(root)
    if not names:
        raise UserError(f"store {root}: no part-NNNNN directories")
    expect = [arrays_lib.part_name(i) for i in range(num_parts if num_parts is not None else len(names))]
    if names != expect:
        raise UserError(f"store {root}: parts {names}, expected {expect}")
    parts, total, first = [], None, None
    for name in names:
        pdir = paths.join(root, name)
        ledger = ledger_lib.read(pdir)
        cfg = ledger["config"]
        ref = first or dict(cfg, fingerprint=meta.get("fingerprint", cfg["fingerprint"]),
                            split_names=list(meta["split_names"]))
        first = first or ref
        for key in ("d", "dtype", "ctx_len", "fingerprint", "split_names"):
            if cfg[key] != ref[key]:
                raise UserError(f"store part {pdir} was written by another model/layer: {key} is "
                                f"{cfg[key]!r} there, {ref[key]!r} expected")
        if arrays_lib.top_k_of(cfg) != arrays_lib.top_k_of(ref):
            raise UserError(f"store part {pdir} stores {arrays_lib.top_k_of(cfg)} next-token predictions per row, "
                            f"{arrays_lib.part_name(0)} {arrays_lib.top_k_of(ref)}")
        stats = normstats.load_sidecar(paths.join(pdir, ledger["stats"]["file"]), ledger["stats"]["sha256"])
        total = normstats.add_together(total, stats)
        parts.append({"name": name, "rows": ledger["committed"], "capacity": cfg["capacity"],
                      "commits": len(ledger["commits"]), "sha256": ledger_lib.commits_sha(ledger["commits"])})
    stats_sha = normstats.write_file(paths.join(root, STATS_FILE), total)
    manifest = {"format": FORMAT, "meta": meta, "d": first["d"], "dtype": first["dtype"],
                "ctx_len": first["ctx_len"], "top_k": arrays_lib.top_k_of(first), "split_names": list(meta["split_names"]),
                "parts": parts, "num_rows": sum(p["rows"] for p in parts),
                "splits": normstats.summarize_stats(total, meta["split_names"]),
                "stats": {"file": STATS_FILE, "sha256": stats_sha}}
    fileio.write_atomic(paths.join(root, MANIFEST), fileio.json_text(manifest, sort_keys=True))
    return manifest


def verify(root: str) -> list[str]:
    """Recheck a store against its ledgers and manifest; one line per problem, [] if good."""
    problems: list[str] = []
    manifest = None
    try:
        manifest = fileio.read_json(paths.join(root, MANIFEST))
    except UserError as e:
        problems.append(str(e))
    try:
        names = arrays_lib.part_dirs(root)
    except UserError as e:
        return problems + [str(e)]
    mparts = {p.get("name"): p for p in manifest.get("parts", [])} if manifest else {}
    if manifest is not None and sorted(mparts) != names:
        problems.append(f"manifest.json: lists parts {sorted(mparts)}, directory holds {names}")
    total_stats, split_names = None, manifest.get("split_names") if manifest else None
    for name in names:
        pdir = paths.join(root, name)
        try:
            ledger = ledger_lib.read(pdir)
            cfg, commits, committed = ledger["config"], ledger["commits"], int(ledger["committed"])
            stats = normstats.load_sidecar(paths.join(pdir, ledger["stats"]["file"]), ledger["stats"]["sha256"])
            arrays = arrays_lib.open_arrays(pdir, cfg)
        except UserError as e:
            problems.append(f"{name}: {e}")
            continue
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{name}: malformed {ledger_lib.LEDGER} ({e.__class__.__name__}: {e})")
            continue
        split_names = split_names or cfg["split_names"]
        total_stats = normstats.add_together(total_stats, stats)
        if name in mparts:
            mp = mparts[name]
            if mp.get("rows") != committed:
                problems.append(f"{name}: manifest says {mp.get('rows')} rows, ledger {committed}")
            if mp.get("sha256") != ledger_lib.commits_sha(commits):
                problems.append(f"{name}: manifest checksum differs from the ledger's commits")
        if commits and commits[-1]["stop"] != committed or not commits and committed:
            problems.append(f"{name}: ledger committed {committed} but commits end at "
                            f"{commits[-1]['stop'] if commits else 0}")
        for arr, key, lo, hi in arrays_lib.unexplained_missing(pdir, cfg, committed, commits, arrays):
            problems.append(f"{name} {arr} rows {lo}:{hi}: shard file {arr}/{key} missing")
        problems += _commit_problems(name, arrays, cfg, commits, stats)
    if manifest is not None and total_stats is not None:
        if manifest.get("num_rows") != int(sum(mp.get("rows") or 0 for mp in mparts.values())):
            problems.append(f"manifest.json: num_rows {manifest.get('num_rows')} is not the sum of part rows")
        got = normstats.summarize_stats(total_stats, split_names)
        for s, v in got.items():
            mv = manifest.get("splits", {}).get(s, {})
            same = mv.get("rows") == v["rows"] and all(
                (mv.get(k) is None and v[k] is None) or (mv.get(k) is not None and v[k] is not None
                                                         and math.isclose(mv[k], v[k], rel_tol=1e-9))
                for k in ("mean_norm", "var_nrm"))
            if not same:
                problems.append(f"manifest.json: split {s} stats {mv} differ from the ledgers' {v}")
    return problems


def _commit_problems(name: str, arrays: dict, cfg: dict, commits: list[dict],
                     stats: dict[str, np.ndarray]) -> list[str]:
    """Reread every commit of part `name`: contiguity, each array's sha256 and value ranges, and
    (only when all of that is clean) the stats sidecar against sums recomputed from the rows."""
    problems: list[str] = []
    recomputed = normstats.empty_stats(len(cfg["split_names"]), cfg["d"])
    prev = 0
    for c in commits:
        a, b = c["start"], c["stop"]
        if a != prev:
            problems.append(f"{name}: commit {a}:{b} does not start at {prev}")
        prev = b
        rows: dict[str, np.ndarray | None] = {}
        for arr in arrays_lib.array_names(cfg):
            try:
                rows[arr] = arrays[arr][a:b].read().result()
            except Exception as e:  # noqa: BLE001 - corrupt shard (crc32c, index) errors
                rows[arr] = None
                problems.append(f"{name} {arr} rows {a}:{b}: unreadable ({str(e).splitlines()[0][:200]})")
                continue
            if arrays_lib.rows_sha(rows[arr]) != c["sha256"].get(arr):
                problems.append(f"{name} {arr} rows {a}:{b}: sha256 differs from the ledger")
        for p in arrays_lib.row_problems(rows, cfg["ctx_len"], len(cfg["split_names"]), a):
            arr, rest = p.split(": ", 1)
            problems.append(f"{name} {arr} rows {a}:{b}: {rest}")
        if not problems:
            normstats.add_stats(recomputed, rows["acts"], rows["split"])
    if not problems:  # sums are only comparable when every row read back clean
        for k in stats:
            if not np.allclose(stats[k], recomputed[k], rtol=1e-9, atol=1e-9):
                problems.append(f"{name}: stats sidecar {k} differs from the stored rows")
                break
    return problems
