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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import distributed as _dist
from ._io import atomic_write_text
from ._artifacts import (basis_path, class_attr_path, coef_path, load_class_attribution, load_coefficients,
                         pfv_path)
from ._sources import Batches, ImageData, PipelineError, default_normalize, default_size, load_model
from ._version import __version__
from .decompose import SOLVERS

__all__ = ["Config", "Pipeline", "PipelineError", "run", "load_coefficients", "load_class_attribution", "STAGES"]

STAGES = ["extract", "fit", "decompose", "attribute", "graph", "evaluate"]

@dataclasses.dataclass
class Config:
    r"""Settings of a pipeline run (the CLI's options; ``None`` values are filled from the model and data).

    Attributes (model and data):
        model (str): ``efficientnet-lite0``, ``fashion-mnist-cnn``, ``torchvision:<name>``
        or ``module:<file.py or module>:<callable>``.
        weights (str): torchvision weights name (downloads), ``"none"`` for random weights.
        data (str): an ImageFolder, ``"photos"`` (bundled real photos) or ``"fashion-mnist"``.
        split (str): Fashion-MNIST split.
        layers (list of str): dotted layer names, early to late.
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
    solver: str = "auto"
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
    fit_data: Optional[str] = None
    fit_split: Optional[str] = None
    fit_limit: Optional[int] = None
    attribute_images: Optional[int] = None
    interlayer: str = "graph"
    interlayer_images: Optional[int] = 64
    eval_seeds: int = 1
    eval_interlayer_images: Optional[int] = None
    eval_pairs: str = "last"
    eval_targets: int = 3
    baselines: Optional[List[str]] = dataclasses.field(default_factory=lambda: ["endpoint", "magnitude"])
    diversity_top: int = 16

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
        for key, allowed in CHOICES.items():
            if s.get(key) not in allowed:
                raise PipelineError(f"--{key.replace('_', '-')} must be one of {list(allowed)}; got {s.get(key)!r}")
        from .baselines import ATTRIBUTIONS

        unknown = [b for b in s.get("baselines") or [] if b not in ATTRIBUTIONS]
        if unknown:
            raise PipelineError(f"--baselines {unknown}: known attributions are {sorted(ATTRIBUTIONS)}")
        for spec in s.get("graph") or []:  # syntax only (classes and images are checked when the graph is drawn)
            kind, _, value = str(spec).partition(":")
            ok = spec == "auto" or (kind == "class" and value) or (kind == "image" and value.isdigit()) or \
                (kind == "pair" and len([v for v in value.split(",") if v.strip()]) == 2)
            if not ok:
                raise PipelineError(f"--graph {spec!r}: expected class:<index or name>, pair:<a>,<b>, image:<index> or auto")
        for key in ("data", "fit_data"):
            if s.get(key) and s[key] not in ("photos", "fashion-mnist"):
                s[key] = os.path.abspath(s[key])
        return Config(**s)


#: every setting and its default
DEFAULTS: Dict[str, Any] = Config().as_dict()

#: integer settings that must be positive (``augment``: >= 0)
POSITIVE_SETTINGS = ("limit", "augment", "per_image", "concepts", "concept_factor", "min_members", "n_steps", "top_k",
                     "atlas_top", "atlas_images", "eval_steps", "eval_images", "batch_size", "image_size", "fit_limit",
                     "attribute_images", "interlayer_images", "eval_seeds", "eval_targets", "diversity_top",
                     "eval_interlayer_images")

#: settings with a fixed set of values
CHOICES = {"interlayer": ("graph", "all"), "solver": SOLVERS, "eval_pairs": ("last", "all"), "class_layers": ("last", "all"),
           "by": ("prediction", "label"), "output": ("logit", "prob")}

#: the settings each stage depends on (its own and those of the stages before it)
STAGE_KEYS: Dict[str, List[str]] = {
    "extract": ["model", "weights", "data", "split", "limit", "augment", "image_size", "normalize", "layers", "by",
                "seed", "sampling", "per_image", "fit_data", "fit_split", "fit_limit"],
    "fit": ["concepts", "concept_factor", "min_members", "offset", "extractor", "diversity_top"],
    "decompose": ["alpha", "solver"],
    "attribute": ["n_steps", "output", "classes", "class_layers", "attribute_images", "interlayer", "interlayer_images",
                  "graph", "top_k"],
    "graph": ["atlas_top", "atlas_images", "ierf"],
    "evaluate": ["eval_steps", "eval_images", "eval_seeds", "eval_pairs", "eval_targets", "baselines",
                 "eval_interlayer_images"],
}
STAGE_DEPENDS = {"extract": [], "fit": ["extract"], "decompose": ["fit"], "attribute": ["decompose"],
                 "graph": ["attribute"], "evaluate": ["attribute"]}




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
        self._fit_data: Optional["ImageData"] = None
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

    @property
    def has_heldout(self) -> bool:
        """Whether the bases are fitted on other images than those attributed (``fit_data`` / ``fit_split``)."""
        fit = (self.s.get("fit_data") or self.s["data"], self.s.get("fit_split") or self.s.get("split"),
               self.s.get("fit_limit") or self.s.get("limit"))
        return fit != (self.s["data"], self.s.get("split"), self.s.get("limit"))

    @property
    def fit_data(self) -> "ImageData":
        """The images whose PFVs the concept bases are fitted on (the data itself unless ``fit_*`` say otherwise)."""
        if not self.has_heldout:
            return self.data
        if self._fit_data is None:
            s = dict(self.s, data=self.s.get("fit_data") or self.s["data"], split=self.s.get("fit_split") or self.s.get("split"),
                     limit=self.s.get("fit_limit") or self.s.get("limit"))
            self._fit_data = ImageData.open(s, self.in_channels, log=self.log, warn=self.warn)
            self.log(f"fit data {s['data']}" + (f" ({s['split']})" if s["data"] == "fashion-mnist" else "")
                     + f": {len(self._fit_data)} images")
        return self._fit_data

    def batches(self, indices: Optional[Sequence[int]] = None, labels: bool = True, data: Optional["ImageData"] = None):
        """Re-iterable batches of the data (or of ``data``), optionally of the images ``indices`` only.

        Under torchrun the batches are made smaller where there would be fewer
        than one per rank (the capped subsets of attribute), so no rank waits idle.
        """
        data = data if data is not None else self.data
        size, ranks = int(self.s["batch_size"]), _dist.world_size()
        n = len(data) if indices is None else len(indices)
        if ranks > 1 and n:
            size = max(1, min(size, -(-n // ranks)))
        return Batches(data, size, self.device, indices=indices, labels=labels)

    def class_index(self, spec: Any) -> int:
        """A class given by index or name, checked against the model's classes."""
        names = self.class_names()
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

    def parse_graph_spec(self, spec: str) -> Tuple[str, Any]:
        """``class:<c>``, ``pair:<a>,<b>`` or ``image:<i>`` as ``(kind, value)``."""
        kind, _, value = spec.partition(":")
        if kind == "class" and value:
            return "class", self.class_index(value)
        if kind == "pair" and "," in value:
            a, b = value.split(",", 1)
            ca, cb = self.class_index(a), self.class_index(b)
            if ca == cb:
                raise PipelineError(f"--graph {spec!r}: a pair needs two different classes")
            return "pair", (ca, cb)
        if kind == "image" and value.isdigit():
            i = int(value)
            if not 0 <= i < len(self.data):
                raise PipelineError(f"--graph {spec!r}: image index out of range (the data has {len(self.data)} images)")
            return "image", i
        raise PipelineError(f"--graph {spec!r}: expected class:<index, name or all>, pair:<a>,<b>, image:<index> or auto")

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
            # the seconds it took when computed: a resumed report still says what each stage costs
            self.timings[name] = {"status": "resumed", "seconds": round(float(marker.get("seconds", 0.0)), 3)}
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
    def pfvs(self, layer: str, heldout: bool = False):
        """The :class:`~captum_gig.PFVSet` of ``layer`` collected by ``extract`` (of the fit data, or held out)."""
        from .pfv import PFVSet

        return PFVSet.load(pfv_path(self, layer, heldout), device=str(self.device))

    def basis(self, layer: str):
        """The :class:`~captum_gig.ConceptBasis` of ``layer`` fitted by ``fit``."""
        from .concepts import ConceptBasis

        return ConceptBasis.load(basis_path(self, layer), device=str(self.device))

    def decomposer(self, layer: str):
        """The :class:`~captum_gig.PFVDecomposer` of ``layer`` (its basis with the fitted alpha)."""
        from ._stages import decomposer

        return decomposer(self, layer)

    def coefficients(self, layer: str) -> Tensor:
        """The dense ``(N, K)`` concept coefficients of ``layer``'s PFVs (those of :meth:`pfvs`) from ``decompose``."""
        return load_coefficients(coef_path(self, layer)).to(self.device)

    def class_attribution(self, layer: str):
        """The per-class mean GIG of ``layer``'s concepts to the classes (``attribute``)."""
        return load_class_attribution(class_attr_path(self, layer))

    def graphs(self) -> Dict[str, Any]:
        """The class and pair :class:`~captum_gig.ConceptGraph` objects chosen by ``attribute``, by spec."""
        from .graph import ConceptGraph

        info = _read_json(self.path("attribution", "graphs.json"))
        return {spec: ConceptGraph.from_json(json.dumps(d)) for spec, d in info["graphs"].items()}


def run(config: Any, out: str, **kwargs: Any) -> Pipeline:
    """Run every stage of the pipeline into ``out`` and write its report; returns the :class:`Pipeline`.

    ``kwargs`` go to :class:`Pipeline` (``device``, ``quiet``, ``force``).
    """
    return Pipeline(config, out, **kwargs).run()


from ._stages import STAGE_FUNCTIONS  # noqa: E402  (the stages use the names above)
