"""The run's ``index.html``: settings, decomposition table, graphs, atlases and evaluation."""

import html
import json
import os
from typing import Any

from . import distributed as _dist
from ._io import atomic_write_text
from ._sources import safe_name

__all__ = ["write_report"]


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_report(run) -> str:
    """``index.html``: settings, decomposition table, links to graphs, atlases and plots."""
    esc = html.escape
    out = run.out
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>captum-gig report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}code{background:#f5f5f5;padding:1px 4px}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}.grid a{flex:0 0 auto}</style></head><body>",
        "<h1>captum-gig report</h1>",
        f"<p>Model <code>{esc(str(run.s.get('model')))}</code>, data <code>{esc(str(run.s.get('data')))}</code>, "
        f"layers {', '.join('<code>' + esc(x) + '</code>' for x in run.s.get('layers') or [])}. "
        "Method: <a href='https://arxiv.org/abs/2409.01610'>GIG, arXiv 2409.01610</a>.</p>",
    ]
    dec_path = run.path("decomposition.json")
    if os.path.isfile(dec_path):
        dec = _read_json(dec_path)
        parts.append("<h2>Concepts and decomposition</h2><table><tr><th>layer</th><th>PFVs</th><th>channels</th>"
                     "<th>concepts</th><th>rel-l2</th><th>l0 ratio</th></tr>")
        for layer, d in dec.items():
            parts.append(f"<tr><td>{esc(layer)}</td><td>{d['n_pfvs']}</td><td>{d['n_channels']}</td><td>{d['n_concepts']}</td>"
                         f"<td>{d['rel_l2']:.3f}</td><td>{d['l0_ratio']:.3f}</td></tr>")
        parts.append("</table>")
    gidx = run.path("graphs", "index.json")
    if os.path.isfile(gidx):
        parts.append("<h2>Concept graphs</h2><p>Click a figure for the interactive graph.</p><div class='grid'>")
        for g in _read_json(gidx):
            parts.append(f"<div><h3>{esc(g['title'])}</h3><a href='{esc(g['html'])}'><img src='{esc(g['png'])}' "
                         f"alt='{esc(g['title'])}' style='width:520px'></a><br><a href='{esc(g['html'])}'>interactive</a> · "
                         f"<a href='{esc(g['json'])}'>JSON</a></div>")
        parts.append("</div>")
    atlas_root = run.path("atlas")
    if os.path.isdir(atlas_root):
        parts.append("<h2>Concept atlases</h2>")
        for layer in run.s.get("layers") or []:
            folder = os.path.join(atlas_root, safe_name(layer))
            if not os.path.isdir(folder):
                continue
            pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
            parts.append(f"<h3>{esc(layer)}: the {len(pngs)} concepts shown in the graphs</h3>"
                         "<p>iERF crops of each concept's nearest PFVs.</p><table>")
            for f in sorted(pngs, key=lambda f: int("".join(ch for ch in f if ch.isdigit()) or 0)):
                rel = os.path.relpath(os.path.join(folder, f), out)
                parts.append(f"<tr><td>{esc(f[:-4].replace('_', ' '))}</td><td style='text-align:left'>"
                             f"<img src='{esc(rel)}' alt='{esc(f)}' style='height:72px'></td></tr>")
            parts.append("</table>")
    ev = run.path("evaluation", "metrics.json")
    if os.path.isfile(ev):
        m = _read_json(ev)
        parts.append(f"<h2>Evaluation</h2><p>Class <b>{esc(m['class_name'])}</b>, {m['n_images']} images.</p>"
                     "<img src='evaluation/curves.png' alt='deletion and insertion curves'><table><tr><th>curve</th><th>AUC</th></tr>")
        for name, cv in m["curves"].items():
            auc = cv.get("auc", cv.get("gig_auc"))
            extra = f" (random order {cv['random_auc']:.3f})" if "random_auc" in cv else ""
            parts.append(f"<tr><td>{esc(name)}</td><td>{auc:.3f}{extra}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Run</h2><p><a href='manifest.json'>manifest.json</a> (settings, versions, timings) · "
                 "<a href='data.json'>data.json</a></p><table><tr><th>stage</th><th>status</th><th>seconds</th></tr>")
    for name, t in run.timings.items():
        parts.append(f"<tr><td>{esc(name)}</td><td>{esc(t['status'])}</td><td>{t['seconds']:.1f}</td></tr>")
    parts.append("</table></body></html>\n")
    path = run.path("index.html")
    if _dist.is_main_process():
        atomic_write_text(path, "\n".join(parts))
    return path

