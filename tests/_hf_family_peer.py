"""Run by the PyTorch peers python (torch + transformers, no jax): tiny random models of the Qwen3 and
Gemma-3 families, built and read by transformers, for tests/test_hf_families.py.

    python _hf_family_peer.py build FAMILY OUTDIR          a tiny random model, save_pretrained(OUTDIR)
    python _hf_family_peer.py reference REQUEST.json OUT.npz

build: fixed torch seed; every weight redrawn at a scale that makes logits peaked (norm weights
around their identity value too, so a norm applied the wrong way shows), float32 safetensors.
Gemma-3 gets two sliding layers of window 4 around full ones, distinct RoPE bases per kind (linear
scaling on the full ones) and query_pre_attn_scalar != head_dim; Qwen3 a head_dim != d / heads.

REQUEST: {"dir", "prompts": [[ids]], "new_tokens", "layer", "inject": {"prompt", "pos", "vector"}}.
OUT.npz: logits_<i> [n_i, V], hidden_<i> = hidden_states[layer + 1] [n_i, d], greedy_<i> [new_tokens]
(generate, no EOS stop), inject_logits [n, V]: inputs_embeds = the model's own embedding module's
output (Gemma: x sqrt(d)) with row `pos` replaced by `vector` as given (the official release's rule).
"""
import json
import sys

import numpy as np
import torch
import transformers

torch.set_num_threads(1)


def tiny_config(family: str):
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen3":
        return transformers.Qwen3Config(num_hidden_layers=3, head_dim=24, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, **common)
    raise SystemExit(f"unknown family {family!r}")


def build(family: str, out: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(family)
    model = (transformers.Qwen3ForCausalLM if family == "qwen3" else transformers.Gemma3ForCausalLM)(cfg).float().eval()
    gemma = family == "gemma3"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:   # Gemma stores 1 + w: weights around 0 there, around 1 elsewhere
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5 if "embed" not in name else (8.0 if gemma else 1.0)))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)


def reference(req_path: str, out_path: str) -> None:
    req = json.load(open(req_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(req["dir"], dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    out = {}
    with torch.inference_mode():
        for i, ids in enumerate(req["prompts"]):
            x = torch.tensor([ids])
            r = model(x, output_hidden_states=True)
            out[f"logits_{i}"] = r.logits[0].numpy()
            out[f"hidden_{i}"] = r.hidden_states[req["layer"] + 1][0].numpy()
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=req["new_tokens"],
                                 do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=req["new_tokens"])
            out[f"greedy_{i}"] = gen[0, len(ids):].numpy()
        inj = req["inject"]
        ids = torch.tensor([inj["prompt"]])
        emb = model.get_input_embeddings()(ids).clone()           # the module's output: x sqrt(d) for Gemma
        emb[0, inj["pos"]] = torch.tensor(inj["vector"], dtype=emb.dtype)
        out["inject_logits"] = model(inputs_embeds=emb).logits[0].numpy()
    np.savez(out_path, **out)
    with open(out_path + ".json", "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__}, f)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "reference":
        reference(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
