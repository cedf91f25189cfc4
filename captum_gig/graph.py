r"""The causal explanation graph (paper Fig. 1, 3, 6; appendix A).

A :class:`ConceptGraph` chains GIG from the classifier down through a list
of layers: the top concepts of the last layer for the class (eq. 7), then the
concepts of each lower layer that contribute most to the concepts already
chosen above it (eq. 5), and so on. Nodes are ``(layer name, concept index)``
plus one node per class; every edge carries the raw GIG value (``gig``) and
the value normalised to ``[0, 1]`` within its layer pair (``weight``).

How concepts are chosen (documented, and tested against a brute-force
reference):

* the relevance of a last-layer concept ``q`` for class ``c`` is its class
  GIG, ``R_c(q) = GIG(v_q -> e_c)``;
* one layer down, relevance flows along the GIG shares of the chosen concepts
  ``t`` of the layer above: ``R_c(q) = sum_t GIG(q -> t) / sum_q' |GIG(q' -> t)| * R_c(t)``
  (by completeness the denominator is the size of ``t``'s own score change);
* per class the ``top_k`` concepts by ``R_c`` are kept. With several classes
  (Fig. 1: a pair of similar classes), the ``n_shared`` concepts whose *worst*
  rank over the classes is best (and whose relevance is positive for every
  class) are kept as *shared* concepts, and each class adds its own
  ``top_k`` best other concepts. A shared concept therefore lies in every
  class's top-``m`` list, ``m = meta["shared_pool"][layer]``, the smallest
  such ``m`` for ``n_shared`` concepts.
"""

import json
import math
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._data import Data, iter_batches
from ._hooks import LayerSpec, model_device, resolve_layer
from ._io import atomic_write_text
from ._version import __version__

__all__ = ["ConceptGraph"]

NodeKey = Tuple[str, int]
CLASS_LAYER = "class"


def _node_id(layer: str, concept: int) -> str:
    return f"{layer}:{int(concept)}"


def _as_targets(target) -> List[int]:
    if isinstance(target, Tensor):
        target = target.tolist()
    if isinstance(target, int) and not isinstance(target, bool):
        return [int(target)]
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        if len(set(target)) != len(target):
            raise ValueError(f"target has repeated classes: {list(target)}")
        return [int(t) for t in target]
    raise ValueError(f"target must be a class index or a sequence of distinct class indices (e.g. a pair); got {target!r}")


def _rank(scores: Tensor) -> Tensor:
    """0-based rank of every entry in descending order (ties: lower index first)."""
    order = torch.argsort(-scores, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(scores.numel(), device=scores.device)
    return rank


def _select(R: Tensor, top_k: int, n_shared: int) -> Tuple[List[int], List[List[int]], int]:
    """Choose concepts from relevance ``R (n_classes, K)``.

    Returns ``(shared, own, pool)``: the shared concepts (empty for one class),
    each class's own top concepts (excluding the shared ones), and the
    smallest ``m`` such that every shared concept is in every class's top-m.
    """
    n_cls, K = R.shape
    ranks = torch.stack([_rank(R[c]) for c in range(n_cls)])  # (n_cls, K)
    shared: List[int] = []
    pool = 0
    if n_cls > 1 and n_shared > 0:
        worst = ranks.max(0).values
        positive = (R > 0).all(0)
        key = torch.where(positive, worst, torch.full_like(worst, K + 1))
        total = ranks.sum(0)
        order = sorted(range(K), key=lambda q: (int(key[q]), int(total[q]), q))
        shared = [q for q in order[:n_shared] if bool(positive[q])]
        pool = int(worst[shared].max()) + 1 if shared else 0
    own: List[List[int]] = []
    taken = set(shared)
    for c in range(n_cls):
        order = torch.argsort(-R[c], stable=True).tolist()
        own.append([q for q in order if q not in taken][:top_k])
    return shared, own, pool


def _normalise(values: List[float]) -> List[float]:
    m = max((abs(v) for v in values), default=0.0)
    return [abs(v) / m if m > 0 else 0.0 for v in values]


class ConceptGraph:
    r"""Concepts of several layers linked by GIG, from the input side up to the classes.

    Build one with :meth:`build` (runs GIG on a model) or
    :meth:`from_attributions` (from GIG values you already have, e.g.
    aggregated over a dataset by :mod:`captum_gig.aggregate`).

    Attributes:
        layers (list of str): layer names, early to late.
        targets (list of int): the classes explained.
        class_names (list of str or None): names of all classes, when given.
        nodes (list of dict): one per node: ``id``, ``layer`` (``"class"`` for
                    class nodes), ``concept`` (the class index for class nodes),
                    ``kind`` (``"concept"`` or ``"class"``), ``name``,
                    ``scores`` (relevance per target class, keyed by the class
                    index as a string), ``classes`` (the target classes whose
                    selection holds the node) and ``shared``.
        edges (list of dict): ``source`` and ``target`` node ids (a lower
                    layer's concept -> a higher layer's concept or a class),
                    ``gig`` (raw GIG value) and ``weight`` (``|gig|`` divided
                    by the largest ``|gig|`` of the same layer pair, in [0, 1]).
        meta (dict): how it was built (``top_k``, ``n_shared``,
                    ``shared_pool`` per layer, ``n_inputs``, ...).

    Examples::

        >>> graph = ConceptGraph.build(model, ["layer2.3", "layer3.5", "layer4.2"], [dec2, dec3, dec4],
        ...                            images, target=(11, 13), top_k=5)
        >>> graph.to_html("graph.html", atlases=atlases)
        >>> g = graph.to_networkx()
    """

    def __init__(
        self,
        layers: Sequence[str],
        nodes: List[Dict[str, Any]],
        edges: List[Dict[str, Any]],
        targets: Sequence[int],
        class_names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
    ):
        self.layers = [str(layer) for layer in layers]
        self.nodes = nodes
        self.edges = edges
        self.targets = [int(t) for t in targets]
        self.class_names = list(class_names) if class_names is not None else None
        self.meta = dict(meta or {})
        ids = {n["id"] for n in nodes}
        for e in edges:
            if e["source"] not in ids or e["target"] not in ids:
                raise ValueError(f"edge {e['source']!r} -> {e['target']!r} refers to a node that is not in the graph")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_attributions(
        cls,
        layers: Sequence[str],
        class_attribution: Tensor,
        interlayer: Sequence[Tensor],
        *,
        target,
        top_k: int = 5,
        n_shared: int = 3,
        class_names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
    ) -> "ConceptGraph":
        r"""A graph from GIG values computed elsewhere (pure; no model runs).

        Args:
            layers (list of str): ``L`` layer names, early to late.
            class_attribution (Tensor): ``(K_L,)`` GIG of the last layer's
                        concepts to the class (eq. 7), or ``(n_targets, K_L)``
                        with one row per class in ``target``.
            interlayer (list of Tensor): ``L - 1`` tensors; ``interlayer[i]``
                        is ``(K_i, K_{i+1})``, the GIG of layer ``i``'s
                        concepts to layer ``i + 1``'s concepts (eq. 5).
            target (int or sequence of int): the class, or the classes (e.g. a
                        pair) whose rows ``class_attribution`` holds.
            top_k (int, optional): concepts per class per layer. Default: 5
            n_shared (int, optional): shared concepts per layer when there are
                        several classes. Default: 3
            class_names (list of str, optional): names of all classes, indexed
                        by class. Default: None
            meta (dict, optional): extra JSON-able information to keep.

        Returns:
            ConceptGraph
        """
        layers = [str(layer) for layer in layers]
        if not layers:
            raise ValueError("layers must name at least one layer")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct; got {layers}")
        targets = _as_targets(target)
        ca = torch.as_tensor(class_attribution).detach().to("cpu", torch.float64)
        if ca.dim() == 1:
            ca = ca.unsqueeze(0)
        if ca.dim() != 2 or ca.shape[0] != len(targets):
            raise ValueError(
                f"class_attribution must be (K_L,) for one class or ({len(targets)}, K_L) for target={targets}; "
                f"got shape {tuple(torch.as_tensor(class_attribution).shape)}"
            )
        interlayer = list(interlayer)
        if len(interlayer) != len(layers) - 1:
            raise ValueError(f"interlayer must hold {len(layers) - 1} matrices for {len(layers)} layers; got {len(interlayer)}")
        mats = []
        for i, m in enumerate(interlayer):
            m = torch.as_tensor(m).detach().to("cpu", torch.float64)
            if m.dim() != 2:
                raise ValueError(f"interlayer[{i}] must be a (K_{i}, K_{i + 1}) matrix; got shape {tuple(m.shape)}")
            mats.append(m)
        sizes = [m.shape[0] for m in mats] + [ca.shape[1]]
        for i, m in enumerate(mats):
            if m.shape[1] != sizes[i + 1]:
                raise ValueError(
                    f"interlayer[{i}] has {m.shape[1]} columns but layer {layers[i + 1]!r} has {sizes[i + 1]} concepts "
                    f"(rows of {'interlayer[%d]' % (i + 1) if i + 1 < len(mats) else 'class_attribution'})"
                )

        def columns(i: int, cols: List[int]) -> Tensor:
            return mats[i][:, cols]

        return cls._assemble(layers, ca, columns, targets, top_k, n_shared, class_names, meta)

    @classmethod
    def _assemble(
        cls,
        layers: List[str],
        class_attribution: Tensor,
        columns: Callable[[int, List[int]], Tensor],
        targets: List[int],
        top_k: int,
        n_shared: int,
        class_names,
        meta,
    ) -> "ConceptGraph":
        """Top-down selection; ``columns(i, cols)`` gives ``(K_i, len(cols))`` GIG of layer i to layer i+1's ``cols``."""
        steps = cls.selection(layers, class_attribution, target=targets, top_k=top_k, n_shared=n_shared,
                              class_names=class_names, meta=meta)
        request = next(steps)
        while True:
            try:
                request = steps.send(columns(*request))
            except StopIteration as done:
                return done.value

    @classmethod
    def selection(
        cls,
        layers: Sequence[str],
        class_attribution: Tensor,
        *,
        target,
        top_k: int = 5,
        n_shared: int = 3,
        class_names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
    ) -> Generator[Tuple[int, List[int]], Tensor, "ConceptGraph"]:
        r"""The top-down concept selection as a generator, for GIG computed only where the graph needs it.

        From the last layer down, the generator yields ``(i, columns)``: it
        needs the ``(K_i, len(columns))`` GIG of layer ``i``'s concepts to the
        concepts ``columns`` of layer ``i + 1`` (the ones chosen there) and
        receives it by ``send``. When every layer is chosen it returns the
        graph (``StopIteration.value``). :meth:`from_attributions` and
        :meth:`build` drive it; a caller that builds many graphs over a dataset
        can advance them together and attribute each image to the few
        concepts the graphs keep instead of all ``K_{i+1}`` of them.

        Args:
            layers, class_attribution, target, top_k, n_shared, class_names, meta:
                        as in :meth:`from_attributions`.

        Examples::

            >>> steps = ConceptGraph.selection(layers, class_gig, target=3)
            >>> i, cols = next(steps)                        # layer i's GIG to these concepts of i + 1
            >>> i, cols = steps.send(gig_matrix[:, cols])    # ... until StopIteration gives the graph
        """
        layers = [str(layer) for layer in layers]
        targets = _as_targets(target)
        class_attribution = torch.as_tensor(class_attribution).detach().to("cpu", torch.float64)
        if class_attribution.dim() == 1:
            class_attribution = class_attribution.unsqueeze(0)
        if class_attribution.dim() != 2 or class_attribution.shape[0] != len(targets):
            raise ValueError(f"class_attribution must hold one row per class of target={targets}; "
                             f"got shape {tuple(class_attribution.shape)}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int; got {top_k!r}")
        if not isinstance(n_shared, int) or n_shared < 0:
            raise ValueError(f"n_shared must be a non-negative int; got {n_shared!r}")
        if class_names is not None and any(t >= len(class_names) or t < 0 for t in targets):
            raise ValueError(f"class_names has {len(class_names)} names; target {targets} is out of range")
        n_cls = len(targets)
        L = len(layers)
        nodes: Dict[str, Dict[str, Any]] = {}
        edges: List[Dict[str, Any]] = []
        pools: Dict[str, int] = {}

        def name_of(c: int) -> str:
            return class_names[c] if class_names is not None else f"class {c}"

        class_ids = []
        for c in targets:
            nid = _node_id(CLASS_LAYER, c)
            class_ids.append(nid)
            nodes[nid] = {
                "id": nid, "layer": CLASS_LAYER, "concept": c, "kind": "class", "name": name_of(c),
                "scores": {str(t): (1.0 if t == c else 0.0) for t in targets}, "classes": [c], "shared": False,
            }

        R = class_attribution  # (n_cls, K_L) relevance of the current layer
        selected_above: Optional[List[List[int]]] = None  # per class, chosen concepts of the layer above
        above_all: List[int] = []
        for i in range(L - 1, -1, -1):
            layer = layers[i]
            if i < L - 1:
                G = torch.as_tensor((yield i, list(above_all))).detach().to("cpu", torch.float64)  # (K_i, |above|)
                if G.shape[1] != len(above_all):
                    raise ValueError(f"GIG of layer {layer!r} has {G.shape[1]} columns for {len(above_all)} targets")
                scale = G.abs().sum(0)
                share = torch.where(scale > 0, G / scale.clamp_min(1e-300), torch.zeros_like(G))
                col = {t: j for j, t in enumerate(above_all)}
                above_layer = layers[i + 1]
                R_new = torch.zeros(n_cls, G.shape[0], dtype=torch.float64)
                for c_idx, c in enumerate(targets):
                    for t in selected_above[c_idx]:
                        r_t = nodes[_node_id(above_layer, t)]["scores"][str(c)]
                        R_new[c_idx] += share[:, col[t]] * r_t
                R = R_new
            shared, own, pool = _select(R, top_k, n_shared if n_cls > 1 else 0)
            if n_cls > 1:
                pools[layer] = pool
            chosen = [shared + own[c_idx] for c_idx in range(n_cls)]
            layer_all = sorted(set(q for ch in chosen for q in ch))
            for q in layer_all:
                nid = _node_id(layer, q)
                nodes[nid] = {
                    "id": nid, "layer": layer, "concept": int(q), "kind": "concept", "name": f"{layer} #{q}",
                    "scores": {str(c): float(R[c_idx, q]) for c_idx, c in enumerate(targets)},
                    "classes": [c for c_idx, c in enumerate(targets) if q in chosen[c_idx]],
                    "shared": q in shared,
                }
            # edges from this layer's chosen concepts to the layer above (or the classes)
            pair: List[Dict[str, Any]] = []
            if i == L - 1:
                for c_idx, c in enumerate(targets):
                    for q in layer_all:
                        pair.append({"source": _node_id(layer, q), "target": class_ids[c_idx],
                                     "gig": float(class_attribution[c_idx, q])})
            else:
                for q in layer_all:
                    for t in above_all:
                        pair.append({"source": _node_id(layer, q), "target": _node_id(layers[i + 1], t),
                                     "gig": float(G[q, col[t]])})
            for e, w in zip(pair, _normalise([e["gig"] for e in pair])):
                e["weight"] = w
            edges.extend(pair)
            selected_above, above_all = chosen, layer_all

        info = {"top_k": top_k, "n_shared": n_shared if n_cls > 1 else 0, "selection": "gig-flow"}
        if n_cls > 1:
            info["shared_pool"] = pools
        info.update(meta or {})
        ordered = [nodes[k] for k in class_ids] + [n for k, n in nodes.items() if n["kind"] == "concept"]
        return cls(layers, ordered, edges, targets, class_names, info)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        layers: Sequence[LayerSpec],
        decomposers: Sequence[Any],
        inputs: Data,
        *,
        target,
        top_k: int = 5,
        n_shared: int = 3,
        n_steps: int = 50,
        output: str = "logit",
        method: str = "gausslegendre",
        batch_size: int = 16,
        internal_batch_size: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        progress: bool = True,
    ) -> "ConceptGraph":
        r"""Chain GIG from the classes down through ``layers`` (paper Fig. 1, 3).

        The last layer's concepts are attributed to the classes (eq. 7), the
        ``top_k`` per class are kept (and ``n_shared`` shared ones for several
        classes), then the layer below is attributed to exactly the concepts
        kept above (eq. 5), and so on down. Each layer pair costs one
        :meth:`GeneralizedIntegratedGradients.attribute_matrix` call per batch,
        whose forwards and batched backwards are shared by all kept targets;
        no GIG is run per node pair. GIG values are averaged over ``inputs``.

        Args:
            model (nn.Module): the image model.
            layers (list of nn.Module or str): ``L`` layers, early to late.
            decomposers (list of PFVDecomposer): one per layer.
            inputs (Tensor or iterable): one image ``(C, H, W)``, a batch
                        ``(N, C, H, W)`` (e.g. the images of a class), or a
                        re-iterable loader of batches (read once per layer).
            target (int or sequence of int): a class, or several (a pair for
                        the shared-concept view of Fig. 1).
            top_k (int, optional): concepts per class per layer. Default: 5
            n_shared (int, optional): shared concepts per layer for several
                        classes. Default: 3
            n_steps (int, optional): GIG path points. Default: 50
            output (str, optional): ``"logit"`` or ``"prob"`` class score. Default: ``"logit"``
            method (str, optional): Captum's quadrature. Default: ``"gausslegendre"``
            batch_size (int, optional): images per GIG call for tensor inputs. Default: 16
            internal_batch_size (int, optional): passed to GIG. Default: None
            class_names (list of str, optional): names of all classes.
            progress (bool, optional): show progress. Default: True

        Returns:
            ConceptGraph

        Examples::

            >>> graph = ConceptGraph.build(model, ["_blocks.5", "_blocks.10", "_blocks.15"], decs,
            ...                            image, target=281, top_k=5, n_steps=32)
        """
        from .decompose import PFVDecomposer
        from .gig import GeneralizedIntegratedGradients

        names = [resolve_layer(model, layer, f"layers[{i}]")[0] for i, layer in enumerate(layers)]
        if len(names) == 0:
            raise ValueError("layers must name at least one layer")
        if len(decomposers) != len(names):
            raise ValueError(f"decomposers must hold one PFVDecomposer per layer ({len(names)}); got {len(decomposers)}")
        for i, d in enumerate(decomposers):
            if not isinstance(d, PFVDecomposer):
                raise TypeError(f"decomposers[{i}] must be a PFVDecomposer; got {type(d).__name__}")
        targets = _as_targets(target)
        if isinstance(inputs, Tensor) and inputs.dim() == 3:
            inputs = inputs.unsqueeze(0)
        device = model_device(model)
        n_inputs = [0]
        bar = tqdm(total=len(names), disable=not progress, desc="concept graph", unit="layer")

        def mean_gig(gig: "GeneralizedIntegratedGradients", tgts: List[int]) -> Tensor:
            total, count = None, 0
            for images, _ in iter_batches(inputs, batch_size):
                images = images.to(device)
                m = gig.attribute_matrix(images, targets=tgts, n_steps=n_steps, method=method,
                                         internal_batch_size=internal_batch_size)  # (n, K_a, T)
                s = m.detach().sum(0).to("cpu", torch.float64)
                total = s if total is None else total + s
                count += images.shape[0]
            if count == 0:
                raise ValueError("inputs yielded no images")
            n_inputs[0] = count
            return total / count

        try:
            top = GeneralizedIntegratedGradients(model, names[-1], decomposers[-1], output=output)
            class_attr = mean_gig(top, targets).t()  # (n_cls, K_L)
            bar.update(1)

            def columns(i: int, cols: List[int]) -> Tensor:
                gig = GeneralizedIntegratedGradients(model, names[i], decomposers[i], names[i + 1], decomposers[i + 1])
                out = mean_gig(gig, cols)
                bar.update(1)
                return out

            meta = {"n_steps": n_steps, "output": output, "method": method}
            graph = cls._assemble(names, class_attr, columns, targets, top_k, n_shared, class_names, meta)
        finally:
            bar.close()
        graph.meta["n_inputs"] = n_inputs[0]
        return graph

    # -- access ---------------------------------------------------------------------------------
    def node(self, layer: str, concept: int) -> Dict[str, Any]:
        """The node dict of ``(layer, concept)`` (``layer="class"`` for a class node)."""
        nid = _node_id(layer, concept)
        for n in self.nodes:
            if n["id"] == nid:
                return n
        raise KeyError(f"no node ({layer!r}, {concept}) in the graph")

    def concepts(self, layer: str) -> List[int]:
        """Concept indices of ``layer``'s nodes, ascending."""
        return sorted(n["concept"] for n in self.nodes if n["layer"] == layer and n["kind"] == "concept")

    def edge(self, source: NodeKey, target: NodeKey) -> Dict[str, Any]:
        """The edge dict from ``source=(layer, concept)`` to ``target=(layer or "class", index)``."""
        s, t = _node_id(*source), _node_id(*target)
        for e in self.edges:
            if e["source"] == s and e["target"] == t:
                return e
        raise KeyError(f"no edge {source} -> {target} in the graph")

    def __repr__(self) -> str:
        return f"ConceptGraph(layers={self.layers}, targets={self.targets}, nodes={len(self.nodes)}, edges={len(self.edges)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ConceptGraph) and self.to_dict() == other.to_dict()

    # -- export ---------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict of the whole graph."""
        return {
            "kind": "ConceptGraph",
            "captum_gig_version": __version__,
            "layers": list(self.layers),
            "targets": list(self.targets),
            "class_names": self.class_names,
            "nodes": self.nodes,
            "edges": self.edges,
            "meta": self.meta,
        }

    def to_json(self, path: Optional[str] = None) -> str:
        """The graph as JSON text; written atomically to ``path`` when given.

        Floats are written with Python's shortest round-trip repr, so
        :meth:`from_json` gives back exactly the same graph.
        """
        for e in self.edges:
            if not (math.isfinite(e["gig"]) and math.isfinite(e["weight"])):
                raise ValueError(f"edge {e['source']} -> {e['target']} has a non-finite GIG value")
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str) -> "ConceptGraph":
        """Read a graph written by :meth:`to_json` (a file path, or the JSON text itself)."""
        if path_or_text.lstrip().startswith("{"):
            data = json.loads(path_or_text)
        else:
            with open(path_or_text, encoding="utf-8") as f:
                data = json.load(f)
        if not isinstance(data, dict) or data.get("kind") != "ConceptGraph":
            raise ValueError(f"{path_or_text[:80]!r} does not hold a ConceptGraph")
        for key in ("layers", "targets", "nodes", "edges"):
            if key not in data:
                raise ValueError(f"ConceptGraph JSON is missing {key!r}")
        return cls(data["layers"], data["nodes"], data["edges"], data["targets"], data.get("class_names"), data.get("meta"))

    def to_networkx(self):
        """A ``networkx.DiGraph``: nodes ``(layer, concept)`` and ``("class", c)``, edges lower -> higher.

        Node attributes are the node dict's fields; edges carry ``gig`` and ``weight``.
        """
        try:
            import networkx as nx
        except ImportError as err:
            raise ImportError(f"to_networkx needs networkx: pip install 'captum-gig[viz]' ({err})") from err
        g = nx.DiGraph(layers=list(self.layers), targets=list(self.targets), class_names=self.class_names)
        key = {}
        for n in self.nodes:
            k = (n["layer"], n["concept"])
            key[n["id"]] = k
            g.add_node(k, **{a: v for a, v in n.items() if a not in ("layer", "concept")}, layer=n["layer"], concept=n["concept"])
        for e in self.edges:
            g.add_edge(key[e["source"]], key[e["target"]], gig=e["gig"], weight=e["weight"])
        return g


    # -- pictures -------------------------------------------------------------------------------
    def positions(self) -> Dict[str, Tuple[float, float]]:
        """Layered layout: ``id -> (x, y)`` in [0, 1]; classes on top, the first layer at the bottom.

        Within a layer, nodes of the first class come left, shared ones in the
        middle, those of the last class right; each group by relevance.
        """
        rows = [CLASS_LAYER] + self.layers[::-1]
        pos: Dict[str, Tuple[float, float]] = {}
        rank = {c: i for i, c in enumerate(self.targets)}
        for r, layer in enumerate(rows):
            members = [n for n in self.nodes if n["layer"] == layer]

            def key(n):
                side = sum(rank[c] for c in n["classes"]) / max(len(n["classes"]), 1)
                best = max(n["scores"].values()) if n["scores"] else 0.0
                return (side, -best, n["concept"])

            members.sort(key=key)
            y = (r + 0.5) / len(rows)
            for j, n in enumerate(members):
                pos[n["id"]] = ((j + 0.5) / len(members), y)
        return pos

    def _atlas_of(self, atlases) -> Dict[str, Any]:
        if atlases is None:
            return {}
        if isinstance(atlases, dict):
            return {str(k): v for k, v in atlases.items()}
        return {a.layer: a for a in atlases}

    def plot(
        self,
        path: Optional[str] = None,
        atlases=None,
        *,
        min_weight: float = 0.0,
        figsize: Optional[Tuple[float, float]] = None,
        thumbnail_zoom: float = 0.5,
        title: Optional[str] = None,
        dpi: int = 150,
    ):
        r"""Static layered figure (matplotlib): classes on top, edge width and colour by weight.

        Args:
            path (str, optional): write a PNG (atomically) when given.
            atlases (dict or list of ConceptAtlas, optional): per layer; a
                        node whose concept is in its layer's atlas is drawn as
                        its thumbnail (the nearest PFV's iERF crop).
            min_weight (float, optional): hide weaker edges. Default: 0
            figsize (tuple, optional): default grows with the graph.
            thumbnail_zoom (float, optional): thumbnail scale. Default: 0.5
            title (str, optional): figure title.
            dpi (int, optional): PNG resolution. Default: 150

        Returns:
            matplotlib.figure.Figure
        """
        import os

        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        atlases = self._atlas_of(atlases)
        pos = self.positions()
        widest = max(sum(1 for n in self.nodes if n["layer"] == layer) for layer in [CLASS_LAYER] + self.layers)
        n_rows = len(self.layers) + 1
        figsize = figsize or (max(6.0, 1.25 * widest + 1.5), max(4.0, 1.6 * n_rows))
        fig, ax = plt.subplots(figsize=figsize)
        ax.set_xlim(-0.08, 1.02)
        ax.set_ylim(1.0, 0.0)
        ax.axis("off")
        blues, reds = matplotlib.colormaps["Blues"], matplotlib.colormaps["Reds"]
        # half a thumbnail's height in axes units (OffsetImage sizes are in points): edges end at the frames
        ax_points = fig.get_size_inches()[1] * 72 * 0.9
        crop_px = max((a.meta.get("crop_size", 64) for a in atlases.values()), default=64)
        dy = (crop_px * thumbnail_zoom / 2 + 3) / ax_points if atlases else 0.12 / n_rows
        for e in sorted(self.edges, key=lambda e: e["weight"]):
            if e["weight"] < min_weight:
                continue
            (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
            cmap = reds if e["gig"] < 0 else blues
            ax.plot([x0, x1], [y0 - dy, y1 + dy], color=cmap(0.25 + 0.75 * e["weight"]),
                    linewidth=0.3 + 4.0 * e["weight"], alpha=0.35 + 0.65 * e["weight"], zorder=1, solid_capstyle="round")
        for r, layer in enumerate([CLASS_LAYER] + self.layers[::-1]):
            ax.text(-0.075, (r + 0.5) / n_rows, "classes" if layer == CLASS_LAYER else layer, fontsize=8,
                    ha="left", va="center", color="#444", fontweight="bold")
        for n in self.nodes:
            x, y = pos[n["id"]]
            atlas = atlases.get(n["layer"])
            edge = "#e08a00" if n["shared"] else ("#23407a" if n["kind"] == "class" else "#555")
            if atlas is not None and n["concept"] in atlas.entries:
                box = AnnotationBbox(OffsetImage(atlas.thumbnail(n["concept"]), zoom=thumbnail_zoom), (x, y), frameon=True,
                                     pad=0.15, bboxprops={"edgecolor": edge, "linewidth": 2.0 if n["shared"] else 0.8})
                box.set_zorder(3)
                ax.add_artist(box)
                ax.text(x + dy * figsize[1] / figsize[0] + 0.004, y + dy, f"#{n['concept']}", ha="left", va="bottom",
                        fontsize=6.5, zorder=4)
            else:
                label = n["name"] if n["kind"] == "class" else f"#{n['concept']}"
                ax.text(x, y, label, ha="center", va="center", fontsize=7.5, zorder=4,
                        bbox={"boxstyle": "round,pad=0.35", "fc": "#e8eef8" if n["kind"] == "class" else "white",
                              "ec": edge, "lw": 2.0 if n["shared"] else 0.8})
        if title is None:
            names = [self.node(CLASS_LAYER, c)["name"] for c in self.targets]
            title = "Concept graph for " + " & ".join(names)
            if len(self.targets) > 1:
                title += "  (orange frame: shared concepts)"
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        if path is not None:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, ".tmp-" + os.path.basename(path))
            fig.savefig(tmp, dpi=dpi, format="png")
            os.replace(tmp, path)
        return fig

    def to_html(
        self,
        path: Optional[str] = None,
        atlases=None,
        *,
        title: Optional[str] = None,
        node_size: int = 56,
        min_weight: float = 0.0,
        n_edges_listed: int = 5,
    ) -> str:
        r"""A self-contained interactive page (plain SVG + a little JS, no CDN, works offline).

        The layered graph with concept thumbnails; hover a node for its
        relevance scores (and an edge for its GIG); click a node to see its
        atlas (the iERF crops of its nearest PFVs) and its strongest incoming
        and outgoing edges; a slider hides edges weaker than a threshold.

        Args:
            path (str, optional): write the page (atomically) when given.
            atlases (dict or list of ConceptAtlas, optional): per layer.
            title (str, optional): page title.
            node_size (int, optional): thumbnail side in pixels. Default: 56
            min_weight (float, optional): initial edge-strength filter. Default: 0
            n_edges_listed (int, optional): edges listed per direction. Default: 5

        Returns:
            str: the HTML text.
        """
        from importlib import resources

        from .atlas import png_data_uri

        atlases = self._atlas_of(atlases)
        pos = self.positions()
        n_rows = len(self.layers) + 1
        widest = max(sum(1 for n in self.nodes if n["layer"] == layer) for layer in [CLASS_LAYER] + self.layers)
        gap = int(node_size * 2.2) + 20
        width = int(110 + widest * (node_size + 28))
        height = int(n_rows * gap + 20)
        label_of = {}
        for c in self.targets:
            label_of[str(c)] = self.node(CLASS_LAYER, c)["name"]
        nodes, atlas_data = [], {}
        for n in self.nodes:
            x, y = pos[n["id"]]
            item = {k: n[k] for k in ("id", "layer", "concept", "kind", "name", "scores", "classes", "shared")}
            item["x"] = round(100 + x * (width - 110), 2)
            item["y"] = round(10 + y * (height - 20), 2)
            atlas = atlases.get(n["layer"])
            if atlas is not None and n["concept"] in atlas.entries:
                item["thumbnail"] = png_data_uri(atlas.thumbnail(n["concept"]))
                atlas_data[n["id"]] = [
                    {"src": png_data_uri(crop), "cosine": e["cosine"],
                     "caption": e["class_name"] or (f"label {e['label']}" if e["label"] >= 0 else f"image {e['image']}")}
                    for crop, e in zip(atlas.crops[n["concept"]], atlas.entries[n["concept"]])
                ]
            nodes.append(item)
        rows = [{"label": "classes" if layer == CLASS_LAYER else layer, "y": round(10 + (r + 0.5) / n_rows * (height - 20), 2)}
                for r, layer in enumerate([CLASS_LAYER] + self.layers[::-1])]
        data = {
            "nodes": nodes, "edges": self.edges, "atlas": atlas_data, "layer_rows": rows, "width": width,
            "height": height, "node_size": node_size, "class_label": label_of, "n_edges_listed": n_edges_listed,
        }
        if title is None:
            title = "Concept graph: " + " & ".join(label_of[str(c)] for c in self.targets)
        assets = resources.files("captum_gig") / "_html"
        template = (assets / "graph.html").read_text(encoding="utf-8")
        css = (assets / "graph.css").read_text(encoding="utf-8")
        js = (assets / "graph.js").read_text(encoding="utf-8")
        payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
        import html as _html

        page = (
            template.replace("__CSS__", css)
            .replace("__JS__", js)
            .replace("__MIN_WEIGHT__", f"{float(min_weight):.2f}")
            .replace("__TITLE__", _html.escape(title))
            .replace("__DATA__", payload)
        )
        if path is not None:
            atomic_write_text(path, page)
        return page
