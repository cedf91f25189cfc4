"""The pipeline's stages: each takes the :class:`~captum_gig.pipeline.Pipeline` and returns the files it wrote.

    extract    predictions over the data; PFVs of every layer from the fit data (and held-out PFVs of the data)
    fit        a concept basis per layer, its image-diversity diagnostics
    decompose  Lasso coefficients of the fit PFVs; rel-l2 / l0 ratio on them and on the held-out PFVs
    attribute  class GIG per class; the graphs' concepts chosen top-down, with the inter-layer GIG computed only
               for the concepts they keep, over up to ``interlayer_images`` images per class
    graph      atlases of the graphs' concepts; every graph drawn (JSON, PNG, HTML)
    evaluate   C-Deletion / C-Insertion and inter-layer deletion / insertion for GIG, the baselines and random,
               on class-stratified subsets (one per seed); rank agreement with the exact ablation effect
"""

import os
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _layout
from . import distributed as _dist
from ._artifacts import (basis_path, class_attr_path, coef_path, files_under, inter_path, load_class_attribution,
                         pfv_path, read_json, save, save_class_attribution, write_json)
from ._hooks import run_until
from ._io import load_artifact
from ._sources import NORMALIZATIONS, PipelineError, safe_name

# ============================================================================ shared helpers


def predictions(run) -> Dict[str, Tensor]:
    tensors, _ = load_artifact(run.path("predictions.safetensors"), "Predictions")
    return tensors


def image_classes(run) -> Tensor:
    """``(N,)`` the class of every image of the data: its prediction, or its label with ``by="label"``."""
    preds = predictions(run)
    return preds["labels"] if run.s["by"] == "label" else preds["prediction"]


def stratified(classes: Tensor, n: Optional[int], seed: int, per_class: Optional[int] = None,
               only: Optional[Sequence[int]] = None) -> List[int]:
    """Indices of a class-stratified subset: classes take turns (each in a seeded random order) until ``n``.

    ``n=None`` takes every image (at most ``per_class`` of each class); ``only`` keeps just those classes.
    The result is sorted, so batches read the data in order.
    """
    classes = torch.as_tensor(classes).long().cpu()
    g = torch.Generator().manual_seed(int(seed))
    wanted = sorted(set(classes.tolist()) if only is None else set(int(c) for c in only))
    queues = []
    for c in wanted:
        members = (classes == c).nonzero().flatten()
        queues.append(members[torch.randperm(members.numel(), generator=g)].tolist()[:per_class])
    taken: List[int] = []
    limit = sum(len(q) for q in queues) if n is None else min(int(n), sum(len(q) for q in queues))
    r = 0
    while len(taken) < limit:
        for q in queues:
            if r < len(q) and len(taken) < limit:
                taken.append(q[r])
        r += 1
    return sorted(taken)


def decomposer(run, layer: str):
    from .concepts import ConceptBasis
    from .decompose import PFVDecomposer

    basis = ConceptBasis.load(basis_path(run, layer), device=str(run.device))
    return PFVDecomposer(basis, alpha=float(basis.meta["alpha"]), solver=run.s.get("solver") or "auto")


def classes_arg(run) -> Optional[List[int]]:
    classes = run.s.get("classes")
    if not classes:
        return None
    return [run.class_index(c) for c in classes]


def _warn_once(run, caught) -> None:
    for w in caught:
        run.warn(str(w.message))


# ============================================================================ extract, fit, decompose


def stage_extract(run) -> List[str]:
    from .pfv import collect_pfvs

    layers = run.layers()
    data = run.data
    produced = []
    # predictions over the data: the classes of the images (graphs, evaluation), the most confident image
    # under torchrun each rank predicts its share of the batches; every image is written by one rank only
    pred = torch.zeros(len(data), dtype=torch.long)
    conf = torch.zeros(len(data))
    batches = run.batches(labels=False)
    mine = batches.shard(_dist.rank(), _dist.world_size())
    with torch.no_grad():
        for start, batch in tqdm(mine, desc="predictions", unit="batch", disable=not run.progress,
                                 total=len(range(_dist.rank(), len(batches), _dist.world_size()))):
            c, i = run.model(batch).softmax(1).max(1)
            pred[start:start + len(i)] = i.cpu()
            conf[start:start + len(i)] = c.cpu().to(conf.dtype)
    pred, conf = _dist.all_reduce(pred), _dist.all_reduce(conf)
    labels = data.labels if data.labels is not None else torch.full_like(pred, -1)
    produced.append(save(run.path("predictions.safetensors"), "Predictions",
                         {"prediction": pred, "confidence": conf, "labels": labels},
                         {"names": data.names, "n_images": len(data)}))
    target = "label" if run.s["by"] == "label" else None
    sources = [(run.fit_data, False)] + ([(data, True)] if run.has_heldout else [])
    for source, heldout in sources:
        if target == "label" and source.labels is None:
            raise PipelineError("--by label needs labelled data (an ImageFolder with class sub-folders, or fashion-mnist)")
        # every layer from one pass over the data
        sets = collect_pfvs(run.model, layers, run.batches(data=source), sampling=run.s["sampling"],
                            per_image=int(run.s["per_image"]), target=target, batch_size=int(run.s["batch_size"]),
                            seed=int(run.s["seed"]), progress=run.progress)
        for layer in layers:
            path = pfv_path(run, layer, heldout)
            if _dist.is_main_process():
                sets[layer].save(path)
            produced.append(path)
            what = "held-out PFVs of the data" if heldout else f"PFVs from {len(source)} images"
            run.log(f"  {layer}: {len(sets[layer])} {what}, {sets[layer].n_channels} channels, "
                    f"grid {sets[layer].spatial_shape}")

    def describe(d, source: str) -> Dict[str, Any]:
        return {"source": source, "n_images": len(d), "names": d.names,
                "labels": d.labels.tolist() if d.labels is not None else None, "class_names": d.class_names,
                "sources": d.sources.tolist(), "skipped_unreadable": d.skipped, "skipped_files": d.skipped_files}

    info = describe(data, run.s["data"])
    if run.has_heldout:
        info["fit"] = describe(run.fit_data, run.s.get("fit_data") or run.s["data"])
    produced.append(write_json(run.path("data.json"), info))
    return produced


def _offset_for(run, layer: str):
    offset = run.s["offset"]
    if offset != "auto":
        return offset
    module = run.model.get_submodule(layer)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module
    children = list(module.children())
    if isinstance(module, nn.Sequential) and children and isinstance(children[-1], nn.modules.batchnorm._BatchNorm):
        return children[-1]
    return "mean"


def stage_fit(run) -> List[str]:
    from .concepts import ConceptBasis
    from .decompose import alpha_max
    from .diagnostics import concept_diagnostics
    from .pfv import PFVSet

    produced, diagnostics = [], {}
    for layer in run.layers():
        pfvs = PFVSet.load(pfv_path(run, layer), device=str(run.device))
        if run.s.get("concepts"):
            k = int(run.s["concepts"])
        else:  # the paper's 8 x channels, limited by the data: at least min_members PFVs per concept on average
            k = min(int(run.s["concept_factor"]) * pfvs.n_channels, max(2, len(pfvs) // int(run.s["min_members"])))
        k = min(k, len(pfvs))
        basis = ConceptBasis.fit(pfvs, k, method=run.s["extractor"], offset=_offset_for(run, layer),
                                 seed=int(run.s["seed"]), progress=run.progress)
        alpha = float(run.s["alpha"]) * float(alpha_max(basis, pfvs.vectors).median())
        basis.meta["alpha"] = alpha
        basis.meta["alpha_fraction"] = float(run.s["alpha"])
        path = basis_path(run, layer)
        if _dist.is_main_process():
            basis.save(path)
        produced.append(path)
        note = ""
        if basis.labels is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                diag = concept_diagnostics(basis, pfvs, top_m=int(run.s["diversity_top"]), layer=layer,
                                           groups=run.fit_data.sources)
            _warn_once(run, caught)
            summary = diag.summary()
            diagnostics[layer] = dict(summary, n_members=diag.n_members.tolist(),
                                      distinct_images=diag.distinct_images.tolist())
            note = f", median {summary['median_distinct_images']:.0f} distinct images among each concept's " \
                   f"top-{diag.top_m} members"
        run.log(f"  {layer}: {k} concepts, alpha {alpha:.4g}{note}")
    produced.append(write_json(run.path("diagnostics.json"), diagnostics))
    return produced


def stage_decompose(run) -> List[str]:
    from ._scores import l0_ratio, relative_l2
    from .pfv import PFVSet

    produced, summary = [], {}
    for layer in run.layers():
        dec = decomposer(run, layer)
        dec.progress = run.progress
        pfvs = PFVSet.load(pfv_path(run, layer), device=str(run.device))
        U = dec.transform(pfvs.vectors, distributed=True)  # each rank solves its share of the chunks
        rel, l0 = float(relative_l2(pfvs.vectors, dec.inverse_transform(U))), float(l0_ratio(U))  # no second solve
        nz = U.nonzero()
        produced.append(save(coef_path(run, layer), "SparseCoefficients",
                             {"indices": nz, "values": U[nz[:, 0], nz[:, 1]]},
                             {"layer": layer, "shape": list(U.shape), "rel_l2": rel, "l0_ratio": l0}))
        summary[layer] = {"n_pfvs": len(pfvs), "n_channels": pfvs.n_channels, "n_concepts": dec.n_concepts,
                          "alpha": dec.alpha, "rel_l2": rel, "l0_ratio": l0}
        line = f"  {layer}: rel-l2 {rel:.3f}, l0 ratio {l0:.3f}"
        if run.has_heldout:  # the paper's Table 1 numbers: PFVs of images the bases never saw
            held = PFVSet.load(pfv_path(run, layer, heldout=True), device=str(run.device))
            Uh = dec.transform(held.vectors, distributed=True)
            summary[layer]["heldout"] = {"n_pfvs": len(held), "n_images": int(held.meta.get("n_images", 0)),
                                         "rel_l2": float(relative_l2(held.vectors, dec.inverse_transform(Uh))),
                                         "l0_ratio": float(l0_ratio(Uh))}
            line += f" (held out: rel-l2 {summary[layer]['heldout']['rel_l2']:.3f}, " \
                    f"l0 ratio {summary[layer]['heldout']['l0_ratio']:.3f})"
        run.log(line)
    produced.append(write_json(run.path("decomposition.json"), summary))
    return produced


# ============================================================================ attribute


def class_counts(run) -> Tuple[Tensor, Tensor]:
    """``(classes, counts)`` of the class attribution of the last layer, most frequent first."""
    ca = load_class_attribution(class_attr_path(run, run.layers()[-1]))
    order = sorted(range(len(ca.classes)), key=lambda i: (-int(ca.counts[i]), int(ca.classes[i])))
    return ca.classes[order], ca.counts[order]


def _auto_targets(run) -> List[str]:
    preds = predictions(run)
    classes, counts = class_counts(run)
    conf = preds["confidence"]
    # classes ranked by their number of images; among equals, by how confidently they are predicted
    by_class = {}
    for c in classes.tolist():
        mask = preds["prediction"] == c if run.s["by"] == "prediction" else preds["labels"] == c
        by_class[c] = (int(mask.sum()), float(conf[mask].mean()) if mask.any() else 0.0)
    ranked = sorted(by_class, key=lambda c: (-by_class[c][0], -by_class[c][1], c))
    specs = [f"class:{ranked[0]}", f"image:{int(conf.argmax())}"]
    if len(ranked) >= 2:
        specs.append(f"pair:{ranked[0]},{ranked[1]}")
    return specs


def graph_specs(run) -> List[Dict[str, Any]]:
    """The graphs asked for, resolved: ``auto`` and ``class:all`` expanded, names turned into classes."""
    names = run.class_names()
    specs = run.s.get("graph") or ["auto"]
    if "auto" in specs:
        specs = [s for s in specs if s != "auto"] + _auto_targets(run)
    if "class:all" in specs:
        present = sorted(class_counts(run)[0].tolist())
        i = specs.index("class:all")
        specs = specs[:i] + [f"class:{c}" for c in present] + specs[i + 1:]
    out, seen = [], set()
    for spec in specs:
        kind, value = run.parse_graph_spec(spec)
        key = (kind, value)
        if key in seen:
            continue
        seen.add(key)
        if kind == "class":
            out.append({"spec": spec, "kind": kind, "targets": [value], "stem": f"class_{value}",
                        "title": f"class {names[value]}"})
        elif kind == "pair":
            a, b = value
            out.append({"spec": spec, "kind": kind, "targets": [a, b], "stem": f"pair_{a}_{b}",
                        "title": f"classes {names[a]} and {names[b]}"})
        else:
            out.append({"spec": spec, "kind": kind, "image": value, "stem": f"image_{value}"})
    return out


def _graph_interlayer(run, decs, ca, specs, subset: List[int], cls_of: Tensor) -> Tuple[Dict[str, Any], List[str]]:
    """Advance every class / pair graph top-down together; per layer pair, GIG only to the concepts they keep.

    For each class, the images are those of the class in ``subset``, at most ``interlayer_images`` of them.
    """
    from . import aggregate
    from .aggregate import ClassAttribution
    from .graph import ConceptGraph

    layers, names = run.layers(), run.class_names()
    cap = run.s.get("interlayer_images")
    steps, requests, graphs = {}, {}, {}
    for g in specs:
        rows = torch.stack([ca.of(c) for c in g["targets"]])
        gen = ConceptGraph.selection(layers, rows, target=g["targets"], top_k=int(run.s["top_k"]), class_names=names,
                                     meta={"by": run.s["by"], "n_steps": int(run.s["n_steps"]), "images_per_class": {}})
        requests[g["spec"]] = next(gen)
        steps[g["spec"]] = gen
    targets_of = {g["spec"]: g["targets"] for g in specs}
    sub = torch.as_tensor(subset, dtype=torch.long)
    images_of = {}
    for c in sorted({c for g in specs for c in g["targets"]}):
        members = sub[cls_of[sub] == c]
        images_of[c] = stratified(torch.full((len(members),), c), cap, int(run.s["seed"]))
        images_of[c] = members[torch.as_tensor(images_of[c], dtype=torch.long)].tolist()
    produced = []
    for i in range(len(layers) - 2, -1, -1):
        a, b = layers[i], layers[i + 1]
        need: Dict[int, set] = defaultdict(set)
        for spec, (_i, cols) in requests.items():
            for c in targets_of[spec]:
                need[c].update(cols)
        results = {}
        bar = tqdm(sorted(need), desc=f"GIG {a} -> {b} (graph concepts)", unit="class", disable=not run.progress)
        for c in bar:
            cols = sorted(need[c])
            res = aggregate.interlayer_attribution(run.model, a, decs[a], b, decs[b], run.batches(images_of[c]),
                                                   targets=cols, by="all", n_steps=int(run.s["n_steps"]),
                                                   batch_size=int(run.s["batch_size"]), progress=False)
            results[c] = (res.mean[0], cols, int(res.counts[0]))
        width = max(len(r[1]) for r in results.values())
        classes = sorted(results)
        mean = torch.zeros(len(classes), decs[a].n_concepts, width)
        tgt = torch.full((len(classes), width), -1, dtype=torch.long)
        for r, c in enumerate(classes):
            m, cols, _n = results[c]
            mean[r, :, : len(cols)] = m.cpu()
            tgt[r, : len(cols)] = torch.tensor(cols)
        counts = torch.tensor([results[c][2] for c in classes])
        produced.append(save_class_attribution(inter_path(run, a, b), ClassAttribution(
            torch.tensor(classes), mean, counts, tgt), {"layer_a": a, "layer_b": b, "by": run.s["by"],
                                                        "columns": "graph concepts"}))
        for spec in list(requests):
            _i, cols = requests[spec]
            parts = [(results[c][0][:, [results[c][1].index(t) for t in cols]], results[c][2]) for c in targets_of[spec]]
            G = sum(m * n for m, n in parts) / max(sum(n for _, n in parts), 1)  # mean over all the classes' images
            try:
                requests[spec] = steps[spec].send(G)
            except StopIteration as done:
                graphs[spec] = done.value
                del requests[spec]
    for g in specs:
        graphs[g["spec"]].meta["images_per_class"] = {str(c): len(images_of[c]) for c in g["targets"]}
    return graphs, produced


def stage_attribute(run) -> List[str]:
    from . import aggregate
    from .diagnostics import class_sharedness
    from .graph import ConceptGraph

    layers = run.layers()
    by = run.s["by"]
    classes = classes_arg(run)
    decs = {layer: decomposer(run, layer) for layer in layers}
    cls_of = image_classes(run)
    subset = stratified(cls_of, run.s.get("attribute_images"), int(run.s["seed"]), only=classes)
    produced = []
    class_layers = layers if run.s["class_layers"] == "all" else layers[-1:]
    results = {}
    for layer in class_layers:
        run.log(f"  GIG of {layer}'s concepts to classes ({len(subset)} images)")
        results[layer] = aggregate.class_attribution(run.model, layer, decs[layer], run.batches(subset), by=by,
                                                     classes=classes, n_steps=int(run.s["n_steps"]),
                                                     output=run.s["output"], batch_size=int(run.s["batch_size"]),
                                                     progress=run.progress)
        produced.append(save_class_attribution(class_attr_path(run, layer), results[layer],
                                               {"layer": layer, "by": by, "output": run.s["output"],
                                                "n_images": len(subset)}))
    ca = results[layers[-1]]
    _dist.barrier()  # graph_specs reads the class attribution that only the main process wrote
    specs = graph_specs(run)
    drawn = [g for g in specs if g["kind"] != "image"]
    for g in drawn:
        for c in g["targets"]:
            if not bool((ca.classes == c).any()):
                raise PipelineError(f"--graph {g['spec']}: no image of class {c} in the data "
                                    f"(classes present: {ca.classes.tolist()})")
    graphs: Dict[str, Any] = {}
    if len(layers) >= 2 and run.s["interlayer"] == "all":
        inter = []
        for a, b in zip(layers[:-1], layers[1:]):
            run.log(f"  GIG of {a}'s concepts to every concept of {b}")
            res = aggregate.interlayer_attribution(run.model, a, decs[a], b, decs[b], run.batches(subset), by=by,
                                                   classes=classes, n_steps=int(run.s["n_steps"]),
                                                   batch_size=int(run.s["batch_size"]), progress=run.progress)
            produced.append(save_class_attribution(inter_path(run, a, b), res, {"layer_a": a, "layer_b": b, "by": by}))
            inter.append(res)
        for g in drawn:
            def columns(i: int, cols: List[int], targets=g["targets"]) -> Tensor:
                ia = inter[i]
                n = [float(ia.counts[ia.classes == c][0]) for c in targets]
                return sum(ia.columns(c, cols) * w for c, w in zip(targets, n)) / max(sum(n), 1.0)

            rows = torch.stack([ca.of(c) for c in g["targets"]])
            graphs[g["spec"]] = ConceptGraph._assemble(layers, rows.double(), columns, g["targets"], int(run.s["top_k"]),
                                                       3, run.class_names(), {"by": by})
    elif len(layers) >= 2 and drawn:
        run.log(f"  GIG between layers for {len(drawn)} graphs, only to the concepts they keep")
        graphs, written = _graph_interlayer(run, decs, ca, drawn, subset, cls_of)
        produced += written
    else:
        for g in drawn:
            rows = torch.stack([ca.of(c) for c in g["targets"]])
            graphs[g["spec"]] = ConceptGraph.from_attributions(layers, rows, [], target=g["targets"],
                                                               top_k=int(run.s["top_k"]), class_names=run.class_names())
    produced.append(write_json(run.path("attribution", "graphs.json"), {
        "specs": specs, "graphs": {spec: graph.to_dict() for spec, graph in graphs.items()}}))
    shared = {layer: {"classes": res.classes.tolist(), "share": 0.05,
                      "n_classes": class_sharedness(res.mean, 0.05).tolist()} for layer, res in results.items()}
    produced.append(write_json(run.path("attribution", "sharedness.json"), shared))
    return produced


# ============================================================================ graph


def _display(run) -> Callable[[Tensor], Tensor]:
    """Model inputs -> [0, 1] images (undoes the normalisation) for atlas crops."""
    mean, std = NORMALIZATIONS[run.s["normalize"]]

    def show(x: Tensor) -> Tensor:
        c = x.shape[1] if x.dim() == 4 else x.shape[0]
        shape = (1, c, 1, 1) if x.dim() == 4 else (c, 1, 1)
        m = torch.tensor(mean[:c], dtype=x.dtype, device=x.device).view(shape)
        s = torch.tensor(std[:c], dtype=x.dtype, device=x.device).view(shape)
        return (x * s + m).clamp(0, 1)

    return show


def _ierf_method(name: str) -> Dict[str, Any]:
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    if name == "ig":
        return {"method": IntegratedGradients, "attribute_kwargs": {"n_steps": 8}}
    return {"method": {"ixg": InputXGradient, "saliency": Saliency}[name], "attribute_kwargs": {}}


def _build_atlases(run, concepts: Dict[str, List[int]]) -> Tuple[Dict[str, Any], List[str]]:
    """Atlases of the graphs' concepts: iERF crops of their nearest fit PFVs, each from a different image.

    Under torchrun each rank builds the atlases of its share of the layers; every rank gets them all.
    """
    from .atlas import ConceptAtlas
    from .concepts import ConceptBasis
    from .ierf import receptive_fields
    from .pfv import PFVSet

    fit = run.fit_data
    names = run.class_names()
    limit = run.s.get("atlas_images")
    wanted = [layer for layer in run.layers() if concepts.get(layer)]
    mine = wanted[_dist.rank()::_dist.world_size()]
    built: Dict[str, Any] = {}
    if wanted:  # the receptive-field probes of every layer in one pass, shared by the ranks (ierf reads the cache)
        first = fit.get([0])
        receptive_fields(run.model, wanted, tuple(first.shape[1:]), dtype=first.dtype, distributed=True)
    for layer in mine:
        pfvs = PFVSet.load(pfv_path(run, layer), device=str(run.device))
        if limit and limit < len(fit):
            pfvs = pfvs[pfvs.image_index < limit]
        basis = ConceptBasis.load(basis_path(run, layer), device=str(run.device))
        # the class of each crop's image: the class its PFV's relevance was drawn for (its label with --by label)
        labels = torch.full((len(fit),), -1, dtype=torch.long)
        cls = pfvs.labels if run.s["by"] == "label" and pfvs.labels is not None else pfvs.target
        if cls is not None:
            labels[pfvs.image_index.cpu()] = cls.cpu().long()
        atlas = ConceptAtlas.build(run.model, layer, basis, pfvs, lambda idx: fit.get(idx).to(run.device),
                                   top_k=int(run.s["atlas_top"]), distinct_images=True, labels=labels,
                                   class_names=names, concepts=sorted(concepts[layer]), **_ierf_method(run.s["ierf"]),
                                   display=_display(run), progress=run.progress)
        atlas.save(run.path("atlas", safe_name(layer)))
        built[layer] = atlas
    if _dist.is_distributed():
        for part in _dist.all_gather_object(built):
            built.update(part)
    atlases = {layer: built[layer] for layer in wanted}
    produced = [f for layer in wanted for f in files_under(run.path("atlas", safe_name(layer)))]
    return atlases, produced


def _close_figures() -> None:
    try:
        import matplotlib.pyplot as plt

        plt.close("all")
    except ImportError:
        pass


def class_heatmap(ca, names: Sequence[str], path: str, title: str, top: int = 3, share: float = 0.05,
                  max_classes: int = 24, max_rows: int = 40) -> None:
    """Concept x class heat map of the share of each class's positive class GIG, for the classes' top concepts.

    Rows are the union of every class's ``top`` concepts, those that give at
    least ``share`` to several classes first (marked with a star). A legible
    map shows at most the ``max_classes`` classes with the most images and
    ``max_rows`` concepts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = torch.arange(len(ca.classes))
    if len(classes) > max_classes:
        classes = ca.counts.argsort(descending=True, stable=True)[:max_classes].sort().values
        title += f", the {max_classes} classes with most images"
    g = ca.mean.double().clamp_min(0)[classes]
    shares = g / g.sum(1, keepdim=True).clamp_min(1e-300)  # (n_classes, K)
    rows = sorted({int(q) for r in shares for q in r.topk(min(top, r.numel())).indices})
    served = (shares[:, rows] >= share).sum(0)
    order = sorted(range(len(rows)), key=lambda i: (-int(served[i]), int(shares[:, rows[i]].argmax()),
                                                     -float(shares[:, rows[i]].max())))[:max_rows]
    rows = [rows[i] for i in order]
    M = shares[:, rows].t().numpy()  # (concepts, classes)
    labels = [names[c] if 0 <= c < len(names) else str(c) for c in ca.classes[classes].tolist()]
    fig, ax = plt.subplots(figsize=(1.1 + 0.62 * len(labels), 1.2 + 0.24 * len(rows)))
    im = ax.imshow(M, cmap="Blues", vmin=0, vmax=max(float(M.max()), 1e-9), aspect="auto")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if M[i, j] >= share:
                ax.text(j, i, f"{100 * M[i, j]:.0f}", ha="center", va="center", fontsize=6.5,
                        color="white" if M[i, j] > 0.5 * M.max() else "#123")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=7.5)
    ax.set_yticks(range(len(rows)), [("\u2605 " if served[order[i]] >= 2 else "") + f"#{q}" for i, q in enumerate(rows)],
                  fontsize=6.5)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the class's GIG")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def stage_graph(run) -> List[str]:
    import json

    from .graph import ConceptGraph

    layers = run.layers()
    names = run.class_names()
    info = read_json(run.path("attribution", "graphs.json"))
    graphs = []
    for g in info["specs"]:
        if g["kind"] != "image":
            graph = ConceptGraph.from_json(json.dumps(info["graphs"][g["spec"]]))
            graphs.append((g["spec"], g["stem"], g["title"], graph))
            continue
        image = run.data.get([g["image"]]).to(run.device)
        with torch.no_grad():
            c = int(run.model(image).argmax(1))
        decs = [decomposer(run, layer) for layer in layers]
        graph = ConceptGraph.build(run.model, layers, decs, image, target=c, top_k=int(run.s["top_k"]),
                                   n_steps=int(run.s["n_steps"]), output=run.s["output"], class_names=names,
                                   progress=run.progress)
        graphs.append((g["spec"], g["stem"], f"image {run.data.names[g['image']]} (predicted {names[c]})", graph))
    shown: Dict[str, List[int]] = {layer: [] for layer in layers}
    for *_rest, graph in graphs:
        for layer in layers:
            shown[layer] = sorted(set(shown[layer]) | set(graph.concepts(layer)))
    atlases, produced = _build_atlases(run, shown)
    folder = run.path("graphs")
    index = []
    for spec, stem, title, graph in graphs:
        paths = {ext: os.path.join(folder, f"{stem}.{ext}") for ext in ("json", "png", "html")}
        if _dist.is_main_process():
            os.makedirs(folder, exist_ok=True)
            graph.to_json(paths["json"])
            graph.plot(paths["png"], atlases=atlases, title=title)
            graph.to_html(paths["html"], atlases=atlases, title=f"captum-gig: {title}")
            _close_figures()
        produced += list(paths.values())
        shared = sum(1 for n in graph.nodes if n.get("shared"))
        index.append({"spec": spec, "title": title, "kind": spec.split(":", 1)[0], "shared_concepts": shared,
                      **{k: os.path.relpath(v, run.out) for k, v in paths.items()}})
        run.log(f"  graph for {title}: {paths['html']}")
    for layer in layers:
        if os.path.isfile(class_attr_path(run, layer)):
            ca = load_class_attribution(class_attr_path(run, layer))
            if len(ca.classes) >= 2:
                path = os.path.join(folder, f"heatmap_{safe_name(layer)}.png")
                if _dist.is_main_process():
                    os.makedirs(folder, exist_ok=True)
                    class_heatmap(ca, names, path, f"{layer}: share of each class's GIG ({int(ca.counts.sum())} images)")
                produced.append(path)
    produced.append(write_json(run.path("graphs", "index.json"), index))
    return produced


# ============================================================================ evaluate


def _average_ranks(x: Tensor, valid: Tensor) -> Tensor:
    """Ranks (1-based, ties averaged, as scipy's ``rankdata``) of each row's valid entries."""
    v = valid.unsqueeze(1)  # (R, 1, m): j counts only where valid
    less = ((x.unsqueeze(1) < x.unsqueeze(2)) & v).sum(2)
    equal = ((x.unsqueeze(1) == x.unsqueeze(2)) & v).sum(2)
    return less + 0.5 * (equal - 1) + 1


def _spearman(attr: Tensor, exact: Tensor, top: int) -> List[float]:
    """Per row, Spearman's rho of ``attr`` and ``exact`` over the ``top`` concepts of largest ``|exact|``
    among those present (non-zero effect); rows with fewer than 3 such concepts are skipped."""
    a, e = attr.double().cpu(), exact.double().cpu()
    present = (e != 0) & torch.isfinite(e)
    size = torch.where(present, e.abs(), torch.full_like(e, -1.0))
    idx = size.topk(min(top, e.shape[1]), dim=1).indices  # (R, m), the largest effects first
    valid = present.gather(1, idx)
    ra, re = _average_ranks(a.gather(1, idx), valid), _average_ranks(e.gather(1, idx), valid)
    n = valid.sum(1, keepdim=True).clamp_min(1)
    ra = torch.where(valid, ra - (ra * valid).sum(1, keepdim=True) / n, torch.zeros_like(ra))
    re = torch.where(valid, re - (re * valid).sum(1, keepdim=True) / n, torch.zeros_like(re))
    denominator = (ra.square().sum(1) * re.square().sum(1)).sqrt()
    rho = (ra * re).sum(1) / denominator
    keep = (valid.sum(1) >= 3) & (denominator > 0)  # a constant order has no rank correlation
    return rho[keep].tolist()


#: images per class whose attributions are compared with the exact ablation effects (Spearman's rho)
SPEARMAN_IMAGES = 8


class _Tally:
    """Sums of curves and per-image AUCs over classes, to average over every evaluated image."""

    def __init__(self):
        self.scores: Dict[Tuple[str, str], Tensor] = {}
        self.weight: Dict[Tuple[str, str], float] = defaultdict(float)
        self.per_input: Dict[Tuple[str, str], List[Tensor]] = defaultdict(list)
        self.fractions: Dict[str, Tensor] = {}
        self.rho: Dict[Tuple[str, str], List[float]] = defaultdict(list)
        self.skipped: Dict[str, int] = defaultdict(int)  # classes without a visible target, per transition

    def add(self, curve: str, method: str, c, n: int) -> None:
        key = (curve, method)
        self.fractions[curve] = c.fractions.cpu()
        s = c.scores.detach().double().cpu() * n
        self.scores[key] = self.scores[key] + s if key in self.scores else s
        self.weight[key] += n
        if c.per_input is not None:
            self.per_input[key].append(c.per_input.double().cpu())

    def merge(self, other: "_Tally") -> None:
        """Add another tally's classes (another rank's); per-image AUCs stay aligned across methods."""
        for key, total in other.scores.items():
            self.scores[key] = self.scores[key] + total if key in self.scores else total
            self.weight[key] += other.weight[key]
        for key, parts in other.per_input.items():
            self.per_input[key] += parts
        self.fractions.update(other.fractions)
        for key, values in other.rho.items():
            self.rho[key] += values
        for key, n in other.skipped.items():
            self.skipped[key] += n

    def result(self) -> Dict[str, Any]:
        from .metrics import auc

        curves: Dict[str, Any] = {}
        for (curve, method), total in self.scores.items():
            scores = total / max(self.weight[(curve, method)], 1)
            entry = curves.setdefault(curve, {"fractions": self.fractions[curve].tolist(), "methods": {}})
            entry["methods"][method] = {"scores": scores.tolist(), "auc": auc(self.fractions[curve], scores),
                                        "n_images": int(self.weight[(curve, method)])}
        for curve, entry in curves.items():
            deletion = "deletion" in curve
            gig = self.per_input.get((curve, "gig"))
            if not gig:
                continue
            g = torch.cat(gig)
            wins = {}
            for method in entry["methods"]:
                other = self.per_input.get((curve, method))
                if method == "gig" or not other:
                    continue
                o = torch.cat(other)
                ok = ~torch.isnan(g) & ~torch.isnan(o)
                better = (g < o) if deletion else (g > o)
                wins[method] = float(better[ok].double().mean()) if bool(ok.any()) else None
            entry["gig_beats"] = wins  # share of images on which GIG's own AUC is better than the method's
        rho = {f"{t}|{m}": {"mean": sum(v) / len(v), "n": len(v)} for (t, m), v in self.rho.items() if v}
        return {"curves": curves, "spearman_vs_ablation": rho, "classes_without_targets": dict(self.skipped)}


def _orders_to_class(run, layer: str, dec, images: Tensor, c: int, methods: List[str], U: Tensor) -> Dict[str, Tensor]:
    """Per-image attributions of ``layer``'s concepts to class ``c``: ``{method: (n, K)}``."""
    from .baselines import attribution_class

    out = {}
    for m in methods:
        method = attribution_class(m)(run.model, layer, dec, output=run.s["output"])
        out[m] = method.attribute(images, target=c, n_steps=int(run.s["n_steps"]), coefficients=U).detach()
    return out


def _evaluate_subset(run, decs, idx: List[int], cls_of: Tensor, methods: List[str], pairs, seed: int,
                     inter_share: float = 1.0) -> Dict[str, Any]:
    from .baselines import ConceptAblation, attribution_class
    from .metrics import concept_deletion, concept_insertion, interlayer_deletion, interlayer_insertion

    layers = run.layers()
    last = layers[-1]
    steps, bs, T = int(run.s["eval_steps"]), int(run.s["batch_size"]), int(run.s["eval_targets"])
    tally = _Tally()
    sub = torch.as_tensor(idx, dtype=torch.long)
    classes = sorted(set(cls_of[sub].tolist()))
    class_means = {layer: load_class_attribution(class_attr_path(run, layer))
                   for layer in layers if os.path.isfile(class_attr_path(run, layer))}
    mine = classes[_dist.rank()::_dist.world_size()]  # under torchrun each rank evaluates its share of the classes
    bar = tqdm(mine, desc=f"evaluation (seed {seed})", unit="class", disable=not run.progress)
    for c in bar:
        ids = sub[cls_of[sub] == c].tolist()
        images = run.data.get(ids).to(run.device)
        n = len(ids)
        solved: Dict[str, Tensor] = {}

        def coefficients(layer: str) -> Tensor:  # each layer's Lasso once per class's images
            if layer not in solved:
                with torch.no_grad():
                    solved[layer] = decs[layer].transform(run_until(run.model, layer, images))
            return solved[layer]

        U_last = coefficients(last)
        per_image = _orders_to_class(run, last, decs[last], images, c, methods, U_last)
        # one order per class (Fel et al.): the class's mean attribution over its evaluated images
        g = torch.Generator().manual_seed(seed * 7919 + c)
        orders = {m: a.mean(0) for m, a in per_image.items()}
        orders["random"] = torch.rand(decs[last].n_concepts, generator=g).to(U_last)
        for m, order in orders.items():
            kw = dict(importance=order, steps=steps, output="prob", batch_size=bs * (steps + 1), coefficients=U_last)
            tally.add("c_deletion", m, concept_deletion(run.model, last, decs[last], images, c, **kw), n)
            tally.add("c_insertion", m, concept_insertion(run.model, last, decs[last], images, c, **kw), n)
        # the exact effects cost a forward per present concept: a few images of each class suffice for the ranks
        few = slice(0, min(n, SPEARMAN_IMAGES))
        exact = ConceptAblation(run.model, last, decs[last], output=run.s["output"]).attribute(
            images[few], target=c, coefficients=U_last[few])
        for m, a in per_image.items():
            tally.rho[(f"{last}->class", m)] += _spearman(a[few], exact, 32)
        # the inter-layer curves need the earlier layers' Lasso at every position: on a share of the images
        n = max(1, round(n * inter_share))
        images, solved = images[:n], {}
        few = slice(0, min(n, SPEARMAN_IMAGES))
        for a_name, b_name in pairs:
            if b_name == last:
                relevance = per_image["gig"].mean(0)
            elif b_name in class_means and bool((class_means[b_name].classes == c).any()):
                relevance = class_means[b_name].of(c).to(U_last)
            else:  # this layer's class GIG over the class's evaluated images
                relevance = _orders_to_class(run, b_name, decs[b_name], images, c, ["gig"],
                                             coefficients(b_name))["gig"].mean(0)
            with torch.no_grad():
                Xb = _layout.to_pfvs(run_until(run.model, b_name, images)) - decs[b_name].basis.offset.to(U_last)
                # a target must show in these images: a positive projection somewhere (the curves divide by it)
                shows = ((Xb @ decs[b_name].basis.normalized_vectors.to(Xb).t()).amax(1) > 0).any(0)
            ranked = [int(q) for q in relevance.argsort(descending=True) if bool(shows[q])]
            targets = ranked[:T]
            if not targets:
                continue
            U_a = coefficients(a_name)
            inter = {}
            for m in methods:
                method = attribution_class(m)(run.model, a_name, decs[a_name], b_name, decs[b_name])
                inter[m] = method.attribute_matrix(images, targets=targets, n_steps=int(run.s["n_steps"]),
                                                   coefficients=U_a).detach().permute(2, 0, 1)  # (T, n, K_a)
            exact = ConceptAblation(run.model, a_name, decs[a_name], b_name, decs[b_name]).attribute_matrix(
                images[few], targets=targets, coefficients=U_a[few])  # (few, K_a, T)
            name = f"{a_name}->{b_name}"
            for m in methods:
                for j in range(len(targets)):
                    tally.rho[(name, m)] += _spearman(inter[m][j][few], exact[:, :, j], 32)
            kw = dict(importance=inter["gig"], baselines={m: inter[m] for m in methods if m != "gig"}, steps=steps,
                      n_random=2, seed=seed * 7919 + c, batch_size=bs * (steps + 1), coefficients=U_a)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*no positive projection.*")
                for kind, fn in (("deletion", interlayer_deletion), ("insertion", interlayer_insertion)):
                    try:
                        res = fn(run.model, a_name, decs[a_name], b_name, decs[b_name], images, targets, **kw)
                    except ValueError as err:  # no target shows at the reconstruction in these images
                        if "no positive projection" not in str(err):
                            raise
                        tally.skipped[name] += 1
                        break
                    tally.add(f"interlayer_{kind}|{name}", "gig", res.gig, n)
                    tally.add(f"interlayer_{kind}|{name}", "random", res.random, n)
                    for m, curve in res.baselines.items():
                        tally.add(f"interlayer_{kind}|{name}", m, curve, n)
    if _dist.is_distributed():
        parts = _dist.all_gather_object(tally)
        tally = parts[0]
        for part in parts[1:]:
            tally.merge(part)
    out = tally.result()
    out["n_images"] = len(idx)
    out["interlayer_share"] = inter_share
    out["classes"] = {str(c): int((cls_of[sub] == c).sum()) for c in classes}
    return out


def stage_evaluate(run) -> List[str]:
    layers = run.layers()
    decs = {layer: decomposer(run, layer) for layer in layers}
    names = run.class_names()
    cls_of = image_classes(run)
    methods = ["gig"] + [m for m in (run.s.get("baselines") or []) if m != "gig"]
    pairs = list(zip(layers[:-1], layers[1:]))
    if run.s["eval_pairs"] == "last":
        pairs = pairs[-1:]
    seeds = [int(run.s["seed"]) + k for k in range(int(run.s["eval_seeds"]))]
    runs = []
    for seed in seeds:
        idx = stratified(cls_of, int(run.s["eval_images"]), seed, only=classes_arg(run))
        inter = run.s.get("eval_interlayer_images")
        share = 1.0 if not inter else min(1.0, int(inter) / max(1, len(idx)))
        runs.append(_evaluate_subset(run, decs, idx, cls_of, methods, pairs, seed, share))
    first = runs[0]
    for curve, entry in first["curves"].items():
        for m, e in entry["methods"].items():
            aucs = [r["curves"][curve]["methods"][m]["auc"] for r in runs]
            e["auc_by_seed"] = aucs
            e["auc_spread"] = max(aucs) - min(aucs)
    result = {"seeds": seeds, "n_images": first["n_images"],
              "interlayer_images": sum(max(1, round(n * first["interlayer_share"])) for n in first["classes"].values()), "classes": first["classes"], "methods": methods,
              "class_names": names, "curves": first["curves"], "spearman_vs_ablation": first["spearman_vs_ablation"],
              "spearman_by_seed": [r["spearman_vs_ablation"] for r in runs], "layers": layers,
              "pairs": [list(p) for p in pairs]}
    for curve, entry in first["curves"].items():
        gig = entry["methods"]["gig"]["auc"]
        others = ", ".join(f"{m} {e['auc']:.3f}" for m, e in entry["methods"].items() if m != "gig")
        run.log(f"  {curve}: AUC GIG {gig:.3f} ({others})")
    os.makedirs(run.path("evaluation"), exist_ok=True)
    produced = [write_json(run.path("evaluation", "metrics.json"), result)]
    png = run.path("evaluation", "curves.png")
    if _dist.is_main_process():
        plot_curves(result, png)
    produced.append(png)
    return produced


_COLOURS = {"gig": "#1f5fbf", "endpoint": "#d9822b", "magnitude": "#3b9c4a", "ablation": "#8e44ad", "random": "#888888"}


def plot_curves(result: Dict[str, Any], path: str) -> None:
    """One panel per curve (C-Deletion, C-Insertion, inter-layer per transition), every order in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["curves"])
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        entry = result["curves"][key]
        for m, e in entry["methods"].items():
            ax.plot(entry["fractions"], e["scores"], color=_COLOURS.get(m), lw=2.2 if m == "gig" else 1.3,
                    ls="--" if m == "random" else "-", label=f"{m} (AUC {e['auc']:.3f})")
        kind, _, transition = key.partition("|")
        title = {"c_deletion": "C-Deletion", "c_insertion": "C-Insertion"}.get(kind, kind.replace("_", " "))
        ax.set_title(title + (f"\n{transition}" if transition else ""), fontsize=9)
        ax.set_xlabel("fraction of concepts " + ("removed" if "deletion" in kind else "inserted"), fontsize=8)
        ax.set_ylabel("p(class)" if kind.startswith("c_") else "max projection / full", fontsize=8)
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['n_images']} images, class-stratified", fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


STAGE_FUNCTIONS: Dict[str, Callable[[Any], List[str]]] = {
    "extract": stage_extract,
    "fit": stage_fit,
    "decompose": stage_decompose,
    "attribute": stage_attribute,
    "graph": stage_graph,
    "evaluate": stage_evaluate,
}
