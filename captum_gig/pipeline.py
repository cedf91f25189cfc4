r"""The GIG pipeline over a dataset, as a Python API (the ``captum-gig`` CLI is argument parsing over it).

A :class:`Config` holds the settings; a :class:`Pipeline` runs the stages
into one output folder, each writing its artifacts (safetensors with JSON
metadata) and a marker with the fingerprint of the settings it depends on.
A stage whose artifacts exist for the same settings is skipped, so running
again after an interruption only computes what is missing. The folder
format is the same whether the stages run from Python or from the shell.

Stages (:meth:`Pipeline.run` does them all, in order)::

    extract    PFVs of every layer (pfvs/<layer>.safetensors) and the predictions
    fit        concept bases (bases/<layer>.safetensors)
    decompose  Lasso coefficients and rel-l2 / l0 ratio (coefficients/, decomposition.json)
    attribute  GIG between consecutive layers and to classes, averaged per class (attribution/)
    graph      concept atlases and ConceptGraphs (JSON, PNG, HTML) for a class, an image, a class pair
    evaluate   C-Deletion / C-Insertion and inter-layer deletion curves (evaluation/)

Examples::

    >>> from captum_gig import pipeline
    >>> cfg = pipeline.Config(model="fashion-mnist-cnn", data="fashion-mnist", layers=["block1", "block2", "block3"])
    >>> pipe = pipeline.run(cfg, out="out")          # every stage, then out/index.html
    >>> pipe = pipeline.Pipeline(cfg, out="out")
    >>> pipe.extract(); pipe.fit()                   # or stage by stage (each resumes)
    >>> basis = pipe.basis("block2")                 # artifacts back as library objects
"""

import dataclasses
import difflib
import hashlib
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import distributed as _dist
from ._io import atomic_write_text, load_artifact, save_artifact
from ._sources import (NORMALIZATIONS, Batches, ImageData, PipelineError, default_normalize, default_size, load_model,
                       safe_name)
from ._version import __version__

__all__ = ["Config", "Pipeline", "PipelineError", "run", "load_coefficients", "load_class_attribution", "STAGES"]

STAGES = ["extract", "fit", "decompose", "attribute", "graph", "evaluate"]

@dataclasses.dataclass
class Config:
    r"""Settings of a pipeline run (the CLI's options; ``None`` values are filled from the model and data).

    Attributes (model and data):
        model (str): ``efficientnet-lite0``, ``fashion-mnist-cnn``,
                    ``torchvision:<name>`` or ``module:<file.py or module>:<callable>``.
        weights (str): torchvision weights name (downloads), ``"none"`` for random weights.
        data (str): an ImageFolder, ``"photos"`` (bundled real photos) or ``"fashion-mnist"``.
        split (str): Fashion-MNIST split. layers (list of str): dotted layer names, early to late.
        limit, augment, image_size, normalize, by, seed, batch_size: as the CLI's options.

    The remaining attributes are the stages' settings, documented with the CLI
    options of the same name (``captum-gig run --help``).
    """

    model: Optional[str] = None
    weights: Optional[str] = None
    data: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None
    augment: int = 0
    image_size: Optional[int] = None
    normalize: Optional[str] = None
    layers: Optional[List[str]] = None
    by: str = "prediction"
    seed: int = 0
    sampling: str = "relevance"
    per_image: int = 8
    concepts: Optional[int] = None
    concept_factor: int = 8
    min_members: int = 8
    offset: str = "auto"
    extractor: str = "bisecting"
    alpha: float = 0.1
    n_steps: int = 16
    output: str = "logit"
    classes: Optional[List[str]] = None
    class_layers: str = "last"
    graph: Optional[List[str]] = None
    top_k: int = 5
    atlas_top: int = 6
    atlas_images: int = 2000
    ierf: str = "ig"
    eval_steps: int = 10
    eval_images: int = 16
    batch_size: int = 16

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: Dict[str, Any]) -> "Config":
        """A config from a settings dict (unknown keys are an error)."""
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise PipelineError(f"unknown settings {unknown}; known: {sorted(DEFAULTS)}")
        return cls(**settings)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def resolved(self) -> "Config":
        """The config with the defaults that depend on the model and data filled in, checked."""
        s = self.as_dict()
        if s.get("model"):
            if s.get("normalize") is None:
                s["normalize"] = default_normalize(s["model"])
            if s.get("image_size") is None:
                s["image_size"] = default_size(s["model"], str(s.get("data")))
        for key in POSITIVE_SETTINGS:
            v = s.get(key)
            if v is not None and (key == "augment" and v < 0 or key != "augment" and v < 1):
                raise PipelineError(f"--{key.replace('_', '-')} must be {'>= 0' if key == 'augment' else 'positive'}; got {v}")
        for spec in s.get("graph") or []:  # syntax only (classes and images are checked when the graph is drawn)
            kind, _, value = str(spec).partition(":")
            ok = spec == "auto" or (kind == "class" and value) or (kind == "image" and value.isdigit()) or \
                (kind == "pair" and len([v for v in value.split(",") if v.strip()]) == 2)
            if not ok:
                raise PipelineError(f"--graph {spec!r}: expected class:<index or name>, pair:<a>,<b>, image:<index> or auto")
        if s.get("data") and s["data"] not in ("photos", "fashion-mnist"):
            s["data"] = os.path.abspath(s["data"])
        return Config(**s)


#: every setting and its default
DEFAULTS: Dict[str, Any] = Config().as_dict()

#: integer settings that must be positive (``augment``: >= 0)
POSITIVE_SETTINGS = ("limit", "augment", "per_image", "concepts", "concept_factor", "min_members", "n_steps", "top_k",
                     "atlas_top", "atlas_images", "eval_steps", "eval_images", "batch_size", "image_size")

#: the settings each stage depends on (its own and those of the stages before it)
STAGE_KEYS: Dict[str, List[str]] = {
    "extract": ["model", "weights", "data", "split", "limit", "augment", "image_size", "normalize", "layers", "by",
                "seed", "sampling", "per_image"],
    "fit": ["concepts", "concept_factor", "min_members", "offset", "extractor"],
    "decompose": ["alpha"],
    "attribute": ["n_steps", "output", "classes", "class_layers"],
    "graph": ["graph", "top_k", "atlas_top", "atlas_images", "ierf"],
    "evaluate": ["eval_steps", "eval_images"],
}
STAGE_DEPENDS = {"extract": [], "fit": ["extract"], "decompose": ["fit"], "attribute": ["decompose"],
                 "graph": ["attribute"], "evaluate": ["attribute"]}

DEMO_SETTINGS: Dict[str, Any] = {
    "model": "efficientnet-lite0",
    "data": "photos",
    "augment": 0,
    "image_size": 160,
    "layers": ["_blocks.9", "_blocks.12", "_blocks.15"],
    "per_image": 16,
    "concept_factor": 8,
    "min_members": 12,
    "n_steps": 6,
    "top_k": 4,
    "atlas_top": 4,
    "ierf": "ixg",
    "eval_steps": 8,
    "eval_images": 4,
    "batch_size": 13,
}



# ============================================================================ small helpers


def _fingerprint(settings: Dict[str, Any], stage: str) -> str:
    keys: List[str] = []
    todo = [stage]
    while todo:
        s = todo.pop()
        keys += STAGE_KEYS[s]
        todo += STAGE_DEPENDS[s]
    picked = {k: settings.get(k) for k in sorted(set(keys))}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj: Any) -> None:
    if _dist.is_main_process():
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ============================================================================ the run context


class Pipeline:
    r"""One output folder of the GIG pipeline: its settings, model, data and stages.

    Args:
        config (Config or dict): the settings.
        out (str): the output folder (created; artifacts of earlier runs with
                    the same settings are reused).
        device (str, optional): torch device. Default: ``"cuda"`` if
                    available, else ``"cpu"``
        quiet (bool, optional): no progress bars or log lines. Default: False
        force (bool, optional): recompute stages whose artifacts exist. Default: False
        command (list of str, optional): the command line, for the manifest.

    Examples::

        >>> pipe = Pipeline(Config(model="fashion-mnist-cnn", data="fashion-mnist", layers=["block1", "block2"]), "out")
        >>> pipe.run()                 # extract, fit, decompose, attribute, graph, evaluate, report
        >>> pipe.decomposer("block2")  # a stage's artifacts as library objects
    """

    def __init__(self, config: Any, out: str, *, device: Optional[str] = None, quiet: bool = False,
                 force: bool = False, command: Optional[List[str]] = None):
        if isinstance(config, dict):
            config = Config.from_dict(config)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a pipeline.Config or a dict of settings; got {type(config).__name__}")
        self.config = config.resolved()
        self.s = self.config.as_dict()
        self.out = os.path.abspath(out)
        self.quiet = quiet
        self.progress = not quiet
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.force = force
        self.command = command or []
        self._model: Optional[nn.Module] = None
        self._data: Optional["ImageData"] = None
        self._n_classes: Optional[int] = None
        self.timings: Dict[str, Dict[str, Any]] = {}
        self.artifacts: Dict[str, List[str]] = {}
        self.started = time.time()

    # -- output ------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def log(self, message: str) -> None:
        if not self.quiet and _dist.is_main_process():
            print(f"[captum-gig] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if _dist.is_main_process():
            print(f"captum-gig: warning: {message}", file=sys.stderr, flush=True)

    # -- model and data ----------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        if self._model is None:
            if not self.s.get("model"):
                raise PipelineError("--model is required (e.g. efficientnet-lite0, torchvision:resnet50, module:file.py:build)")
            self.log(f"model {self.s['model']}" + (f" (weights {self.s['weights']})" if self.s.get("weights") else ""))
            self._model = load_model(self.s["model"], self.s.get("weights")).to(self.device).eval()
        return self._model

    @property
    def data(self) -> "ImageData":
        if self._data is None:
            if not self.s.get("data"):
                raise PipelineError("--data is required (an ImageFolder directory, 'photos' or 'fashion-mnist')")
            self._data = ImageData.open(self.s, self.in_channels, log=self.log, warn=self.warn)
            self.log(f"data {self.s['data']}: {len(self._data)} images"
                     + (f" ({self._data.skipped} unreadable skipped)" if self._data.skipped else ""))
        return self._data

    @property
    def in_channels(self) -> int:
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return 3

    @property
    def n_classes(self) -> int:
        if self._n_classes is None:
            with torch.no_grad():
                out = self.model(self.data.get(range(1)).to(self.device))
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise PipelineError(f"the model must return (N, classes) scores; it returned {getattr(out, 'shape', type(out))}")
            self._n_classes = out.shape[1]
        return self._n_classes

    def class_names(self) -> List[str]:
        n = self.n_classes
        model = str(self.s.get("model") or "")
        if n == 1000 and (model.startswith("torchvision:") or model == "efficientnet-lite0"):
            from .zoo import imagenet_categories

            return imagenet_categories()
        if model == "fashion-mnist-cnn" or str(self.s.get("data")) == "fashion-mnist":
            from .zoo import FASHION_MNIST_CLASSES

            if n == len(FASHION_MNIST_CLASSES):
                return list(FASHION_MNIST_CLASSES)
        names = self.data.class_names
        if names is not None and len(names) == n:
            return list(names)
        return [f"class {i}" for i in range(n)]

    def layers(self) -> List[str]:
        layers = self.s.get("layers")
        if not layers:
            raise PipelineError("--layers is required (dotted module names, early to late; see --list-layers)")
        from ._hooks import resolve_layer

        names = dict(self.model.named_modules())
        for layer in layers:
            if layer not in names or not layer:
                try:
                    resolve_layer(self.model, layer, "--layers")
                except ValueError as err:
                    raise PipelineError(f"{err} (captum-gig --list-layers shows them all)") from None
        if len(set(layers)) != len(layers):
            raise PipelineError(f"--layers lists a layer twice: {layers}")
        return list(layers)

    def batches(self, indices: Optional[Sequence[int]] = None, labels: bool = True) -> "Batches":
        return Batches(self.data, int(self.s["batch_size"]), self.device, indices=indices, labels=labels)

    # -- stage bookkeeping -------------------------------------------------------------
    def _marker(self, stage: str) -> str:
        return self.path(".state", f"{stage}.json")

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished before with the same settings and its artifacts are all there."""
        if self.force or not os.path.isfile(self._marker(stage)):
            return False
        try:
            marker = _read_json(self._marker(stage))
        except (OSError, ValueError):
            return False
        if marker.get("fingerprint") != _fingerprint(self.s, stage):
            return False
        return all(os.path.isfile(self.path(p)) for p in marker.get("artifacts", []))

    def stage(self, name: str) -> None:
        """Run stage ``name`` (and the stages it depends on) unless its artifacts are up to date."""
        for dep in STAGE_DEPENDS[name]:
            if dep not in self.timings and not self.done(dep):
                self.stage(dep)
        if name in self.timings:
            return
        if self.done(name):
            marker = _read_json(self._marker(name))
            self.timings[name] = {"status": "resumed", "seconds": 0.0}
            self.artifacts[name] = marker.get("artifacts", [])
            self.log(f"{name}: up to date, resumed from {len(self.artifacts[name])} artifacts")
            return
        self.log(f"{name} ...")
        torch.manual_seed(int(self.s.get("seed") or 0))  # each stage reproducible on its own (resumes equal full runs)
        t0 = time.perf_counter()
        produced = STAGE_FUNCTIONS[name](self)
        seconds = time.perf_counter() - t0
        rel = [os.path.relpath(p, self.out) for p in produced]
        _dist.barrier()
        _write_json(self._marker(name), {"fingerprint": _fingerprint(self.s, name), "artifacts": rel, "seconds": seconds})
        self.write_config()
        self.timings[name] = {"status": "computed", "seconds": round(seconds, 3)}
        self.artifacts[name] = rel
        self.log(f"{name}: done in {seconds:.1f} s")
        self.write_manifest()

    def write_config(self) -> None:
        """Remember the settings (after a stage succeeded, so that a failed call leaves none behind)."""
        _write_json(self.path("config.json"), {"captum_gig_version": __version__, "settings": self.s})

    def write_manifest(self) -> str:
        import captum
        import torchvision

        path = self.path("manifest.json")
        previous: Dict[str, Any] = {}
        if os.path.isfile(path):
            try:
                previous = _read_json(path)
            except (OSError, ValueError):
                previous = {}
        stages = dict(previous.get("stages", {}))
        for name, t in self.timings.items():
            stages[name] = dict(t, artifacts=self.artifacts.get(name, []))
        manifest = {
            "captum_gig_version": __version__,
            "command": self.command,
            "settings": self.s,
            "seed": self.s.get("seed"),
            "device": str(self.device),
            "world_size": _dist.world_size(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "captum": captum.__version__,
                "captum_gig": __version__,
            },
            "stages": stages,
            "this_invocation": {k: v for k, v in self.timings.items()},
            "total_seconds": round(time.time() - self.started, 3),
        }
        _write_json(path, manifest)
        return path


    # -- the stages, one method each -----------------------------------------------------
    def extract(self) -> None:
        """PFVs of every layer (``pfvs/``) and the model's predictions over the data."""
        self.stage("extract")

    def fit(self) -> None:
        """A concept basis per layer (``bases/``)."""
        self.stage("fit")

    def decompose(self) -> None:
        """Sparse coefficients of the PFVs, rel-l2 and l0 ratio (``coefficients/``, ``decomposition.json``)."""
        self.stage("decompose")

    def attribute(self) -> None:
        """GIG to classes and between consecutive layers, averaged per class (``attribution/``)."""
        self.stage("attribute")

    def graph(self) -> None:
        """Concept atlases and ConceptGraphs (``atlas/``, ``graphs/``)."""
        self.stage("graph")

    def evaluate(self) -> None:
        """Deletion / insertion curves and their AUCs (``evaluation/``)."""
        self.stage("evaluate")

    def report(self) -> str:
        """Write ``index.html`` over what the folder holds; returns its path."""
        from .report import write_report

        return write_report(self)

    def run(self, stages: Optional[Sequence[str]] = None, report: bool = True) -> "Pipeline":
        """Every stage (or ``stages``) in order, resuming from what exists, then the report."""
        for name in stages or STAGES:
            if name not in STAGE_FUNCTIONS:
                raise PipelineError(f"unknown stage {name!r}; stages are {STAGES}")
            self.stage(name)
        if report:
            self.report_path = self.report()
        self.write_manifest()
        return self

    # -- artifacts as library objects ------------------------------------------------------
    def pfvs(self, layer: str):
        """The :class:`~captum_gig.PFVSet` of ``layer`` collected by ``extract``."""
        from .pfv import PFVSet

        return PFVSet.load(_pfv_path(self, layer), device=str(self.device))

    def basis(self, layer: str):
        """The :class:`~captum_gig.ConceptBasis` of ``layer`` fitted by ``fit``."""
        from .concepts import ConceptBasis

        return ConceptBasis.load(_basis_path(self, layer), device=str(self.device))

    def decomposer(self, layer: str):
        """The :class:`~captum_gig.PFVDecomposer` of ``layer`` (its basis with the fitted alpha)."""
        return _decomposer(self, layer)

    def class_attribution(self, layer: str):
        """The per-class mean GIG of ``layer``'s concepts to the classes (``attribute``)."""
        return load_class_attribution(_class_attr_path(self, layer))


def run(config: Any, out: str, **kwargs: Any) -> Pipeline:
    """Run every stage of the pipeline into ``out`` and write its report; returns the :class:`Pipeline`.

    ``kwargs`` go to :class:`Pipeline` (``device``, ``quiet``, ``force``).
    """
    return Pipeline(config, out, **kwargs).run()


# ============================================================================ stages


def _pfv_path(run: Pipeline, layer: str) -> str:
    return run.path("pfvs", f"{safe_name(layer)}.safetensors")


def _basis_path(run: Pipeline, layer: str) -> str:
    return run.path("bases", f"{safe_name(layer)}.safetensors")


def _coef_path(run: Pipeline, layer: str) -> str:
    return run.path("coefficients", f"{safe_name(layer)}.safetensors")


def _class_attr_path(run: Pipeline, layer: str) -> str:
    return run.path("attribution", "class", f"{safe_name(layer)}.safetensors")


def _inter_path(run: Pipeline, a: str, b: str) -> str:
    return run.path("attribution", "interlayer", f"{safe_name(a)}--{safe_name(b)}.safetensors")


def _save(path: str, kind: str, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> str:
    if _dist.is_main_process():
        save_artifact(path, kind, tensors, meta)
    return path


def stage_extract(run: Pipeline) -> List[str]:
    from .pfv import collect_pfvs

    layers = run.layers()
    data = run.data
    produced = []
    # predictions over the data: used to pick classes, the most confident image and a class pair
    preds, confs = [], []
    from tqdm.auto import tqdm

    with torch.no_grad():
        for batch in tqdm(run.batches(labels=False), desc="predictions", unit="batch", disable=not run.progress):
            p = run.model(batch).softmax(1)
            c, i = p.max(1)
            preds.append(i.cpu())
            confs.append(c.cpu())
    pred = torch.cat(preds)
    labels = data.labels if data.labels is not None else torch.full_like(pred, -1)
    produced.append(_save(run.path("predictions.safetensors"), "Predictions",
                          {"prediction": pred, "confidence": torch.cat(confs), "labels": labels},
                          {"names": data.names, "n_images": len(data)}))
    target = "label" if run.s["by"] == "label" else None
    if target == "label" and data.labels is None:
        raise PipelineError("--by label needs labelled data (an ImageFolder with class sub-folders, or fashion-mnist)")
    for layer in layers:
        pfvs = collect_pfvs(run.model, layer, run.batches(), sampling=run.s["sampling"], per_image=int(run.s["per_image"]),
                            target=target, batch_size=int(run.s["batch_size"]), seed=int(run.s["seed"]), progress=run.progress)
        path = _pfv_path(run, layer)
        if _dist.is_main_process():
            pfvs.save(path)
        produced.append(path)
        run.log(f"  {layer}: {len(pfvs)} PFVs of {pfvs.n_channels} channels, grid {pfvs.spatial_shape}")
    _write_json(run.path("data.json"), {
        "source": run.s["data"], "n_images": len(data), "names": data.names,
        "labels": data.labels.tolist() if data.labels is not None else None,
        "class_names": data.class_names, "skipped_unreadable": data.skipped, "skipped_files": data.skipped_files,
    })
    produced.append(run.path("data.json"))
    return produced


def _offset_for(run: Pipeline, layer: str):
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


def stage_fit(run: Pipeline) -> List[str]:
    from .concepts import ConceptBasis
    from .decompose import alpha_max
    from .pfv import PFVSet

    produced = []
    for layer in run.layers():
        pfvs = PFVSet.load(_pfv_path(run, layer), device=str(run.device))
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
        path = _basis_path(run, layer)
        if _dist.is_main_process():
            basis.save(path)
        produced.append(path)
        run.log(f"  {layer}: {k} concepts, alpha {alpha:.4g}")
    return produced


def _decomposer(run: Pipeline, layer: str):
    from .concepts import ConceptBasis
    from .decompose import PFVDecomposer

    basis = ConceptBasis.load(_basis_path(run, layer), device=str(run.device))
    return PFVDecomposer(basis, alpha=float(basis.meta["alpha"]))


def stage_decompose(run: Pipeline) -> List[str]:
    from .pfv import PFVSet

    produced, summary = [], {}
    for layer in run.layers():
        dec = _decomposer(run, layer)
        pfvs = PFVSet.load(_pfv_path(run, layer), device=str(run.device))
        dec.progress = run.progress
        U = dec.transform(pfvs.vectors, distributed=True)  # each rank solves its share of the chunks
        from .decompose import DecompositionScore
        from .metrics import l0_ratio, relative_l2

        score = DecompositionScore(rel_l2=float(relative_l2(pfvs.vectors, dec.inverse_transform(U))),
                                   l0_ratio=float(l0_ratio(U)))  # from U: no second solve
        nz = U.nonzero()
        path = _save(_coef_path(run, layer), "SparseCoefficients",
                     {"indices": nz, "values": U[nz[:, 0], nz[:, 1]]},
                     {"layer": layer, "shape": list(U.shape), "rel_l2": score.rel_l2, "l0_ratio": score.l0_ratio})
        produced.append(path)
        summary[layer] = {"n_pfvs": len(pfvs), "n_channels": pfvs.n_channels, "n_concepts": dec.n_concepts,
                          "alpha": dec.alpha, "rel_l2": score.rel_l2, "l0_ratio": score.l0_ratio}
        run.log(f"  {layer}: rel-l2 {score.rel_l2:.3f}, l0 ratio {score.l0_ratio:.3f}")
    _write_json(run.path("decomposition.json"), summary)
    produced.append(run.path("decomposition.json"))
    return produced


def load_coefficients(path: str) -> Tensor:
    """The dense ``(N, K)`` coefficients stored by ``decompose``."""
    tensors, meta = load_artifact(path, "SparseCoefficients")
    U = torch.zeros(meta["shape"], dtype=tensors["values"].dtype)
    U[tensors["indices"][:, 0], tensors["indices"][:, 1]] = tensors["values"]
    return U


def _save_class_attribution(path: str, result, meta: Dict[str, Any]) -> str:
    return _save(path, "ClassAttribution", {"classes": result.classes, "mean": result.mean, "counts": result.counts}, meta)


def load_class_attribution(path: str):
    """A ``ClassAttribution`` written by ``attribute``."""
    from .aggregate import ClassAttribution

    tensors, _ = load_artifact(path, "ClassAttribution")
    return ClassAttribution(tensors["classes"], tensors["mean"], tensors["counts"])


def _classes_arg(run: Pipeline) -> Optional[List[int]]:
    classes = run.s.get("classes")
    if not classes:
        return None
    return [_class_index(run, c) for c in classes]


def _class_index(run: Pipeline, spec: Any) -> int:
    names = run.class_names()
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        c = int(text)
        if not 0 <= c < len(names):
            raise PipelineError(f"class {c} is out of range: the model has {len(names)} classes")
        return c
    if text in names:
        return names.index(text)
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise PipelineError(f"unknown class {text!r}{hint}")


def stage_attribute(run: Pipeline) -> List[str]:
    from . import aggregate

    layers = run.layers()
    by = run.s["by"]
    classes = _classes_arg(run)
    decs = {layer: _decomposer(run, layer) for layer in layers}
    produced = []
    class_layers = layers if run.s["class_layers"] == "all" else layers[-1:]
    for layer in class_layers:
        run.log(f"  GIG of {layer}'s concepts to classes")
        result = aggregate.class_attribution(run.model, layer, decs[layer], run.batches(), by=by, classes=classes,
                                             n_steps=int(run.s["n_steps"]), output=run.s["output"],
                                             batch_size=int(run.s["batch_size"]), progress=run.progress)
        produced.append(_save_class_attribution(_class_attr_path(run, layer), result,
                                                {"layer": layer, "by": by, "output": run.s["output"]}))
    for a, b in zip(layers[:-1], layers[1:]):
        run.log(f"  GIG of {a}'s concepts to {b}'s concepts")
        result = aggregate.interlayer_attribution(run.model, a, decs[a], b, decs[b], run.batches(), by=by,
                                                  classes=classes, n_steps=int(run.s["n_steps"]),
                                                  batch_size=int(run.s["batch_size"]), progress=run.progress)
        produced.append(_save_class_attribution(_inter_path(run, a, b), result, {"layer_a": a, "layer_b": b, "by": by}))
    return produced


# -- graph ---------------------------------------------------------------------------------


def _predictions(run: Pipeline) -> Dict[str, Tensor]:
    tensors, _ = load_artifact(run.path("predictions.safetensors"), "Predictions")
    return tensors


def _class_counts(run: Pipeline) -> Tuple[Tensor, Tensor]:
    """``(classes, counts)`` of the class attribution of the last layer, most frequent first."""
    ca = load_class_attribution(_class_attr_path(run, run.layers()[-1]))
    order = sorted(range(len(ca.classes)), key=lambda i: (-int(ca.counts[i]), int(ca.classes[i])))
    return ca.classes[order], ca.counts[order]


def _auto_targets(run: Pipeline) -> List[str]:
    preds = _predictions(run)
    classes, counts = _class_counts(run)
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


def _parse_graph_spec(run: Pipeline, spec: str) -> Tuple[str, Any]:
    kind, _, value = spec.partition(":")
    if kind == "class" and value:
        return "class", _class_index(run, value)
    if kind == "pair" and "," in value:
        a, b = value.split(",", 1)
        ca, cb = _class_index(run, a), _class_index(run, b)
        if ca == cb:
            raise PipelineError(f"--graph {spec!r}: a pair needs two different classes")
        return "pair", (ca, cb)
    if kind == "image" and value.isdigit():
        i = int(value)
        if not 0 <= i < len(run.data):
            raise PipelineError(f"--graph {spec!r}: image index out of range (the data has {len(run.data)} images)")
        return "image", i
    raise PipelineError(f"--graph {spec!r}: expected class:<index or name>, pair:<a>,<b>, image:<index> or auto")


def _row(ca, c: int, what: str) -> int:
    hits = (ca.classes == c).nonzero()
    if len(hits) == 0:
        raise PipelineError(f"no image of class {c} in the data for {what} (classes present: {ca.classes.tolist()})")
    return int(hits[0, 0])


def _display(run: Pipeline) -> Callable[[Tensor], Tensor]:
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


def _build_atlases(run: Pipeline, concepts: Dict[str, List[int]]) -> Tuple[Dict[str, Any], List[str]]:
    """Concept atlases of the concepts shown in the graphs (iERF crops of their nearest PFVs)."""
    from .atlas import ConceptAtlas
    from .concepts import ConceptBasis
    from .pfv import PFVSet

    atlases, produced = {}, []
    data = run.data
    names = run.class_names()
    n = min(len(data), int(run.s["atlas_images"]))
    images = data.get(range(n)).to(run.device)
    preds = _predictions(run)
    for layer in run.layers():
        if not concepts.get(layer):
            continue
        pfvs = PFVSet.load(_pfv_path(run, layer), device=str(run.device))
        if n < len(data):
            pfvs = pfvs[pfvs.image_index < n]
        basis = ConceptBasis.load(_basis_path(run, layer), device=str(run.device))
        atlas = ConceptAtlas.build(run.model, layer, basis, pfvs, images, top_k=int(run.s["atlas_top"]),
                                   labels=preds["prediction"][:n].to(run.device), class_names=names,
                                   concepts=sorted(concepts[layer]), **_ierf_method(run.s["ierf"]),
                                   display=_display(run), progress=run.progress)
        folder = run.path("atlas", safe_name(layer))
        if _dist.is_main_process():
            atlas.save(folder)
        produced += _files_under(folder)
        atlases[layer] = atlas
    return atlases, produced


def _files_under(folder: str) -> List[str]:
    out = []
    for dirpath, _d, files in os.walk(folder):
        out += [os.path.join(dirpath, f) for f in sorted(files) if not f.startswith(".tmp-") and not f.endswith(".tmp")]
    return out


def stage_graph(run: Pipeline) -> List[str]:
    from .graph import ConceptGraph

    layers = run.layers()
    specs = run.s.get("graph") or ["auto"]
    if "auto" in specs:
        specs = [s for s in specs if s != "auto"] + _auto_targets(run)
    names = run.class_names()
    ca = load_class_attribution(_class_attr_path(run, layers[-1]))
    inter = [load_class_attribution(_inter_path(run, a, b)) for a, b in zip(layers[:-1], layers[1:])]
    top_k = int(run.s["top_k"])
    graphs = []
    for spec in dict.fromkeys(specs):
        kind, value = _parse_graph_spec(run, spec)
        if kind == "class":
            r = _row(ca, value, spec)
            rows = [_row(ia, value, spec) for ia in inter]
            graph = ConceptGraph.from_attributions(layers, ca.mean[r], [ia.mean[j] for ia, j in zip(inter, rows)],
                                                   target=value, top_k=top_k, class_names=names)
            stem, title = f"class_{value}", f"class {names[value]}"
        elif kind == "pair":
            a, b = value
            ra, rb = _row(ca, a, spec), _row(ca, b, spec)
            # concepts shared by two classes: each class's row, the inter-layer GIG averaged over both classes' images
            inter_ab = []
            for ia in inter:
                ja, jb = _row(ia, a, spec), _row(ia, b, spec)
                na, nb = float(ia.counts[ja]), float(ia.counts[jb])
                inter_ab.append((ia.mean[ja] * na + ia.mean[jb] * nb) / max(na + nb, 1.0))
            graph = ConceptGraph.from_attributions(layers, torch.stack([ca.mean[ra], ca.mean[rb]]), inter_ab,
                                                   target=(a, b), top_k=top_k, class_names=names)
            stem, title = f"pair_{a}_{b}", f"classes {names[a]} and {names[b]}"
        else:
            image = run.data.get([value]).to(run.device)
            with torch.no_grad():
                c = int(run.model(image).argmax(1))
            decs = [_decomposer(run, layer) for layer in layers]
            graph = ConceptGraph.build(run.model, layers, decs, image, target=c, top_k=top_k,
                                       n_steps=int(run.s["n_steps"]), output=run.s["output"], class_names=names,
                                       progress=run.progress)
            stem, title = f"image_{value}", f"image {run.data.names[value]} (predicted {names[c]})"
        graphs.append((spec, stem, title, graph))
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
        index.append({"spec": spec, "title": title, **{k: os.path.relpath(v, run.out) for k, v in paths.items()}})
        run.log(f"  graph for {title}: {paths['html']}")
    _write_json(run.path("graphs", "index.json"), index)
    produced.append(run.path("graphs", "index.json"))
    return produced


def _close_figures() -> None:
    try:
        import matplotlib.pyplot as plt

        plt.close("all")
    except ImportError:
        pass


# -- evaluate ------------------------------------------------------------------------------


def stage_evaluate(run: Pipeline) -> List[str]:
    from . import metrics

    layers = run.layers()
    preds = _predictions(run)
    classes, _counts = _class_counts(run)
    c = int(classes[0])
    key = "prediction" if run.s["by"] == "prediction" else "labels"
    idx = (preds[key] == c).nonzero().flatten()[: int(run.s["eval_images"])].tolist()
    images = run.data.get(idx).to(run.device)
    names = run.class_names()
    steps = int(run.s["eval_steps"])
    result: Dict[str, Any] = {"class": c, "class_name": names[c], "n_images": len(idx),
                              "decomposition": _read_json(run.path("decomposition.json"))}
    curves: Dict[str, Any] = {}
    last = layers[-1]
    dec_last = _decomposer(run, last)
    ca = load_class_attribution(_class_attr_path(run, last))
    importance = ca.mean[_row(ca, c, "evaluate")]
    for name, fn in (("c_deletion", metrics.concept_deletion), ("c_insertion", metrics.concept_insertion)):
        curve = fn(run.model, last, dec_last, images, c, importance=importance, steps=steps, output="prob",
                   batch_size=int(run.s["batch_size"]), progress=run.progress)
        curves[name] = {"layer": last, "fractions": curve.fractions.tolist(), "scores": curve.scores.tolist(), "auc": curve.auc}
        run.log(f"  {name} on {last}: AUC {curve.auc:.3f}")
    if len(layers) >= 2:
        a, b = layers[-2], layers[-1]
        dec_a = _decomposer(run, a)
        ia = load_class_attribution(_inter_path(run, a, b))
        target_concept = int(importance.argmax())
        inter_imp = ia.mean[_row(ia, c, "evaluate")][:, target_concept]
        for name, fn in (("interlayer_deletion", metrics.interlayer_deletion), ("interlayer_insertion", metrics.interlayer_insertion)):
            res = fn(run.model, a, dec_a, b, dec_last, images, target_concept, importance=inter_imp, steps=steps,
                     seed=int(run.s["seed"]))
            curves[name] = {
                "layer_a": a, "layer_b": b, "target_concept": target_concept,
                "fractions": res.gig.fractions.tolist(), "gig": res.gig.scores.tolist(), "random": res.random.scores.tolist(),
                "gig_auc": res.gig.auc, "random_auc": res.random.auc, "auc_difference": res.auc_difference,
            }
            run.log(f"  {name} {a} -> {b}: AUC GIG {res.gig.auc:.3f} vs random {res.random.auc:.3f}")
    result["curves"] = curves
    produced = []
    path = run.path("evaluation", "metrics.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, result)
    produced.append(path)
    png = run.path("evaluation", "curves.png")
    if _dist.is_main_process():
        _plot_curves(curves, png, names[c])
    produced.append(png)
    return produced


def _plot_curves(curves: Dict[str, Any], path: str, class_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("c_deletion", "c_insertion", "interlayer_deletion", "interlayer_insertion") if k in curves]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        cv = curves[key]
        if key.startswith("c_"):
            ax.plot(cv["fractions"], cv["scores"], marker="o", ms=3, label=f"GIG order (AUC {cv['auc']:.2f})")
            ax.set_ylabel(f"p({class_name})")
        else:
            ax.plot(cv["fractions"], cv["gig"], marker="o", ms=3, label=f"GIG (AUC {cv['gig_auc']:.2f})")
            ax.plot(cv["fractions"], cv["random"], ls="--", label=f"random (AUC {cv['random_auc']:.2f})")
            ax.set_ylabel(f"max projection on concept {cv['target_concept']}")
        ax.set_xlabel("fraction of concepts " + ("removed" if "deletion" in key else "inserted"))
        ax.set_title(key.replace("_", " ").replace("c ", "C-"), fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


STAGE_FUNCTIONS: Dict[str, Callable[[Pipeline], List[str]]] = {
    "extract": stage_extract,
    "fit": stage_fit,
    "decompose": stage_decompose,
    "attribute": stage_attribute,
    "graph": stage_graph,
    "evaluate": stage_evaluate,
}


