"""The HTML report of `python -m nla_jax.evaluate`: one self-contained file, plots as inline SVG.

No scripts, stylesheets, fonts or images are fetched: everything is in the file. Stable hooks for
tests and readers:

  #meta                      command, store, rows, elapsed time
  table#comparison.nla-table the side-by-side table; th.ckpt[data-checkpoint] per column,
                             tr[data-metric="fve.real" ...] per row, td[data-checkpoint][data-mean][data-lo][data-hi]
  #training-curves           svg#plot-fve-vs-step, svg#plot-reward-vs-step (RL), svg#plot-sft-fve-vs-step
                             (SFT AR validation), from each run's metrics.jsonl, with the floor dashed
  #length-histogram          svg#plot-length-hist
  #fve-by-position           svg#plot-fve-by-position
  #samples                   div.sample[data-checkpoint] > .context, .explanation, .fve (and .shuffled)
Every plot is an svg.plot with a <title>; series are g.series[data-series].
"""
from __future__ import annotations

import html
import math
from typing import Callable, Sequence

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
W, H = 640, 300
M = dict(l=56, r=16, t=28, b=44)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table.nla-table{border-collapse:collapse;font-size:13px} .nla-table th,.nla-table td{padding:3px 10px;
border-bottom:1px solid #eee;text-align:right;white-space:nowrap} .nla-table th.metric{text-align:left}
.nla-table tr.group-start td,.nla-table tr.group-start th{border-top:2px solid #bbb}
.na{color:#999} .sample{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:8px 0}
.sample .context,.sample .explanation,.sample .shuffled{font-family:ui-monospace,monospace;white-space:pre-wrap;
font-size:12px} .sample .context{color:#555} .sample .label{font-weight:600;font-size:12px;color:#333}
svg.plot{background:#fff;border:1px solid #eee;margin:4px 8px 4px 0} .meta td{padding:1px 8px;font-size:13px}
"""


def esc(s) -> str:
    return html.escape(str(s), quote=True)


# ============================================================================= svg pieces

def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


class Frame:
    """Axes of one plot: data -> pixel transforms, grid, labels."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str):
        xs = [x for x in xs if x is not None and math.isfinite(x)] or [0.0, 1.0]
        ys = [y for y in ys if y is not None and math.isfinite(y)] or [0.0, 1.0]
        self.x0, self.x1 = min(xs), max(xs)
        self.y0, self.y1 = min(ys), max(ys)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5
        pad = (self.y1 - self.y0) * 0.06 or 0.5
        self.y0, self.y1 = self.y0 - pad, self.y1 + pad
        self.xlabel, self.ylabel = xlabel, ylabel

    def x(self, v: float) -> float:
        return M["l"] + (v - self.x0) / (self.x1 - self.x0) * (W - M["l"] - M["r"])

    def y(self, v: float) -> float:
        return H - M["b"] - (v - self.y0) / (self.y1 - self.y0) * (H - M["t"] - M["b"])

    def axes(self) -> str:
        out = [f'<rect x="{M["l"]}" y="{M["t"]}" width="{W - M["l"] - M["r"]}" height="{H - M["t"] - M["b"]}" '
               f'fill="none" stroke="#999"/>']
        for v in _ticks(self.y0, self.y1):
            y = self.y(v)
            out.append(f'<line x1="{M["l"]}" x2="{W - M["r"]}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text x="{M["l"] - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_fmt_tick(v)}</text>')
        for v in _ticks(self.x0, self.x1, 8):
            x = self.x(v)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - M["b"]}" y2="{H - M["b"] + 4}" stroke="#999"/>'
                       f'<text x="{x:.1f}" y="{H - M["b"] + 15}" font-size="10" text-anchor="middle">{_fmt_tick(v)}</text>')
        out.append(f'<text x="{(M["l"] + W - M["r"]) / 2}" y="{H - 8}" font-size="11" text-anchor="middle">'
                   f'{esc(self.xlabel)}</text>')
        out.append(f'<text x="12" y="{(M["t"] + H - M["b"]) / 2}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 12 {(M["t"] + H - M["b"]) / 2})">{esc(self.ylabel)}</text>')
        return "".join(out)


def _legend(names: Sequence[str], dashed: Sequence[bool] = ()) -> str:
    out, x = [], M["l"] + 6
    for i, n in enumerate(names):
        dash = ' stroke-dasharray="4 3"' if (dashed[i] if i < len(dashed) else False) else ""
        out.append(f'<line x1="{x}" x2="{x + 16}" y1="{M["t"] - 12}" y2="{M["t"] - 12}" stroke="{COLORS[i % 8]}" '
                   f'stroke-width="2"{dash}/><text x="{x + 20}" y="{M["t"] - 8}" font-size="10">{esc(n)}</text>')
        x += 28 + 6 * len(n)
    return "".join(out)


def svg_open(pid: str, title: str) -> str:
    return (f'<svg id="{esc(pid)}" class="plot" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img"><title>{esc(title)}</title>')


def line_chart(pid: str, title: str, series: list[dict], xlabel: str, ylabel: str) -> str:
    """series: {"name", "x": [...], "y": [...], optional "lo"/"hi" (error bars), "dashed"}."""
    xs = [x for s in series for x in s["x"]]
    ys = [y for s in series for y in list(s["y"]) + list(s.get("lo") or []) + list(s.get("hi") or [])
          if y is not None]
    if not xs:
        return svg_open(pid, title) + f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" font-size="12">' \
            f'no data</text></svg>'
    fr = Frame(xs, ys, xlabel, ylabel)
    out = [svg_open(pid, title), fr.axes()]
    for i, s in enumerate(series):
        c = COLORS[i % 8]
        pts = [(fr.x(x), fr.y(y)) for x, y in zip(s["x"], s["y"]) if y is not None]
        dash = ' stroke-dasharray="4 3"' if s.get("dashed") else ""
        g = [f'<g class="series" data-series="{esc(s["name"])}">']
        if len(pts) > 1:
            g.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6"{dash} points="'
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for j, (a, b) in enumerate(pts):
            g.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.4" fill="{c}"/>')
        if s.get("lo") is not None:
            for x, lo, hi in zip(s["x"], s["lo"], s["hi"]):
                if lo is not None and hi is not None:
                    g.append(f'<line x1="{fr.x(x):.1f}" x2="{fr.x(x):.1f}" y1="{fr.y(lo):.1f}" y2="{fr.y(hi):.1f}" '
                             f'stroke="{c}" stroke-width="1"/>')
        g.append("</g>")
        out += g
    out.append(_legend([s["name"] for s in series], [bool(s.get("dashed")) for s in series]))
    out.append("</svg>")
    return "".join(out)


def bar_chart(pid: str, title: str, groups: list[dict], xlabel: str, ylabel: str) -> str:
    """groups: {"name", "counts": [...]} over the same integer bins 0..n-1, drawn side by side."""
    n = max((len(g["counts"]) for g in groups), default=0)
    top = max((c for g in groups for c in g["counts"]), default=0)
    if n == 0:
        return svg_open(pid, title) + "</svg>"
    fr = Frame([-0.5, n - 0.5], [0, top or 1], xlabel, ylabel)
    fr.y0 = 0
    out = [svg_open(pid, title), fr.axes()]
    bw = (fr.x(1) - fr.x(0)) * 0.8 / max(len(groups), 1)
    for i, g in enumerate(groups):
        out.append(f'<g class="series" data-series="{esc(g["name"])}">')
        for b, c in enumerate(g["counts"]):
            if c:
                x = fr.x(b) - (fr.x(1) - fr.x(0)) * 0.4 + i * bw
                out.append(f'<rect x="{x:.1f}" y="{fr.y(c):.1f}" width="{bw:.1f}" height="{fr.y(0) - fr.y(c):.1f}" '
                           f'fill="{COLORS[i % 8]}"><title>{b} tokens: {c}</title></rect>')
        out.append("</g>")
    out.append(_legend([g["name"] for g in groups]))
    out.append("</svg>")
    return "".join(out)


# ============================================================================= page

def _cell(v, fmt: Callable) -> str:
    text = fmt(v)
    attrs = ""
    if isinstance(v, dict) and v.get("mean") is not None:
        attrs = f' data-mean="{v["mean"]:.6g}"' + (f' data-lo="{v["lo"]:.6g}" data-hi="{v["hi"]:.6g}"'
                                                    if v.get("lo") is not None else "")   # one document: none
    cls = ' class="na"' if text == "n/a" else ""
    return attrs, cls, esc(text)


def render(doc: dict, rows: Sequence[tuple[str, str]], fmt: Callable, lookup: Callable) -> str:
    cks = doc["checkpoints"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>nla_jax evaluate</title>", f"<style>{CSS}</style></head><body>",
             "<h1>NLA evaluation</h1>"]
    # -- meta
    meta = [("command", " ".join(doc["command"])), ("store", doc["store"]),
            ("rows", f"{doc['rows']} of split {doc['split']} from {doc['documents']} documents"),
            ("teacher summaries", f"{doc['teacher_rows']} rows ({doc['teacher_summaries']})"),
            ("elapsed", f"{doc['elapsed_s']} s on {doc['devices']} device(s)")]
    parts.append('<table id="meta" class="meta">' + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>"
                                                             for k, v in meta) + "</table>")
    # -- the side-by-side table
    parts.append('<h2 id="comparison-heading">Side by side (mean [95% CI over documents])</h2>')
    t = ['<table id="comparison" class="nla-table"><thead><tr><th class="metric">metric</th>']
    t += [f'<th class="ckpt" data-checkpoint="{esc(c["label"])}">{esc(c["label"])}</th>' for c in cks]
    t.append("</tr></thead><tbody>")
    prev = None
    for key, label in rows:
        group = key.split(".")[0]
        cls = ' class="group-start"' if prev is not None and group != prev else ""
        prev = group
        t.append(f'<tr data-metric="{esc(key)}"{cls}><th class="metric">{esc(label)}</th>')
        for c in cks:
            attrs, ccls, text = _cell(lookup(c, key), fmt)
            t.append(f'<td data-checkpoint="{esc(c["label"])}"{attrs}{ccls}>{text}</td>')
        t.append("</tr>")
    t.append("</tbody></table>")
    parts.append("".join(t))
    # -- training curves
    parts.append('<section id="training-curves"><h2>Training: fve_nrm and reward against step</h2>')
    fser, rser, aser = [], [], []
    for w, cur in doc["training_curves"].items():
        name = w.rstrip("/").split("/")[-1] or w
        floor = next((r["floor"] for r in cur["sft_ar_val"] if r.get("floor") is not None), None)
        if cur["rl"]:
            steps = [r["step"] for r in cur["rl"]]
            fser.append({"name": f"{name} rl (rollouts)", "x": steps, "y": [r["fve_nrm"] for r in cur["rl"]]})
            rser.append({"name": f"{name} rl reward", "x": steps, "y": [r["reward_mean"] for r in cur["rl"]]})
            if floor is not None:
                fser.append({"name": f"{name} floor", "x": [min(steps), max(steps)], "y": [floor, floor], "dashed": True})
        if cur["sft_ar_val"]:
            steps = [r["step"] for r in cur["sft_ar_val"]]
            aser.append({"name": f"{name} sft_ar (validation)", "x": steps, "y": [r["fve_nrm"] for r in cur["sft_ar_val"]]})
            if floor is not None:
                aser.append({"name": f"{name} floor", "x": [min(steps), max(steps)], "y": [floor, floor], "dashed": True})
    parts.append(line_chart("plot-fve-vs-step", "fve_nrm of the RL rollouts against RL step", fser, "RL step",
                            "fve_nrm"))
    parts.append(line_chart("plot-reward-vs-step", "RL reward (-mse_nrm; failures get rl.fail_reward) against RL step",
                            rser, "RL step", "reward"))
    parts.append(line_chart("plot-sft-fve-vs-step", "SFT reconstructor: validation fve_nrm against SFT step", aser,
                            "sft_ar step", "fve_nrm"))
    parts.append("</section>")
    # -- lengths
    parts.append('<section id="length-histogram"><h2>Explanation length (extracted explanations)</h2>')
    parts.append(bar_chart("plot-length-hist", "explanation length histogram",
                           [{"name": c["label"], "counts": c["length"]["hist"]} for c in cks], "tokens", "count"))
    parts.append("<p>" + "; ".join(f'{esc(c["label"])}: {c["length"]["failed"]} without a closing tag'
                                   for c in cks) + "</p></section>")
    # -- fve by position
    parts.append('<section id="fve-by-position"><h2>fve_nrm by token position (equal-count bins, 95% CI)</h2>')
    pser = []
    for c in cks:
        bins = c["by_position"]
        mid = [(b["lo"] + b["hi"]) / 2 for b in bins]
        pser.append({"name": c["label"], "x": mid, "y": [b["real"]["mean"] for b in bins],
                     "lo": [b["real"]["lo"] for b in bins], "hi": [b["real"]["hi"] for b in bins]})
        pser.append({"name": f'{c["label"]} shuffled', "x": mid, "y": [b["shuffled"]["mean"] for b in bins],
                     "dashed": True})
    if cks:
        bins = cks[0]["by_position"]
        pser.append({"name": "floor", "x": [(b["lo"] + b["hi"]) / 2 for b in bins],
                     "y": [b["floor"]["mean"] for b in bins], "dashed": True})
    parts.append(line_chart("plot-fve-by-position", "fve_nrm by token position", pser, "token position", "fve_nrm"))
    parts.append("</section>")
    # -- samples
    parts.append('<section id="samples"><h2>Sample explanations (one per document)</h2>')
    for c in cks:
        for s in c["samples"]:
            parts.append(
                f'<div class="sample" data-checkpoint="{esc(c["label"])}" data-row="{s["row"]}">'
                f'<div class="label">{esc(c["label"])} · row {s["row"]} · position {s["position"]} · '
                f'fve_nrm <span class="fve">{s["fve"]:+.3f}</span> (floor {s["floor"]:+.3f})'
                f'{"" if s["ok"] else " · no closing tag"}</div>'
                f'<div class="label">context (…)</div><div class="context">{esc(s["context"])}</div>'
                f'<div class="label">explanation</div><div class="explanation">{esc(s["explanation"])}</div>'
                f'<div class="label">explanation of a shuffled activation (fve_nrm {s["fve_shuffled"]:+.3f})</div>'
                f'<div class="shuffled">{esc(s["shuffled_explanation"])}</div></div>')
    parts.append("</section></body></html>")
    return "\n".join(parts)
