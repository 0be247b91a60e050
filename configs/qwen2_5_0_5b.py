"""Qwen2.5-0.5B-Instruct at block K=16 (of 24): the mid-size real architecture, on 8 x H100 80GB or one GPU.

Point model.source at the model's Hugging Face directory and launch as for the 7B config:

    python -m nla_jax.train --config configs/qwen2_5_0_5b.py --config.model.source=/data/Qwen2.5-0.5B-Instruct
    sbatch --nodes=1 launch/slurm_gpu.sbatch configs/qwen2_5_0_5b.py --config.model.source=/data/Qwen2.5-0.5B-Instruct
    # one GPU: sbatch --gpus-per-node=1 launch/slurm_gpu.sbatch ... --config.mesh.shape="(-1,1,1)"

Ahead-of-time check on 8 fake devices (tests/test_aot.py runs it in CI), and with the real TPU
compiler for the `:v5e8` variant (a v5e-8 slice: 8 chips of 16 GB; `bash launch/setup.sh tpu-compile`):

    python -m nla_jax.aot --config configs/qwen2_5_0_5b.py
    .venv-tpu/bin/python -m nla_jax.aot --config configs/qwen2_5_0_5b.py:v5e8

The architecture is the checkpoint's config.json (24 blocks, d=896, 14 heads, 2 KV heads of 64, MLP
4864, vocab 151936, tied embeddings, q/k/v biases, RoPE theta 1e6); block 16 is 2/3 of depth. The
14 heads and 2 KV heads do not split 8 ways, so the mesh is fsdp=8 alone. The NLA settings follow
the 7B config (explanations of 150 tokens, groups of 8, the release's learning rates); the injected
norm is left to the store's statistics (0 = about 1.1 x the mean norm).
"""
import ml_collections

from configs import common

ARCH = dict(
    family="qwen2", n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864,
    vocab_size=151936, rope_theta=1_000_000.0, rms_eps=1e-6, rope_scaling=None, tie_embeddings=True,
    qkv_bias=True, max_seq_len=32768, bos_id=151643, eos_ids=(151645,), pad_id=151643, add_bos=False,
    name="Qwen2.5-0.5B-Instruct")


VARIANTS = ("v5e8",)


def get_config(arg=None):
    variants = common.variants(arg, VARIANTS)
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        source="/path/to/Qwen2.5-0.5B-Instruct",   # set this: a Hugging Face directory
        dtype="bfloat16",        # compute dtype; log-probs and losses stay float32
        weight_dtype="float32",  # master weights and Adam moments (bf16 updates at LR 1e-6 would round away)
        layer=16,                                  # block K: HF hidden_states[17]
        remat="full",            # none | minimal | full (what a block keeps for its backward)
        decode="auto",          # sampler layers: scan on accelerators (per-layer gathers), unrolled on CPU
        attention="einsum",     # einsum | xla | cudnn | splash (models/attention.py); TPU variants: splash
        arch=ml_collections.ConfigDict(ARCH),
        seed=0,
    ))
    cfg.mesh = common.mesh((1, 8, 1), platform="gpu")
    cfg.rules = common.rules()
    cfg.data = common.data(store="runs/qwen2_5_0_5b/acts", max_len=512)
    cfg.summarize = common.summarize(batch=64, max_new_tokens=128)
    cfg.sample = common.sample()
    common.nla(cfg, workdir="runs/qwen2_5_0_5b/train")
    cfg.av.max_len = 150
    cfg.sft_av.update(steps=2000, batch=32, val_rows=256, eval_every=250, optim=common.optim(2e-5, warmup=50))
    cfg.sft_ar.update(steps=2000, batch=64, val_rows=512, eval_every=250,
                      optim=common.optim(3e-5, lr_head=1e-4, warmup=50))
    cfg.rl.update(steps=300, batch=16, group_size=8,
                  optim_av=common.optim(5e-6, warmup=0), optim_ar=common.optim(3e-5, lr_head=1e-4, warmup=0))
    cfg.train.update(ckpt_every=50)
    cfg.eval.update(rows=1024)
    cfg.aot = ml_collections.ConfigDict(dict(
        devices=8, accelerator="H100-80GB", device_memory_gb=80.0, usable_fraction=0.9,
        prompt_len=64, closer_len=4, ar_prefix_len=4, ar_suffix_len=5,
    ))
    if "v5e8" in variants:
        common.tpu(cfg, "v5e:2x4", 8, (1, 8, 1), hbm_gb=16.0)
    return cfg
