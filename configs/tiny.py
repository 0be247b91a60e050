"""A tiny random Llama-family model (2 blocks, d=64, vocab 512, byte tokenizer) for unit tests.

    python -m nla_jax.generate --config configs/tiny.py --prompt-ids 1,2,3 --greedy
    python -m nla_jax.train --config configs/tiny.py --config.data.store=STORE --config.train.workdir=/tmp/w
    variants: configs/tiny.py:qwen2 (q/k/v biases, untied head), :qwen3 (q/k norms, head_dim != d / heads),
              :gemma3 (sqrt(d) embeddings, four norms per block, GeGLU, sliding-window and full layers)
"""
import ml_collections

from configs import common


def get_config(arg=None):
    variant = arg or "llama"
    if variant not in ("llama", "qwen2", "qwen3", "gemma3"):
        raise ValueError(f"unknown variant {variant!r} (llama, qwen2, qwen3, gemma3)")
    cfg = ml_collections.ConfigDict()
    arch = dict(family=variant, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                vocab_size=512, rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=variant in ("llama", "gemma3"),
                qkv_bias=variant == "qwen2", max_seq_len=512, bos_id=1, eos_ids=(2,), pad_id=0,
                add_bos=True, name=f"tiny-{variant}")
    if variant == "qwen3":
        arch.update(head_dim=24)
    if variant == "gemma3":
        arch.update(n_layers=3, layer_types=("sliding", "full", "sliding"), sliding_window=4, rope_local_theta=100.0,
                    rope_scaling=(("factor", 2.0), ("rope_type", "linear")), attn_scale=24 ** -0.5)
    cfg.model = ml_collections.ConfigDict(dict(source="random", dtype="float32", weight_dtype="float32", layer=0, remat=False, decode="auto", attention="einsum",
                                               arch=ml_collections.ConfigDict(arch), seed=0))
    cfg.mesh = common.mesh((-1, 1, 1))
    cfg.rules = common.rules()
    cfg.data = common.data(store="runs/tiny/acts")
    cfg.summarize = common.summarize()
    cfg.sample = common.sample(max_new_tokens=16)
    common.nla(cfg, workdir="runs/tiny/train")
    cfg.av.max_len = 24
    cfg.av.user = "<c>{marker}</c>"
    cfg.av.answer_prefix = "<e>"
    cfg.av.closer = "</e>"
    cfg.ar.prefix, cfg.ar.suffix = "E: ", "\nC:"
    cfg.sft_av.update(steps=4, batch=4, val_rows=8, eval_every=2)
    cfg.sft_ar.update(steps=4, batch=4, val_rows=8, eval_every=2, ridge_rows=16)
    cfg.ar.head_init = "ridge"  # keep the ridge path exercised by the tests
    cfg.rl.update(steps=3, batch=2, group_size=4)
    cfg.train.update(ckpt_every=2, async_checkpoint=False)
    cfg.eval.update(rows=8, n_examples=2, n_boot=100)
    return cfg
