"""Compile the training steps ahead of time for the config's target accelerators, without them.

    python -m nla_jax.aot --config configs/qwen2_5_7b.py
    python -m nla_jax.aot --config configs/llama3_3_70b.py --steps rl --json runs/aot_llama70b.json
    python -m nla_jax.aot --config configs/qwen2_5_0_5b.py --config.aot.device_memory_gb=0.001   # must fail

What MaxText's train_compile does for TPU topologies, done here with fake CPU devices: the process
gets `aot.devices` host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax
starts; the command re-runs itself in a fresh process if jax already started with another count),
the config's mesh is built on them, and every step is lowered and compiled from abstract arrays
(jax.ShapeDtypeStruct with the shardings the trainer would use): no weights are read, no store or
tokenizer is opened. The AV/AR prompts are synthetic token ids of realistic lengths (config keys
aot.prompt_len, closer_len, ar_prefix_len, ar_suffix_len). The run state is the trainer's
(nla_jax.nla.run.build with abstract=True) and so are the stage layouts and jitted steps
(nla_jax.nla.state): the same shardings, the state donated.

For each step it prints XLA's memory analysis of the compiled per-device program: arguments,
outputs, outputs aliased to donated arguments, temporaries, and their total (args + outputs -
aliased + temps), against aot.device_memory_gb x aot.usable_fraction of the target accelerator. It
exits with status 2 and a one-line error when a step does not fit.

The numbers are XLA:CPU's, not the GPU/TPU compiler's: buffer assignment, fusion and scheduling
differ between backends, so treat the totals as an estimate; the argument bytes (params, optimizer
state, batch) are exact. One CPU artefact is removed by default: XLA:CPU computes bfloat16 dots in
float32 (it inserts float32 copies of both operands), and loop-invariant copies are hoisted out of
loops, so a bf16 model would show float32 copies of whole weight stacks that no GPU/TPU allocates.
With `--bf16-as f16` (the default) bfloat16 arrays are compiled as float16, which has the same size
and which XLA:CPU multiplies natively once its `change-op-data-type` and `operand_upcaster` passes
are disabled (done here via XLA_FLAGS; the compiled programs are only measured, never run, and
XLA:CPU could not run their f16 x f16 -> f32 logit dots). `--bf16-as bf16` compiles the real dtype
with XLA:CPU's upcasts (an upper bound).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

# Importing jax does not start a backend; ensure_devices() sets XLA_FLAGS before the first use.
import jax
import jax.numpy as jnp
import numpy as np
from jax._src import xla_bridge

from nla_jax import accelerators, cli, sampling, sharding
from nla_jax import weights as weights_lib
from nla_jax.weights import hf as hf_weights
from nla_jax.cli import cli_main
from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.nla import flops as flops_lib
from nla_jax.nla import measure
from nla_jax.nla import run as run_lib
from nla_jax.nla import state as state_lib
from nla_jax.nla import steps

TRAIN_STEPS = ("sft_av", "sft_ar", "rl")
STEPS = TRAIN_STEPS + ("decode", "explain", "export")
GB = 1e9
NOTE = ("per-device bytes from XLA:CPU's memory analysis on fake CPU devices: an estimate of what the "
        "GPU/TPU compiler needs, not its exact plan")
NOTE_TPU = ("per-device bytes from XLA:TPU's memory analysis and seconds from its cost model (compiled for the "
            "slice libtpu describes, no TPU attached): the TPU compiler's own estimates; est MFU = model FLOPs "
            "(nla_jax.nla.flops) / (est s x devices x peak bf16 FLOP/s)")
NOTE_F16 = "bfloat16 compiled as float16 (same size) so that XLA:CPU keeps 16-bit dots as a GPU/TPU does"
NOTE_BF16 = "bfloat16 compiled as is: XLA:CPU's float32 copies of dot operands inflate the temporaries"
_REEXEC = "NLA_AOT_CHILD"


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--steps", default=",".join(TRAIN_STEPS),
                   help="comma-separated subset of " + ",".join(STEPS) + " (default: the training steps). "
                        "decode: the RL step's rollout alone (rl.batch x group); explain: evaluate's and explain's per-batch program (sampler + AR read-out, eval.batch "
                        "rows, the pair in the compute dtype); export: the pair's float32 masters on the "
                        "mesh and the host memory of writing them (nothing compiled)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON here")
    p.add_argument("--target", default=None, metavar="TOPOLOGY",
                   help="compile with the real TPU compiler for this TPU slice, as libtpu names it: v5p:2x2x2 "
                        "(8 chips), v5p:4x4x4 (64), v5e:4x4 (16), v6e:8x8 (64), ... (default: config "
                        "aot.topology if set, else aot.devices fake CPU devices). Needs libtpu: "
                        + accelerators.SETUP_HINT)
    p.add_argument("--no-time", action="store_true",
                   help="TPU targets: skip the cost model's loop-corrected time (and MFU), which compiles each "
                        "step again once per distinct layer-scan length (plus twice for the decode loop)")
    p.add_argument("--devices", type=int, default=None, help="fake devices (default: config aot.devices)")
    p.add_argument("--device-memory-gb", type=float, default=None,
                   help="memory of one accelerator in GB (default: config aot.device_memory_gb)")
    p.add_argument("--bf16-as", choices=("f16", "bf16"), default="f16",
                   help="compile bfloat16 as float16 with native 16-bit dots (default; see above), or as is")
    return p


# ============================================================================= target description

@dataclasses.dataclass
class Target:
    devices: int
    accelerator: str
    memory_gb: float
    usable_fraction: float
    prompt_len: int
    closer_len: int
    ar_prefix_len: int
    ar_suffix_len: int
    topology: str | None = None          # a TPU slice (libtpu's name): compiled by XLA:TPU
    peak_tflops: float | None = None     # per device, bf16 dense (TPU targets: accelerators.CHIPS)

    @property
    def budget_gb(self) -> float:
        return self.memory_gb * self.usable_fraction


def target_of(cfg, args) -> Target:
    """The machine to compile for: a TPU slice (--target or config aot.topology: the real TPU
    compiler, memory and peak from accelerators.CHIPS) or aot.devices fake CPU devices (GPU targets:
    XLA:CPU's estimate)."""
    a = cfg.get("aot") or {}
    lengths = (int(a.get("prompt_len", 64)), int(a.get("closer_len", 4)), int(a.get("ar_prefix_len", 4)),
               int(a.get("ar_suffix_len", 5)))
    frac = float(a.get("usable_fraction", 0.9))
    if not 0 < frac <= 1:
        raise UserError(f"config key aot.usable_fraction={frac}: expected a fraction in (0, 1]")
    topology = args.target or a.get("topology")
    if topology:
        chip, _ = accelerators.parse_topology(topology)
        mem = args.device_memory_gb if args.device_memory_gb is not None else chip.hbm_gb
        return Target(accelerators.chips(topology), f"TPU-{chip.name}-{chip.hbm_gb:g}GB", float(mem), frac, *lengths,
                      topology=topology, peak_tflops=chip.peak_tflops_bf16)
    devices = args.devices or a.get("devices")
    mem = args.device_memory_gb if args.device_memory_gb is not None else a.get("device_memory_gb")
    if not devices or mem is None:
        raise UserError(f"config {args.config!r} has no aot section (aot.devices, aot.device_memory_gb); "
                        "add one or pass --devices N --device-memory-gb G, or --target TOPOLOGY")
    if devices < 1:
        raise UserError(f"aot.devices={devices}: expected at least 1")
    return Target(int(devices), str(a.get("accelerator", "accelerator")), float(mem), frac, *lengths)


# ============================================================================= fake devices

NATIVE_16BIT_DOTS = "--xla_disable_hlo_passes=change-op-data-type,operand_upcaster"


def _xla_flags(n: int, native16: bool) -> str:
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count") and f != NATIVE_16BIT_DOTS]
    return " ".join(keep + [f"--xla_force_host_platform_device_count={n}"] + ([NATIVE_16BIT_DOTS] if native16 else []))


def ensure_devices(n: int, native16: bool, argv: Sequence[str]) -> int | None:
    """Give this process n CPU devices (and XLA:CPU's native 16-bit dots if asked). Returns None when it
    has them, else the exit status of a fresh process that re-ran the command with them (jax had
    already started, with other devices or flags)."""
    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = _xla_flags(n, native16)
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    flags_ok = (NATIVE_16BIT_DOTS in os.environ.get("XLA_FLAGS", "").split()) == native16
    if jax.default_backend() == "cpu" and jax.device_count() == n and flags_ok:
        return None
    if os.environ.get(_REEXEC):
        raise UserError(f"could not get {n} fake CPU devices (have {jax.device_count()} {jax.default_backend()} "
                        "devices); is XLA_FLAGS overridden?")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, XLA_FLAGS=_xla_flags(n, native16), JAX_PLATFORMS="cpu", PYTHONPATH=path, **{_REEXEC: "1"})
    print(f"aot: jax already started with {jax.device_count()} {jax.default_backend()} devices; "
          f"re-running in a fresh process with {n} CPU devices", file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, "-m", "nla_jax.aot", *argv], env=env)


# ============================================================================= the steps

def _batch(run: run_lib.Run, fields: dict[str, tuple[tuple[int, ...], Any]], key: str) -> dict:
    """Abstract global batch sharded along its first axis like data_loader.to_global."""
    b = next(iter(fields.values()))[0][0]
    if b % run.batch_shards:
        raise UserError(f"config key {key}={b} is not divisible by the mesh's data x fsdp = {run.batch_shards} "
                        f"(the batch is sharded over them)")
    out = {}
    for k, (shape, dt) in fields.items():
        sh = sharding.named_sharding(("batch",) + (None,) * (len(shape) - 1), None, run.mesh, run.rules)
        out[k] = jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    return out


def _replicated(run: run_lib.Run, shape=(), dtype=None):
    return jax.ShapeDtypeStruct(shape, dtype or jnp.float32, sharding=run.replicated)


def lower_rl(run: run_lib.Run):
    layout = state_lib.rl(run)
    ref = state_lib.abstract_reference(run)
    d = run.model_cfg.d_model
    batch = _batch(run, {"acts": ((run.cfg.rl.batch, d), jnp.dtype(run.cfg.data.dtype))}, "rl.batch")
    key = jax.eval_shape(lambda: jax.random.key(0))
    fn = state_lib.rl_step(run, layout, jax.tree.map(lambda a: a.sharding, ref),
                           {k: v.sharding for k, v in batch.items()})
    args = (layout.abstract, ref, batch, _replicated(run, (d,)), _replicated(run, key.shape, key.dtype))
    return fn, args, {"state": layout.abstract, "ref_av": ref}


def _sft(run: run_lib.Run, name: str, batch: dict):
    layout = state_lib.for_stage(run, name)
    jitted = state_lib.sft_step(run, layout, {k: v.sharding for k, v in batch.items()})
    return jitted, (layout.abstract, batch, _replicated(run, (run.model_cfg.d_model,))), {"state": layout.abstract}


def lower_sft_av(run: run_lib.Run):
    d, cap = run.model_cfg.d_model, run.ctx.av.max_len
    act = jnp.dtype(run.cfg.data.dtype)
    b = run.cfg.sft_av.batch
    batch = _batch(run, {"acts": ((b, d), act), "targets": ((b, cap), jnp.int32), "mask": ((b, cap), jnp.bool_)},
                   "sft_av.batch")
    return _sft(run, "sft_av", batch)


def lower_sft_ar(run: run_lib.Run):
    d, room = run.model_cfg.d_model, run.ctx.ar.max_len
    act = jnp.dtype(run.cfg.data.dtype)
    b = run.cfg.sft_ar.batch
    batch = _batch(run, {"acts": ((b, d), act), "expl": ((b, room), jnp.int32), "expl_len": ((b,), jnp.int32)},
                   "sft_ar.batch")
    return _sft(run, "sft_ar", batch)


def _pair_abstract(run: run_lib.Run) -> tuple[dict, dict]:
    """The pair's parameters as a reader restores them (no optimizer state), in the run's weight dtype."""
    return state_lib.sft_av(run).params_abstract("av"), state_lib.sft_ar(run).params_abstract("ar")


def lower_explain(run: run_lib.Run):
    """What evaluate and explain compile per batch of eval.batch rows: the verbalizer samples an
    explanation (prefill + decode loop to the cap) and the reconstructor reads it back. The run is
    the inference run: the pair held in the compute dtype (workdir.load_pair's default)."""
    av, ar = _pair_abstract(run)
    d = run.model_cfg.d_model
    batch = _batch(run, {"acts": ((int(run.cfg.eval.batch), d), jnp.float32)}, "eval.batch")
    key = jax.eval_shape(lambda: jax.random.key(0))
    sc = sampling.SampleConfig(max_new_tokens=run.ctx.av.max_len, greedy=True)
    explain, predict = measure._explain_fn(run.ctx, sc), measure._predict_fn(run.ctx)

    def explain_and_reconstruct(av, ar, acts, mean, key):      # acts [b, d] -> tokens [b, cap], pred [b, d]
        ex = explain(av, acts, mean, key)
        return ex["tokens"], predict(ar, ex["tokens"], ex["expl_len"])

    fn = jax.jit(explain_and_reconstruct)
    args = (av, ar, batch["acts"], _replicated(run, (d,)), _replicated(run, key.shape, key.dtype))
    return fn, args, {"av": av, "ar": ar}


def lower_decode(run: run_lib.Run):
    """The RL step's rollout alone (prefill + decode of rl.batch x rl.group_size explanations from
    the AV's masters, cast inside as the step does): how much of the step sampling takes."""
    av = state_lib.rl(run).params_abstract("av")
    d, G = run.model_cfg.d_model, int(run.cfg.rl.group_size)
    batch = _batch(run, {"acts": ((int(run.cfg.rl.batch), d), jnp.dtype(run.cfg.data.dtype))}, "rl.batch")
    key = jax.eval_shape(lambda: jax.random.key(0))
    fn = jax.jit(functools.partial(steps.explain, ctx=run.ctx, sc=state_lib.rl_sample_config(run), group=G))
    args = (av, batch["acts"], _replicated(run, (d,)), _replicated(run, key.shape, key.dtype))
    return fn, args, {"av": av}


LOWER = {"sft_av": lower_sft_av, "sft_ar": lower_sft_ar, "rl": lower_rl, "explain": lower_explain,
         "decode": lower_decode}


def model_flops(run: run_lib.Run, name: str) -> flops_lib.StepFlops | None:
    """Model FLOPs of one global step (nla_jax.nla.flops); None for export (no program)."""
    m, c = run.model_cfg, run.cfg
    P, C, A, K = len(run.ctx.av.prompt), run.ctx.av.max_len, run.ctx.ar.seq_len, int(c.model.layer)
    B, G = int(c.rl.batch), int(c.rl.group_size)
    if name == "sft_av":
        return flops_lib.sft_av(m, int(c.sft_av.batch), P, C)
    if name == "sft_ar":
        return flops_lib.sft_ar(m, int(c.sft_ar.batch), A, K)
    if name == "rl":
        return flops_lib.rl(m, B, G, P, C, A, K, state_lib.share_prompt(run), float(c.rl.beta) > 0)
    if name == "decode":
        return flops_lib.decode(m, B * G, B, P, C)
    if name == "explain":
        E = int(c.eval.batch)
        f = flops_lib.decode(m, E, E, P, C).total + flops_lib.forward(m, E * A, A / 2, layers=K + 1, head_rows=E)
        return flops_lib.StepFlops(f, {"explain": f})
    return None


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard per leaf)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += int(np.prod(shape, dtype=np.int64)) * a.dtype.itemsize
    return total


def export_row(run: run_lib.Run) -> dict:
    """export compiles nothing: it restores the pair's float32 masters (no optimizer state, no
    target) onto the mesh and writes them from process 0 one safetensors shard at a time (each
    block's tensors sliced out of the sharded stacks when their shard is written). Device bytes =
    the sharded masters; host bytes = at most one shard (or the largest single tensor, or the
    whole model if it is smaller)."""
    av, ar = _pair_abstract(run)
    size = lambda a: int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize
    block = lambda a: size(a) // a.shape[0] if len(a.shape) > 2 else size(a)    # stacked [L, ...] leaves
    host = lambda tree: min(sum(size(a) for a in jax.tree.leaves(tree)),
                            max(hf_weights.SHARD_BYTES, max(block(a) for a in jax.tree.leaves(tree))))
    dev = (per_device_bytes(av) + per_device_bytes(ar)) / GB
    return {"step": "export", "lower_s": 0.0, "compile_s": 0.0, "argument_gb": dev, "output_gb": 0.0,
            "alias_gb": 0.0, "temp_gb": 0.0, "code_gb": 0.0, "total_gb": dev,
            "parts_gb": {"av": per_device_bytes(av) / GB, "ar": per_device_bytes(ar) / GB},
            "host_gb": max(host(av), host(ar)) / GB}


def _probe_seconds(run: run_lib.Run, name: str, scan_probe: int | None = None, peel: int = 0) -> float:
    transformer.SCAN_PROBE, sampling.DECODE_PEEL = scan_probe, peel
    jax.clear_caches()            # the probes change module switches a cached trace would not see
    try:
        return _compile(run, name)["est_seconds"]
    finally:
        transformer.SCAN_PROBE, sampling.DECODE_PEEL = None, 0
        jax.clear_caches()


_DECODE_STEP: dict[int, float] = {}


def loop_corrected_seconds(run: run_lib.Run, name: str, as_compiled: float, trips: list[int]) -> tuple[float, dict]:
    """The cost model's seconds with every loop counted at its trip count.

    XLA's cost analysis counts a loop body once. Layer scans: compiling again with the scans of trip
    count n unrolled twice adds 1 + n % 2 bodies (jax runs an odd remainder as its own loop), so one
    block costs the difference / (1 + n % 2) and the scan n - 1 more of them. Decode: the sampler's
    while_loop (layers unrolled inside) runs cap - 1 steps; one peeled step's cost is measured on
    the rollout program (`decode`) and the loop's cap - 2 uncounted steps added."""
    total, parts = as_compiled, {"as_compiled": as_compiled}
    for n in trips:
        if n < 2:
            continue
        block = (_probe_seconds(run, name, scan_probe=n) - as_compiled) / (1 + n % 2)
        parts[f"scan{n}"] = (n - 1) * block
        total += parts[f"scan{n}"]
    if name in ("rl", "decode", "explain"):
        probe = "explain" if name == "explain" else "decode"
        key = id(run) * 2 + (probe == "explain")
        if key not in _DECODE_STEP:
            _DECODE_STEP[key] = _probe_seconds(run, probe, peel=1) - _probe_seconds(run, probe, peel=0)
        parts["decode_loop"] = (run.ctx.av.max_len - 2) * _DECODE_STEP[key]
        total += parts["decode_loop"]
    return total, parts


def compile_step(run: run_lib.Run, name: str, t: Target | None = None, time_it: bool = False) -> dict:
    """Lower and compile step `name`; memory analysis, and where the compiler has a cost model (XLA:TPU)
    its time estimate (`time_it`: loops counted at their trip counts, see loop_corrected_seconds;
    several more compiles) and the estimated MFU = model FLOPs / (seconds x devices x peak)."""
    if name == "export":
        return export_row(run)
    transformer.SCAN_TRIPS.clear()
    row = _compile(run, name)
    if not time_it and row["est_seconds"]:
        # the cost model counts each loop body once: without the loop correction the seconds are far too
        # low (an "MFU" of several hundred percent), so they are kept only as what the compile reported
        row["est_seconds_as_compiled"], row["est_seconds"] = row["est_seconds"], None
    if time_it and row["est_seconds"]:
        row["est_seconds_as_compiled"] = row["est_seconds"]
        row["est_seconds"], row["est_seconds_parts"] = loop_corrected_seconds(run, name, row["est_seconds"],
                                                                             sorted(transformer.SCAN_TRIPS))
    mf = model_flops(run, name)
    row["model_flops"] = mf.total if mf else None
    row["model_flops_parts"] = mf.parts if mf else None
    row["est_mfu"] = None
    if t is not None and t.peak_tflops and row["est_seconds"] and mf:
        row["est_mfu"] = mf.total / (row["est_seconds"] * t.devices * t.peak_tflops * 1e12)
    return row


def _compile(run: run_lib.Run, name: str) -> dict:
    t0 = time.perf_counter()
    fn, args, parts = LOWER[name](run)
    with sharding.use_mesh(run.mesh, run.rules):
        lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row = {"step": name, "lower_s": t1 - t0, "compile_s": t2 - t1,
           "xla_flops_per_device": float(cost.get("flops", 0.0)) or None,
           "est_seconds": float(cost["optimal_seconds"]) if cost.get("optimal_seconds", 0) > 0 else None,
           "argument_gb": m.argument_size_in_bytes / GB, "output_gb": m.output_size_in_bytes / GB,
           "alias_gb": m.alias_size_in_bytes / GB, "temp_gb": m.temp_size_in_bytes / GB,
           "code_gb": m.generated_code_size_in_bytes / GB,
           # Pallas TPU kernels in the program (splash attention: forward and backward calls)
           "kernel_calls": lowered.as_text().count("tpu_custom_call")}
    row["total_gb"] = row["argument_gb"] + row["output_gb"] - row["alias_gb"] + row["temp_gb"] + row["code_gb"]
    row["parts_gb"] = {}
    for k, tree in parts.items():
        if k == "state":
            for sk in tree:
                if sk not in state_lib.COUNTERS:
                    row["parts_gb"][sk] = per_device_bytes(tree[sk]) / GB
        else:
            row["parts_gb"][k] = per_device_bytes(tree) / GB
    return row


# ============================================================================= report

def table(rows: list[dict], t: Target) -> str:
    cost = t.topology is not None
    head = (f"{'step':<8}{'lower s':>9}{'compile s':>11}{'args GB':>10}{'out GB':>9}{'alias GB':>10}"
            f"{'temp GB':>10}{'total GB':>10}{'budget GB':>11}" + (f"{'est s':>9}{'est MFU':>9}" if cost else "")
            + "  fits")
    lines = [head, "-" * len(head)]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        extra = f"{fmt(r.get('est_seconds'), '.3f'):>9}{fmt(r.get('est_mfu'), '.1%'):>9}" if cost else ""
        lines.append(f"{r['step']:<8}{r['lower_s']:>9.1f}{r['compile_s']:>11.1f}{r['argument_gb']:>10.2f}"
                     f"{r['output_gb']:>9.2f}{r['alias_gb']:>10.2f}{r['temp_gb']:>10.2f}{r['total_gb']:>10.2f}"
                     f"{t.budget_gb:>11.2f}{extra}  {'yes' if r['fits'] else 'NO'}")
    return "\n".join(lines)


def _params(model_cfg) -> int:
    return sum(int(np.prod(a.shape, dtype=np.int64)) for a in jax.tree.leaves(transformer.abstract_params(model_cfg)))


def check(cfg) -> None:
    """The trainer's own config checks, on the architecture from model.arch."""
    c = cfg.copy_and_resolve_references()
    c.unlock()
    if c.model.get("arch") and len(c.model.arch):
        c.model.source = "random"
    run_lib.check_config(c)


def build_run(cfg, bf16_as: str, inference: bool = False, devices=None) -> run_lib.Run:
    """The abstract run: no weights, store or tokenizer; bfloat16 compiled as float16 with
    --bf16-as f16 (same bytes; see the module docstring). `inference`: parameters held in the
    compute dtype, as evaluate and explain read a pair (workdir.load_pair(dtype="compute"))."""
    as_compiled = lambda d: jnp.float16 if bf16_as == "f16" and d == jnp.bfloat16 else d
    compute = as_compiled(weights_lib.dtype_of(cfg.model.dtype))
    weight = compute if inference else as_compiled(weights_lib.dtype_of(weights_lib.weight_dtype_name(cfg.model)))
    return run_lib.build(cfg, abstract=True, compute_dtype=compute, weight_dtype=weight, devices=devices)


@cli_main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = cli.parse(build_parser(), argv)
    steps_ = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps_ if s not in STEPS]
    if bad or not steps_:
        raise UserError(f"--steps: unknown step {bad[0] if bad else ''!r} (expected some of {', '.join(STEPS)})")
    t = target_of(cfg, args)
    devices = None
    if t.topology:
        if not xla_bridge.backends_are_initialized():     # the host runs on its CPU; libtpu only compiles
            os.environ["JAX_PLATFORMS"] = "cpu"
            jax.config.update("jax_platforms", "cpu")
        devices = accelerators.tpu_devices(t.topology)
        args.bf16_as = "bf16"                               # XLA:TPU computes bf16 natively: no stand-in
    else:
        rc = ensure_devices(t.devices, args.bf16_as == "f16", argv)
        if rc is not None:
            return rc
        if cfg.model.get("attention", "einsum") in ("splash", "cudnn"):
            # fake CPU devices cannot build a TPU or cuDNN kernel (splash would compile its Pallas
            # interpreter): estimate with the einsum reference, and say so
            print(f"aot: model.attention={cfg.model.attention} is compiled as 'einsum' on the fake CPU devices "
                  f"(the kernel needs its accelerator)", file=sys.stderr)
            with cfg.unlocked():
                cfg.model.attention = "einsum"
    jax.config.update("jax_enable_compilation_cache", False)  # compile times are part of the report
    # Compile the accelerator's code path: the hand-written matmul gradient is an XLA:CPU speed fix.
    transformer.CPU_HANDWRITTEN_MATMUL_GRAD = False
    check(cfg)
    run = build_run(cfg, args.bf16_as, devices=devices)
    runs = {"train": run, "inference": build_run(cfg, args.bf16_as, inference=True, devices=devices)
            if "explain" in steps_ else None}
    mesh, m = run.mesh, run.model_cfg
    print(f"config {args.config}: {m.name} ({m.family}, {_params(m) / 1e9:.2f}B params, {m.n_layers} blocks, "
          f"d={m.d_model}), block K={cfg.model.layer}, compute {cfg.model.dtype}, weights "
          f"{weights_lib.weight_dtype_name(cfg.model)}, remat={run.ctx.remat}, attention={m.attention}")
    where = (f"TPU slice {t.topology} as libtpu describes it, compiled by XLA:TPU" if t.topology
             else f"{t.devices} fake CPU devices")
    print(f"target: {t.devices} x {t.accelerator} ({t.memory_gb:g} GB each, budget {t.usable_fraction:g} x = "
          f"{t.budget_gb:.2f} GB); mesh {dict(mesh.shape)} on {where}")
    print(f"batches: sft_av {cfg.sft_av.batch}, sft_ar {cfg.sft_ar.batch}, rl {cfg.rl.batch} x group "
          f"{cfg.rl.group_size}; prompt {t.prompt_len} + explanation cap {cfg.av.max_len} tokens", flush=True)
    rows = []
    for name in steps_:
        print(f"aot: lowering and compiling {name} ...", file=sys.stderr, flush=True)
        r = compile_step(runs["inference"] if name == "explain" else run, name, t,
                         time_it=bool(t.topology) and not args.no_time)
        r["fits"] = r["total_gb"] <= t.budget_gb
        rows.append(r)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts_gb"].items())
        host = f"; host GB (process 0): {r['host_gb']:.2f}" if "host_gb" in r else ""
        done = "measured" if name == "export" else f"compiled in {r['compile_s']:.1f}s"
        print(f"aot: {name} {done}; per-device argument GB: {parts}{host}", file=sys.stderr, flush=True)
    print(table(rows, t))
    if t.topology:
        note = NOTE_TPU
    else:
        note = NOTE
        if cfg.model.dtype == "bfloat16":
            note += "; " + (NOTE_F16 if args.bf16_as == "f16" else NOTE_BF16)
    print(f"note: {note}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "model": m.name, "params": _params(m), "layer": cfg.model.layer,
                       "dtype": cfg.model.dtype, "weight_dtype": weights_lib.weight_dtype_name(cfg.model), "mesh": dict(mesh.shape), "target": dataclasses.asdict(t),
                       "budget_gb": t.budget_gb, "bf16_as": args.bf16_as, "steps": rows, "note": note,
                       "jax": jax.__version__}, f, indent=1)
    over = [r for r in rows if not r["fits"]]
    if over:
        what = "; ".join(f"{r['step']} needs {r['total_gb']:.3g} GB" for r in over)
        raise UserError(f"does not fit: {what} per device, over the budget of {t.budget_gb:.3g} GB "
                        f"({t.usable_fraction:g} x {t.memory_gb:g} GB of one {t.accelerator}; config keys "
                        f"aot.device_memory_gb, aot.usable_fraction, mesh.shape)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
