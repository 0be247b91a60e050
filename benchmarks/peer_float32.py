"""The transformers peer's float32 measurements only, for CPUs without native bfloat16.

Run by `benchmarks/model_speed.py --bf16 off` with the peer venv's python. ../shared/peers/hf_peer.py's
`speed` and `matmul` always time bfloat16 too, and on a CPU without bf16 instructions (e.g. AMD Zen 3)
torch's bf16 4096^3 matmul alone ran for more than 13 minutes. This script times the same float32
work with hf_peer's own helpers (same model loading, timing loop and chat batches), so the float32
rows stay comparable with a full `speed` run.

    PEER_PY benchmarks/peer_float32.py speed --batch 8 --seq 128 --new-tokens 64 --gen-batches 8,32 --out F
    PEER_PY benchmarks/peer_float32.py matmul --out F
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "peers"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hf_peer  # noqa: E402


def speed(args) -> dict:
    res = {"peer": "transformers", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "batch": args.batch, "seq": args.seq, "dtypes": ["float32"]}
    tokens = torch.from_numpy(np.random.default_rng(0).integers(3, 49152, size=(args.batch, args.seq))).long()
    tok, m = hf_peer.load(args, torch.float32)
    with torch.inference_mode():
        med, _ = hf_peer.timeit(lambda: m(input_ids=tokens).logits, 1, 5)
    res["forward_float32_tok_s"] = args.batch * args.seq / med
    m.train()

    def step():
        m.zero_grad(set_to_none=True)
        m(input_ids=tokens, labels=tokens).loss.backward()
    med, _ = hf_peer.timeit(step, 1, 3)
    m.eval()
    res["train_float32_tok_s"] = args.batch * args.seq / med
    for gb in [int(x) for x in args.gen_batches.split(",")]:
        enc = hf_peer.chat_batch(tok, (hf_peer.DEFAULT_PROMPTS * (gb // len(hf_peer.DEFAULT_PROMPTS) + 1))[:gb])
        with torch.inference_mode():
            med, _ = hf_peer.timeit(lambda: m.generate(**enc, max_new_tokens=args.new_tokens,
                                                       min_new_tokens=args.new_tokens, do_sample=False,
                                                       pad_token_id=tok.pad_token_id), 1, 3)
        res[f"generate_float32_batch{gb}_new_tok_s"] = gb * args.new_tokens / med
    return res


def matmul(args) -> dict:
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    med, _ = hf_peer.timeit(lambda: a @ b, 1, 5)
    return {"peer": "torch", "threads": torch.get_num_threads(), "matmul_float32_gflops": 2 * n ** 3 / med / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["speed", "matmul"])
    p.add_argument("--model-dir")
    p.add_argument("--gguf")
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-batches", default="8,32")
    args = p.parse_args()
    res = {"speed": speed, "matmul": matmul}[args.command](args)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
