"""Chat with the target model, and look at its block-K residual stream.

    python -m nla_jax.generate --config configs/smollm2_135m.py --prompt "What is the capital of France?"
    python -m nla_jax.generate --config configs/smollm2_135m.py --prompt "Hi" --greedy --norms

Several --prompt flags are sampled as one left-padded batch. --norms prints the L2 norm of the
residual stream after block K (config model.layer) at every token of the chat-rendered prompt.
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax import cli, sampling, sharding, weights
from nla_jax.models import transformer
from nla_jax.cli import cli_main
from nla_jax.errors import UserError


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids (models without a tokenizer)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, not through the chat template")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (overrides sample.greedy)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="overrides sample.max_new_tokens")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--norms", action="store_true", help="print block-K activation norms of the prompt")
    return p


@cli_main
def main(argv=None) -> int:
    args, cfg = cli.parse(build_parser(), argv)
    if not args.prompt and not args.prompt_ids:
        raise UserError("give at least one --prompt (or --prompt-ids)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cli.enable_compilation_cache()
    t0 = time.perf_counter()
    mesh = sharding.mesh_from_config(cfg.mesh)
    mcfg, params, tok = weights.load_from_config(cfg.model, mesh, cfg.rules)
    print(f"loaded {mcfg.name} ({mcfg.family}, {mcfg.n_layers} blocks, d={mcfg.d_model}) "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    if args.prompt_ids:
        try:
            prompts = [[int(x) for x in args.prompt_ids.split(",") if x.strip()]]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        bad = [i for i in prompts[0] if not 0 <= i < mcfg.vocab_size]
        if bad:
            raise UserError(f"--prompt-ids: {bad[0]} is outside the vocabulary [0, {mcfg.vocab_size})")
    else:
        if tok is None:
            raise UserError(f"model source {cfg.model.source!r} has no tokenizer: use --prompt-ids")
        prompts = [tok.bos(tok.encode(p)) if args.raw else tok.encode_chat(p) for p in args.prompt]

    s = cfg.sample
    sc = sampling.SampleConfig(
        max_new_tokens=args.max_new_tokens or s.max_new_tokens,
        temperature=args.temperature if args.temperature is not None else s.temperature,
        top_k=s.top_k, top_p=s.top_p, greedy=args.greedy or s.greedy)
    seed = args.seed if args.seed is not None else s.seed
    # Pad the batch to a multiple of the devices it is split over (extra rows are dropped).
    shards = sharding.batch_shards(mesh, cfg.rules)
    rows = prompts + [prompts[0]] * (-len(prompts) % shards)
    toks, valid = sampling.pad_prompts(rows, mcfg.pad_id)
    run = sampling.make_sampler(mcfg, sc, mesh, cfg.rules, weights.dtype_of(cfg.model.dtype))
    t0 = time.perf_counter()
    out = jax.device_get(run(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.key(seed)))
    out = jax.tree.map(lambda a: a[:len(prompts)], out)
    dt = time.perf_counter() - t0
    n_new = int(out.lengths.sum())
    print(f"sampled {n_new} tokens in {dt:.1f}s (compile included)", file=sys.stderr)
    for i, (row, n) in enumerate(zip(out.tokens, out.lengths)):
        ids = row[:n].tolist()
        text = tok.decode(ids) if tok is not None and not args.prompt_ids else " ".join(map(str, ids))
        if len(prompts) > 1:
            print(f"--- [{i}] {args.prompt[i] if args.prompt else ''}")
        print(text)

    if args.norms:
        K = cfg.model.layer
        fwd = jax.jit(lambda p, t, v: transformer.forward(p, t, mcfg, valid=v, capture_layer=K, logits=False)["hidden"])
        for i, ids in enumerate(prompts):
            h = np.asarray(fwd(params, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool))[0])
            norms = np.linalg.norm(h, axis=-1)
            print(f"\nblock {K} residual norms (HF hidden_states[{K + 1}]), prompt {i}: "
                  f"median {np.median(norms):.1f}, position 0 (attention sink) {norms[0]:.1f}")
            for j, (t_id, nrm) in enumerate(zip(ids, norms)):
                piece = tok.decode([t_id], skip_special=False) if tok is not None and not args.prompt_ids else str(t_id)
                print(f"{j:4d}  {nrm:9.1f}  {piece!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
