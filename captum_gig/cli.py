r"""``captum-gig``: the GIG pipeline over a dataset, from the shell.

Every subcommand writes its artifacts into one output folder (``--out``) and
can be resumed: a stage whose complete artifacts exist for the same settings
is skipped, so ``captum-gig run`` after an interrupted run only computes what
is missing. Settings given once are remembered in ``config.json`` of the
output folder, so later subcommands need only ``--out``.

Stages (``run`` does them all, in order)::

    extract    PFVs of every layer (pfvs/<layer>.safetensors) and the predictions
    fit        concept bases (bases/<layer>.safetensors)
    decompose  Lasso coefficients and rel-l2 / l0 ratio (coefficients/, decomposition.json)
    attribute  GIG between consecutive layers and to classes, averaged per class (attribution/)
    graph      concept atlases and ConceptGraphs (JSON, PNG, HTML) for a class, an image, a class pair
    evaluate   C-Deletion / C-Insertion and inter-layer deletion curves (evaluation/)

and ``demo`` runs them all on EfficientNet-Lite0 and real photos, offline.

Examples::

    captum-gig demo --out demo
    captum-gig run --model torchvision:resnet50 --weights IMAGENET1K_V2 --data ./images \
        --layers layer3.5 layer4.0 layer4.2 --out out
    captum-gig run --model torchvision:resnet50 --list-layers
    captum-gig graph --out out --graph class:goldfish --graph pair:1,2 --graph image:0
"""

import argparse
import difflib
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._io import atomic_write_text, load_artifact, read_metadata, save_artifact
from ._version import __version__

__all__ = ["main", "build_parser", "CLIError", "load_model", "load_coefficients", "load_class_attribution"]

STAGES = ["extract", "fit", "decompose", "attribute", "graph", "evaluate"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: settings and their defaults; ``None`` values are filled from the model / data
DEFAULTS: Dict[str, Any] = {
    "model": None,
    "weights": None,
    "data": None,
    "split": "test",
    "limit": None,
    "augment": 0,
    "image_size": None,
    "normalize": None,
    "layers": None,
    "by": "prediction",
    "seed": 0,
    "sampling": "relevance",
    "per_image": 8,
    "concepts": None,
    "concept_factor": 8,
    "min_members": 8,
    "offset": "auto",
    "extractor": "bisecting",
    "alpha": 0.1,
    "n_steps": 16,
    "output": "logit",
    "classes": None,
    "class_layers": "last",
    "graph": None,
    "top_k": 5,
    "atlas_top": 6,
    "atlas_images": 2000,
    "ierf": "ig",
    "eval_steps": 10,
    "eval_images": 16,
    "batch_size": 16,
}

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


class CLIError(Exception):
    """A user error: printed as ``captum-gig: error: ...`` with exit status 2."""


# ============================================================================ small helpers


def _is_main_process() -> bool:
    try:
        from .distributed import is_main_process  # provided by the distributed helper module

        return bool(is_main_process())
    except ImportError:
        pass
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fingerprint(settings: Dict[str, Any], stage: str) -> str:
    keys: List[str] = []
    todo = [stage]
    while todo:
        s = todo.pop()
        keys += STAGE_KEYS[s]
        todo += STAGE_DEPENDS[s]
    picked = {k: settings.get(k) for k in sorted(set(keys))}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "layer"


def _write_json(path: str, obj: Any) -> None:
    if _is_main_process():
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ============================================================================ the run context


class Run:
    """Settings, output folder, model and data of one invocation; logs and the manifest."""

    def __init__(self, settings: Dict[str, Any], out: str, *, quiet: bool, device: str, force: bool, command: List[str]):
        self.s = settings
        self.out = os.path.abspath(out)
        self.quiet = quiet
        self.progress = not quiet
        self.device = torch.device(device)
        self.force = force
        self.command = command
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
        if not self.quiet and _is_main_process():
            print(f"[captum-gig] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if _is_main_process():
            print(f"captum-gig: warning: {message}", file=sys.stderr, flush=True)

    # -- model and data ----------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        if self._model is None:
            if not self.s.get("model"):
                raise CLIError("--model is required (e.g. efficientnet-lite0, torchvision:resnet50, module:file.py:build)")
            self.log(f"model {self.s['model']}" + (f" (weights {self.s['weights']})" if self.s.get("weights") else ""))
            self._model = load_model(self.s["model"], self.s.get("weights")).to(self.device).eval()
        return self._model

    @property
    def data(self) -> "ImageData":
        if self._data is None:
            if not self.s.get("data"):
                raise CLIError("--data is required (an ImageFolder directory, 'photos' or 'fashion-mnist')")
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
                raise CLIError(f"the model must return (N, classes) scores; it returned {getattr(out, 'shape', type(out))}")
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
            raise CLIError("--layers is required (dotted module names, early to late; see --list-layers)")
        from ._hooks import resolve_layer

        names = dict(self.model.named_modules())
        for layer in layers:
            if layer not in names or not layer:
                try:
                    resolve_layer(self.model, layer, "--layers")
                except ValueError as err:
                    raise CLIError(f"{err} (captum-gig --list-layers shows them all)") from None
        if len(set(layers)) != len(layers):
            raise CLIError(f"--layers lists a layer twice: {layers}")
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

    def stage(self, name: str, fn: Callable[["Run"], List[str]]) -> None:
        for dep in STAGE_DEPENDS[name]:
            if dep not in self.timings and not self.done(dep):
                self.stage(dep, STAGE_FUNCTIONS[dep])
        if name in self.timings:
            return
        if self.done(name):
            marker = _read_json(self._marker(name))
            self.timings[name] = {"status": "resumed", "seconds": 0.0}
            self.artifacts[name] = marker.get("artifacts", [])
            self.log(f"{name}: up to date, resumed from {len(self.artifacts[name])} artifacts")
            return
        self.log(f"{name} ...")
        t0 = time.perf_counter()
        produced = fn(self)
        seconds = time.perf_counter() - t0
        rel = [os.path.relpath(p, self.out) for p in produced]
        _barrier()
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
            "world_size": _world_size(),
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


# ============================================================================ models


def load_model(spec: str, weights: Optional[str] = None) -> nn.Module:
    """A model from ``torchvision:<name>``, ``efficientnet-lite0``, ``fashion-mnist-cnn`` or ``module:<path>:<callable>``."""
    if spec == "efficientnet-lite0":
        from .zoo import efficientnet_lite0

        return efficientnet_lite0(pretrained=weights != "none")
    if spec == "fashion-mnist-cnn":
        from . import zoo

        if not hasattr(zoo, "fashion_mnist_cnn"):
            raise CLIError("fashion-mnist-cnn is not available in this version of captum_gig.zoo")
        return zoo.fashion_mnist_cnn(pretrained=weights != "none")
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        available = torchvision.models.list_models()
        if name not in available:
            close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CLIError(f"--model: torchvision has no model {name!r}{hint}")
        try:
            return torchvision.models.get_model(name, weights=weights)
        except (ValueError, KeyError) as err:
            raise CLIError(f"--weights {weights!r} for {name}: {err}") from None
        except OSError as err:  # a download that failed (no network)
            raise CLIError(f"could not load the weights {weights!r} of {name} (no network?): {err}") from None
    if spec.startswith("module:"):
        rest = spec[len("module:"):]
        if ":" not in rest:
            raise CLIError(f"--model {spec!r}: expected module:<file.py or dotted.module>:<callable>")
        where, attr = rest.rsplit(":", 1)
        import importlib
        import importlib.util

        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise CLIError(f"--model: no such file {where!r}")
            mod_name = "_captum_gig_user_model_" + _safe_name(os.path.splitext(os.path.basename(where))[0])
            spec_ = importlib.util.spec_from_file_location(mod_name, where)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[mod_name] = module
            spec_.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as err:
                raise CLIError(f"--model: cannot import {where!r}: {err}") from None
        if not hasattr(module, attr):
            raise CLIError(f"--model: {where!r} has no attribute {attr!r}")
        model = getattr(module, attr)()
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model: {where}:{attr}() returned a {type(model).__name__}, not an nn.Module")
        return model
    raise CLIError(
        f"--model {spec!r}: use efficientnet-lite0, fashion-mnist-cnn, torchvision:<name> or module:<path>:<callable>"
    )


def list_layers(model: nn.Module, example: Tensor) -> str:
    """The table printed by ``--list-layers``: every module that ran, with its output shape."""
    from ._hooks import trace_layers

    rows = []
    for name, kind, shape, calls in trace_layers(model, example):
        if calls == 0:
            continue
        note = "" if calls == 1 else f"  (runs {calls} times per forward: not hookable)"
        shp = "x".join(str(s) for s in shape[1:]) if shape else "(not a tensor)"
        rows.append((name, kind, shp, note))
    width = max([len(r[0]) for r in rows] + [5])
    kwidth = max([len(r[1]) for r in rows] + [4])
    lines = [f"{'layer'.ljust(width)}  {'type'.ljust(kwidth)}  output (without batch)"]
    lines += [f"{n.ljust(width)}  {k.ljust(kwidth)}  {s}{note}" for n, k, s, note in rows]
    return "\n".join(lines)


# ============================================================================ data


NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "lite": ((127.0 / 255,) * 3, (128.0 / 255,) * 3),
    "none": ((0.0,) * 3, (1.0,) * 3),
}


def _default_normalize(model: str) -> str:
    if model == "efficientnet-lite0":
        return "lite"
    if model.startswith("torchvision:"):
        return "imagenet"
    return "none"


def _default_size(model: str, data: str) -> int:
    if model == "fashion-mnist-cnn" or data == "fashion-mnist":
        return 28
    return 224


class ImageData:
    """Images of one data source, loaded lazily, with labels, names and the count of skipped files."""

    def __init__(self, n: int, getter: Callable[[int], Tensor], labels: Optional[Tensor], names: List[str],
                 class_names: Optional[List[str]], skipped: int = 0, skipped_files: Optional[List[str]] = None):
        self.n = n
        self._get = getter
        self.labels = labels
        self.names = names
        self.class_names = class_names
        self.skipped = skipped
        self.skipped_files = skipped_files or []

    def __len__(self) -> int:
        return self.n

    def get(self, indices: Sequence[int]) -> Tensor:
        return torch.stack([self._get(int(i)) for i in indices])

    @classmethod
    def open(cls, s: Dict[str, Any], channels: int, log=print, warn=print) -> "ImageData":
        source = str(s["data"])
        size = int(s["image_size"])
        mean, std = NORMALIZATIONS[s["normalize"]]
        mean, std = mean[:channels], std[:channels]
        limit = s.get("limit")
        if source == "photos":
            from .zoo import real_photos

            images, names = real_photos(size=size, mean=mean if channels == 3 else (0.0,) * 3, std=std if channels == 3 else (1.0,) * 3)
            if channels == 1:
                images = images.mean(1, keepdim=True)
            if limit:
                images, names = images[:limit], names[:limit]
            base = cls(len(images), lambda i: images[i], None, names, None)
        elif source == "fashion-mnist":
            from . import zoo

            if not hasattr(zoo, "fashion_mnist"):
                raise CLIError("--data fashion-mnist needs captum_gig.zoo.fashion_mnist (not in this version)")
            try:
                images, labels = zoo.fashion_mnist(split=s.get("split") or "test", limit=limit)
            except FileNotFoundError as err:
                raise CLIError(str(err)) from None
            if images.shape[-1] != size:
                images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            if channels == 3:
                images = images.expand(-1, 3, -1, -1)
            m = torch.tensor(mean).view(1, -1, 1, 1)
            sd = torch.tensor(std).view(1, -1, 1, 1)
            images = ((images - m) / sd).contiguous()
            base = cls(len(images), lambda i: images[i], labels, [f"fashion-mnist:{s.get('split') or 'test'}:{i}" for i in range(len(images))],
                       list(zoo.FASHION_MNIST_CLASSES))
        else:
            base = cls._folder(source, size, channels, mean, std, limit, warn)
        if base.n == 0:
            raise CLIError(f"--data {source!r}: the dataset is empty")
        return base.augmented(int(s.get("augment") or 0), int(s.get("seed") or 0))

    @classmethod
    def _folder(cls, root: str, size: int, channels: int, mean, std, limit, warn) -> "ImageData":
        if not os.path.exists(root):
            raise CLIError(f"--data {root!r}: no such folder")
        if not os.path.isdir(root):
            raise CLIError(f"--data {root!r} is not a folder (expected an ImageFolder: one sub-folder of images per class)")
        from PIL import Image

        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        files: List[Tuple[str, int]] = []
        if classes:
            for label, c in enumerate(classes):
                for dirpath, _dirs, fnames in sorted(os.walk(os.path.join(root, c))):
                    files += [(os.path.join(dirpath, f), label) for f in sorted(fnames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        else:  # a flat folder of images, no labels
            files = [(os.path.join(root, f), -1) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        readable: List[Tuple[str, int]] = []
        skipped: List[str] = []
        for path, label in files:
            if limit and len(readable) >= limit:
                break
            try:
                with Image.open(path) as im:
                    im.load()
                readable.append((path, label))
            except Exception as err:  # PIL raises many kinds for broken files
                warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}")
                skipped.append(path)
        if not readable:
            extra = f" ({len(skipped)} unreadable)" if skipped else ""
            raise CLIError(f"--data {root!r}: no readable images found{extra}")
        mode = "L" if channels == 1 else "RGB"

        def get(i: int) -> Tensor:
            import numpy as np
            import torchvision.transforms.functional as F

            with Image.open(readable[i][0]) as im:
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
            t = torch.from_numpy(arr.copy()).float() / 255
            t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
            t = F.resize(t, int(round(size * 256 / 224)) if size >= 64 else size, antialias=True)
            t = F.center_crop(t, size)
            return F.normalize(t, list(mean), list(std))

        labels = torch.tensor([lab for _, lab in readable], dtype=torch.long) if classes else None
        names = [os.path.relpath(p, root) for p, _ in readable]
        return cls(len(readable), get, labels, names, classes or None, len(skipped), skipped)

    def augmented(self, copies: int, seed: int) -> "ImageData":
        """Each image followed by ``copies`` variants (a mirror image, then random crops of it)."""
        if copies <= 0:
            return self
        k = copies + 1
        base_get = self._get

        def get(j: int) -> Tensor:
            img = base_get(j // k)
            v = j % k
            if v == 0:
                return img
            g = torch.Generator().manual_seed(seed * 1_000_003 + j)
            if v > 1:
                h, w = img.shape[-2:]
                scale = 0.6 + 0.3 * torch.rand(1, generator=g).item()
                ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                img = torch.nn.functional.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w),
                                                      mode="bilinear", align_corners=False)[0]
            return img.flip(-1) if v % 2 == 1 or torch.rand(1, generator=g).item() < 0.5 else img

        labels = self.labels.repeat_interleave(k) if self.labels is not None else None
        names = [f"{n}" if v == 0 else f"{n}#{v}" for n in self.names for v in range(k)]
        return ImageData(self.n * k, get, labels, names, self.class_names, self.skipped, self.skipped_files)


class Batches:
    """Re-iterable batches ``(images, labels)`` (or images) of an :class:`ImageData`, with a length."""

    def __init__(self, data: ImageData, batch_size: int, device, indices: Optional[Sequence[int]] = None, labels: bool = True):
        self.data = data
        self.batch_size = max(1, batch_size)
        self.device = device
        self.indices = list(range(len(data))) if indices is None else [int(i) for i in indices]
        self.with_labels = labels and data.labels is not None

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            images = self.data.get(idx).to(self.device)
            if self.with_labels:
                yield images, self.data.labels[idx].to(self.device)
            else:
                yield images

    def shard(self, rank: int, world_size: int):
        """``(index of the first image, batch)`` of batches ``rank, rank + W, ...``: loads only those.

        Used by the library's data reader under torchrun, so no rank decodes another rank's images.
        """
        for number in range(rank, len(self), world_size):
            start = number * self.batch_size
            idx = self.indices[start:start + self.batch_size]
            images = self.data.get(idx).to(self.device)
            yield start, ((images, self.data.labels[idx].to(self.device)) if self.with_labels else images)


# ============================================================================ stages


def _pfv_path(run: Run, layer: str) -> str:
    return run.path("pfvs", f"{_safe_name(layer)}.safetensors")


def _basis_path(run: Run, layer: str) -> str:
    return run.path("bases", f"{_safe_name(layer)}.safetensors")


def _coef_path(run: Run, layer: str) -> str:
    return run.path("coefficients", f"{_safe_name(layer)}.safetensors")


def _class_attr_path(run: Run, layer: str) -> str:
    return run.path("attribution", "class", f"{_safe_name(layer)}.safetensors")


def _inter_path(run: Run, a: str, b: str) -> str:
    return run.path("attribution", "interlayer", f"{_safe_name(a)}--{_safe_name(b)}.safetensors")


def _save(path: str, kind: str, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> str:
    if _is_main_process():
        save_artifact(path, kind, tensors, meta)
    return path


def stage_extract(run: Run) -> List[str]:
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
        raise CLIError("--by label needs labelled data (an ImageFolder with class sub-folders, or fashion-mnist)")
    for layer in layers:
        pfvs = collect_pfvs(run.model, layer, run.batches(), sampling=run.s["sampling"], per_image=int(run.s["per_image"]),
                            target=target, batch_size=int(run.s["batch_size"]), seed=int(run.s["seed"]), progress=run.progress)
        path = _pfv_path(run, layer)
        if _is_main_process():
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


def _offset_for(run: Run, layer: str):
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


def stage_fit(run: Run) -> List[str]:
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
        if _is_main_process():
            basis.save(path)
        produced.append(path)
        run.log(f"  {layer}: {k} concepts, alpha {alpha:.4g}")
    return produced


def _decomposer(run: Run, layer: str):
    from .concepts import ConceptBasis
    from .decompose import PFVDecomposer

    basis = ConceptBasis.load(_basis_path(run, layer), device=str(run.device))
    return PFVDecomposer(basis, alpha=float(basis.meta["alpha"]))


def stage_decompose(run: Run) -> List[str]:
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


def _classes_arg(run: Run) -> Optional[List[int]]:
    classes = run.s.get("classes")
    if not classes:
        return None
    return [_class_index(run, c) for c in classes]


def _class_index(run: Run, spec: Any) -> int:
    names = run.class_names()
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        c = int(text)
        if not 0 <= c < len(names):
            raise CLIError(f"class {c} is out of range: the model has {len(names)} classes")
        return c
    if text in names:
        return names.index(text)
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise CLIError(f"unknown class {text!r}{hint}")


def stage_attribute(run: Run) -> List[str]:
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


def _predictions(run: Run) -> Dict[str, Tensor]:
    tensors, _ = load_artifact(run.path("predictions.safetensors"), "Predictions")
    return tensors


def _class_counts(run: Run) -> Tuple[Tensor, Tensor]:
    """``(classes, counts)`` of the class attribution of the last layer, most frequent first."""
    ca = load_class_attribution(_class_attr_path(run, run.layers()[-1]))
    order = sorted(range(len(ca.classes)), key=lambda i: (-int(ca.counts[i]), int(ca.classes[i])))
    return ca.classes[order], ca.counts[order]


def _auto_targets(run: Run) -> List[str]:
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


def _parse_graph_spec(run: Run, spec: str) -> Tuple[str, Any]:
    kind, _, value = spec.partition(":")
    if kind == "class" and value:
        return "class", _class_index(run, value)
    if kind == "pair" and "," in value:
        a, b = value.split(",", 1)
        ca, cb = _class_index(run, a), _class_index(run, b)
        if ca == cb:
            raise CLIError(f"--graph {spec!r}: a pair needs two different classes")
        return "pair", (ca, cb)
    if kind == "image" and value.isdigit():
        i = int(value)
        if not 0 <= i < len(run.data):
            raise CLIError(f"--graph {spec!r}: image index out of range (the data has {len(run.data)} images)")
        return "image", i
    raise CLIError(f"--graph {spec!r}: expected class:<index or name>, pair:<a>,<b>, image:<index> or auto")


def _row(ca, c: int, what: str) -> int:
    hits = (ca.classes == c).nonzero()
    if len(hits) == 0:
        raise CLIError(f"no image of class {c} in the data for {what} (classes present: {ca.classes.tolist()})")
    return int(hits[0, 0])


def _display(run: Run) -> Callable[[Tensor], Tensor]:
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


def _build_atlases(run: Run, concepts: Dict[str, List[int]]) -> Tuple[Dict[str, Any], List[str]]:
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
        folder = run.path("atlas", _safe_name(layer))
        if _is_main_process():
            atlas.save(folder)
        produced += _files_under(folder)
        atlases[layer] = atlas
    return atlases, produced


def _files_under(folder: str) -> List[str]:
    out = []
    for dirpath, _d, files in os.walk(folder):
        out += [os.path.join(dirpath, f) for f in sorted(files) if not f.startswith(".tmp-") and not f.endswith(".tmp")]
    return out


def stage_graph(run: Run) -> List[str]:
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
        if _is_main_process():
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


def stage_evaluate(run: Run) -> List[str]:
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
    if _is_main_process():
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


STAGE_FUNCTIONS: Dict[str, Callable[[Run], List[str]]] = {
    "extract": stage_extract,
    "fit": stage_fit,
    "decompose": stage_decompose,
    "attribute": stage_attribute,
    "graph": stage_graph,
    "evaluate": stage_evaluate,
}


# ============================================================================ report


def write_report(run: Run) -> str:
    """``index.html``: settings, decomposition table, links to graphs, atlases and plots."""
    import html

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
            folder = os.path.join(atlas_root, _safe_name(layer))
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
    if _is_main_process():
        atomic_write_text(path, "\n".join(parts))
    return path


# ============================================================================ argument parsing


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and data (remembered in OUT/config.json)")
    g.add_argument("--model", help="efficientnet-lite0, fashion-mnist-cnn, torchvision:<name> or module:<file.py|module>:<callable>")
    g.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V2 (downloads; default: none)")
    g.add_argument("--data", help="an ImageFolder directory (one sub-folder per class, or a flat folder), "
                                  "'photos' (bundled real photos) or 'fashion-mnist'")
    g.add_argument("--split", choices=["train", "test"], help="fashion-mnist split (default: test)")
    g.add_argument("--limit", type=int, help="use at most this many images")
    g.add_argument("--augment", type=int, help="add this many mirrored / cropped variants of every image (default: 0)")
    g.add_argument("--image-size", type=int, help="input side in pixels (default: 224, 28 for Fashion-MNIST)")
    g.add_argument("--normalize", choices=sorted(NORMALIZATIONS), help="pixel normalisation (default: from the model)")
    g.add_argument("--layers", nargs="+", help="dotted layer names, early to late (see --list-layers)")
    g.add_argument("--by", choices=["prediction", "label"], help="class of an image: its prediction or its label (default: prediction)")
    g.add_argument("--seed", type=int, help="random seed (default: 0)")
    g.add_argument("--batch-size", type=int, help="images per batch (default: 16)")
    g = p.add_argument_group("stages")
    g.add_argument("--sampling", choices=["relevance", "uniform", "all"], help="PFV sampling (default: relevance)")
    g.add_argument("--per-image", type=int, help="PFVs drawn per image (default: 8)")
    g.add_argument("--concepts", type=int, help="concepts per layer (default: min(8 x channels, PFVs / --min-members))")
    g.add_argument("--concept-factor", type=int, help="concepts per channel (default: 8, the paper's)")
    g.add_argument("--min-members", type=int, help="PFVs per concept at least, on average (default: 8)")
    g.add_argument("--offset", choices=["auto", "mean", "zero"], help="PFV offset: BatchNorm shift where the layer ends in BN, else the mean (default: auto)")
    g.add_argument("--extractor", help="concept extractor registered with register_extractor (default: bisecting)")
    g.add_argument("--alpha", type=float, help="Lasso alpha as a fraction of the median alpha_max (default: 0.1)")
    g.add_argument("--n-steps", type=int, help="GIG path points (default: 16)")
    g.add_argument("--output", choices=["logit", "prob"], help="class score for GIG (default: logit)")
    g.add_argument("--classes", nargs="+", help="restrict class attributions to these classes (indices or names)")
    g.add_argument("--class-layers", choices=["last", "all"], help="layers whose GIG to classes is computed (default: last)")
    g.add_argument("--graph", action="append", help="graph target: class:<c>, pair:<a>,<b>, image:<i> or auto "
                                                    "(repeatable; default: auto = most frequent class, most confident image, top class pair)")
    g.add_argument("--top-k", type=int, help="concepts per layer in a graph (default: 5)")
    g.add_argument("--atlas-top", type=int, help="example patches per concept in the atlas (default: 6)")
    g.add_argument("--ierf", choices=["ig", "ixg", "saliency"], help="Captum method of the atlas crops' iERFs: "
                   "IntegratedGradients, InputXGradient or Saliency (default: ig)")
    g.add_argument("--atlas-images", type=int, help="images searched for atlas patches (default: 2000)")
    g.add_argument("--eval-steps", type=int, help="points of the deletion / insertion curves (default: 10)")
    g.add_argument("--eval-images", type=int, help="images of the evaluated class (default: 16)")
    g = p.add_argument_group("running")
    g.add_argument("--out", default=None, help="output folder (default: captum-gig-out; demo: captum-gig-demo)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--force", action="store_true", help="recompute stages even when their artifacts exist")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    g.add_argument("--list-layers", action="store_true", help="print the model's layers with output shapes and exit")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-gig",
        description="Generalized Integrated Gradients (arXiv 2409.01610) over a dataset: PFVs, concepts, "
                    "sparse decompositions, GIG attributions, concept graphs and their evaluation.",
        epilog="Run `captum-gig demo` for the whole pipeline on EfficientNet-Lite0 and real photos (offline).",
    )
    parser.add_argument("--version", action="version", version=f"captum-gig {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    common = _common_parser()
    helps = {
        "extract": "collect PFVs of every layer (and the model's predictions)",
        "fit": "fit a concept basis per layer (bisecting spherical k-means)",
        "decompose": "sparse concept coefficients of every PFV, rel-l2 and l0 ratio",
        "attribute": "GIG between consecutive layers and to classes, averaged per class",
        "graph": "concept atlases and ConceptGraphs (JSON, PNG, HTML)",
        "evaluate": "C-Deletion / C-Insertion and inter-layer deletion / insertion curves",
        "run": "all stages, resuming from what exists, and an index.html report",
        "demo": "the whole pipeline on EfficientNet-Lite0 and bundled real photos (offline, a few minutes)",
    }
    for name, text in helps.items():
        sub.add_parser(name, parents=[common], help=text, description=text)
    return parser


def _settings(args: argparse.Namespace, out: str, demo: bool) -> Dict[str, Any]:
    stored: Dict[str, Any] = {}
    cfg = os.path.join(out, "config.json")
    if os.path.isfile(cfg):
        try:
            stored = _read_json(cfg).get("settings", {})
        except (OSError, ValueError) as err:
            raise CLIError(f"{cfg} is unreadable ({err}); delete it or use another --out") from None
    s = dict(DEFAULTS)
    if demo:
        s.update(DEMO_SETTINGS)
    s.update({k: v for k, v in stored.items() if k in DEFAULTS})
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    s.update(given)
    if s.get("model"):
        if s.get("normalize") is None:
            s["normalize"] = _default_normalize(s["model"])
        if s.get("image_size") is None:
            s["image_size"] = _default_size(s["model"], str(s.get("data")))
    for key in ("limit", "augment", "per_image", "concepts", "concept_factor", "min_members", "n_steps", "top_k",
                "atlas_top", "atlas_images", "eval_steps", "eval_images", "batch_size", "image_size"):
        v = s.get(key)
        if v is not None and (key == "augment" and v < 0 or key != "augment" and v < 1):
            raise CLIError(f"--{key.replace('_', '-')} must be {'>= 0' if key == 'augment' else 'positive'}; got {v}")
    for spec in s.get("graph") or []:  # syntax only (classes and images are checked when the graph is drawn)
        kind, _, value = str(spec).partition(":")
        ok = spec == "auto" or (kind == "class" and value) or (kind == "image" and value.isdigit()) or \
            (kind == "pair" and len([v for v in value.split(",") if v.strip()]) == 2)
        if not ok:
            raise CLIError(f"--graph {spec!r}: expected class:<index or name>, pair:<a>,<b>, image:<index> or auto")
    if s.get("data") and s["data"] not in ("photos", "fashion-mnist"):
        s["data"] = os.path.abspath(s["data"])
    return s


def _summary(run: Run, report: Optional[str]) -> str:
    lines = [f"captum-gig: artifacts in {run.out}"]
    for name, t in run.timings.items():
        arts = run.artifacts.get(name, [])
        shown = ", ".join(arts[:4]) + (f", ... ({len(arts)} files)" if len(arts) > 4 else "")
        lines.append(f"  {name:<9} {t['status']:<8} {t['seconds']:7.1f} s  {shown}")
    if run._data is not None and run._data.skipped:
        lines.append(f"  skipped {run._data.skipped} unreadable image(s) (listed in data.json)")
    lines.append(f"  manifest  {run.path('manifest.json')}")
    if report:
        lines.append(f"  report    {report}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``captum-gig`` / ``python -m captum_gig``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    demo = args.command == "demo"
    out = args.out or ("captum-gig-demo" if demo else "captum-gig-out")
    from .distributed import init_from_env, leave

    # under torchrun: join the process group (NCCL with CUDA unless --device cpu, else Gloo)
    joined = init_from_env("gloo" if (args.device or "").startswith("cpu") or not torch.cuda.is_available() else None)
    status = 1
    try:
        status = _main(args, argv, demo, out)
        return status
    finally:
        if joined:
            leave(clean=status == 0)


def _main(args, argv: List[str], demo: bool, out: str) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        settings = _settings(args, out, demo)
        run = Run(settings, out, quiet=args.quiet, device=device, force=args.force, command=["captum-gig"] + argv)
        if args.list_layers:
            model = run.model
            if settings.get("data"):
                example = run.data.get(range(1))
            else:
                size = int(settings.get("image_size") or 224)
                example = torch.zeros(1, run.in_channels, size, size)
            print(list_layers(model, example.to(run.device)))
            return 0
        if settings.get("seed") is not None:
            torch.manual_seed(int(settings["seed"]))
        stages = STAGES if args.command in ("run", "demo") else [args.command]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was written by captum_gig.*")
            for name in stages:
                run.stage(name, STAGE_FUNCTIONS[name])
        report = write_report(run) if args.command in ("run", "demo") else None
        run.write_manifest()
        if not args.quiet and _is_main_process():
            print(_summary(run, report))
        return 0
    except CLIError as err:
        print(f"captum-gig: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as err:
        if os.environ.get("CAPTUM_GIG_DEBUG"):
            raise
        print(f"captum-gig: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("captum-gig: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
