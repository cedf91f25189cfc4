r"""Dataset-wide GIG: per-class mean attributions (paper eq. 7 averaged, Fig. 1, 3, 6).

The paper's concept graphs rank concepts by their GIG averaged over the
images of a class. :func:`class_attribution` streams a dataset once and
returns, for every class, the mean GIG of a layer's concepts to that class;
:func:`interlayer_attribution` does the same for the full concept-to-concept
matrix between two layers. Both read the data batch by batch (never holding
all images), and under ``torchrun`` each process attributes its shard of the
batches and the per-class sums and counts are all-reduced, so every process
gets the single-process result.
"""

from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as _dist
from ._data import Data, count_shard, iter_shard
from ._hooks import LayerSpec, frozen, model_device
from .decompose import PFVDecomposer
from .baselines import attribution_class

__all__ = ["ClassAttribution", "class_attribution", "interlayer_attribution"]

BY = ("prediction", "label", "all")


class ClassAttribution(NamedTuple):
    r"""Mean attribution per class.

    Attributes:
        classes (Tensor): ``(n,)`` int64, the sorted classes that occurred
                    (``-1`` for ``by="all"``).
        mean (Tensor): ``(n, K_a)`` (concept to class) or ``(n, K_a, T)``
                    (concept to layer-``b`` concept) mean GIG over the images
                    of each class.
        counts (Tensor): ``(n,)`` int64, images per class.
        targets (Tensor or None): ``(n, T)`` int64, the layer-``b`` concept of
                    each column of ``mean`` per class, where the columns differ
                    between classes (``-1`` pads); None when the columns are
                    the same for every class.
    """

    classes: Tensor
    mean: Tensor
    counts: Tensor
    targets: Optional[Tensor] = None

    def columns(self, cls: int, concepts: Sequence[int]) -> Tensor:
        """``(K_a, len(concepts))``: class ``cls``'s mean GIG to the layer-``b`` ``concepts`` (per-class columns)."""
        row = self.of(cls)
        if self.targets is None:
            return row[:, torch.as_tensor(list(concepts), dtype=torch.long)]
        r = int((self.classes == int(cls)).nonzero()[0, 0])
        where = {int(t): j for j, t in enumerate(self.targets[r].tolist()) if t >= 0}
        missing = [int(t) for t in concepts if int(t) not in where]
        if missing:
            raise KeyError(f"class {cls}: GIG to concepts {missing} was not computed (columns: {sorted(where)})")
        return row[:, [where[int(t)] for t in concepts]]

    def of(self, cls: int) -> Tensor:
        """The mean attribution of class ``cls``: ``(K_a,)`` or ``(K_a, T)``."""
        hit = (self.classes == int(cls)).nonzero()
        if hit.numel() == 0:
            raise KeyError(f"class {cls} did not occur; classes are {self.classes.tolist()}")
        return self.mean[int(hit[0, 0])]


def _check_classes(classes) -> Optional[Tensor]:
    if classes is None:
        return None
    t = torch.as_tensor(classes)
    if t.dim() == 0:
        t = t.view(1)
    if t.is_floating_point() or t.dim() != 1:
        raise ValueError(f"classes must be an int or a 1-D sequence of ints; got {classes!r}")
    return t.long()


def _accumulate(
    model: nn.Module,
    data: Data,
    by: str,
    classes: Optional[Tensor],
    batch_size: int,
    progress: bool,
    desc: str,
    item_shape: Sequence[int],
    attribute: Callable[[Tensor, Tensor], Tensor],
) -> ClassAttribution:
    """Stream this rank's batches, attribute each image to its class, sum per class, reduce over ranks."""
    if by not in BY:
        raise ValueError(f"by must be one of {BY}; got {by!r}")
    if by == "all" and classes is not None:
        raise ValueError("classes cannot be combined with by='all' (one class -1 holds every image)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    device = model_device(model)
    sums: Dict[int, Tensor] = {}
    counts: Dict[int, int] = {}
    r, w = _dist.rank(), _dist.world_size()
    bar = tqdm(
        total=count_shard(data, batch_size, r, w),
        disable=not progress or not _dist.is_main_process(),
        desc=desc,
        unit="batch",
    )
    try:
        for number, (_start, images, labels) in enumerate(iter_shard(data, batch_size, r, w)):
            images = images.to(device)
            n = images.shape[0]
            if by == "label":
                if labels is None:
                    raise ValueError("by='label' needs data that yields (images, labels) pairs")
                cls = labels.to(device=device, dtype=torch.long).reshape(-1)
                if cls.shape[0] != n:
                    raise ValueError(f"batch {number} has {n} images but {cls.shape[0]} labels")
            elif by == "prediction":
                with frozen(model), torch.no_grad():
                    logits = model(images)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise ValueError("by='prediction' needs a model returning (N, classes) scores")
                cls = logits.argmax(dim=1)
            else:
                cls = torch.full((n,), -1, dtype=torch.long, device=device)
            if classes is not None:
                keep = torch.isin(cls, classes.to(cls.device))
                images, cls = images[keep], cls[keep]
            if images.shape[0]:
                attr = attribute(images, cls).detach().double()
                present, inverse = torch.unique(cls, return_inverse=True)
                part = torch.zeros((present.shape[0],) + tuple(attr.shape[1:]), dtype=attr.dtype, device=attr.device)
                part.index_add_(0, inverse, attr)
                for i, c in enumerate(present.tolist()):
                    sums[c] = sums[c] + part[i] if c in sums else part[i]
                    counts[c] = counts.get(c, 0) + int((inverse == i).sum())
            bar.update(1)
    finally:
        bar.close()

    found = sorted(set().union(*_dist.all_gather_object(sorted(counts))))
    dtype = torch.get_default_dtype()
    out_device = next(iter(sums.values())).device if sums else device
    total = torch.zeros((len(found),) + tuple(item_shape), dtype=torch.float64, device=out_device)
    number = torch.zeros(len(found), dtype=torch.float64, device=out_device)
    for i, c in enumerate(found):
        if c in sums:
            total[i] = sums[c]
            number[i] = counts[c]
    total, number = _dist.all_reduce(total), _dist.all_reduce(number)
    mean = total / number.clamp_min(1).view((-1,) + (1,) * len(item_shape))
    return ClassAttribution(
        classes=torch.tensor(found, dtype=torch.long, device=out_device),
        mean=mean.to(dtype),
        counts=number.round().long(),
    )


def class_attribution(
    model: nn.Module,
    layer: LayerSpec,
    decomposer: PFVDecomposer,
    data: Data,
    *,
    by: str = "prediction",
    classes: Optional[Sequence[int]] = None,
    n_steps: int = 32,
    output: str = "logit",
    method: str = "gausslegendre",
    batch_size: int = 32,
    internal_batch_size: Optional[int] = None,
    attribute_to_layer_input: bool = False,
    residual: bool = False,
    progress: bool = True,
    attribution: str = "gig",
) -> ClassAttribution:
    r"""Mean GIG of a layer's concepts to each image's class, per class (eq. 7 averaged).

    For every image ``x`` with class ``c`` (its label or the model's
    prediction) the GIG of every concept ``q`` of ``layer`` to the class
    score ``s_c`` is computed with :class:`GeneralizedIntegratedGradients`
    (``layer_b=None``) and averaged over the images of each class:

    .. math:: \overline{GIG}(v_q \to c) = \frac{1}{|D_c|} \sum_{x \in D_c} GIG_x(v_q \to c)

    The data is streamed in batches. When ``torch.distributed`` is
    initialised, each process attributes its shard of the batches and sums
    and counts are all-reduced: every process returns the same result, equal
    to the single-process one.

    Args:
        model (nn.Module): the image model returning ``(N, n_classes)`` scores.
        layer (nn.Module or str): the source layer ``a``.
        decomposer (PFVDecomposer): concepts and Lasso of ``layer``.
        data (Tensor or iterable): images ``(N, ...)``, or a DataLoader /
                    iterable of image batches or ``(images, labels)`` pairs.
        by (str, optional): the class of an image: ``"prediction"`` (argmax
                    of the model's scores) or ``"label"``. Default: ``"prediction"``
        classes (sequence of int, optional): only these classes (images of
                    other classes are skipped, not attributed). Default: None
        n_steps (int, optional): path points of the integral. Default: 32
        output (str, optional): ``"logit"`` or ``"prob"``. Default: ``"logit"``
        method (str, optional): Captum's quadrature. Default: ``"gausslegendre"``
        batch_size (int, optional): images per batch when ``data`` is a
                    tensor. Default: 32
        internal_batch_size (int, optional): path points times images per
                    forward, as in Captum. Default: None
        attribute_to_layer_input (bool, optional): PFVs are the layer's input.
                    Default: False
        residual (bool, optional): integrate to the real activation; the
                    residual node becomes column ``K_a``. Default: False
        progress (bool, optional): progress bar (rank 0 only). Default: True
        attribution (str, optional): ``"gig"`` or a baseline of
                    :data:`captum_gig.baselines.ATTRIBUTIONS` (``"endpoint"``,
                    ``"magnitude"``, ``"ablation"``) averaged the same way.
                    Default: ``"gig"``

    Returns:
        ClassAttribution: ``classes (n,)``, ``mean (n, K_a)`` (``K_a + 1``
        with residual), ``counts (n,)``.

    Examples::

        >>> res = class_attribution(model, "layer4.2", dec4, loader, by="label", classes=[207, 208])
        >>> res.mean.shape, res.counts
        (torch.Size([2, 16384]), tensor([50, 50]))
        >>> top = res.of(207).topk(5).indices    # the class's five most contributing concepts
    """
    if by == "all":
        raise ValueError("by must be 'prediction' or 'label' for class_attribution (a class is the target)")
    gig = attribution_class(attribution)(
        model, layer, decomposer, output=output, attribute_to_layer_input=attribute_to_layer_input
    )
    extra = {"residual": residual} if residual else {}

    def attribute(images: Tensor, cls: Tensor) -> Tensor:
        return gig.attribute(images, target=cls, n_steps=n_steps, method=method, internal_batch_size=internal_batch_size,
                             **extra)

    width = decomposer.n_concepts + (1 if residual else 0)
    return _accumulate(
        model, data, by, _check_classes(classes), batch_size, progress, f"class GIG of {gig.layer_a}", (width,), attribute
    )


def interlayer_attribution(
    model: nn.Module,
    layer_a: LayerSpec,
    decomposer_a: PFVDecomposer,
    layer_b: LayerSpec,
    decomposer_b: Any,
    data: Data,
    *,
    targets: Optional[Sequence[int]] = None,
    by: str = "prediction",
    classes: Optional[Sequence[int]] = None,
    n_steps: int = 16,
    method: str = "gausslegendre",
    batch_size: int = 32,
    internal_batch_size: Optional[int] = None,
    attribute_to_layer_input: bool = False,
    residual: bool = False,
    progress: bool = True,
    attribution: str = "gig",
    **matrix_kwargs,
) -> ClassAttribution:
    r"""Mean concept-to-concept GIG matrix between two layers, per class (eq. 5 averaged).

    For every image, :meth:`GeneralizedIntegratedGradients.attribute_matrix`
    gives the ``(K_a, T)`` GIG of each layer-``a`` concept to each target
    concept of layer ``b``; these are averaged over the images of each class
    (``by="label"`` / ``"prediction"``) or over all images (``by="all"``, one
    class ``-1``). Streams the data; distributed as :func:`class_attribution`.

    Args:
        model (nn.Module): the image model.
        layer_a (nn.Module or str): the source layer.
        decomposer_a (PFVDecomposer): concepts and Lasso of ``layer_a``.
        layer_b (nn.Module or str): the later target layer.
        decomposer_b (PFVDecomposer or ConceptBasis): concepts of ``layer_b``.
        data (Tensor or iterable): images, or batches / ``(images, labels)``.
        targets (sequence of int, optional): ``T`` concept indices of layer
                    ``b``; None for all ``K_b``. Default: None
        by (str, optional): ``"prediction"``, ``"label"`` or ``"all"``.
                    Default: ``"prediction"``
        classes (sequence of int, optional): only these classes. Default: None
        n_steps (int, optional): path points. Default: 16
        method (str, optional): Captum's quadrature. Default: ``"gausslegendre"``
        batch_size (int, optional): images per batch for tensor data. Default: 32
        internal_batch_size (int, optional): path points times images per forward.
        attribute_to_layer_input (bool, optional): layer ``a``'s PFVs are its input.
        residual (bool, optional): add the residual node as row ``K_a``.
        progress (bool, optional): progress bar (rank 0 only). Default: True
        attribution (str, optional): ``"gig"`` or a baseline of
                    :data:`captum_gig.baselines.ATTRIBUTIONS`. Default: ``"gig"``
        **matrix_kwargs: passed to ``attribute_matrix`` (``vjp_batch_size``, ``max_memory``).

    Returns:
        ClassAttribution: ``classes (n,)``, ``mean (n, K_a (+1), T)``, ``counts (n,)``.

    Examples::

        >>> res = interlayer_attribution(model, "layer3.5", dec3, "layer4.2", dec4, loader, by="all")
        >>> res.mean[0].shape           # (K_a, K_b) averaged over the dataset
    """
    gig = attribution_class(attribution)(
        model, layer_a, decomposer_a, layer_b, decomposer_b, attribute_to_layer_input=attribute_to_layer_input
    )
    t_idx = None
    if targets is not None:
        t_idx = torch.as_tensor(targets).long().reshape(-1)
    n_targets = gig.decomposer_b.n_concepts if t_idx is None else t_idx.shape[0]

    def attribute(images: Tensor, cls: Tensor) -> Tensor:
        return gig.attribute_matrix(
            images,
            targets=t_idx,
            n_steps=n_steps,
            method=method,
            internal_batch_size=internal_batch_size,
            **({"residual": True} if residual else {}),
            **matrix_kwargs,
        )

    rows = decomposer_a.n_concepts + (1 if residual else 0)
    return _accumulate(
        model,
        data,
        by,
        _check_classes(classes),
        batch_size,
        progress,
        f"GIG {gig.layer_a} -> {gig.layer_b}",
        (rows, n_targets),
        attribute,
    )
