"""Pointwise feature vectors (PFVs) collected over a dataset (paper section 3.1, appendix C)."""

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from captum.attr import LayerGradientXActivation
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _layout
from . import distributed as _dist
from ._data import Data, count_shard, iter_shard
from ._hooks import LayerSpec, check_inputs, check_runs_once, frozen, model_device, resolve_layer, run_until, tap
from ._io import as_json_value, load_artifact, save_artifact

__all__ = ["PFVSet", "collect_pfvs", "image_generator"]

SAMPLINGS = ("relevance", "uniform", "all")


@dataclass
class PFVSet:
    r"""A set of PFVs of one layer, each with the image and position it came from.

    Attributes:
        vectors (Tensor): ``(N, C)`` the PFVs.
        image_index (Tensor): ``(N,)`` int64, index of the source image in the
                    order the data was read.
        position (Tensor): ``(N,)`` int64, flat index into the layer's position
                    grid ``spatial_shape`` (row-major ``h * W + w`` for conv
                    layers, the token index for token layers).
        layer (str): dotted name of the layer.
        spatial_shape (tuple): the layer's position grid, ``(H, W)``, ``(T,)``
                    or ``()``.
        labels (Tensor, optional): ``(N,)`` int64 label of the source image when
                    the data provided one, else -1.
        target (Tensor, optional): ``(N,)`` int64 class whose relevance was used
                    for sampling (-1 for ``"uniform"``/``"all"``).
        relevance (Tensor, optional): ``(N,)`` the position's positive relevance
                    (``"relevance"`` sampling only, else 0).
        meta (dict): how the set was made (sampling, seed, model, ...).
    """

    vectors: Tensor
    image_index: Tensor
    position: Tensor
    layer: str
    spatial_shape: Tuple[int, ...]
    labels: Optional[Tensor] = None
    target: Optional[Tensor] = None
    relevance: Optional[Tensor] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.vectors.dim() != 2:
            raise ValueError(f"vectors must be (N, C); got shape {tuple(self.vectors.shape)}")
        n = self.vectors.shape[0]
        for name in ("image_index", "position", "labels", "target", "relevance"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match vectors; got {tuple(value.shape)}")
        self.spatial_shape = tuple(int(s) for s in self.spatial_shape)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def n_channels(self) -> int:
        return self.vectors.shape[1]

    def coordinates(self) -> Tensor:
        """``(N, len(spatial_shape))`` grid coordinates of each PFV, e.g. (row, col)."""
        return _layout.unravel_position(self.position, self.spatial_shape)

    def _fields(self) -> Dict[str, Optional[Tensor]]:
        return {
            "vectors": self.vectors,
            "image_index": self.image_index,
            "position": self.position,
            "labels": self.labels,
            "target": self.target,
            "relevance": self.relevance,
        }

    def _replace(self, fn: Callable[[Tensor], Tensor]) -> "PFVSet":
        new = {k: (fn(v) if v is not None else None) for k, v in self._fields().items()}
        return PFVSet(layer=self.layer, spatial_shape=self.spatial_shape, meta=dict(self.meta), **new)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PFVSet":
        """A copy on ``device``; ``dtype`` applies to the vectors only."""
        moved = self._replace(lambda t: t.to(device) if device is not None else t)
        if dtype is not None:
            moved.vectors = moved.vectors.to(dtype)
        return moved

    def __getitem__(self, index) -> "PFVSet":
        """A subset, e.g. ``pfvs[:100]`` or ``pfvs[mask]``."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._replace(lambda t: t[index])

    @staticmethod
    def concat(sets: Sequence["PFVSet"]) -> "PFVSet":
        """Concatenate PFV sets of the same layer (e.g. collected in parts)."""
        if not sets:
            raise ValueError("concat needs at least one PFVSet")
        first = sets[0]
        for s in sets[1:]:
            if s.layer != first.layer or s.n_channels != first.n_channels or s.spatial_shape != first.spatial_shape:
                raise ValueError(
                    f"cannot concatenate PFVs of layer {s.layer!r} ({s.n_channels} channels, grid {s.spatial_shape}) "
                    f"with layer {first.layer!r} ({first.n_channels} channels, grid {first.spatial_shape})"
                )
        merged = {}
        for name in first._fields():
            parts = [getattr(s, name) for s in sets]
            merged[name] = None if any(p is None for p in parts) else torch.cat(parts)
        return PFVSet(layer=first.layer, spatial_shape=first.spatial_shape, meta=dict(first.meta), **merged)

    def save(self, path: str) -> None:
        """Save as safetensors with JSON metadata (no pickle)."""
        meta = {
            "layer": self.layer,
            "spatial_shape": list(self.spatial_shape),
            "n_channels": self.n_channels,
            "n_pfvs": len(self),
            "info": {k: as_json_value(v) for k, v in self.meta.items()},
        }
        save_artifact(path, "PFVSet", self._fields(), meta)

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "PFVSet":
        """Load a set written by :meth:`save`; raises ``ValueError`` for a file that is not one."""
        tensors, meta = load_artifact(path, "PFVSet", device)
        missing = {"vectors", "image_index", "position"} - set(tensors)
        if missing:
            raise ValueError(f"{path!r} is missing the tensors {sorted(missing)}")
        if tensors["vectors"].shape[-1] != meta.get("n_channels") or len(tensors["vectors"]) != meta.get("n_pfvs"):
            raise ValueError(f"{path!r}: tensor shapes do not match its metadata (tampered file?)")
        return cls(
            vectors=tensors["vectors"],
            image_index=tensors["image_index"],
            position=tensors["position"],
            labels=tensors.get("labels"),
            target=tensors.get("target"),
            relevance=tensors.get("relevance"),
            layer=meta["layer"],
            spatial_shape=tuple(meta["spatial_shape"]),
            meta=meta.get("info", {}),
        )


def image_generator(seed: int, image_index: int) -> torch.Generator:
    """The random stream of one image: a function of ``(seed, image_index)`` only.

    Sampling therefore does not depend on batch size, data order of other
    images or the number of processes sharing the work.
    """
    state = np.random.SeedSequence([int(seed), int(image_index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def _sample_positions(weights: Tensor, per_image: int, first_index: int, seed: int, uniform: bool) -> Tensor:
    """Draw ``per_image`` distinct positions per row of ``weights (n, P)``.

    Gumbel-top-k: the top ``k`` of ``log w + Gumbel noise`` is a draw without
    replacement with probability proportional to ``w`` (successive sampling).
    Positions with zero weight are drawn only after all positive ones.
    """
    n, p = weights.shape
    noise = torch.stack(
        [torch.rand(p, generator=image_generator(seed, first_index + i), dtype=torch.float64) for i in range(n)]
    )
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-300)))
    if uniform:
        keys = gumbel
    else:
        w = weights.detach().to("cpu", torch.float64)
        keys = torch.where(w > 0, torch.log(w.clamp_min(1e-300)) + gumbel, gumbel - 1e6)
    return keys.topk(per_image, dim=1).indices


def _resolve_targets(target, logits: Optional[Tensor], labels: Optional[Tensor], n: int, device) -> Tensor:
    if target is None:
        if logits is None or not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(
                "target=None uses the predicted class, which needs a model returning (N, classes) scores; "
                "pass target=<class index> or target='label'"
            )
        return logits.argmax(dim=1)
    if isinstance(target, str):
        if target != "label":
            raise ValueError(f"target must be None, an int, or 'label'; got {target!r}")
        if labels is None:
            raise ValueError("target='label' needs data that yields (images, labels) pairs")
        return labels.to(device=device, dtype=torch.long)
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    raise TypeError(f"target must be None, an int, or 'label'; got {type(target).__name__}")


def collect_pfvs(
    model: nn.Module,
    layer: Union[LayerSpec, Sequence[LayerSpec]],
    data: Data,
    *,
    sampling: str = "relevance",
    per_image: int = 1,
    target: Union[None, int, str] = None,
    attribute_to_layer_input: bool = False,
    relevance_method: Callable[..., Any] = LayerGradientXActivation,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Union[PFVSet, Dict[str, PFVSet]]:
    r"""Collect pointwise feature vectors of ``layer`` over a dataset (paper 3.1, app. C).

    For every image, ``per_image`` positions of the layer's activation are
    drawn and their channel vectors kept, with the image index and position.

    With ``sampling="relevance"`` (the paper's choice) positions are drawn with
    probability proportional to their positive contribution to the target
    class, computed with a Captum layer attribution (``relevance_method``,
    LayerGradientXActivation by default) summed over channels. This avoids the
    background dominating the PFV set. ``"uniform"`` draws positions uniformly
    and ``"all"`` keeps every position.

    Several layers at once (a list) share every pass over the data: one
    forward records all their activations and one relevance attribution
    (Captum's multi-layer form: one more forward and one backward) serves all
    of them, where one layer at a time costs those passes per layer. The PFVs
    are the same as layer by layer.

    Args:
        model (nn.Module): the image model; run in eval mode, restored afterwards.
        layer (nn.Module, str or list of them): the layer (or its dotted name)
                    whose output (or input, see ``attribute_to_layer_input``)
                    is a ``(N, C, H, W)``, ``(N, T, C)`` or ``(N, C)`` tensor;
                    or a list of layers.
        data (Tensor or iterable): images ``(N, ...)``, or a DataLoader /
                    iterable yielding image batches or ``(images, labels)``.
                    Batches are moved to the model's device.
        sampling (str, optional): ``"relevance"``, ``"uniform"`` or ``"all"``.
                    Default: ``"relevance"``
        per_image (int, optional): positions drawn per image (without
                    replacement). Ignored for ``"all"``. Default: 1
        target (int, str or None, optional): the class whose relevance guides
                    sampling: ``None`` for the predicted class, an int, or
                    ``"label"`` for the labels the data yields. Default: None
        attribute_to_layer_input (bool, optional): take PFVs from the layer's
                    input instead of its output (Captum's convention).
                    Default: False
        relevance_method (callable, optional): a Captum layer attribution
                    class, called as ``relevance_method(model, layer)`` (with a
                    list of layers for several). Default: ``LayerGradientXActivation``
        batch_size (int, optional): batch size used when ``data`` is a tensor.
                    Default: 32
        seed (int, optional): draws depend only on ``(seed, image index)``.
                    Default: 0
        progress (bool, optional): show a progress bar. Default: True

    Returns:
        PFVSet, or a dict ``{layer name: PFVSet}`` for a list of layers:
        ``vectors (M, C)`` with ``M = n_images * per_image`` (or
        ``n_images * positions`` for ``"all"``), their image indices and positions.

    Examples::

        >>> model = torchvision.models.resnet18(weights=None).eval()
        >>> images = torch.randn(8, 3, 64, 64)
        >>> pfvs = collect_pfvs(model, "layer3", images, per_image=2)
        >>> pfvs.vectors.shape
        torch.Size([16, 256])
        >>> both = collect_pfvs(model, ["layer2", "layer3"], images, per_image=2)   # one pass for both
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}; got {sampling!r}")
    if not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"per_image must be a positive int; got {per_image!r}")
    several = isinstance(layer, (list, tuple))
    if several and not layer:
        raise ValueError("layer is an empty list; name at least one layer")
    resolved = [resolve_layer(model, spec) for spec in (layer if several else [layer])]
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"layer lists a layer twice: {names}")
    modules = [module for _, module in resolved]
    device = model_device(model)
    keys = ("vectors", "image_index", "position", "labels", "target", "relevance")
    parts: Dict[str, Dict[str, List[Tensor]]] = {name: {k: [] for k in keys} for name in names}
    spatial: Dict[str, Tuple[int, ...]] = {}
    n_channels: Dict[str, int] = {}
    n_images = 0
    has_labels = True

    rank, world = _dist.rank(), _dist.world_size()
    with frozen(model):
        bar = tqdm(
            total=count_shard(data, batch_size, rank, world),
            disable=not progress or not _dist.is_main_process(),
            desc=f"PFVs of {', '.join(names)}",
            unit="batch",
        )
        try:
            for batch_number, (first, images, labels) in enumerate(iter_shard(data, batch_size, rank, world)):
                images = images.to(device)
                check_inputs(model, images, f"images of batch {batch_number}")
                n = images.shape[0]
                has_labels = has_labels and labels is not None
                with torch.no_grad():
                    if sampling == "relevance" or len(modules) > 1:
                        with ExitStack() as stack:
                            records = [stack.enter_context(tap(model, m, attribute_to_layer_input)) for m in modules]
                            logits = model(images)
                        activations = [r.value for r in records]
                        if sampling != "relevance":
                            logits = None
                    elif batch_number == 0:
                        logits = None
                        activations = [check_runs_once(model, modules[0], images,
                                                       attribute_to_layer_input=attribute_to_layer_input)]
                    else:
                        logits = None
                        activations = [run_until(model, modules[0], images, attribute_to_layer_input=attribute_to_layer_input)]
                targets = torch.full((n,), -1, dtype=torch.long, device=device)
                relevances: List[Optional[Tensor]] = [None] * len(modules)
                if sampling == "relevance":
                    targets = _resolve_targets(target, logits, labels, n, device)
                    attributor = relevance_method(model, modules if len(modules) > 1 else modules[0])
                    attrs = attributor.attribute(images, target=targets, attribute_to_layer_input=attribute_to_layer_input)
                    if len(modules) == 1:
                        attrs = [attrs[0] if isinstance(attrs, tuple) else attrs]
                    for j, attr in enumerate(attrs):
                        attr = attr[0] if isinstance(attr, (tuple, list)) else attr
                        relevances[j] = _layout.to_pfvs(attr.detach()).sum(-1).clamp_min(0)
                for j, (name, activation) in enumerate(zip(names, activations)):
                    pfvs = _layout.to_pfvs(activation.detach())  # (n, P, C)
                    if name not in spatial:
                        spatial[name] = _layout.spatial_shape(activation)
                        n_channels[name] = pfvs.shape[2]
                    n_pos = pfvs.shape[1]
                    if sampling != "all" and per_image > n_pos:
                        raise ValueError(f"per_image={per_image} exceeds the {n_pos} positions of layer {name!r}")
                    relevance = relevances[j] if relevances[j] is not None else torch.zeros(n, n_pos, device=pfvs.device)
                    if sampling == "all":
                        chosen = torch.arange(n_pos, device=pfvs.device).expand(n, n_pos)
                    else:
                        chosen = _sample_positions(relevance, per_image, first, seed, uniform=sampling == "uniform")
                        chosen = chosen.to(pfvs.device)
                    k = chosen.shape[1]
                    rows = torch.arange(n, device=pfvs.device).unsqueeze(1).expand(n, k)
                    part = parts[name]
                    part["vectors"].append(pfvs[rows, chosen].reshape(n * k, -1))
                    part["position"].append(chosen.reshape(-1).long().cpu())
                    part["image_index"].append((torch.arange(n).unsqueeze(1) + first).expand(n, k).reshape(-1))
                    lab = labels.cpu().long() if labels is not None else torch.full((n,), -1, dtype=torch.long)
                    part["labels"].append(lab.unsqueeze(1).expand(n, k).reshape(-1))
                    part["target"].append(targets.cpu().unsqueeze(1).expand(n, k).reshape(-1))
                    part["relevance"].append(relevance[rows, chosen].reshape(-1).float().cpu())
                n_images += n
                bar.update(1)
        finally:
            bar.close()

    meta = {
        "sampling": sampling,
        "per_image": per_image if sampling != "all" else None,
        "seed": seed,
        "model": type(model).__name__,
        "attribute_to_layer_input": attribute_to_layer_input,
        "relevance_method": getattr(relevance_method, "__name__", str(relevance_method)) if sampling == "relevance" else None,
    }
    out: Dict[str, PFVSet] = {}
    total = n_images
    for name in names:
        part, grid, labelled = parts[name], spatial.get(name), has_labels
        if world > 1:
            part, total, grid, labelled = _gather_parts(part, n_images, grid, n_channels.get(name), has_labels)
        if total == 0:
            raise ValueError("data yielded no images")
        out[name] = PFVSet(
            vectors=torch.cat(part["vectors"]),
            image_index=torch.cat(part["image_index"]),
            position=torch.cat(part["position"]),
            labels=torch.cat(part["labels"]) if labelled else None,
            target=torch.cat(part["target"]),
            relevance=torch.cat(part["relevance"]),
            layer=name,
            spatial_shape=grid or (),
            meta=dict(meta, n_images=total),
        )
    return out if several else out[names[0]]


def _gather_parts(parts, n_images, spatial, n_channels, has_labels):
    """Collect every rank's PFVs, in the global image order of a single-process run."""
    infos = _dist.all_gather_object((n_images, spatial, n_channels, has_labels))
    n_total = sum(i[0] for i in infos)
    shapes = {(i[1], i[2]) for i in infos if i[0] > 0}
    if len(shapes) > 1:
        raise ValueError(f"processes saw different layer shapes (grid, channels): {sorted(shapes, key=str)}")
    if not shapes:
        return parts, 0, spatial, has_labels
    spatial, n_channels = shapes.pop()
    has_labels = all(i[3] for i in infos if i[0] > 0)
    if not parts["vectors"]:  # this rank had no batch: contribute empty tensors of the right kind
        dtype = torch.get_default_dtype()
        parts["vectors"].append(torch.empty(0, n_channels, dtype=dtype))
        for key, dt in (("position", torch.long), ("image_index", torch.long), ("labels", torch.long),
                        ("target", torch.long), ("relevance", torch.float32)):
            parts[key].append(torch.empty(0, dtype=dt))
    local = {k: torch.cat(v) for k, v in parts.items()}
    gathered = {k: torch.cat([p.to(local["vectors"].device if k == "vectors" else p.device) for p in _dist.all_gather(t)])
                for k, t in local.items()}
    order = torch.sort(gathered["image_index"], stable=True).indices
    merged = {k: [t[order.to(t.device)]] for k, t in gathered.items()}
    return merged, n_total, spatial, has_labels
