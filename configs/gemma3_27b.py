"""Gemma-3-27B-IT at block K=41 (of 62), on four nodes of 8 x H100 80GB (mesh fsdp 8 x tensor 4).

    sbatch --nodes=4 launch/slurm_gpu.sbatch configs/gemma3_27b.py \\
        --config.model.source=/data/gemma-3-27b-it --config.train.workdir=/shared/runs/gemma27b
    python -m nla_jax.import_official --av AV_DIR --ar AR_DIR --out runs/gemma27b_official \\
        --config configs/gemma3_27b.py:imported
    python -m nla_jax.aot --config configs/gemma3_27b.py --steps rl

Architecture (config.json's text_config): 62 blocks, d 5376, 32 query / 16 KV heads of 128, GeGLU 21504,
vocabulary 262 208, query_pre_attn_scalar 168 (= d / heads), otherwise as configs/gemma3_12b.py. The
release's documents give no injection scale for this target here: inject_norm 0 = 1.1 x the store's mean
norm when training; an imported pair brings its own from its sidecar. `:v5p32`: the mesh on a v5p-64 slice
(32 chips), `:imported` the release's AV/AR conventions. Memory (`aot`): the GRPO step needs 37.6 GB/device
on 32 H100s with fsdp 8 x tensor 4 (72.04 on 16 with fsdp 8 x tensor 2: just over the 72 GB budget).
"""
from configs import gemma3_12b

N_LAYERS = 62
ARCH = dict(gemma3_12b.ARCH, n_layers=N_LAYERS, d_model=5376, n_heads=32, n_kv_heads=16, head_dim=128, d_ff=21504,
            layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(N_LAYERS)),
            attn_scale=168 ** -0.5, name="gemma-3-27b-it")


def get_config(arg=None):
    return gemma3_12b.get_config(arg, arch=ARCH, layer=41, inject_norm=0.0, mesh=(1, 8, 4), devices=32,
                                 name="gemma3_27b", tpu=("v5p32", "v5p:4x4x2"))
