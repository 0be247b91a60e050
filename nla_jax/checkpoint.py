"""Training checkpoints (orbax v0 CheckpointManager) and the one-trainer-per-workdir lock.

A checkpoint step holds two orbax items: `state` (a pytree of jax.Arrays, saved with
`StandardSave`, so it restores onto any mesh/sharding given by the abstract target) and `meta`
(JSON: the caller's dict plus the config fingerprint). Orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it when complete, so an interrupted save never looks
like a step. What orbax does not catch is a committed step whose files were later damaged
(truncated copy, full disk, partial rsync): `restore(step=None)` tries steps newest-first and
takes the first that restores cleanly. Damaged newer steps are renamed aside (never deleted), so
they neither shadow the good step in orbax's "latest" nor count towards `keep`.

Every process of a multi-process run calls every method; orbax picks the primary host for the
shared writes, and the fallback decision is agreed across processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from nla_jax import distributed, locks, paths
from nla_jax.errors import UserError, disk_full, disk_full_error

log = logging.getLogger(__name__)

_STATE, _META = "state", "meta"
_FORMAT = 1


def _quiet_closed_loop_callbacks() -> None:
    """Drop one kind of noise: when a read of a damaged step fails, orbax closes its asyncio loop
    while tensorstore still completes the other reads of that step; their callbacks then raise
    "Event loop is closed" in tensorstore's threads, which Python prints as unraisable tracebacks
    (dozens per damaged step) around the one-line warning that says what happened."""
    previous = sys.unraisablehook
    if getattr(previous, "_nla_quiet", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)
    hook._nla_quiet = True
    sys.unraisablehook = hook


class _DiskFullFromOrbax(logging.Filter):
    """Orbax logs a full disk in its background save threads as several ERROR records with
    tracebacks; the Checkpointer reports it as one line (which step, that the last one is intact),
    so those records are dropped. Anything else orbax logs passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        # A read of a damaged step fails in several tensorstore tasks at once; restore() catches one
        # and reports the step in one line, and asyncio may log the others at garbage collection
        # (when is up to the collector) as "never retrieved" with a traceback.
        if record.name == "asyncio" and "never retrieved" in msg and 'Error opening "zarr" driver' in msg:
            return False
        # absl records from orbax's modules; asyncio's "Task exception was never retrieved" for
        # orbax's own write tasks (their repr names orbax)
        if "orbax" not in (record.pathname or "") and "orbax" not in msg:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not ((exc is not None and disk_full(exc)) or "No space left on device" in msg)


def _install_log_filter() -> None:
    for name in ("absl", "asyncio"):
        log_ = logging.getLogger(name)
        if not any(isinstance(f, _DiskFullFromOrbax) for f in log_.filters):
            log_.addFilter(_DiskFullFromOrbax())


def fingerprint(cfg_subset: dict) -> str:
    """Short stable id of the config settings a checkpoint's contents depend on."""
    blob = json.dumps(cfg_subset, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _one_line(e: BaseException, limit: int = 240) -> str:
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."


# ----------------------------------------------------------------------------- lock

def _process_index() -> int:
    # Only ask jax when distributed is up: process_index() would otherwise start a
    # single-process backend and break a later jax.distributed.initialize.
    try:
        if jax.distributed.is_initialized():
            return jax.process_index()
    except Exception:  # older/newer jax without is_initialized
        pass
    return 0


class WorkdirLock:
    """Exclusive lock on WORKDIR/.lock so two trainers never write one work directory.

    Each process of a multi-process run locks its own file (`.lock` for process 0,
    `.lock.<i>` otherwise), so all processes of one run can take it while a second run is
    refused. Take it after `jax.distributed.initialize` (or pass `process_index`). On a local disk
    it is a flock that dies with the process (kill -9 included; the file is left in place on
    purpose, since deleting a lock file races with the next holder); on gs:// a lease that a
    crashed holder's successor takes over within one lease (`nla_jax.locks`).
    """

    def __init__(self, workdir: str, process_index: int | None = None) -> None:
        self.workdir = paths.absolute(workdir)
        idx = _process_index() if process_index is None else int(process_index)
        self.path = paths.join(self.workdir, ".lock" if idx == 0 else f".lock.{idx}")
        self._lock = locks.Lock(self.path)

    @property
    def held(self) -> bool:
        return self._lock.held

    def acquire(self) -> "WorkdirLock":
        if self._lock.held:
            return self
        try:
            paths.makedirs(self.workdir)
            self._lock.acquire()
        except locks.Busy as e:
            raise UserError(f"work directory {self.workdir} is in use by another trainer ({e})") from None
        except OSError as e:
            raise UserError(f"cannot create lock file {self.path}: {e.strerror or e}") from None
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------- checkpointer

def _key_name(k: Any) -> str:
    # Orbax stores tuples/NamedTuples as lists/dicts, so compare paths by their names only.
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_by_path(tree: Any) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _path_str(path: tuple[str, ...]) -> str:
    return "".join(f"[{p}]" for p in path) or "<root>"


def _dtype_ok(saved, wanted, partial: bool) -> bool:
    saved, wanted = jax.numpy.dtype(saved), jax.numpy.dtype(wanted)
    if saved == wanted:
        return True
    return partial and jax.numpy.issubdtype(saved, jax.numpy.floating) and jax.numpy.issubdtype(wanted, jax.numpy.floating)


def read_step_arrays(step_dir: str) -> dict[str, Any]:
    """{path: numpy array} of one saved step's state (`<dir>/<step>`), read with plain orbax onto one
    CPU device, whatever mesh wrote it. For tools and tests comparing runs leaf by leaf; no
    fingerprint or shape checks (use Checkpointer.restore to resume)."""
    d = paths.join(step_dir, _STATE)
    dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(d)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), meta)
        tree = c.restore(d, target)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
    """Save/restore `(state, meta)` per step under one directory, newest `keep` retained, and every
    step divisible by `keep_every` besides (None / 0: none), so a run can be read back part way.

    `fingerprint` identifies the config settings the state depends on (see `fingerprint()`);
    steps written under another fingerprint are refused. `read_only=True` is for tools that
    read a directory a trainer may be writing: it neither saves, nor removes orbax's
    unfinished tmp directories, nor moves damaged steps aside.
    """

    def __init__(self, directory: str, *, keep: int | None = 3, keep_every: int | None = None, async_save: bool = True,
                 fingerprint: str | None = None, read_only: bool = False,
                 describe: Callable[[dict], str | None] | None = None) -> None:
        if keep is not None and keep < 1:
            raise UserError(f"checkpoint keep must be >= 1 (or None for all), got {keep}")
        if keep_every is not None and keep_every < 0:
            raise UserError(f"checkpoint keep_every must be >= 0 (0 or None: none), got {keep_every}")
        self.directory = paths.absolute(directory)
        self.fingerprint = fingerprint
        # describe(meta of a step written under another fingerprint) -> None if its saved config
        # agrees after all (e.g. fingerprinted by an older version), else what differs (the message)
        self.describe = describe
        self._saving: int | None = None  # the step an async save is writing
        self.read_only = read_only
        self.restored_step: int | None = None  # the step the last restore() actually loaded
        self._warned: set[int] = set()
        self._barriers = 0
        self._dir_checked = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            keep_period=None if read_only or not keep_every else int(keep_every),
            enable_async_checkpointing=async_save, create=not read_only,
            # The writer (holding WorkdirLock) owns the directory: leftovers of interrupted
            # saves are garbage. A reader must not touch a running trainer's in-flight save.
            cleanup_tmp_directories=not read_only, read_only=read_only)
        _quiet_closed_loop_callbacks()
        _install_log_filter()
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:  # orbax warns "Given directory is read only": what we asked for, not news
            absl_log.setLevel(logging.ERROR)
        try:
            # Handlers named up front: a fresh manager can then read item metadata before any
            # save/restore has told it the item types.
            self._mgr = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
        except OSError as e:
            raise UserError(f"cannot use checkpoint directory {self.directory}: {_one_line(e)}") from None
        finally:
            absl_log.setLevel(level)
        if paths.is_url(self.directory) and not read_only:
            # an object store has no empty directories: when orbax's clean-up removed the only
            # (unfinished) step a kill -9 left, the directory would vanish and orbax's own listing
            # of it fail; an object of ours keeps it (orbax ignores names that are not steps)
            paths.write_bytes(paths.join(self.directory, ".nla_checkpoints"), b"orbax steps of nla_jax\n")
        self._options = options
        self._partial_mgr: ocp.CheckpointManager | None = None

    # -- saving

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Start saving `step` (async if configured). False if that step is already saved."""
        if self.read_only:
            raise RuntimeError(f"Checkpointer on {self.directory} is read-only")
        step = int(step)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from None
        if not self._dir_checked:
            self._dir_checked = True
            self.latest_step()  # refuse to mix steps of another config into this directory
        steps = self._mgr.all_steps()
        if step in steps:
            return False
        if steps and step < max(steps):
            # orbax would silently skip it; a trainer resumed from an explicitly older step
            # would then lose every save until it passes the old latest step.
            raise UserError(f"cannot save checkpoint step {step}: {self.directory} already has the later "
                            f"step {max(steps)} (resume from the latest step, or use a fresh work directory)")
        payload = {"format": _FORMAT, "fingerprint": self.fingerprint, "meta": meta}
        self.wait()  # orbax would wait for the previous async save anyway; its errors are about that step
        self._saving = step
        try:
            return bool(self._mgr.save(step, args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(payload)})))
        except Exception as e:
            raise self._disk_full(e) if disk_full(e) else e

    def _disk_full(self, e: BaseException) -> UserError:
        steps = [s for s in self._mgr.all_steps() if s != self._saving]
        last = f"the last complete step, {max(steps)}, is intact" if steps else "no earlier step"
        return disk_full_error(f"checkpoint step {self._saving} in {self.directory} ({last})", e)

    def wait(self) -> None:
        """Block until the in-flight async save (and its pruning of old steps) is committed."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:
            raise self._disk_full(e) if disk_full(e) else e

    def close(self) -> None:
        self._mgr.close()
        if self._partial_mgr is not None:
            self._partial_mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading

    def all_steps(self) -> list[int]:
        """Committed steps on disk (not checked for readability), ascending."""
        self._refresh()
        return sorted(self._mgr.all_steps())

    def _refresh(self) -> None:
        # An in-flight async step is listed by orbax before it is committed; wait for it,
        # then re-list so steps written or moved by someone else are seen.
        self.wait()
        self._mgr.reload()

    def _payload(self, step: int) -> dict:
        """The step's meta item; a UserError if it was written under another fingerprint."""
        got = self._mgr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        if not isinstance(got, dict) or "meta" not in got:
            raise ValueError(f"meta item of step {step} is not a checkpoint meta record")
        theirs = got.get("fingerprint")
        if self.fingerprint is not None and theirs != self.fingerprint:
            detail = ""
            if self.describe is not None:
                try:
                    detail = self.describe(got.get("meta") or {})
                except Exception:  # noqa: BLE001 - best effort; without an answer the step is refused
                    detail = ""
                if detail is None:
                    return got
            detail = f": {detail}" if detail else ""
            raise UserError(f"checkpoints in {self.directory} were written by a different config "
                            f"(fingerprint {theirs} != {self.fingerprint}{detail}); use a fresh work directory")
        return got

    def _saved_tree(self, step: int) -> Any:
        md = self._mgr.item_metadata(step)[_STATE]
        if md is None:
            raise ValueError(f"no state metadata in step {step}")
        return getattr(md, "tree", md)

    def _check_matches(self, step: int, saved: Any, abstract: Any, partial: bool = False) -> None:
        """UserError (not an orbax traceback) when the requested tree differs from the saved one
        (`partial`: the request may leave out saved subtrees, e.g. optimizer state, and may read a
        floating array in another floating dtype: inference reads float32 masters as bfloat16,
        cast while restoring; a resumed training state must match exactly)."""
        have, want = _flat_by_path(saved), _flat_by_path(abstract)
        problems = [f"{_path_str(p)} missing from the checkpoint" for p in sorted(set(want) - set(have))]
        if not partial:
            problems += [f"{_path_str(p)} in the checkpoint but not requested" for p in sorted(set(have) - set(want))]
        for p in sorted(set(have) & set(want)):
            h, w = have[p], want[p]
            if w.dtype is not None and jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
                continue  # typed PRNG keys are stored as their raw uint32 data
            hs, hd = getattr(h, "shape", None), getattr(h, "dtype", None)
            if hs is None:
                continue
            if tuple(hs) != tuple(w.shape) or (hd is not None and not _dtype_ok(hd, w.dtype, partial)):
                problems.append(f"{_path_str(p)} saved {tuple(hs)} {hd}, requested {tuple(w.shape)} {w.dtype}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise UserError(f"checkpoint step {step} in {self.directory} does not match the state being restored: "
                            f"{'; '.join(problems[:3])}{more}; a model/shape setting changed? "
                            f"use a fresh work directory")

    def _readable_meta(self, step: int) -> tuple[dict | None, str]:
        """(payload, '') if the step's meta and state metadata read, else (None, reason)."""
        try:
            payload = self._payload(step)
            self._saved_tree(step)
            return payload, ""
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged step
            return None, _one_line(e)

    def latest_step(self) -> int | None:
        """Newest step whose meta and array metadata read (the array data is checked by restore).

        Waits for an in-flight async save first. Raises UserError if the step was written
        under another fingerprint.
        """
        self._refresh()
        for step in sorted(self._mgr.all_steps(), reverse=True):
            payload, why = self._readable_meta(step)
            if distributed.all_true(payload is not None):
                return step
            self._warn_skip(step, why or "unreadable on another process")
        return None

    def meta(self, step: int | None = None) -> tuple[int, dict]:
        """(step, meta) of `step`, or of the newest step whose metadata reads; no arrays are read."""
        if step is not None:
            self._refresh()
            steps = sorted(self._mgr.all_steps())
            if int(step) not in steps:
                raise UserError(f"no checkpoint step {step} in {self.directory} (available: {steps or 'none'})")
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise UserError(f"no readable checkpoints in {self.directory}")
        payload, why = self._readable_meta(step)
        if payload is None:
            raise UserError(f"checkpoint step {step} in {self.directory} does not read: {why}")
        return step, payload["meta"]

    def _warn_skip(self, step: int, why: str) -> None:
        if step not in self._warned:
            self._warned.add(step)
            log.warning("skipping checkpoint step %d in %s: it does not read (%s)", step, self.directory, why)

    def _restore_partial(self, step: int, abstract_state: Any) -> Any:
        """Read only the subtrees of the saved state that `abstract_state` names (orbax's partial
        restore is a PyTree-handler feature, hence a second, read-only manager on the directory)."""
        if self._partial_mgr is None:
            absl_log = logging.getLogger("absl")
            level = absl_log.level
            absl_log.setLevel(logging.ERROR)  # "Given directory is read only": what we asked for
            try:
                self._partial_mgr = ocp.CheckpointManager(
                    self.directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                    item_handlers={_STATE: ocp.PyTreeCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
            finally:
                absl_log.setLevel(level)
        self._partial_mgr.reload()
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_state)
        return self._partial_mgr.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
            abstract_state, restore_args=restore_args, partial_restore=True)}))[_STATE]

    def _attempt(self, step: int, abstract_state: Any, partial: bool = False) -> tuple[Any, str]:
        """((state, meta), '') or (None, reason); identical outcome on every process."""
        out, why = None, ""
        try:
            payload = self._payload(step)
            self._check_matches(step, self._saved_tree(step), abstract_state, partial)
            if partial:
                restored = self._restore_partial(step, abstract_state)
            else:
                restored = self._mgr.restore(step, args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(abstract_state)}))[_STATE]
            out = (restored, payload["meta"])
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means a damaged step
            why = _one_line(e)
        if not distributed.all_true(out is not None):
            return None, why or "unreadable on another process"
        return out, ""

    def restore(self, abstract_state: Any, step: int | None = None, partial: bool = False) -> tuple[Any, dict]:
        """Load `(state, meta)`; `abstract_state` leaves are ShapeDtypeStructs with the target shardings.
        `partial=True` reads only the subtrees `abstract_state` holds (e.g. {"av": ...} without the
        optimizer state: what inference needs).

        step=None: the newest step that restores cleanly. Damaged newer steps are logged and
        renamed to `<step>.unreadable-<time>` (only once an older step has restored, so nothing
        is moved when the failure is on our side, e.g. a wrong target sharding).
        """
        self._refresh()
        steps = sorted(self._mgr.all_steps(), reverse=True)
        if step is not None:
            if int(step) not in steps:
                raise UserError(f"no checkpoint step {step} in {self.directory} "
                                f"(available: {sorted(steps) or 'none'})")
            out, why = self._attempt(int(step), abstract_state, partial)
            if out is None:
                raise UserError(f"checkpoint step {step} in {self.directory} does not restore: {why}")
            self.restored_step = int(step)
            return out
        if not steps:
            raise UserError(f"no checkpoints in {self.directory}")
        bad: list[tuple[int, str]] = []
        for s in steps:
            out, why = self._attempt(s, abstract_state, partial)
            if out is not None:
                self._set_aside([b for b, _ in bad])
                self.restored_step = s
                return out
            self._warn_skip(s, why)
            bad.append((s, why))
        raise UserError(f"no checkpoint in {self.directory} restores (tried steps "
                        f"{', '.join(str(b) for b, _ in bad)}; newest failed with: {bad[0][1]})")

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged steps out of orbax's view; renaming keeps them for inspection."""
        if not steps or self.read_only:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if jax.process_index() == 0:
            for s in steps:
                src = paths.join(self.directory, str(s))
                dst = f"{src}.unreadable-{stamp}"
                try:
                    paths.rename(src, dst)
                    log.warning("moved unreadable checkpoint step %d aside to %s", s, dst)
                except OSError as e:
                    log.warning("could not move unreadable checkpoint step %d aside: %s", s, _one_line(e))
        self._barriers += 1  # barrier names must be unique and equal on every process
        distributed.barrier(f"nla_checkpoint_set_aside_{self._barriers}")
        self._mgr.reload()
