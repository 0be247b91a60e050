"""Gemma-3-12B-IT at block K=32 (of 48), on two nodes of 8 x H100 80GB (mesh fsdp 8 x tensor 2).

Point model.source at the model's Hugging Face directory (the multimodal Gemma-3 checkpoint or a text-only
Gemma3ForCausalLM one: nla_jax reads the text model either way):

    sbatch --nodes=2 launch/slurm_gpu.sbatch configs/gemma3_12b.py \\
        --config.model.source=/data/gemma-3-12b-it --config.train.workdir=/shared/runs/gemma12b

A released Gemma-3-12B pair (the official format) is imported and explained with:

    python -m nla_jax.import_official --av AV_DIR --ar AR_DIR --out runs/gemma12b_official \\
        --config configs/gemma3_12b.py:imported
    python -m nla_jax.explain --checkpoint runs/gemma12b_official --text "..."

Check that every step compiles and fits the GPUs' memory before renting them (no GPU, no weights):

    python -m nla_jax.aot --config configs/gemma3_12b.py --steps rl

Architecture (config.json's text_config): 48 blocks, d 3840, 16 query / 8 KV heads of 256, GeGLU 15360,
vocabulary 262 208 (tied), sqrt(d) embedding scale, q/k norms, four norms per block, every sixth block
global (RoPE 1e6, linear x8) and the others sliding (window 1024, RoPE 1e4), query_pre_attn_scalar 256.
The release's injection scale for this target is 80 000 (the injected vector replaces the sqrt(d)-scaled
embedding row: residual-stream units). Variant `:imported` takes the release's AV/AR conventions
(configs/official.py) for an imported pair; `:v5p16` the same mesh on a v5p-32 slice (16 chips).
Memory (`aot`, float32 masters, bf16 compute, scanned decode): the GRPO step needs 37.4 GB/device on 16
H100s (fsdp 8 x tensor 2); on 8 (fsdp 8) it needs 72.8 GB, just over the 72 GB budget (a smaller rl.batch may bring
it to one node; not measured).
"""
import ml_collections

from configs import common
from configs import official

VARIANTS = ("imported", "v5p16")
N_LAYERS = 48

ARCH = dict(
    family="gemma3", n_layers=N_LAYERS, d_model=3840, n_heads=16, n_kv_heads=8, head_dim=256, d_ff=15360,
    vocab_size=262208, rope_theta=1_000_000.0, rms_eps=1e-6, rope_scaling=(("factor", 8.0), ("rope_type", "linear")),
    tie_embeddings=True, qkv_bias=False, max_seq_len=131072, bos_id=2, eos_ids=(1, 106), pad_id=0, add_bos=True,
    layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(N_LAYERS)), sliding_window=1024,
    rope_local_theta=10000.0, attn_scale=256 ** -0.5, name="gemma-3-12b-it")


def get_config(arg=None, arch=ARCH, layer=32, inject_norm=80000.0, mesh=(1, 8, 2), devices=16, name="gemma3_12b",
               tpu=("v5p16", "v5p:2x2x4")):
    variants = common.variants(arg, ("imported", tpu[0]))
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        source=f"/path/to/{arch['name']}",       # set this: a Hugging Face directory
        dtype="bfloat16", weight_dtype="float32", layer=layer, remat="full", decode="auto", attention="einsum",
        arch=ml_collections.ConfigDict(arch), seed=0))
    cfg.mesh = common.mesh(mesh, platform="gpu")
    cfg.rules = common.rules()
    cfg.data = common.data(store=f"runs/{name}/acts", max_len=512)
    cfg.summarize = common.summarize(batch=64, max_new_tokens=128)
    cfg.sample = common.sample()
    common.nla(cfg, workdir=f"runs/{name}/train")
    cfg.av.inject_norm = inject_norm           # the release's scale (0 = 1.1 x the store's mean norm)
    cfg.av.max_len = 150
    cfg.sft_av.update(steps=2000, batch=32, val_rows=256, eval_every=250, optim=common.optim(1e-5, warmup=50))
    cfg.sft_ar.update(steps=2000, batch=64, val_rows=512, eval_every=250,
                      optim=common.optim(3e-5, lr_head=1e-4, warmup=50))
    cfg.rl.update(steps=300, batch=16, group_size=8,
                  optim_av=common.optim(5e-6, warmup=0), optim_ar=common.optim(3e-5, lr_head=1e-4, warmup=0))
    cfg.train.update(ckpt_every=50)
    cfg.eval.update(rows=1024)
    cfg.aot = ml_collections.ConfigDict(dict(
        devices=devices, accelerator="H100-80GB", device_memory_gb=80.0, usable_fraction=0.9,
        prompt_len=64, closer_len=4, ar_prefix_len=4, ar_suffix_len=5))
    if "imported" in variants:
        official.official(cfg)
        cfg.av.inject_norm = inject_norm
    if tpu[0] in variants:
        common.tpu(cfg, tpu[1], devices, mesh, hbm_gb=95.0)
    return cfg
