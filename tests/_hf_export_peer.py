"""Run by the PyTorch peers python (torch + transformers, no jax): read an nla_jax export with transformers.

    python _hf_export_peer.py REQUEST.json OUT.npz

REQUEST: {"av_dir", "ar_dir" (optional), "token_ids": [[...]], "inject_acts": [[d floats]],
"expl_ids": [[...]], "texts": [...], "chat": [...]}. Everything is float32 on CPU with one thread.
Written to OUT.npz:
  logits_<i>        AutoModelForCausalLM(av_dir) logits for token_ids[i]                    [n_i, V]
  inject_logits_<i> the AV's logits over its prompt with inject_acts[i] injected exactly as
                    av/nla_av.json's recipe says (inputs_embeds, or a hook for mode "add")    [P, V]
  ar_pred           the AR's prediction for each expl_ids row: AutoModel(ar_dir) with the config's
                    tie_last_hidden_states=false, hidden_states[K+1] at the last token, the head
                    applied in numpy                                                          [b, d]
  ar_pred_identity  the same with model.norm replaced by Identity (older transformers)        [b, d]
  ar_last_normed    hidden_states[-1] with tie_last_hidden_states forced back on (normed): must differ
and OUT.npz.json: {"text_ids": [...], "chat_ids": [...], "transformers": version}.
"""
import json
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

torch.set_num_threads(1)


def main(req_path, out_path):
    req = json.load(open(req_path))
    out, meta = {}, {"transformers": transformers.__version__}
    av_dir = req["av_dir"]
    av = transformers.AutoModelForCausalLM.from_pretrained(av_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for i, ids in enumerate(req.get("token_ids", [])):
            out[f"logits_{i}"] = av(torch.tensor([ids])).logits[0].float().numpy()
        if req.get("inject_acts"):
            spec = json.load(open(f"{av_dir}/nla_av.json"))
            extra = load_file(f"{av_dir}/nla_av_extra.safetensors")
            ids = torch.tensor([spec["prompt_ids"]])
            for i, act in enumerate(req["inject_acts"]):
                v = np.asarray(act, np.float32)
                if spec["center"]:
                    v = v - extra["mean"]
                if spec["input_proj"]:
                    v = v @ extra["proj"]
                u = torch.tensor(v / max(np.linalg.norm(v), 1e-12))
                emb = av.get_input_embeddings()(ids).clone()
                handle = None
                if spec["inject"] == "replace":
                    emb[0, spec["marker_pos"]] = u * spec["inject_norm"]
                else:
                    def hook(mod, args, output, u=u):
                        h = output[0] if isinstance(output, tuple) else output
                        p = spec["marker_pos"]
                        h = h.clone()
                        h[0, p] = h[0, p] + h[0, p].norm() * u
                        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
                    handle = av.model.layers[spec["add_after"]].register_forward_hook(hook)
                try:
                    out[f"inject_logits_{i}"] = av(inputs_embeds=emb).logits[0].float().numpy()
                finally:
                    if handle is not None:
                        handle.remove()
    tok = transformers.AutoTokenizer.from_pretrained(av_dir)
    meta["text_ids"] = [tok(t).input_ids for t in req.get("texts", [])]
    meta["chat_ids"] = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False) for c in req.get("chat", [])]
    if req.get("ar_dir") and req.get("expl_ids"):
        ar_dir = req["ar_dir"]
        spec = json.load(open(f"{ar_dir}/nla_ar.json"))
        head = load_file(f"{ar_dir}/ar_head.safetensors")
        K = spec["layer"]
        ar = transformers.AutoModel.from_pretrained(ar_dir, dtype=torch.float32).eval()
        assert ar.config.num_hidden_layers == K + 1 and ar.config.tie_last_hidden_states is False

        def feats(model):
            rows = []
            with torch.inference_mode():
                for e in req["expl_ids"]:
                    x = torch.tensor([spec["prefix_ids"] + list(e)[:spec["max_len"]] + spec["suffix_ids"]])
                    hs = model(x, output_hidden_states=True).hidden_states
                    assert len(hs) == K + 2
                    rows.append(hs[K + 1][0, -1].float().numpy())
            return np.stack(rows)

        def head_of(h):
            h = h.astype(np.float32)
            if spec["head_norm"] == "rms":
                h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + spec["head_norm_eps"])
            return h @ head["w"] + head["b"]

        out["ar_pred"] = head_of(feats(ar))
        ar.config.tie_last_hidden_states = True
        out["ar_last_normed"] = feats(ar)
        ar.norm = torch.nn.Identity()
        out["ar_pred_identity"] = head_of(feats(ar))
    np.savez(out_path, **out)
    json.dump(meta, open(out_path + ".json", "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
