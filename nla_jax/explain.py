"""CLI: explanations of chosen tokens of any text by a trained NLA pair, printed and as an HTML viewer.

    python -m nla_jax.explain --checkpoint runs/smollm2_135m_quick/train \
        --text "The capital of France is Paris. The capital of Italy is" --samples 3 --html explain.html

For each chosen token the frozen target is run to block K on the text (tokenised exactly as the
activation store's extraction tokenises a plain-text document: the model's BOS policy, no chat
template, `Document.render`); the activation at that position is given to the AV, which samples
`--samples` explanations (greedy at temperature 0); the AR reads each explanation back and the
reconstruction is compared with the true activation:

  cos   cosine between the AR's prediction and the activation, in the space the pair was trained in
        (the activation minus the dataset mean when the run used centring); mse_nrm = 2 (1 - cos)
  fve   this row's contribution to fve_nrm: 1 - mse_nrm / Var(v_nrm) (the held-out metric's terms)
  floor the same cosine for the best constant prediction (the renormalised dataset mean): what an
        explanation must beat to carry information about this token (not 0: WORKSPACE.md, "The method in brief")

Positions: `--positions 5,7,-1` (negative counts from the end; `a:b` ranges, Python-style, too).
Default: every token except position 0 and special tokens (BOS etc.): position 0 is the attention
sink, whose activation (norm ~ 100x the others from the middle layers on) is never in the
training data. An explanation without a closing tag is scored as the AR reads it (up to the cap),
as the evaluation does, and marked.

Outputs: the table on stdout; `--json OUT` the same data; `--html OUT` a self-contained viewer
(no external resources): the text as a strip of tokens (`.tok[data-pos]`); clicking one (or
opening `viewer.html#pos=N`) fills `#explanation` with its `.sample` items and their cosines.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nla_jax import cli, distributed, fileio, sampling, sharding
from nla_jax.cli import cli_main
from nla_jax.data.corpus import Document
from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.nla import av as av_lib
from nla_jax.nla import measure
from nla_jax.nla import stats as stats_lib
from nla_jax.nla import steps
from nla_jax.nla import workdir as workdir_lib
from nla_jax.nla.run import Run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nla_jax.explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a trained pair: WORKDIR (final), WORKDIR/rl, WORKDIR/rl@STEP or WORKDIR/sft_av")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text whose tokens to explain")
    src.add_argument("--text-file", metavar="FILE", help="read the text from a UTF-8 file ('-': stdin)")
    p.add_argument("--positions", metavar="LIST",
                   help="token positions, e.g. '5,7,-1' or '10:20' (negative: from the end); default: every "
                        "token except position 0 and special tokens")
    p.add_argument("--samples", type=int, default=1, help="explanations per token (default 1)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy. Default: 0 for one sample, else the temperature the "
                        "AV was trained to sample at (rl.temperature)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the run's rl.top_p)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling, 0 = off (default: the run's rl.top_k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="explanations sampled per compiled call (default 16)")
    p.add_argument("--html", metavar="OUT.html", help="write the self-contained viewer here")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    return cli.add_distributed_flags(p)


# ----------------------------------------------------------------------------- loading

# ----------------------------------------------------------------------------- inputs

def read_text(args) -> str:
    if args.text is not None:
        text = args.text
    elif args.text_file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"--text-file {args.text_file!r}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise UserError(f"--text-file {args.text_file!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise UserError("the text is empty: give --text or --text-file with something to explain")
    return text


def tokenize(tok, text: str) -> tuple[list[int], list[str]]:
    """Token ids exactly as extraction renders a plain-text document, and each token's display text.

    Display texts come from character offsets in the original text, so multi-byte characters split
    over several byte-level tokens are shown once (on the first) instead of as replacement marks."""
    ids, offsets = tok.encode_with_offsets(text)
    full = Document(doc_id="explain", text=text).render(tok)   # the store's own rendering
    lead = len(full) - len(ids)
    if lead < 0 or full[lead:] != ids:
        raise RuntimeError("tokenizer offsets disagree with Document.render")  # a bug, not a user error
    shown, last = [], None
    for i in full[:lead]:
        shown.append(tok.id_to_token(i) or f"<{i}>")
    for (s, e), i in zip(offsets, ids):
        if i in tok.special_ids:
            shown.append(tok.id_to_token(i) or f"<{i}>")
        else:
            shown.append("" if (s, e) == last else text[s:e])
        last = (s, e)
    return list(full), shown


def parse_positions(spec: str | None, n: int, default: Sequence[int]) -> list[int]:
    """'5,7,-1' / '3:9' -> sorted unique positions in [0, n); out-of-range values are named."""
    if spec is None:
        return sorted(default)
    out = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                a, _, b = part.partition(":")
                lo = int(a) if a.strip() else 0
                hi = int(b) if b.strip() else n
                for v in (lo, hi):
                    if not -n <= v <= n:
                        raise UserError(f"--positions: {part!r} is out of range for a text of {n} tokens")
                rng = range(n)[slice(lo, hi)]
                if not rng:
                    raise UserError(f"--positions: range {part!r} is empty for a text of {n} tokens")
                out.update(rng)
                continue
            v = int(part)
        except ValueError:
            raise UserError(f"--positions: {part!r} is not an integer or a range a:b") from None
        if not -n <= v < n:
            raise UserError(f"--positions: {v} is out of range for a text of {n} tokens (0..{n - 1}, or -{n}..-1)")
        out.add(v % n)
    if not out:
        raise UserError(f"--positions {spec!r} names no position")
    return sorted(out)


# ----------------------------------------------------------------------------- model calls

def activations(run: Run, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """The frozen target's block-K output at `positions` of one sequence: [p, d] float32."""
    K = run.cfg.model.layer

    @jax.jit
    def block_k(params, toks):
        with sharding.use_mesh(run.mesh, run.rules):
            out = transformer.forward(steps.for_compute(params, run.ctx), toks, run.model_cfg, capture_layer=K,
                                      logits=False)
            return out["hidden"][0].astype(jnp.float32)                      # [s, d]

    h = distributed.host_array(block_k(run.target, np.asarray([tokens], np.int32)))
    return h[np.asarray(positions)]


def check_sampling(samples: int, temperature: float | None, top_p, top_k, batch: int = 1) -> None:
    """The sampling flags on their own (before the slow model load)."""
    if samples < 1:
        raise UserError(f"--samples {samples}: expected >= 1")
    if batch < 1:
        raise UserError(f"--batch {batch}: expected >= 1")
    if temperature is not None and (temperature < 0 or not math.isfinite(temperature)):
        raise UserError(f"--temperature {temperature}: expected >= 0 (0 = greedy)")
    if temperature == 0 and samples > 1:
        raise UserError(f"--samples {samples} with --temperature 0 would repeat the one greedy explanation; "
                        f"give --temperature > 0 or --samples 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: expected 0 < p <= 1")
    if top_k is not None and top_k < 0:
        raise UserError(f"--top-k {top_k}: expected >= 0")


def sample_config(run: Run, samples: int, temperature: float | None, top_p, top_k):
    check_sampling(samples, temperature, top_p, top_k)
    r = run.cfg.rl
    if temperature is None:
        temperature = 0.0 if samples == 1 else float(r.temperature)
    top_p = float(r.top_p if top_p is None else top_p)
    top_k = int(r.top_k if top_k is None else top_k)
    return sampling.SampleConfig(max_new_tokens=run.ctx.av.max_len, temperature=max(temperature, 1e-6),
                                 greedy=temperature == 0, top_k=top_k, top_p=top_p), temperature


def explain_acts(run: Run, av: dict, ar: dict, acts: np.ndarray, samples: int, sc, seed: int, batch: int,
                 progress: bool = True) -> list[list[dict]]:
    """For each activation row, `samples` explanations with their AR scores.

    The evaluation core (nla/measure.py) does the work: rows are repeated `samples` times and
    sampled in fixed-size global batches (the last one padded, so one shape is compiled), each
    process feeding the batch shards its devices hold; the batch at row offset i samples with
    fold_in(key(seed), i), so every sample of every row has its own random stream."""
    rows = np.repeat(acts.astype(np.float32), samples, axis=0)            # [p * samples, d]
    n = len(rows)
    shards = run.batch_shards
    batch = -(-max(1, min(batch, n)) // shards) * shards                   # whole rows per data shard
    with tqdm(total=2 * measure.n_batches(n, batch), desc="explain", unit="batch",
              disable=not progress or jax.process_index() != 0, file=sys.stderr) as bar:
        got = measure.explain_rows(run, av, rows, batch, sc, seed, bar.update)
        mse = measure.score(run, ar, got, rows, batch, bar.update)         # [p * samples] mse_nrm
    texts = av_lib.decode(run.tokenizer, got["tokens"], got["expl_len"])
    var = run.stats.var(run.ctx.center)
    res = []
    for r in range(len(acts)):
        items = []
        for j in range(r * samples, (r + 1) * samples):
            m = float(mse[j])
            items.append({"text": texts[j], "cos": float(measure.cosine(m)), "mse_nrm": m,
                          "fve": float(measure.fve(m, var)), "closed": bool(got["ok"][j]),
                          "n_tokens": int(got["expl_len"][j])})
        res.append(items)
    return res


def floor_cos(run: Run, acts: np.ndarray) -> np.ndarray:
    """Cosine of the best constant prediction (the renormalised mean) with each activation [p]."""
    center = run.ctx.center
    target = stats_lib.normalise_np(acts, run.stats.mean_array() if center else None)
    pred = run.stats.floor_prediction(center)
    return (target @ pred) / acts.shape[1]


# ----------------------------------------------------------------------------- outputs

def _fmt_token(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def print_table(result: dict, stream=sys.stdout) -> None:
    toks = result["tokens"]
    print(f"# {result['label']}  layer {result['layer']}  {len(toks)} tokens, {len(result['explained'])} explained, "
          f"{result['samples']} sample(s) at temperature {result['temperature']:g}  "
          f"(cos: AR reconstruction vs the true activation; floor: the constant prediction's cos)", file=stream)
    for pos_s, e in result["explained"].items():
        pos = int(pos_s)
        t = toks[pos]
        ctx = "".join(x["text"] for x in toks[max(0, pos - 8):pos])
        print(f"\n[{pos}] {_fmt_token(t['text'])}  (id {t['id']}; after {_fmt_token(ctx[-40:])})  "
              f"floor cos {e['floor_cos']:+.3f}", file=stream)
        for k, s in enumerate(e["samples"], 1):
            mark = "" if s["closed"] else "  [no closing tag: read up to the cap]"
            print(f"  {k}. cos {s['cos']:+.3f}  fve {s['fve']:+.3f}  {s['text']}{mark}", file=stream)
    stream.flush()


def _json_for_script(obj) -> str:
    """JSON safe inside <script>: no '<', '>', '&' or line separators that could end or break it."""
    s = json.dumps(obj, ensure_ascii=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(a, b)
    return s


_CSS = """
body{font:15px/1.5 system-ui,sans-serif;margin:1.5em auto;max-width:60em;padding:0 1em;color:#222}
h1{font-size:1.2em;margin:0 0 .2em} .meta{color:#666;font-size:.85em;margin-bottom:1em}
#text{font:14px/2 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;border:1px solid #ddd;
  padding:.6em;border-radius:4px}
.tok{border-radius:3px;padding:1px 0;margin-right:1px;cursor:default;outline-offset:1px}
.tok.has{cursor:pointer;border-bottom:2px solid #88a}
.tok.has:hover{outline:1px solid #446}
.tok.sel{outline:2px solid #c30 !important}
.tok.nl::before{content:"\\21b5";color:#aaa}
.tok.cont{padding:0 2px}
#explanation{margin-top:1em;border:1px solid #ddd;border-radius:4px;padding:.6em 1em;min-height:4em}
#explanation h2{font-size:1em;margin:.2em 0}
.sample{margin:.3em 0} .cos{font:13px ui-monospace,monospace;display:inline-block;min-width:13em;color:#444}
.open{color:#a40;font-size:.85em} .legend{font-size:.85em;color:#666;margin-top:.4em}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('nla-data').textContent);
  var panel = document.getElementById('explanation');
  function fmt(x){ return (x >= 0 ? '+' : '') + x.toFixed(3); }
  function el(tag, cls, text){ var e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text; return e; }
  function show(pos){
    var prev = document.querySelector('.tok.sel'); if (prev) prev.classList.remove('sel');
    var span = document.querySelector('.tok[data-pos="' + pos + '"]');
    if (span) span.classList.add('sel');
    var tok = data.tokens[pos], e = data.explained[String(pos)];
    panel.textContent = '';
    panel.setAttribute('data-pos', String(pos));
    var h = el('h2', null, 'token ' + pos + ': ' + JSON.stringify(tok ? tok.text : '') + ' (id ' + (tok ? tok.id : '?') + ')');
    h.id = 'exp-token'; panel.appendChild(h);
    if (!e) { panel.appendChild(el('p', 'none', 'not explained (choose it with --positions)')); return; }
    panel.appendChild(el('div', 'floor', 'floor cos ' + fmt(e.floor_cos) + ' (the constant prediction)'));
    var ol = el('ol'); ol.id = 'samples';
    e.samples.forEach(function(s, i){
      var li = el('li', 'sample'); li.setAttribute('data-cos', String(s.cos)); li.setAttribute('data-index', String(i));
      li.appendChild(el('span', 'cos', 'cos ' + fmt(s.cos) + ' fve ' + fmt(s.fve)));
      li.appendChild(el('span', 'text', s.text));
      if (!s.closed) li.appendChild(el('span', 'open', ' [no closing tag]'));
      ol.appendChild(li);
    });
    panel.appendChild(ol);
  }
  document.querySelectorAll('.tok').forEach(function(t){
    var pos = Number(t.getAttribute('data-pos'));
    t.addEventListener('click', function(){ history.replaceState(null, '', '#pos=' + pos); show(pos); });
    t.addEventListener('keydown', function(ev){ if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); t.click(); } });
  });
  function fromHash(){ var m = /pos=(\\d+)/.exec(location.hash); if (m) show(Number(m[1])); }
  window.addEventListener('hashchange', fromHash);
  fromHash();
  if (!/pos=/.test(location.hash)) { var first = Object.keys(data.explained)[0]; if (first !== undefined) show(Number(first)); }
  document.body.setAttribute('data-ready', '1');
})();
"""


def _heat(cos: float, floor: float) -> str:
    """Background for a token: green by how far its best cosine beats the floor."""
    gain = max(0.0, min(1.0, (cos - floor) / max(1e-6, 1.0 - floor)))
    return f"hsl(120,60%,{95 - 40 * gain:.0f}%)"


def render_html(result: dict) -> str:
    e = html.escape
    spans = []
    for t in result["tokens"]:
        pos = t["pos"]
        ex = result["explained"].get(str(pos))
        cls = ["tok"]
        style = ""
        text = t["text"]
        if ex:
            cls.append("has")
            best = max(s["cos"] for s in ex["samples"])
            style = f' style="background:{_heat(best, ex["floor_cos"])}"'
        if text == "":
            cls.append("cont")
        if "\n" in text:
            cls.append("nl")
        title = f"pos {pos} · id {t['id']}" + (f" · best cos {max(s['cos'] for s in ex['samples']):+.3f}" if ex else "")
        spans.append(f'<span class="{" ".join(cls)}" data-pos="{pos}" tabindex="0" title="{e(title)}"{style}>'
                     f'{e(text)}</span>')
    meta = (f"{result['label']} · layer {result['layer']} · {len(result['explained'])} of {len(result['tokens'])} "
            f"tokens explained · {result['samples']} sample(s) at temperature {result['temperature']:g}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>NLA explanations: {e(result['label'])}</title>
<style>{_CSS}</style></head>
<body>
<h1>Natural-language explanations of block-{result['layer']} activations</h1>
<div class="meta" id="meta">{e(meta)}</div>
<div id="text">{''.join(spans)}</div>
<div class="legend">Click a token (underlined ones have explanations; greener = the AR's reconstruction from the
explanation beats the constant prediction by more). cos: cosine between the AR's reconstruction and the true
activation{' (both centred on the dataset mean)' if result['center'] else ''}; fve: 1 - mse_nrm / Var(v_nrm).</div>
<div id="explanation" aria-live="polite"></div>
<script type="application/json" id="nla-data">{_json_for_script(result)}</script>
<script>{_JS}</script>
</body></html>
"""


def write_file(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"output {path!r}: directory {d} does not exist")
    fileio.write_atomic(path, text)


# ----------------------------------------------------------------------------- main

def explain_text(pair, text: str, positions: str | None = None, samples: int = 1, temperature: float | None = None,
        top_p=None, top_k=None, seed: int = 0, batch: int = 16, progress: bool = True) -> dict:
    """Explain tokens of `text` with a loaded pair (nla_jax.nla.workdir.load_pair); returns the result dict
    the table, JSON and viewer are made from."""
    run = pair.run
    check_sampling(samples, temperature, top_p, top_k, batch)
    ids, shown = tokenize(run.tokenizer, text)
    if len(ids) > run.model_cfg.max_seq_len:
        raise UserError(f"the text is {len(ids)} tokens long; the model's context is {run.model_cfg.max_seq_len}")
    special = run.tokenizer.special_ids
    default = [i for i in range(1, len(ids)) if ids[i] not in special]
    if positions is None and not default:
        raise UserError(f"the text has no token to explain besides position 0 ({len(ids)} token(s)); "
                        f"give a longer text or --positions 0")
    pos = parse_positions(positions, len(ids), default)
    sc, temp = sample_config(run, samples, temperature, top_p, top_k)
    acts = activations(run, ids, pos)
    got = explain_acts(run, pair.av, pair.ar, acts, samples, sc, seed, batch, progress)
    floors = floor_cos(run, acts)
    return {
        "checkpoint": pair.path, "label": pair.label, "kind": pair.kind, "step": int(pair.step),
        "model": run.cfg.model.source, "layer": int(run.cfg.model.layer), "center": bool(run.ctx.center),
        "var_nrm": float(run.stats.var(run.ctx.center)), "samples": samples, "temperature": float(temp),
        "top_p": sc.top_p, "top_k": sc.top_k, "seed": seed, "text": text,
        "tokens": [{"pos": i, "id": int(t), "text": s} for i, (t, s) in enumerate(zip(ids, shown))],
        "explained": {str(p): {"floor_cos": float(f), "act_norm": float(np.linalg.norm(a)), "samples": s}
                      for p, f, a, s in zip(pos, floors, acts, got)},
    }


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    text = read_text(args)
    check_sampling(args.samples, args.temperature, args.top_p, args.top_k, args.batch)
    for out in (args.html, args.json):
        if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise UserError(f"output {out!r}: directory {os.path.dirname(os.path.abspath(out))} does not exist")
    cli.start_distributed(args)
    cli.enable_compilation_cache()
    cli.quiet_orbax_readonly()
    pair = workdir_lib.load_pair_here(args.checkpoint)
    result = explain_text(pair, text, args.positions, args.samples, args.temperature, args.top_p, args.top_k, args.seed,
                 args.batch)
    if jax.process_index() != 0:
        return 0  # every process computed the same result; process 0 prints and writes it
    if not args.quiet:
        print_table(result)
    if args.json:
        write_file(args.json, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    if args.html:
        write_file(args.html, render_html(result))
        print(f"viewer: {args.html}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
