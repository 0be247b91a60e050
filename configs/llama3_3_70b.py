"""Llama-3.3-70B-Instruct at block K=53 (of 80), on 128 x H100 80GB (16 nodes of 8): fsdp=16 x tensor=8.

Point model.source at the model's Hugging Face directory (config.json, tokenizer.json, *.safetensors)
and launch one process per node (all its GPUs; see launch/slurm_gpu.sbatch), or one per host on a
TPU pod slice of 64 chips, a v5p-128 (16 hosts of 4 chips; see launch/tpu_vm.sh):

    sbatch --nodes=16 launch/slurm_gpu.sbatch configs/llama3_3_70b.py \\
        --config.model.source=/data/Llama-3.3-70B-Instruct --config.train.workdir=/shared/runs/llama70b
    TPU=my-v5p-128 ZONE=... bash launch/tpu_vm.sh run configs/llama3_3_70b.py:v5p64 \\
        --config.model.source=/mnt/shared/Llama-3.3-70B-Instruct --config.train.workdir=/mnt/shared/runs/llama70b

Check that every step compiles and fits before renting the machines (no accelerator, no weights):

    python -m nla_jax.aot --config configs/llama3_3_70b.py            # or :v5p64

Layer: "about 2/3 of depth" (WORKSPACE.md, "The method in brief"). K = round(2/3 x 80) = 53, the same fraction as the public
Gemma-3-12B setting (block 32 of 48); the AR then runs blocks 0..53 (54 of 80). The injected norm is
left to the store's statistics (0 = a round number about 1.1 x the mean activation norm), since no
published value exists for this layer.
Mesh: the tensor axis (8) shards heads (64 query, 8 KV), MLP (28672) and vocabulary inside a node's
NVLink domain; fsdp shards the embed dimension of every weight and Adam moment across nodes. The
GRPO step holds the AV and AR as float32 master weights with float32 Adam states, the reference AV
in bf16 (12 GB a device at 128 GPUs), the optimizer update's temporaries, and the sampler's weights:
its decode loop needs each layer gathered over fsdp, and XLA hoists those loop-invariant gathers out
of the loop, so a device holds 1/tensor of the whole verbalizer (17.6 GB at tensor=8).
`python -m nla_jax.aot` puts the step at 57.9 GB a device on 128 GPUs and 81.7 GB on 64 (fsdp=8),
over the 72 GB budget of an 80 GB H100: the float32 masters (needed: a bf16 update at LR 2e-6 rounds
away) cost ~19 GB a device there. Before them, with everything in bf16, 64 GPUs needed 62 GB.
The public release: explanations capped at 150 tokens, group size 8, actor LR in 1e-6..1e-5 (2e-6 at this
size), AR LR in 1e-5..5e-5 (2e-5). `model.arch` repeats config.json (RoPE with Llama-3 scaling)
so `nla_jax.aot` needs no weights; with a real source directory, its config.json is what training
uses (aot checks the two agree).
Variants: v5p64 (a v5p-128 slice: 64 chips of 95 GB, fsdp=8 x tensor=8: 81.7 GB of 90 usable), g4 (groups of 4).
"""
import ml_collections

from configs import common

VARIANTS = ("v5p64", "g4")

ARCH = dict(
    family="llama", n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, head_dim=128, d_ff=28672,
    vocab_size=128256, rope_theta=500000.0, rms_eps=1e-5,
    rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
    tie_embeddings=False, qkv_bias=False, max_seq_len=131072, bos_id=128000, eos_ids=(128001, 128008, 128009),
    pad_id=128004, add_bos=True, name="Llama-3.3-70B-Instruct")


def get_config(arg=None):
    variants = common.variants(arg, VARIANTS)
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        source="/path/to/Llama-3.3-70B-Instruct",   # set this: a Hugging Face directory
        dtype="bfloat16",        # compute dtype; log-probs and losses stay float32
        weight_dtype="float32",  # master weights and Adam moments (bf16 updates at LR 1e-6 would round away)
        layer=53,                                   # block K: HF hidden_states[54]
        remat="full",            # none | minimal | full (what a block keeps for its backward)
        decode="auto",          # sampler layers: scan on accelerators (per-layer gathers), unrolled on CPU
        attention="einsum",     # einsum | xla | cudnn | splash (models/attention.py); TPU variants: splash
        arch=ml_collections.ConfigDict(ARCH),
        seed=0,
    ))
    cfg.mesh = common.mesh((1, 16, 8), platform="gpu")  # (data, fsdp, tensor) on 128 GPUs
    cfg.rules = common.rules()
    cfg.data = common.data(store="runs/llama3_3_70b/acts", max_len=512)
    cfg.summarize = common.summarize(batch=64, max_new_tokens=128)
    cfg.sample = common.sample()
    common.nla(cfg, workdir="runs/llama3_3_70b/train")
    cfg.av.max_len = 150
    cfg.sft_av.update(steps=2000, batch=32, val_rows=256, eval_every=250, optim=common.optim(5e-6, warmup=50))
    cfg.sft_ar.update(steps=2000, batch=64, val_rows=512, eval_every=250,
                      optim=common.optim(2e-5, lr_head=1e-4, warmup=50))
    cfg.rl.update(steps=300, batch=16, group_size=8,
                  optim_av=common.optim(2e-6, warmup=0), optim_ar=common.optim(2e-5, lr_head=1e-4, warmup=0))
    cfg.train.update(ckpt_every=25)
    cfg.eval.update(rows=1024)
    cfg.aot = ml_collections.ConfigDict(dict(
        devices=128, accelerator="H100-80GB", device_memory_gb=80.0,
        usable_fraction=0.9,     # of device memory a step may plan for (CUDA context, NCCL, fragmentation)
        prompt_len=64,           # AV prompt: chat template (with its date header) + marker + "<explanation>"
        closer_len=4, ar_prefix_len=4, ar_suffix_len=5,
    ))
    if "v5p64" in variants:
        common.tpu(cfg, "v5p:4x4x4", 64, (1, 8, 8), hbm_gb=95.0)
    if "g4" in variants:
        cfg.rl.update(batch=32, group_size=4)
    return cfg
