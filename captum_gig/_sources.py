"""Models and image data named by strings: the pipeline's (and the CLI's) ``model`` and ``data`` settings.

``load_model`` turns ``efficientnet-lite0``, ``fashion-mnist-cnn``,
``torchvision:<name>`` or ``module:<file.py>:<callable>`` into a module;
:class:`ImageData` opens an ImageFolder, the bundled ``photos`` or
``fashion-mnist`` lazily, with labels, names and the files it had to skip.
"""

import difflib
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["PipelineError", "load_model", "list_layers", "ImageData", "Batches", "NORMALIZATIONS", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class PipelineError(Exception):
    """A user error in the pipeline's settings or data (the CLI prints it as ``captum-gig: error: ...``)."""


def safe_name(name: str) -> str:
    """A layer name as a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "layer"


def load_model(spec: str, weights: Optional[str] = None) -> nn.Module:
    """A model from ``torchvision:<name>``, ``efficientnet-lite0``, ``fashion-mnist-cnn`` or ``module:<path>:<callable>``."""
    if spec == "efficientnet-lite0":
        from .zoo import efficientnet_lite0

        return efficientnet_lite0(pretrained=weights != "none")
    if spec == "fashion-mnist-cnn":
        from . import zoo

        if not hasattr(zoo, "fashion_mnist_cnn"):
            raise PipelineError("fashion-mnist-cnn is not available in this version of captum_gig.zoo")
        return zoo.fashion_mnist_cnn(pretrained=weights != "none")
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        available = torchvision.models.list_models()
        if name not in available:
            close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PipelineError(f"--model: torchvision has no model {name!r}{hint}")
        try:
            model = torchvision.models.get_model(name, weights=None if weights in (None, "none") else weights)
        except (ValueError, KeyError) as err:
            raise PipelineError(f"--weights {weights!r} for {name}: {err}") from None
        except OSError as err:  # a download that failed (no network)
            raise PipelineError(f"could not load the weights {weights!r} of {name} (no network?): {err}") from None
        from .preactivation import expose_preactivations

        try:  # ResNet blocks: the pre-ReLU sums (the paper's PFVs) as hookable layers ``layerX.Y.preact``
            expose_preactivations(model)
        except ValueError:  # not a ResNet
            pass
        return model
    if spec.startswith("module:"):
        rest = spec[len("module:"):]
        if ":" not in rest:
            raise PipelineError(f"--model {spec!r}: expected module:<file.py or dotted.module>:<callable>")
        where, attr = rest.rsplit(":", 1)
        import importlib
        import importlib.util

        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise PipelineError(f"--model: no such file {where!r}")
            mod_name = "_captum_gig_user_model_" + safe_name(os.path.splitext(os.path.basename(where))[0])
            spec_ = importlib.util.spec_from_file_location(mod_name, where)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[mod_name] = module
            spec_.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as err:
                raise PipelineError(f"--model: cannot import {where!r}: {err}") from None
        if not hasattr(module, attr):
            raise PipelineError(f"--model: {where!r} has no attribute {attr!r}")
        model = getattr(module, attr)()
        if not isinstance(model, nn.Module):
            raise PipelineError(f"--model: {where}:{attr}() returned a {type(model).__name__}, not an nn.Module")
        return model
    raise PipelineError(
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


NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "lite": ((127.0 / 255,) * 3, (128.0 / 255,) * 3),
    "none": ((0.0,) * 3, (1.0,) * 3),
}


def default_normalize(model: str) -> str:
    if model == "efficientnet-lite0":
        return "lite"
    if model.startswith("torchvision:"):
        return "imagenet"
    return "none"


def default_size(model: str, data: str) -> int:
    if model == "fashion-mnist-cnn" or data == "fashion-mnist":
        return 28
    return 224


class ImageData:
    """Images of one data source, loaded lazily, with labels, names and the count of skipped files."""

    def __init__(self, n: int, getter: Callable[[int], Tensor], labels: Optional[Tensor], names: List[str],
                 class_names: Optional[List[str]], skipped: int = 0, skipped_files: Optional[List[str]] = None,
                 sources: Optional[Tensor] = None):
        self.n = n
        self._get = getter
        self.labels = labels
        self.names = names
        self.class_names = class_names
        self.skipped = skipped
        self.skipped_files = skipped_files or []
        #: ``(n,)`` the source image of every image (augmented copies share their original's)
        self.sources = sources if sources is not None else torch.arange(n)

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
                raise PipelineError("--data fashion-mnist needs captum_gig.zoo.fashion_mnist (not in this version)")
            try:
                images, labels = zoo.fashion_mnist(split=s.get("split") or "test", limit=limit)
            except FileNotFoundError as err:
                raise PipelineError(str(err)) from None
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
            raise PipelineError(f"--data {source!r}: the dataset is empty")
        return base.augmented(int(s.get("augment") or 0), int(s.get("seed") or 0))

    @classmethod
    def _folder(cls, root: str, size: int, channels: int, mean, std, limit, warn) -> "ImageData":
        if not os.path.exists(root):
            raise PipelineError(f"--data {root!r}: no such folder")
        if not os.path.isdir(root):
            raise PipelineError(f"--data {root!r} is not a folder (expected an ImageFolder: one sub-folder of images per class)")
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
            raise PipelineError(f"--data {root!r}: no readable images found{extra}")
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
        """Each image followed by ``copies`` variants: its mirror image, then random crops of 40-95% of its side
        (scaled back to full size, half of them mirrored)."""
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
                scale = 0.4 + 0.55 * torch.rand(1, generator=g).item()  # zoomed in 1.05-2.5x
                ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                img = torch.nn.functional.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w),
                                                      mode="bilinear", align_corners=False)[0]
            return img.flip(-1) if v % 2 == 1 or torch.rand(1, generator=g).item() < 0.5 else img

        labels = self.labels.repeat_interleave(k) if self.labels is not None else None
        names = [f"{n}" if v == 0 else f"{n}#{v}" for n in self.names for v in range(k)]
        return ImageData(self.n * k, get, labels, names, self.class_names, self.skipped, self.skipped_files,
                         self.sources.repeat_interleave(k))


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
