"""Train an NLA: SFT warm start of the verbalizer (AV) and reconstructor (AR), then GRPO.

    python -m nla_jax.train --config configs/smollm2_135m.py:quick
    python -m nla_jax.train --config configs/tiny.py:nla --config.train.workdir=/tmp/w --stages sft_av,sft_ar,rl
    # several processes (one per host / GPU): add --coordinator HOST:PORT --num-processes N --process-id I

Stages run in order; each keeps its own orbax checkpoints under WORKDIR/<stage>/ and resumes from
its latest good one, so rerunning the same command after a crash continues where it stopped.
A finished stage is skipped. Reading order of this file: 1 CLI, 2 setup (mesh, target, store,
statistics, prompt specs), 3 state and shardings, 4 data, 5 the stage loops, 6 main.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import zlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from nla_jax import checkpoint as ckpt_lib
from nla_jax import cli, distributed, faults, optim, sampling, sharding
from nla_jax import metrics as metrics_lib
from nla_jax import weights
from nla_jax.data import loader as data_loader
from nla_jax.data import store as store_lib
from nla_jax.cli import cli_main
from nla_jax.errors import UserError
from nla_jax.models import transformer as T
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import stats as stats_lib
from nla_jax.nla import steps
from nla_jax.summarize import read_done

STAGES = ("sft_av", "sft_ar", "rl", "eval")


# ============================================================================= 1. CLI

def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--stages", default=None, help="comma-separated subset of sft_av,sft_ar,rl,eval "
                   "(default: config train.stages)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--distributed-auto", action="store_true",
                   help="discover processes from the environment (TPU VM pods); see launch/tpu_vm.sh")
    return p


# ============================================================================= 2. setup

@dataclasses.dataclass
class Setup:
    cfg: Any
    mesh: Any
    rules: Any
    mcfg: Any
    target: dict                 # the frozen target's params (AV and AR start from them)
    tok: Any
    store: store_lib.Store
    stats: stats_lib.ActStats
    mean: jax.Array              # [d] replicated: centring
    ctx: steps.Ctx
    summaries: dict[int, str]
    workdir: str
    writer: metrics_lib.MetricsWriter


def check_config(cfg) -> None:
    """Refuse bad settings before any compute (each names the key)."""
    rl = cfg.rl
    if rl.group_size < 2:
        raise UserError(f"config key rl.group_size={rl.group_size}: GRPO needs groups of at least 2")
    if rl.advantage not in ("grpo", "drgrpo", "rloo"):
        raise UserError(f"config key rl.advantage={rl.advantage!r}: expected grpo, drgrpo or rloo")
    if rl.kl not in ("k1", "k2", "k3"):
        raise UserError(f"config key rl.kl={rl.kl!r}: expected k1, k2 or k3")
    if rl.agg not in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "drgrpo"):
        raise UserError(f"config key rl.agg={rl.agg!r}: expected token_mean, seq_mean_token_mean, "
                        "seq_mean_token_sum or drgrpo")
    for sec in ("sft_av", "sft_ar", "rl"):
        if cfg[sec].steps < 0 or cfg[sec].batch < 1:
            raise UserError(f"config keys {sec}.steps / {sec}.batch must be >= 0 / >= 1")
    for key in ("train.ckpt_every", "train.log_every", "train.max_nonfinite", "train.keep",
                "sft_av.eval_every", "sft_ar.eval_every"):
        sec, name = key.split(".")
        if key == "train.keep" and cfg[sec][name] is None:  # keep every checkpoint
            continue
        if not isinstance(cfg[sec][name], int) or cfg[sec][name] < 1:
            raise UserError(f"config key {key}={cfg[sec][name]!r}: must be an integer >= 1")
    for key in ("sft_av.optim", "sft_ar.optim", "rl.optim_av", "rl.optim_ar"):
        sec, name = key.split(".")
        if cfg[sec][name].schedule not in ("constant", "cosine"):
            raise UserError(f"config key {key}.schedule={cfg[sec][name].schedule!r}: expected 'constant' or 'cosine'")
    mcfg = weights.peek_config(cfg.model)  # reads metadata only
    if not 0 <= cfg.model.layer < mcfg.n_layers:
        raise UserError(f"config key model.layer={cfg.model.layer} is out of range for {mcfg.n_layers} blocks")
    if cfg.av.max_len >= mcfg.max_seq_len:
        raise UserError(f"config key av.max_len={cfg.av.max_len}: the explanation cap must be below the model's "
                        f"context ({mcfg.max_seq_len} tokens)")


def check_store(cfg, man: dict | None = None, d_model: int | None = None) -> None:
    """The store must come from this target at this layer (DESIGN: a store from another target is
    refused). Without arguments reads only the store manifest and the model's metadata."""
    if man is None:
        man = store_lib.open_store(cfg.data.store).manifest
    if d_model is None:
        d_model = weights.peek_config(cfg.model).d_model
    meta = man.get("meta", {})
    if meta.get("layer") != cfg.model.layer or man.get("d") != d_model:
        raise UserError(f"store {cfg.data.store} holds layer {meta.get('layer')} (d={man.get('d')}) activations, "
                        f"but the config trains layer {cfg.model.layer} of a d={d_model} model")


def check_stages(cfg, stages: tuple[str, ...]) -> None:
    """RL warm-started from SFT needs both SFT stages finished, or run before it by this command."""
    if "rl" in stages and cfg.rl.init_from_sft:
        for need in ("sft_av", "sft_ar"):
            if need not in stages and not os.path.exists(os.path.join(cfg.train.workdir, need, "DONE")):
                raise UserError(f"stage rl needs the finished {need} stage in {cfg.train.workdir} "
                                f"(run it first, or set --config.rl.init_from_sft=False)")


STAGE_SECTIONS = {"sft_av": ("av", "nla", "sft_av"), "sft_ar": ("ar", "nla", "sft_ar"),
                  "rl": ("av", "ar", "nla", "rl")}
# Keys of those sections that may change under existing checkpoints. `steps`: rerunning with a
# larger (or smaller) value is how a run is extended (or cut short), and the state so far does not
# depend on it (with a cosine schedule the decay follows the new length from the resumed step on,
# which is what extending means). `eval_every` / `val_rows` only change what is evaluated.
# `share_prompt` and model.remat change how a step is computed (rounding), not what it computes.
# Everything else (optimizer, batch, group size, sampling, seeds, model, store) defines the run:
# checkpoints written under other values are refused, naming the key.
FREE_KEYS = {"steps", "eval_every", "val_rows", "share_prompt"}
FREE_MODEL_KEYS = {"remat"}


def fingerprint_subset(cfg: dict, stage: str) -> dict:
    """The settings a stage's checkpoints depend on, from a plain (JSON) config dict: the current
    config's, or the one saved in a checkpoint's meta."""
    keep = {k: {kk: v for kk, v in cfg[k].items() if kk not in FREE_KEYS} for k in STAGE_SECTIONS[stage]}
    keep["model"] = {k: v for k, v in cfg["model"].items() if k not in FREE_MODEL_KEYS}
    keep["data"] = {"seed": cfg["data"]["seed"], "store": os.path.abspath(cfg["data"]["store"])}
    return keep


def fingerprint(cfg, stage: str) -> str:
    """What must not change under a stage's checkpoints: model, store, data seed, the stage's own
    section and the sections its state depends on (so an AR ablation can reuse a finished sft_av
    stage); see FREE_KEYS for what may change."""
    return ckpt_lib.fingerprint(fingerprint_subset(json.loads(cfg.to_json()), stage))


def describe_change(cfg, stage: str) -> Callable[[dict], str | None]:
    """For Checkpointer(describe=), called when a checkpoint's fingerprint differs: which fingerprinted
    keys differ between the config saved with the checkpoint and `cfg` (e.g. "sft_av.optim.lr is 5e-05
    there, 0.001 now"), or None when they all agree (a fingerprint from an older trainer: the saved
    config is the authority). Keys only one side has are not compared: a key added to the config
    later keeps the behaviour it had before it existed, by the convention for adding keys."""
    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": json.dumps(v)})
        return out
    now = flat(fingerprint_subset(json.loads(cfg.to_json()), stage))

    def describe(meta: dict) -> str | None:
        if "config" not in meta:
            return "no config saved with it"
        then = flat(fingerprint_subset(meta["config"], stage))
        diff = [k for k in sorted(set(now) & set(then)) if now[k] != then[k]]
        if not diff:
            return None
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        return "; ".join(f"{k} is {then[k]} there, {now[k]} now" for k in diff[:3]) + more
    return describe


def check_run(cfg, stages: tuple[str, ...]) -> None:
    """Checks that need jax (after distributed start-up) but no compute, before the work directory is
    touched: the mesh fits the devices, each batch fits its split, and existing checkpoints of the
    stages this run will read were written under this config."""
    sharding.mesh_from_config(cfg.mesh)
    man = store_lib.open_store(cfg.data.store).manifest
    for stage, split in (("sft_av", "av_sft"), ("sft_ar", "ar_sft"), ("rl", "rl")):
        rows = man.get("splits", {}).get(split, {}).get("rows", 0)
        if stage in stages and cfg[stage].steps > 0 and cfg[stage].batch > rows:
            raise UserError(f"config key {stage}.batch={cfg[stage].batch} is larger than split {split!r} "
                            f"of store {cfg.data.store} ({rows} rows)")
    reads = {s for s in stages if s in STAGE_SECTIONS}
    if "rl" in stages and cfg.rl.init_from_sft:
        reads |= {"sft_av", "sft_ar"}
    for stage in sorted(reads):
        d = os.path.join(cfg.train.workdir, stage)
        if not os.path.isdir(d) or not any(n.isdigit() for n in os.listdir(d)):
            continue
        mgr = ckpt_lib.Checkpointer(d, keep=None, async_save=False, read_only=True,
                                    fingerprint=fingerprint(cfg, stage), describe=describe_change(cfg, stage))
        try:
            mgr.latest_step()
        finally:
            mgr.close()


def setup(cfg, writer_enabled: bool, stats: stats_lib.ActStats | None = None, open_store: bool = True) -> Setup:
    """Everything the stages share. Tools reading a finished run pass the checkpoint's `stats` (and
    may skip the store, which then is None: `explain` needs only the models)."""
    mesh = sharding.mesh_from_config(cfg.mesh)
    rules = cfg.rules
    store = store_lib.open_store(cfg.data.store) if open_store else None
    mcfg, target, tok = weights.load_from_config(cfg.model, mesh, rules)
    if tok is None:
        raise UserError(f"model source {cfg.model.source!r} has no tokenizer; the NLA needs text")
    if store is not None:
        check_store(cfg, store.manifest, mcfg.d_model)
    if stats is None:
        stats = stats_lib.from_store(store, cfg.nla.stats_splits, cfg.nla.stats_rows, cfg.nla.seed)
    av_spec = av_lib.build_spec(tok, mcfg, cfg.av, stats.mean_norm)
    ar_spec = ar_lib.build_spec(tok, mcfg, cfg.ar, cfg.model.layer, max_len=cfg.av.max_len)
    ctx = steps.Ctx(cfg=mcfg, av=av_spec, ar=ar_spec, center=bool(cfg.nla.center), remat=bool(cfg.model.remat),
                    var_nrm=stats.var(bool(cfg.nla.center)))
    workdir = cfg.train.workdir
    summ_path = os.path.join(cfg.data.store, "summaries.jsonl")
    summaries = {r: rec["text"] for r, rec in read_done(summ_path).items()} if os.path.exists(summ_path) else {}
    rep = sharding.named_sharding((), None, mesh, rules)
    mean = jax.device_put(jnp.asarray(stats.mean_array()), rep)
    return Setup(cfg, mesh, rules, mcfg, target, tok, store, stats, mean, ctx, summaries, workdir,
                 metrics_lib.MetricsWriter(workdir, enabled=writer_enabled))


# ============================================================================= 3. state and shardings

def av_axes(S: Setup) -> dict:
    extra = {"proj": ("embed", None)} if S.cfg.av.input_proj else {}
    return {"model": T.param_axes(S.mcfg), "extra": extra}


def ar_axes(S: Setup) -> dict:
    return ar_lib.param_axes(S.mcfg)


def make_tx(S: Setup, sec, params) -> optax.GradientTransformation:
    return optim.make(sec.optim, max(sec.steps, 1), params)


def _scalars() -> dict:
    return {"step": jnp.int32(0), "skipped": jnp.int32(0), "streak": jnp.int32(0)}


def init_av(S: Setup, target: dict) -> dict:
    return {"model": target, "extra": av_lib.init_extra(S.mcfg.d_model, S.cfg.av.input_proj)}


def init_ar(S: Setup, target: dict) -> dict:
    return ar_lib.init_params(target, S.cfg.model.layer, S.mcfg.d_model)


def state_shardings(S: Setup, abstract: dict, txs: dict[str, tuple[optax.GradientTransformation, str]],
                    axes: dict[str, dict]) -> dict:
    """Shardings of a stage state: params by logical axes, optimizer leaves like their params."""
    rep = sharding.named_sharding((), None, S.mesh, S.rules)
    out = {}
    for k, v in abstract.items():
        if k in axes:
            out[k] = sharding.tree_shardings(axes[k], v, S.mesh, S.rules)
    for k, (_, pk) in txs.items():
        out[k] = like_params(abstract[k], abstract[pk], out[pk], rep)
    for k in ("step", "skipped", "streak"):
        out[k] = rep
    return out


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def like_params(opt_abstract, params_abstract, param_shardings, rep):
    """Optimizer-state shardings: a leaf whose dict-key path ends with a parameter's path and has its
    shape (Adam's mu / nu) is sharded like that parameter; everything else (counts) is replicated."""
    by_path = {}
    for (path, a), s in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0], jax.tree.leaves(param_shardings)):
        by_path[_dict_keys(path)] = (a.shape, s)

    def f(path, leaf):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep
    return jax.tree_util.tree_map_with_path(f, opt_abstract)


def abstract_with(abstract: dict, shardings: dict) -> dict:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ============================================================================= 4. data

def _global(S: Setup, local: dict) -> dict:
    return data_loader.to_global(local, S.mesh, S.rules)


def summary_rows(S: Setup, split: str) -> np.ndarray:
    rows = S.store.rows_of_split(split)
    have = rows[np.isin(rows, np.fromiter(S.summaries, np.int64, len(S.summaries)))].astype(np.int64)
    if len(have) == 0:
        raise UserError(f"no teacher summaries for split {split!r} in {S.cfg.data.store}/summaries.jsonl; "
                        f"run: python -m nla_jax.summarize --config ...")
    return have


def av_batch(S: Setup, local: dict) -> dict:
    texts = [S.summaries[int(r)] for r in local["row"]]
    targets, mask = av_lib.sft_targets(S.tok, texts, S.ctx.av)
    return {"acts": local["acts"], "targets": targets, "mask": mask}


def ar_batch(S: Setup, local: dict) -> dict:
    texts = [S.summaries[int(r)] for r in local["row"]]
    expl, lens = ar_lib.host_explanations(S.tok, texts, S.ctx.ar)
    return {"acts": local["acts"], "expl": expl, "expl_len": lens}


def batches(S: Setup, split: str, batch: int, start: int, make: Callable | None, only=None,
            stage: str | None = None) -> Iterator[tuple[int, dict]]:
    for step, local in data_loader.iterate(S.cfg.data.store, split, batch=batch, seed=S.cfg.data.seed + zlib.crc32(split.encode()) % 997,
                                           start_step=start, fields=("acts",), only=only):
        if stage is not None and (poison := faults.point(f"train.{stage}.batch")) in ("nan", "inf"):
            local["acts"] = np.full_like(local["acts"], np.nan if poison == "nan" else np.inf)  # tests only
        yield step, _global(S, make(S, local) if make else {"acts": local["acts"]})


def fixed_rows(S: Setup, rows: np.ndarray, n: int, make: Callable) -> tuple[dict, np.ndarray]:
    """A fixed validation batch of the first n rows (canonical order): (global batch, doc ids of all its rows)."""
    rows = np.sort(rows)[:n]
    n = len(rows) - len(rows) % max(1, jax.process_count() * _data_shards(S))
    rows = rows[:n]
    k = n // jax.process_count()
    mine = rows[jax.process_index() * k:(jax.process_index() + 1) * k]
    local = S.store.read(None, mine, fields=("acts",))
    local["row"] = mine
    docs = S.store.read(None, rows, fields=("doc_id",))["doc_id"]
    return _global(S, make(S, local)), docs


def _host(x) -> np.ndarray:
    """A batch-sharded global array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _data_shards(S: Setup) -> int:
    return int(np.prod([S.mesh.shape[a] for a in ("data", "fsdp")]))


# ============================================================================= 5. stages

_OPEN_STAGES: list["Stage"] = []


class Stage:
    """Checkpointing, metrics, progress bar and the non-finite guard shared by the stage loops."""

    def __init__(self, S: Setup, name: str, total: int, abstract: dict, shardings: dict):
        self.S, self.name, self.total = S, name, total
        self.mgr = ckpt_lib.Checkpointer(os.path.join(S.workdir, name), keep=S.cfg.train.keep,
                                         async_save=S.cfg.train.async_checkpoint, fingerprint=fingerprint(S.cfg, name),
                                         describe=describe_change(S.cfg, name))
        self.abstract = abstract_with(abstract, shardings)
        self.abstract_shardings = shardings
        self.bar = None
        self.streak = 0
        _OPEN_STAGES.append(self)

    def restore(self) -> tuple[dict | None, dict]:
        if self.mgr.latest_step() is None:
            if self.mgr.all_steps():  # never start over on top of steps that exist but do not read
                raise UserError(f"no checkpoint in {self.mgr.directory} reads (steps "
                                f"{', '.join(map(str, self.mgr.all_steps()))}); move that directory aside "
                                f"to start stage {self.name} over")
            return None, {}
        return self.mgr.restore(self.abstract)

    def save(self, state: dict, step: int, done: bool = False, extra: dict | None = None) -> None:
        if self.streak and not done:
            return  # inside a run of non-finite steps: the last checkpoint stays the last good one
        meta = {"stage": self.name, "step": step, "done": done, "data_step": step,
                "config": json.loads(self.S.cfg.to_json()), "stats": self.S.stats.to_json(), **(extra or {})}
        self.mgr.save(step, state, meta)
        faults.point(f"train.{self.name}.saving")

    def progress(self, start: int):
        self.bar = tqdm(total=self.total, initial=start, desc=self.name, unit="step",
                        disable=jax.process_index() != 0, dynamic_ncols=True)
        return self.bar

    def guard(self, state: dict, m: dict, step: int) -> None:
        streak = self.streak = int(jax.device_get(state["streak"]))
        if streak >= self.S.cfg.train.max_nonfinite:
            self.mgr.wait()
            raise UserError(f"stage {self.name}: {streak} non-finite steps in a row up to step {step}; stopped. "
                            f"Last good checkpoint: step {self.mgr.latest_step()} in {self.mgr.directory}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.mgr.wait()
        self.mgr.close()
        if self in _OPEN_STAGES:
            _OPEN_STAGES.remove(self)

    def abort(self) -> None:
        """After an error: let an in-flight save of a good state finish, then stop orbax's threads,
        so nothing of theirs prints after the one-line error (best effort: the error that got us
        here is the one reported)."""
        if self in _OPEN_STAGES:
            _OPEN_STAGES.remove(self)
        if self.bar is not None:
            self.bar.close()
        for fn in (self.mgr.wait, self.mgr.close):
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass


def finished(S: Setup, name: str) -> bool:
    d = os.path.join(S.workdir, name)
    return os.path.exists(os.path.join(d, "DONE"))


def mark_done(S: Setup, name: str, summary: dict) -> None:
    faults.point(f"train.{name}.before_done")
    if jax.process_index() == 0:
        with open(os.path.join(S.workdir, name, "DONE"), "w") as f:
            json.dump(summary, f, indent=1)
    distributed.barrier(f"done-{name}")


def load_final(S: Setup, name: str, key: str, init: Callable, txs_fn: Callable, axes: dict) -> dict:
    """The `key` params of a finished stage's final checkpoint (e.g. the SFT AV for RL)."""
    state0 = jax.eval_shape(init, S.target)
    sh = state_shardings(S, state0, txs_fn(), axes)
    mgr = ckpt_lib.Checkpointer(os.path.join(S.workdir, name), keep=S.cfg.train.keep, async_save=False,
                                fingerprint=fingerprint(S.cfg, name), describe=describe_change(S.cfg, name))
    try:
        state, _ = mgr.restore(abstract_with(state0, sh))
    finally:
        mgr.close()
    return state[key]


def sft_av_parts(S: Setup):
    sec = S.cfg.sft_av
    av0 = jax.eval_shape(lambda t: init_av(S, t), S.target)
    tx = make_tx(S, sec, av0)
    labels = optim.labels(av0, sec.optim.train_embed)
    init = lambda t: {"av": init_av(S, t), "opt": tx.init(init_av(S, t)), **_scalars()}
    return tx, labels, init, {"opt": (tx, "av")}, {"av": av_axes(S)}


def sft_step_fn(S: Setup, name: str, sh: dict, batch_sh=None):
    """The jitted SFT step of stage `name` (sft_av | sft_ar) with explicit shardings and the state donated."""
    sec = S.cfg[name]
    tx, labels, *_ = (sft_av_parts if name == "sft_av" else sft_ar_parts)(S)
    step, n_blocks = ((steps.sft_av_step, S.mcfg.n_layers) if name == "sft_av"
                      else (steps.sft_ar_step, S.cfg.model.layer + 1))
    rep = sharding.named_sharding((), None, S.mesh, S.rules)
    fn = functools.partial(step, ctx=S.ctx, tx=tx, labels=labels,
                           block_mask=optim.block_mask(n_blocks, sec.optim.train_blocks))
    return jax.jit(fn, in_shardings=(sh, batch_sh, rep), out_shardings=(sh, rep), donate_argnums=(0,))


def sft_loop(S: Setup, st: Stage, name: str, split: str, make: Callable, state: dict, start: int,
             evaluate: Callable[[dict, int], dict], extra: Callable[[dict], dict]) -> None:
    """The SFT stages' shared loop: step, guard, log, evaluate, checkpoint; then the final evaluation,
    the final checkpoint and the DONE marker. `extra(m)` adds logged values (the first also shows
    on the progress bar instead of the loss)."""
    sec = S.cfg[name]
    step_fn = sft_step_fn(S, name, st.abstract_shardings)
    bar = st.progress(start)
    for step, batch in batches(S, split, sec.batch, start, make, only=summary_rows(S, split), stage=name):
        if step >= sec.steps:
            break
        state, m = step_fn(state, batch, S.mean)
        m = jax.device_get(m)
        more = extra(m)
        if (step + 1) % S.cfg.train.log_every == 0:
            S.writer.write(name, step + 1, {"loss": m["loss"], **more, "grad_norm": m["grad_norm"],
                                            "skipped": state["skipped"]})
        st.guard(state, m, step + 1)  # after the log line: the step that stops the run is logged too
        bar.update(1)
        bar.set_postfix({k: f"{float(v):.3f}" for k, v in (more or {"loss": m["loss"]}).items()})
        faults.point(f"train.{name}.step")
        if (step + 1) % sec.eval_every == 0 and step + 1 < sec.steps:
            evaluate(state, step + 1)
        if (step + 1) % S.cfg.train.ckpt_every == 0 and step + 1 < sec.steps:
            st.save(state, step + 1)
    final = evaluate(state, sec.steps)
    st.save(state, sec.steps, done=True)
    st.close()
    mark_done(S, name, final)


def run_sft_av(S: Setup) -> None:
    sec = S.cfg.sft_av
    *_, init, txs, axes = sft_av_parts(S)
    sh = state_shardings(S, jax.eval_shape(init, S.target), txs, axes)
    st = Stage(S, "sft_av", sec.steps, jax.eval_shape(init, S.target), sh)
    state, meta = st.restore()
    start = int(meta.get("step", 0))
    if state is None:
        state = jax.jit(init, out_shardings=sh)(S.target)
    val, val_docs = fixed_rows(S, summary_rows(S, "ar_sft"), sec.val_rows, av_batch)  # other documents than training
    perm = jnp.asarray(np.random.default_rng(0).permutation(val["acts"].shape[0]))
    eval_fn = jax.jit(functools.partial(steps.sft_av_eval, ctx=S.ctx))

    def evaluate(state, step):
        e = {k: _host(v) for k, v in eval_fn(state["av"], val, S.mean, perm).items()}
        gap = stats_lib.bootstrap_ci(np.asarray(e["ce_shuffled"] - e["ce_real"]), val_docs)
        return S.writer.write("sft_av", step, {"kind": "eval", "ce_real": float(e["ce_real"].mean()),
                                               "ce_shuffled": float(e["ce_shuffled"].mean()),
                                               "ce_gap": gap[0], "ce_gap_lo": gap[1], "ce_gap_hi": gap[2]})

    sft_loop(S, st, "sft_av", "av_sft", av_batch, state, start, evaluate, lambda m: {})


def sft_ar_parts(S: Setup):
    sec = S.cfg.sft_ar
    ar0 = jax.eval_shape(lambda t: init_ar(S, t), S.target)
    tx = make_tx(S, sec, ar0)
    labels = optim.labels(ar0, sec.optim.train_embed)
    init = lambda t: {"ar": init_ar(S, t), "opt": tx.init(init_ar(S, t)), **_scalars()}
    return tx, labels, init, {"opt": (tx, "ar")}, {"ar": ar_axes(S)}


def ridge_head(S: Setup, state: dict, sh: dict) -> dict:
    """Initialise the AR head by ridge regression from head inputs to normalised targets."""
    sec = S.cfg.sft_ar
    feats_fn = jax.jit(functools.partial(steps.ar_features, ctx=S.ctx))
    F, Y = [], []
    rows = summary_rows(S, "ar_sft")
    for i, batch in batches(S, "ar_sft", sec.batch, 0, ar_batch, only=rows):
        if i * sec.batch >= min(sec.ridge_rows, len(rows)):
            break
        # every process solves the same ridge problem on all processes' rows
        F.append(np.asarray(multihost_utils.process_allgather(feats_fn(state["ar"], batch), tiled=True)))
        Y.append(np.asarray(multihost_utils.process_allgather(batch["acts"], tiled=True)))
    F, Y = np.concatenate(F), np.concatenate(Y)
    Yn = stats_lib.normalise_np(Y, S.stats.mean_array() if S.ctx.center else None)
    w, b = ar_lib.ridge(F, Yn, sec.ridge_lambda)
    ar = dict(state["ar"])
    ar["head"] = {"w": jax.device_put(w, sh["ar"]["head"]["w"]), "b": jax.device_put(b, sh["ar"]["head"]["b"])}
    return {**state, "ar": ar}


def run_sft_ar(S: Setup) -> None:
    sec = S.cfg.sft_ar
    *_, init, txs, axes = sft_ar_parts(S)
    sh = state_shardings(S, jax.eval_shape(init, S.target), txs, axes)
    st = Stage(S, "sft_ar", sec.steps, jax.eval_shape(init, S.target), sh)
    state, meta = st.restore()
    start = int(meta.get("step", 0))
    if state is None:
        state = jax.jit(init, out_shardings=sh)(S.target)
        if S.cfg.ar.head_init == "ridge":
            state = ridge_head(S, state, sh)
            # the optimizer state was built for the identity head; Adam moments are zero either way
    val, val_docs = fixed_rows(S, summary_rows(S, "av_sft"), sec.val_rows, ar_batch)  # other documents than training
    eval_fn = jax.jit(functools.partial(steps.ar_eval, ctx=S.ctx))
    var, floor = S.stats.var(S.ctx.center), S.stats.floor(S.ctx.center)

    def evaluate(state, step):
        mse = _host(eval_fn(state["ar"], val, S.mean))
        f = stats_lib.bootstrap_ci(1 - mse / var, val_docs)
        return S.writer.write("sft_ar", step, {"kind": "eval", "fve_nrm": f[0], "fve_lo": f[1], "fve_hi": f[2],
                                               "floor": floor})

    if start == 0:
        evaluate(state, 0)
    sft_loop(S, st, "sft_ar", "ar_sft", ar_batch, state, start, evaluate,
             lambda m: {"fve_nrm": 1 - float(m["loss"]) / var})


def rl_sample_config(S: Setup) -> sampling.SampleConfig:
    r = S.cfg.rl
    return sampling.SampleConfig(max_new_tokens=S.ctx.av.max_len, temperature=r.temperature, top_k=r.top_k,
                                 top_p=r.top_p)


def rl_parts(S: Setup):
    rl = S.cfg.rl
    av0, ar0 = jax.eval_shape(lambda t: init_av(S, t), S.target), jax.eval_shape(lambda t: init_ar(S, t), S.target)
    tx_av = optim.make(rl.optim_av, max(rl.steps, 1), av0)
    tx_ar = optim.make(rl.optim_ar, max(rl.steps, 1), ar0)
    init = lambda t: {"av": init_av(S, t), "ar": init_ar(S, t), "opt_av": tx_av.init(init_av(S, t)),
                      "opt_ar": tx_ar.init(init_ar(S, t)), **_scalars()}
    return (tx_av, tx_ar, optim.labels(av0, rl.optim_av.train_embed), optim.labels(ar0, rl.optim_ar.train_embed),
            init, {"opt_av": (tx_av, "av"), "opt_ar": (tx_ar, "ar")}, {"av": av_axes(S), "ar": ar_axes(S)})


def rl_step_fn(S: Setup, sh: dict, ref_sh, batch_sh=None):
    """The jitted GRPO step with explicit shardings and the state donated."""
    rl = S.cfg.rl
    tx_av, tx_ar, lab_av, lab_ar, _, _, _ = rl_parts(S)
    rep = sharding.named_sharding((), None, S.mesh, S.rules)
    # prompt sharing runs the B injected prompts at batch B: only when B splits over the batch shards
    share = bool(rl.share_prompt) and rl.batch % (jax.process_count() * _data_shards(S)) == 0
    fn = functools.partial(steps.rl_step, ctx=S.ctx, rl=rl, sc=rl_sample_config(S), tx_av=tx_av, tx_ar=tx_ar,
                           share_prompt=share,
                           labels_av=lab_av, labels_ar=lab_ar,
                           mask_av=optim.block_mask(S.mcfg.n_layers, rl.optim_av.train_blocks),
                           mask_ar=optim.block_mask(S.cfg.model.layer + 1, rl.optim_ar.train_blocks))
    return jax.jit(fn, in_shardings=(sh, ref_sh, batch_sh, rep, rep), out_shardings=(sh, rep), donate_argnums=(0,))


def run_rl(S: Setup) -> None:
    rl = S.cfg.rl
    if rl.init_from_sft:  # before the Checkpointer exists (its threads must not outlive a refusal)
        for need in ("sft_av", "sft_ar"):
            if not finished(S, need):
                raise UserError(f"stage rl needs the finished {need} stage in {S.workdir} "
                                f"(run it first, or set --config.rl.init_from_sft=False)")
    tx_av, tx_ar, lab_av, lab_ar, init, txs, axes = rl_parts(S)
    sh = state_shardings(S, jax.eval_shape(init, S.target), txs, axes)
    st = Stage(S, "rl", rl.steps, jax.eval_shape(init, S.target), sh)
    state, meta = st.restore()
    start = int(meta.get("step", 0))
    # The reference AV is the SFT AV (or the target itself without a warm start): where to find it is
    # recorded in every RL checkpoint's meta.
    if rl.init_from_sft:
        _, _, av_init, av_txs, av_ax = sft_av_parts(S)
        ref = load_final(S, "sft_av", "av", av_init, lambda: av_txs, av_ax)
    else:
        ref = init_av(S, S.target)
    ref_where = os.path.join(S.workdir, "sft_av") if rl.init_from_sft else f"target:{S.cfg.model.source}"
    if state is None:
        state = jax.jit(init, out_shardings=sh)(S.target)
        if rl.init_from_sft:
            _, _, ar_init, ar_txs, ar_ax = sft_ar_parts(S)
            ar = load_final(S, "sft_ar", "ar", ar_init, lambda: ar_txs, ar_ax)
            state = {**state, "av": jax.tree.map(jnp.copy, ref), "ar": ar}
    step_fn = rl_step_fn(S, sh, jax.tree.map(lambda a: a.sharding, ref))
    bar = st.progress(start)
    key0 = jax.random.key(rl.seed)
    for step, batch in batches(S, "rl", rl.batch, start, None, stage="rl"):
        if step >= rl.steps:
            break
        state, m = step_fn(state, ref, batch, S.mean, jax.random.fold_in(key0, step))
        m = jax.device_get(m)
        S.writer.write("rl", step + 1, {**{k: float(v) for k, v in m.items()}, "skipped": state["skipped"]})
        st.guard(state, m, step + 1)
        bar.update(1)
        bar.set_postfix(reward=f"{float(m['reward_mean']):.3f}", fve=f"{float(m['fve_nrm']):.3f}",
                        fail=f"{float(m['extract_fail']):.2f}")
        faults.point("train.rl.step")
        if (step + 1) % S.cfg.train.ckpt_every == 0 and step + 1 < rl.steps:
            st.save(state, step + 1, extra={"ref_av": ref_where})
    st.save(state, rl.steps, done=True, extra={"ref_av": ref_where})
    st.close()
    mark_done(S, "rl", {"steps": rl.steps, "skipped": int(state["skipped"])})


def run_eval(S: Setup) -> None:
    from nla_jax.nla import quality
    quality.run(S)


# ============================================================================= 6. main

@cli_main
def main(argv=None) -> int:
    args, cfg = cli.parse(build_parser(), argv)
    check_config(cfg)
    stages = tuple(s for s in (args.stages or ",".join(cfg.train.stages)).split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage {bad[0]!r} (expected some of {', '.join(STAGES)})")
    check_store(cfg)
    check_stages(cfg, stages)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed_auto)
    cli.enable_compilation_cache()
    check_run(cfg, stages)
    os.makedirs(cfg.train.workdir, exist_ok=True)
    with ckpt_lib.WorkdirLock(cfg.train.workdir, jax.process_index()):
        S = setup(cfg, writer_enabled=jax.process_index() == 0)
        if jax.process_index() == 0:
            with open(os.path.join(S.workdir, "stats.json"), "w") as f:
                json.dump(S.stats.to_json(), f)
        t0 = time.time()
        with sharding.use_mesh(S.mesh, S.rules):
            for name in STAGES:
                if name not in stages:
                    continue
                if name != "eval" and finished(S, name):
                    print(f"{name}: finished earlier, skipped", file=sys.stderr)
                    continue
                try:
                    {"sft_av": run_sft_av, "sft_ar": run_sft_ar, "rl": run_rl, "eval": run_eval}[name](S)
                except BaseException:
                    for st in list(_OPEN_STAGES):
                        st.abort()
                    S.writer.close()
                    raise
        S.writer.close()
        print(f"done in {time.time() - t0:.0f}s; work directory {S.workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
