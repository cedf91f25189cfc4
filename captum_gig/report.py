"""The run's ``index.html``: what was computed, the concepts' quality, the graphs, the heat map, the evaluation.

:func:`write_report` writes one pipeline folder's page; :func:`report_page`
puts the sections of several folders (the demo's parts) into one page.
"""

import html
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from . import distributed as _dist
from ._io import atomic_write_text
from ._sources import safe_name

__all__ = ["write_report", "report_page", "report_sections"]

esc = html.escape

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}"
    "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd}"
    "code{background:#f5f5f5;padding:1px 4px}.grid{display:flex;flex-wrap:wrap;gap:14px}.grid>div{flex:0 0 auto}"
    ".note{color:#555;font-size:.92em}.part{border-top:3px solid #23407a;margin-top:2.5em;padding-top:.4em}"
    ".win{color:#1d6b2f;font-weight:600}.loss{color:#a33}nav a{margin-right:1em}"
)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _decomposition(run, base: str) -> List[str]:
    dec_path, diag_path = run.path("decomposition.json"), run.path("diagnostics.json")
    if not os.path.isfile(dec_path):
        return []
    dec = _read_json(dec_path)
    diag = _read_json(diag_path) if os.path.isfile(diag_path) else {}
    shared_path = run.path("attribution", "sharedness.json")
    shared = _read_json(shared_path) if os.path.isfile(shared_path) else {}
    heldout = any("heldout" in d for d in dec.values())
    top = next((d.get("top_m") for d in diag.values()), 16)
    head = ("<tr><th class='l'>layer</th><th>PFVs</th><th>channels</th><th>concepts</th><th>rel-l2</th><th>l0 ratio</th>"
            + ("<th>held-out rel-l2</th><th>held-out l0</th>" if heldout else "")
            + f"<th>median distinct images<br>in top-{top} members</th><th>single-image<br>concepts</th>"
            "<th>concepts giving &ge; 5%<br>of a class's GIG</th><th>&hellip; of two or<br>more classes</th></tr>")
    parts = ["<h3>Concepts and decomposition</h3>",
             "<p class='note'>Concepts are fitted on PFVs of the whole fit set (bisecting spherical k-means, K = 8 x "
             "channels where the data allow) and every PFV is decomposed into a sparse mix of them (Lasso). "
             "<b>Diversity</b>: the distinct images among each concept's most similar members (a concept drawn from "
             "one image is that image, not a concept). <b>Sharedness</b>: how many classes get at least 5% of their "
             "class GIG from a concept.</p>", "<table>", head]
    for layer, d in dec.items():
        g = diag.get(layer, {})
        row = [f"<td class='l'>{esc(layer)}</td>", f"<td>{d['n_pfvs']}</td>", f"<td>{d['n_channels']}</td>",
               f"<td>{d['n_concepts']}</td>", f"<td>{d['rel_l2']:.3f}</td>", f"<td>{d['l0_ratio']:.3f}</td>"]
        if heldout:
            h = d.get("heldout", {})
            row += [f"<td>{_fmt(h.get('rel_l2'))}</td>", f"<td>{_fmt(h.get('l0_ratio'))}</td>"]
        row += [f"<td>{_fmt(g.get('median_distinct_images'), '.0f')}</td>",
                f"<td>{_fmt(g.get('share_single_image'), '.0%')}</td>"]
        s = shared.get(layer)
        if s:
            counts = s["n_classes"]
            important = [c for c in counts if c >= 1]
            several = [c for c in important if c >= 2]
            row += [f"<td>{len(important)}</td>",
                    f"<td>{len(several)} ({len(several) / max(len(important), 1):.0%})</td>"]
        else:
            row += ["<td>-</td>", "<td>-</td>"]
        parts.append("<tr>" + "".join(row) + "</tr>")
    parts.append("</table>")
    return parts


def _heatmaps(run, base: str) -> List[str]:
    folder = run.path("graphs")
    if not os.path.isdir(folder):
        return []
    maps = sorted(f for f in os.listdir(folder) if f.startswith("heatmap_") and f.endswith(".png"))
    if not maps:
        return []
    parts = ["<h3>Which concepts the classes use</h3>",
             "<p class='note'>Share of each class's class GIG (eq. 7, averaged over the class's images; positive part "
             "normalised per class) given by each of the classes' top concepts. Rows marked &#9733; give at least 5% "
             "to two or more classes: concepts the classes share.</p>"]
    for f in maps:
        parts.append(f"<p><img src='{esc(base + 'graphs/' + f)}' alt='concept x class heat map {esc(f[8:-4])}' "
                     "style='max-width:100%'></p>")
    return parts


def _graphs(run, base: str) -> List[str]:
    gidx = run.path("graphs", "index.json")
    if not os.path.isfile(gidx):
        return []
    index = _read_json(gidx)
    parts = []
    for kind, title, note in (
        ("class", "Class graphs", "From the classifier down: each class's top concepts per layer, and the concepts "
                                  "below that build them (edge width: GIG, normalised per layer pair)."),
        ("pair", "Pairs of similar classes", "Shared concepts (orange frames) are among the top concepts of both "
                                             "classes; each class adds its own."),
        ("image", "One image", "The same chain for a single image."),
    ):
        graphs = [g for g in index if g.get("kind", g["spec"].split(":", 1)[0]) == kind]
        if not graphs:
            continue
        width = 360 if kind == "class" and len(graphs) > 3 else 540
        parts.append(f"<h3>{title}</h3><p class='note'>{note} Click a figure for the interactive graph.</p>"
                     "<div class='grid'>")
        for g in graphs:
            shared = f" &middot; {g['shared_concepts']} shared concepts" if kind == "pair" else ""
            parts.append(f"<div><b>{esc(g['title'])}</b>{shared}<br><a href='{esc(base + g['html'])}'>"
                         f"<img src='{esc(base + g['png'])}' alt='{esc(g['title'])}' style='width:{width}px'></a><br>"
                         f"<a href='{esc(base + g['html'])}'>interactive</a> &middot; "
                         f"<a href='{esc(base + g['json'])}'>JSON</a></div>")
        parts.append("</div>")
    return parts


def _atlases(run, base: str) -> List[str]:
    atlas_root = run.path("atlas")
    if not os.path.isdir(atlas_root):
        return []
    parts = ["<h3>Concept atlases</h3>",
             "<p class='note'>For every concept shown in the graphs: iERF crops (the pixels that make the PFV) of its "
             "most similar PFVs, each from a different image.</p>"]
    for layer in run.s.get("layers") or []:
        folder = os.path.join(atlas_root, safe_name(layer))
        if not os.path.isdir(folder):
            continue
        meta = os.path.join(folder, "atlas.json")
        entries = _read_json(meta).get("entries", {}) if os.path.isfile(meta) else {}
        pngs = sorted((f for f in os.listdir(folder) if f.endswith(".png")),
                      key=lambda f: int("".join(ch for ch in f if ch.isdigit()) or 0))
        parts.append(f"<details><summary><b>{esc(layer)}</b>: {len(pngs)} concepts</summary><table>")
        for f in pngs:
            concept = "".join(ch for ch in f if ch.isdigit())
            items = entries.get(concept, [])
            images = len({e["image"] for e in items})
            classes = sorted({e["class_name"] for e in items if e.get("class_name")})
            note = f"{images} images" + (f"; {esc(', '.join(classes[:4]))}" if classes else "")
            parts.append(f"<tr><td class='l'>#{concept}<br><span class='note'>{note}</span></td><td class='l'>"
                         f"<img src='{esc(base + os.path.relpath(os.path.join(folder, f), run.out))}' "
                         f"alt='concept {concept}' style='height:68px'></td></tr>")
        parts.append("</table></details>")
    return parts


def _curve_label(key: str) -> str:
    kind, _, transition = key.partition("|")
    name = {"c_deletion": "C-Deletion", "c_insertion": "C-Insertion", "interlayer_deletion": "inter-layer deletion",
            "interlayer_insertion": "inter-layer insertion"}.get(kind, kind)
    return name + (f" {transition}" if transition else "")


def _evaluation(run, base: str) -> List[str]:
    ev = run.path("evaluation", "metrics.json")
    if not os.path.isfile(ev):
        return []
    m = _read_json(ev)
    methods = [x for x in m["methods"]] + ["random"]
    seeds = m.get("seeds", [0])
    parts = ["<h3>Evaluation</h3>",
             f"<p class='note'>{m['n_images']} class-stratified images ({len(m['classes'])} classes), drawn with seed"
             f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. C-Deletion / C-Insertion remove or insert "
             "the last layer's concepts in the order of each class's mean attribution and follow the class "
             "probability (lower / higher AUC is better); the inter-layer curves do the same for a layer's concepts "
             "ordered by their attribution to each image's top concepts of the next layer, following the normalised "
             "maximum projection (paper Fig. 5). GIG is compared with the coefficient magnitude |u| ||v||, the "
             "endpoint gradient (GIG with one point at alpha = 1) and random orders."
             + (f" The inter-layer curves use {m['interlayer_images']} of each subset's images (the same share of "
                "every class)." if m.get("interlayer_images") not in (None, m["n_images"]) else "") + "</p>",
             f"<p><img src='{esc(base)}evaluation/curves.png' alt='deletion and insertion curves'></p>",
             "<table><tr><th class='l'>curve</th>"
             + "".join(f"<th>{esc(x)} AUC</th>" for x in methods)
             + (f"<th>spread over<br>{len(seeds)} seeds (GIG)</th>" if len(seeds) > 1 else "")
             + "<th>images where GIG<br>beats each baseline</th></tr>"]
    for key, entry in m["curves"].items():
        deletion = "deletion" in key
        row = [f"<td class='l'>{esc(_curve_label(key))} ({'lower' if deletion else 'higher'} is better)</td>"]
        gig = entry["methods"].get("gig", {}).get("auc")
        for x in methods:
            e = entry["methods"].get(x)
            if e is None:
                row.append("<td>-</td>")
                continue
            best = gig is not None and x != "gig" and ((e["auc"] > gig) if deletion else (e["auc"] < gig))
            cls = "" if x == "gig" else (" class='win'" if best else " class='loss'")
            row.append(f"<td{cls}>{e['auc']:.3f}</td>")
        if len(seeds) > 1:
            row.append(f"<td>{_fmt(entry['methods'].get('gig', {}).get('auc_spread'), '.4f')}</td>")
        beats = entry.get("gig_beats", {})
        row.append("<td>" + ", ".join(f"{esc(k)} {v:.0%}" for k, v in beats.items() if v is not None) + "</td>")
        parts.append("<tr>" + "".join(row) + "</tr>")
    parts.append("</table><p class='note'>Green: GIG is better than that order; red: it is not.</p>")
    rho = m.get("spearman_vs_ablation", {})
    if rho:
        transitions = list(dict.fromkeys(k.split("|")[0] for k in rho))
        parts.append("<p>Rank agreement with the exact effect of removing each concept (Spearman's rho over each "
                     "image's 32 concepts of largest exact effect, mean over images and targets):</p><table>"
                     "<tr><th class='l'>transition</th>" + "".join(f"<th>{esc(x)}</th>" for x in m["methods"]) + "</tr>")
        for t in transitions:
            parts.append(f"<tr><td class='l'>{esc(t)}</td>" + "".join(
                f"<td>{_fmt(rho.get(f'{t}|{x}', {}).get('mean'))}</td>" for x in m["methods"]) + "</tr>")
        parts.append("</table>")
    return parts


def _timings(run) -> Dict[str, Any]:
    path = run.path("manifest.json")
    stages = dict(_read_json(path).get("stages", {})) if os.path.isfile(path) else {}
    for name, t in run.timings.items():
        stages[name] = dict(stages.get(name, {}), **t)
    return stages


def report_sections(run, base: str = "", title: Optional[str] = None, intro: str = "") -> str:
    """The HTML sections of one pipeline folder, links prefixed with ``base`` (its path from the page)."""
    s = run.s
    fit = s.get("fit_data") or s.get("data")
    fit_split = s.get("fit_split")
    parts = [f"<h2>{esc(title)}</h2>" if title else "", intro,
             f"<p>Model <code>{esc(str(s.get('model')))}</code>; attributed and evaluated on <code>{esc(str(s.get('data')))}"
             f"{' ' + esc(str(s.get('split'))) if s.get('data') == 'fashion-mnist' else ''}</code>"
             + (f"; concepts fitted on <code>{esc(str(fit))}{' ' + esc(fit_split) if fit_split else ''}</code>"
                if run.has_heldout else "")
             + f"; layers {', '.join('<code>' + esc(x) + '</code>' for x in s.get('layers') or [])}.</p>"]
    for section in (_decomposition, _heatmaps, _graphs, _atlases, _evaluation):
        parts += section(run, base)
    stages = _timings(run)
    if stages:
        parts.append("<p class='note'>Stages: " + ", ".join(
            f"{esc(n)} {t.get('seconds', 0):.1f} s{' (resumed)' if t.get('status') == 'resumed' else ''}"
            for n, t in stages.items())
            + f" &middot; <a href='{esc(base)}manifest.json'>manifest.json</a> (settings, versions, timings) "
            f"&middot; <a href='{esc(base)}data.json'>data.json</a></p>")
    return "\n".join(p for p in parts if p)


def report_page(title: str, body: Sequence[str], path: str) -> str:
    """Write one page with ``body`` (HTML fragments) under a header; returns ``path``."""
    page = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>",
            "<p class='note'>Method: <a href='https://arxiv.org/abs/2409.01610'>Generalized Integrated Gradients, "
            "arXiv 2409.01610</a>, with <a href='https://captum.ai'>Captum</a>.</p>", *body, "</body></html>\n"]
    if _dist.is_main_process():
        atomic_write_text(path, "\n".join(page))
    return path


def write_report(run) -> str:
    """``index.html`` of one pipeline folder."""
    return report_page("captum-gig report", [report_sections(run)], run.path("index.html"))
