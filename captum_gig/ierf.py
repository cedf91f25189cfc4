r"""Instance-specific effective receptive fields (iERF; paper section 3.1, Han et al. 2024).

The iERF of a PFV ``x_p`` (image ``n``, layer ``l``, position ``p``) is the
input-pixel attribution of that PFV -- of its projection on its own (centred)
direction by default -- computed with a Captum attribution method and
restricted to the PFV's theoretical receptive field. It labels what the PFV
encodes: a heat map, a box around the most influential pixels, and a crop of
the image around the box with some context (the paper adds context so that the
patch is readable).

The theoretical receptive field is found structurally, without assumptions
about the architecture: an input whose row ``i`` (or column ``j``) is NaN is
run to the layer, and every position whose activation turns NaN depends on
that row (column). NaN propagates through convolutions, pooling, BatchNorm,
activations and attention alike, and independently of the weights' values, so
this is exactly the set of pixels the position can depend on (a global
operation such as attention makes it the whole image).
"""

import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _layout
from . import distributed as _dist
from ._hooks import LayerSpec, StopForward, _single_tensor, check_inputs, frozen, resolve_layer, run_until

__all__ = ["IERFResult", "ierf", "receptive_fields", "to_display"]


class IERFResult(NamedTuple):
    """What :func:`ierf` returns; boxes are ``(top, left, bottom, right)`` pixels, bottom/right exclusive."""

    heatmaps: Tensor
    """``(B, H, W)`` attribution summed over input channels, zero outside the receptive field"""
    rf_boxes: Tensor
    """``(B, 4)`` int64, the theoretical receptive field of each PFV"""
    boxes: Tensor
    """``(B, 4)`` int64, the smallest box holding the most influential pixels (``mass`` of the positive attribution)"""
    crop_boxes: Tensor
    """``(B, 4)`` int64, the box grown by ``context`` on every side, made square, inside the image"""
    crops: Tensor
    """``(B, C_display, crop_size, crop_size)`` the crops of the display images, values in [0, 1]"""
    scores: Tensor
    """``(B,)`` the attributed score of each PFV (its projection on its direction)"""


def to_display(images: Tensor) -> Tensor:
    """Per-image min-max scaling to [0, 1] (the default way to show normalised model inputs)."""
    flat = images.detach().flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (images.dim() - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (images.dim() - 1)))
    return ((images.detach() - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


# model -> {(layer, input side, shape, dtype, device): boxes}; entries go with their model
_RF_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple, Tensor]]" = weakref.WeakKeyDictionary()


def receptive_fields(
    model: nn.Module,
    layer: Union[LayerSpec, Sequence[LayerSpec]],
    input_shape: Tuple[int, ...],
    *,
    attribute_to_layer_input: bool = False,
    dtype: Optional[torch.dtype] = None,
    batch_size: int = 32,
    distributed: bool = False,
) -> Union[Tensor, List[Tensor]]:
    r"""Theoretical receptive field of every position of ``layer``, as boxes.

    Args:
        model (nn.Module): the image model.
        layer (nn.Module or str, or a list of them): the layer, or several
                    layers, whose boxes then come from the same probe forwards.
        input_shape (tuple): one input's shape ``(C, H, W)``.
        attribute_to_layer_input (bool, optional): positions of the layer's
                    input rather than its output. Default: False
        dtype (torch.dtype, optional): input dtype; the model's by default.
        batch_size (int, optional): probe inputs per forward. Default: 32
        distributed (bool, optional): every process asks for the same layers;
                    under ``torch.distributed`` each runs its share of the
                    probes and all get every box. Default: False

    Returns:
        Tensor or list of Tensor: ``(P, 4)`` int64 ``(top, left, bottom,
        right)`` per flat position (bottom/right exclusive), one per layer if
        ``layer`` is a list. Costs ``H + W`` forwards (one NaN row or column
        each) up to the last of the layers, however many layers are asked
        for, and is cached per model, layer and shape.

    Example::

        >>> early, late = receptive_fields(model, ["layer1.1", "layer4.2"], (3, 224, 224))
        >>> late.shape  # 7 x 7 positions
        torch.Size([49, 4])
    """
    several = isinstance(layer, (list, tuple))
    resolved = [resolve_layer(model, one) for one in (layer if several else [layer])]
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W); got {tuple(input_shape)}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = dtype or (param.dtype if param is not None else torch.get_default_dtype())
    shape = tuple(int(s) for s in input_shape)
    cache = _RF_CACHE.setdefault(model, {})

    def key(name: str) -> Tuple:
        return (name, attribute_to_layer_input, shape, dtype, str(device))

    todo = list({name: module for name, module in resolved if key(name) not in cache}.items())
    if todo:
        h, w = shape[1], shape[2]
        distributed = distributed and _dist.is_distributed()
        probes = _dist.shard_indices(h + w) if distributed else torch.arange(h + w)
        deps = _nan_dependence(model, todo, shape, attribute_to_layer_input, dtype, device, batch_size, probes)
        for (name, _), dep in zip(todo, deps):
            if distributed:
                order = torch.cat(_dist.all_gather(probes))
                full = torch.empty((h + w,) + tuple(dep.shape[1:]), dtype=torch.bool)
                full[order] = torch.cat(_dist.all_gather(dep))
                dep = full
            cache[key(name)] = _boxes(dep, h, w)
    boxes = [cache[key(name)] for name, _ in resolved]
    return boxes if several else boxes[0]


def _nan_dependence(model: nn.Module, layers: List[Tuple[str, nn.Module]], input_shape: Tuple[int, int, int],
                    attribute_to_layer_input: bool, dtype: torch.dtype, device: torch.device,
                    batch_size: int, probes: Tensor) -> List[Tensor]:
    """Per layer, ``(len(probes), P)``: which positions turn NaN when probe row ``i`` (probe ``i < H``), or
    column ``i - H``, is NaN.

    Every layer is read from the same probe forwards, each stopped once the
    last of the layers has run (a layer that runs twice is read at its first run).
    """
    c, h, w = input_shape
    masks: List[List[Tensor]] = [[] for _ in layers]
    seen: List[bool] = []

    def reader(k: int, name: str):
        def read(value, where):
            if seen[k]:
                return
            seen[k] = True
            masks[k].append(torch.isnan(_layout.to_pfvs(_single_tensor(value, name, where))).any(-1).cpu())
            if all(seen):
                raise StopForward(None)
        return read

    handles = []
    for k, (name, module) in enumerate(layers):
        read = reader(k, name)
        if attribute_to_layer_input:
            handles.append(module.register_forward_pre_hook(lambda _m, a, read=read: read(a[0] if a else None,
                                                                                          "receives")))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, read=read: read(out, "returns")))
    try:
        with frozen(model), torch.no_grad():
            for s in range(0, len(probes), batch_size):
                chunk = probes[s : s + batch_size].tolist()
                x = torch.zeros(len(chunk), c, h, w, dtype=dtype, device=device)
                for b, i in enumerate(chunk):
                    if i < h:
                        x[b, :, i, :] = float("nan")
                    else:
                        x[b, :, :, i - h] = float("nan")
                seen[:] = [False] * len(layers)
                try:
                    model(x)
                except StopForward:
                    continue
                missing = [name for (name, _), ok in zip(layers, seen) if not ok]
                raise RuntimeError(f"layer {missing[0]!r} was not run by the model's forward; "
                                   "is it part of the forward path?")
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(m) if m else torch.zeros(0, 0, dtype=torch.bool) for m in masks]


def _boxes(dep: Tensor, h: int, w: int) -> Tensor:
    """``(P, 4)`` boxes from the ``(H + W, P)`` dependence of positions on probe rows, then columns."""
    rows, cols = dep[:h], dep[h:]
    idx_h = torch.arange(h).unsqueeze(1)
    idx_w = torch.arange(w).unsqueeze(1)
    big = max(h, w) + 1
    top = torch.where(rows, idx_h, big).min(0).values
    bottom = torch.where(rows, idx_h, -1).max(0).values + 1
    left = torch.where(cols, idx_w, big).min(0).values
    right = torch.where(cols, idx_w, -1).max(0).values + 1
    none = ~rows.any(0) | ~cols.any(0)
    boxes = torch.stack([top, left, bottom, right], dim=1)
    boxes[none] = torch.tensor([0, 0, 0, 0])
    return boxes.long()


class _PFVScore(nn.Module):
    """``<x_p - offset, d>`` for one position ``p`` and direction ``d`` per example, as a module.

    A module (not a function) so that Captum methods needing one (GuidedBackprop,
    DeepLift, ...) work as well.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, attribute_to_layer_input: bool, offset: Optional[Tensor]):
        super().__init__()
        self.model = model
        self.layer = layer
        self.attribute_to_layer_input = attribute_to_layer_input
        self.offset = offset

    def pfvs(self, x: Tensor, positions: Tensor) -> Tensor:
        act = run_until(self.model, self.layer, x, attribute_to_layer_input=self.attribute_to_layer_input)
        pf = _layout.to_pfvs(act)
        v = pf[torch.arange(pf.shape[0], device=pf.device), positions.to(pf.device)]
        return v - self.offset.to(v) if self.offset is not None else v

    def forward(self, x: Tensor, positions: Tensor, directions: Tensor) -> Tensor:
        return (self.pfvs(x, positions) * directions.to(x.dtype)).sum(1)


def _influence_box(heat: Tensor, mass: float) -> Tensor:
    """Smallest box holding the top pixels that make up ``mass`` of the positive attribution."""
    h, w = heat.shape
    pos = heat.clamp_min(0)
    if not (pos > 0).any():
        pos = heat.abs()
    if not (pos > 0).any():
        return torch.tensor([0, 0, 0, 0])
    flat = pos.flatten()
    values, order = flat.sort(descending=True)
    cum = values.cumsum(0)
    n = int(torch.searchsorted(cum, mass * cum[-1]).item()) + 1
    keep = order[: max(1, min(n, flat.numel()))]
    r, c = keep // w, keep % w
    return torch.stack([r.min(), c.min(), r.max() + 1, c.max() + 1]).long()


def _context_box(box: Tensor, context: float, h: int, w: int) -> Tensor:
    """Grow ``box`` by ``context`` times its size on each side, make it square, keep it in the image."""
    t, l, b, r = (int(v) for v in box)
    if b <= t or r <= l:
        return torch.tensor([0, 0, h, w])
    side = max(b - t, r - l)
    side = int(round(side * (1 + 2 * context)))
    side = max(1, min(side, h, w))
    cy, cx = (t + b) / 2, (l + r) / 2
    top = int(round(cy - side / 2))
    left = int(round(cx - side / 2))
    top = min(max(top, 0), h - side)
    left = min(max(left, 0), w - side)
    return torch.tensor([top, left, top + side, left + side])


def ierf(
    model: nn.Module,
    layer: LayerSpec,
    images: Tensor,
    positions: Tensor,
    *,
    method: Callable[..., Any] = IntegratedGradients,
    attribute_to_layer_input: bool = False,
    offset: Optional[Tensor] = None,
    directions: Optional[Tensor] = None,
    context: float = 0.25,
    mass: float = 0.5,
    crop_size: int = 64,
    batch_size: int = 8,
    display: Optional[Callable[[Tensor], Tensor]] = None,
    attribute_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = False,
) -> IERFResult:
    r"""The iERF of many PFVs: heat map, box of the most influential pixels, crop with context.

    For PFV ``b`` (image ``images[b]``, flat position ``positions[b]`` of
    ``layer``), the score ``s_b(x) = <x_p - offset, d_b>`` is attributed to
    the input pixels with ``method`` (a Captum attribution class called as
    ``method(forward_module)``). ``d_b`` is the PFV's own unit direction
    ``(x_p - offset) / ||x_p - offset||`` unless ``directions`` is given
    (e.g. a concept vector). The heat map (summed over input channels) is set
    to zero outside the theoretical receptive field (see
    :func:`receptive_fields`); for gradient methods it already is.

    Args:
        model (nn.Module): the image model.
        layer (nn.Module or str): the PFVs' layer.
        images (Tensor): ``(B, C, H, W)`` one input per PFV (repeat an image
                    for several PFVs of it).
        positions (Tensor): ``(B,)`` flat positions (``PFVSet.position``) or
                    ``(B, 2)`` ``(row, col)`` grid coordinates.
        method (type, optional): Captum attribution class, e.g.
                    ``IntegratedGradients``, ``InputXGradient``, ``Saliency``,
                    ``GuidedBackprop``. Default: ``IntegratedGradients``
        attribute_to_layer_input (bool, optional): PFVs of the layer's input.
                    Default: False
        offset (Tensor, optional): ``(C_l,)`` offset beta subtracted from the
                    PFV before projecting. Default: None (zero)
        directions (Tensor, optional): ``(B, C_l)`` or ``(C_l,)`` directions;
                    normalised. Default: each PFV's own direction
        context (float, optional): context added around the box on each side,
                    as a fraction of its size. Default: 0.25
        mass (float, optional): fraction of the positive attribution the box
                    must hold. Default: 0.5
        crop_size (int, optional): side of the returned crops. Default: 64
        batch_size (int, optional): PFVs per attribution call. Default: 8
        display (callable, optional): maps model inputs to images in [0, 1]
                    for the crops. Default: per-image min-max scaling
        attribute_kwargs (dict, optional): passed to ``method(...).attribute``
                    (e.g. ``{"n_steps": 16}``, ``baselines``).
        progress (bool, optional): show progress. Default: False

    Returns:
        IERFResult: heat maps ``(B, H, W)``, receptive-field boxes, boxes and
        crop boxes ``(B, 4)``, crops ``(B, C, crop_size, crop_size)``, scores ``(B,)``.

    Examples::

        >>> res = ierf(model, "_blocks.10", images[pfvs.image_index[:16]], pfvs.position[:16],
        ...            attribute_kwargs={"n_steps": 16})
        >>> res.crops.shape
        torch.Size([16, 3, 64, 64])
    """
    name, module = resolve_layer(model, layer)
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, one per PFV; got {getattr(images, 'shape', type(images))}")
    check_inputs(model, images, "images")
    positions = torch.as_tensor(positions)
    B, _, H, W = images.shape
    if positions.is_floating_point():
        raise ValueError("positions must be integer positions")
    if not 0 <= context:
        raise ValueError(f"context must be >= 0; got {context}")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1]; got {mass}")
    rf = receptive_fields(model, module, tuple(images.shape[1:]), attribute_to_layer_input=attribute_to_layer_input,
                          dtype=images.dtype)
    P = rf.shape[0]
    with torch.no_grad():
        probe = run_until(model, module, images[:1], attribute_to_layer_input=attribute_to_layer_input)
    spatial = _layout.spatial_shape(probe)
    if positions.dim() == 2:
        if positions.shape != (B, len(spatial)):
            raise ValueError(f"positions as coordinates must be (B, {len(spatial)}); got {tuple(positions.shape)}")
        flat = torch.zeros(B, dtype=torch.long)
        for k, size in enumerate(spatial):
            flat = flat * size + positions[:, k].long().cpu()
        positions = flat
    if positions.shape != (B,):
        raise ValueError(f"positions must be (B,) = ({B},) flat positions; got {tuple(positions.shape)}")
    positions = positions.long().cpu()
    if ((positions < 0) | (positions >= P)).any():
        raise ValueError(f"positions out of range: layer {name!r} has {P} positions")
    if display is None:
        display = to_display
    kwargs = dict(attribute_kwargs or {})

    heat_all, scores_all, boxes, crop_boxes, crops = [], [], [], [], []
    dev = images.device
    with frozen(model):
        scorer = _PFVScore(model, module, attribute_to_layer_input, offset)
        attributor = method(scorer)
        bar = tqdm(total=B, disable=not progress, desc=f"iERF of {name}", unit="PFV")
        try:
            for s in range(0, B, batch_size):
                x = images[s : s + batch_size]
                pos = positions[s : s + batch_size].to(dev)
                with torch.no_grad():
                    own = scorer.pfvs(x, pos)
                if directions is None:
                    d = F.normalize(own, dim=1)
                else:
                    d = torch.as_tensor(directions).to(device=dev, dtype=x.dtype)
                    d = d.expand(own.shape) if d.dim() == 1 else d[s : s + batch_size]
                    if d.shape != own.shape:
                        raise ValueError(f"directions must be ({own.shape[1]},) or (B, {own.shape[1]}); got {tuple(d.shape)}")
                    d = F.normalize(d, dim=1)
                scores_all.append((own * d).sum(1).detach().cpu())
                # gradient methods on the raw input (InputXGradient, Saliency) warn unless it requires grad
                attr = attributor.attribute(x.detach().requires_grad_(True), additional_forward_args=(pos, d), **kwargs)
                if isinstance(attr, tuple):
                    attr = attr[0]
                heat_all.append(attr.detach().sum(1).cpu())
                bar.update(x.shape[0])
        finally:
            bar.close()
        shown = display(images.detach()).cpu().float()
    heat = torch.cat(heat_all)
    rf_boxes = rf[positions]
    rows = torch.arange(H).view(1, H, 1)
    cols = torch.arange(W).view(1, 1, W)
    inside = (
        (rows >= rf_boxes[:, 0].view(-1, 1, 1)) & (rows < rf_boxes[:, 2].view(-1, 1, 1))
        & (cols >= rf_boxes[:, 1].view(-1, 1, 1)) & (cols < rf_boxes[:, 3].view(-1, 1, 1))
    )
    heat = torch.where(inside, heat, torch.zeros_like(heat))
    for b in range(B):
        box = _influence_box(heat[b], mass)
        cbox = _context_box(box, context, H, W)
        boxes.append(box)
        crop_boxes.append(cbox)
        t, l, bt, r = (int(v) for v in cbox)
        patch = shown[b : b + 1, :, t:bt, l:r]
        crops.append(F.interpolate(patch, size=(crop_size, crop_size), mode="bilinear", align_corners=False)[0].clamp(0, 1))
    return IERFResult(
        heatmaps=heat,
        rf_boxes=rf_boxes,
        boxes=torch.stack(boxes).long(),
        crop_boxes=torch.stack(crop_boxes).long(),
        crops=torch.stack(crops),
        scores=torch.cat(scores_all),
    )
