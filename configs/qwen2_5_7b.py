"""Qwen2.5-7B-Instruct at block K=20 (of 28), on one node of 8 x H100 80GB: the public release's setting.

Point model.source at the model's Hugging Face directory (config.json, tokenizer.json, *.safetensors)
and launch one process per node, using all its GPUs (see launch/slurm_gpu.sbatch; mesh 8 = 1 node of 8):

    sbatch --nodes=1 launch/slurm_gpu.sbatch configs/qwen2_5_7b.py \\
        --config.model.source=/data/Qwen2.5-7B-Instruct --config.train.workdir=/shared/runs/qwen7b
    # the pipeline before training, same flags: python -m nla_jax.extract ... ; python -m nla_jax.summarize ...
    # TPU: a v5p-16 slice (8 chips of 95 GB, 2 hosts): TPU=... ZONE=... bash launch/tpu_vm.sh run configs/qwen2_5_7b.py ...

Check that every step compiles and fits the GPUs' memory before renting them (no GPU, no weights):

    python -m nla_jax.aot --config configs/qwen2_5_7b.py

Mesh: fsdp=8 (the 28 query heads and 4 KV heads do not split 8 ways, so no tensor axis; at 7B
the fully sharded weights and Adam moments leave most of each 80 GB for activations).
Facts of the public release used here: layer 20, injected norm 150 ("a round number a bit above the mean
norm"), explanations capped at 150 tokens, group size 8, actor LR in 1e-6..1e-5, AR LR in 1e-5..5e-5.
`model.arch` repeats the checkpoint's config.json so `nla_jax.aot` needs no weights; when
model.source is a directory, its config.json is what training uses (aot checks the two agree).
Variant `:g4` uses groups of 4; `:v5p8` is the same mesh on a v5p-16 slice (8 chips of 95 GB),
compiled by the real TPU compiler: `.venv-tpu/bin/python -m nla_jax.aot --config configs/qwen2_5_7b.py:v5p8`.
"""
import ml_collections

from configs import common

VARIANTS = ("g4", "v5p8")

ARCH = dict(
    family="qwen2", n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, head_dim=128, d_ff=18944,
    vocab_size=152064, rope_theta=1_000_000.0, rms_eps=1e-6, rope_scaling=None, tie_embeddings=False,
    qkv_bias=True, max_seq_len=32768, bos_id=151643, eos_ids=(151645,), pad_id=151643, add_bos=False,
    name="Qwen2.5-7B-Instruct")


def get_config(arg=None):
    variants = common.variants(arg, VARIANTS)
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        source="/path/to/Qwen2.5-7B-Instruct",   # set this: a Hugging Face directory
        dtype="bfloat16",        # compute dtype; log-probs and losses stay float32
        weight_dtype="float32",  # master weights and Adam moments (bf16 updates at LR 1e-6 would round away)
        layer=20,                                # block K: HF hidden_states[21]
        remat="full",            # none | minimal | full (what a block keeps for its backward)
        decode="auto",          # sampler layers: scan on accelerators (per-layer gathers), unrolled on CPU
        attention="einsum",     # einsum | xla | cudnn | splash (models/attention.py); TPU variants: splash
        arch=ml_collections.ConfigDict(ARCH),
        seed=0,
    ))
    cfg.mesh = common.mesh((1, 8, 1), platform="gpu")   # (data, fsdp, tensor) on 8 GPUs
    cfg.rules = common.rules()
    cfg.data = common.data(store="runs/qwen2_5_7b/acts", max_len=512)
    cfg.summarize = common.summarize(batch=64, max_new_tokens=128)
    cfg.sample = common.sample()
    common.nla(cfg, workdir="runs/qwen2_5_7b/train")
    cfg.av.inject_norm = 150.0
    cfg.av.max_len = 150
    cfg.sft_av.update(steps=2000, batch=32, val_rows=256, eval_every=250, optim=common.optim(1e-5, warmup=50))
    cfg.sft_ar.update(steps=2000, batch=64, val_rows=512, eval_every=250,
                      optim=common.optim(3e-5, lr_head=1e-4, warmup=50))
    cfg.rl.update(steps=300, batch=16, group_size=8,
                  optim_av=common.optim(5e-6, warmup=0), optim_ar=common.optim(3e-5, lr_head=1e-4, warmup=0))
    cfg.train.update(ckpt_every=50)
    cfg.eval.update(rows=1024)
    # What `python -m nla_jax.aot` compiles for: the target accelerator and synthetic prompt lengths.
    cfg.aot = ml_collections.ConfigDict(dict(
        devices=8, accelerator="H100-80GB", device_memory_gb=80.0,
        usable_fraction=0.9,     # of device memory a step may plan for (CUDA context, NCCL, fragmentation)
        prompt_len=64,           # AV prompt: chat template + <concept>marker</concept> + "<explanation>"
        closer_len=4, ar_prefix_len=4, ar_suffix_len=5,
    ))
    if "g4" in variants:
        cfg.rl.update(batch=32, group_size=4)
    if "v5p8" in variants:
        common.tpu(cfg, "v5p:2x2x2", 8, (1, 8, 1), hbm_gb=95.0)
    return cfg
