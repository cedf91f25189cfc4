r"""Concept-quality diagnostics: are a layer's concepts dataset-wide, or pictures of single images?

The paper's point is concepts shared across images and classes. Two numbers
per concept tell whether a fitted basis delivers that:

* **image diversity** -- the number of distinct images (or source photos,
  when augmented copies are grouped) among the concept's ``top_m`` members,
  the training PFVs assigned to it that are most cosine-similar to it. A
  concept whose members all come from one image is that image, not a
  concept; when most concepts of a layer are like that, the dataset is too
  small for ``K`` concepts and :func:`concept_diagnostics` warns;
* **sharedness** -- the number of classes to which the concept gives at least
  ``share`` of their class GIG (the positive part of eq. 7, normalised per
  class): a concept several classes rely on is a shared concept (Fig. 1).
"""

import warnings
from typing import Any, Dict, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["ConceptDiagnostics", "concept_diagnostics", "image_diversity", "class_sharedness"]


class ConceptDiagnostics(NamedTuple):
    r"""Per-concept quality numbers of one layer.

    Attributes:
        layer (str): the layer.
        n_members (Tensor): ``(K,)`` training PFVs assigned to each concept.
        distinct_images (Tensor): ``(K,)`` distinct images (or groups) among
                    each concept's ``top_m`` most similar members.
        top_m (int): members looked at per concept.
        n_classes (Tensor or None): ``(K,)`` classes receiving at least
                    ``share`` of their class GIG from the concept (None
                    without a class attribution).
        share (float): the sharedness threshold.
    """

    layer: str
    n_members: Tensor
    distinct_images: Tensor
    top_m: int
    n_classes: Optional[Tensor] = None
    share: float = 0.05

    def summary(self) -> Dict[str, Any]:
        """JSON-able medians and shares (what the report and the closing numbers quote)."""
        distinct = self.distinct_images.double()
        out: Dict[str, Any] = {
            "layer": self.layer,
            "n_concepts": int(distinct.numel()),
            "top_m": self.top_m,
            "median_members": float(self.n_members.double().median()),
            "median_distinct_images": float(distinct.median()),
            "share_single_image": float((self.distinct_images <= 1).double().mean()),
        }
        if self.n_classes is not None:
            important = self.n_classes >= 1
            out.update({
                "share": self.share,
                "important_concepts": int(important.sum()),
                "shared_concepts": int((self.n_classes >= 2).sum()),
                "share_shared_of_important": float((self.n_classes[important] >= 2).double().mean())
                if bool(important.any()) else 0.0,
                "max_classes_per_concept": int(self.n_classes.max()) if self.n_classes.numel() else 0,
            })
        return out


def image_diversity(basis, pfvs, top_m: int = 16, groups: Optional[Tensor] = None):
    r"""``(n_members, distinct)``: members per concept and distinct images among the ``top_m`` most similar.

    Args:
        basis (ConceptBasis): a fitted basis whose ``labels`` assign each of
                    the training PFVs to a concept.
        pfvs (PFVSet): the training PFVs the basis was fitted on.
        top_m (int, optional): members looked at per concept. Default: 16
        groups (Tensor, optional): ``(n_images,)`` group of every image (e.g.
                    the source photo of augmented copies); images of one group
                    count once. Default: None (every image its own group)

    Returns:
        (Tensor, Tensor): ``(K,)`` int64 each.
    """
    if basis.labels is None:
        raise ValueError("the basis has no labels (member assignments); diagnostics need a basis fitted on pfvs")
    labels = torch.as_tensor(basis.labels).long().cpu()
    if labels.shape[0] != len(pfvs):
        raise ValueError(f"the basis was fitted on {labels.shape[0]} PFVs but pfvs holds {len(pfvs)}")
    if not isinstance(top_m, int) or top_m < 1:
        raise ValueError(f"top_m must be a positive int; got {top_m!r}")
    k = basis.n_concepts
    V = torch.nn.functional.normalize(basis.vectors.double().cpu(), dim=1)
    X = torch.nn.functional.normalize(pfvs.vectors.double().cpu() - basis.offset.double().cpu(), dim=1)
    similarity = (X * V[labels]).sum(1).numpy()
    images = pfvs.image_index.long().cpu()
    if groups is not None:
        images = torch.as_tensor(groups).long().cpu()[images]
    lab = labels.numpy()
    order = np.lexsort((-similarity, lab))  # by concept, most similar first
    sorted_lab = lab[order]
    starts = np.searchsorted(sorted_lab, np.arange(k))
    rank = np.arange(len(order)) - starts[sorted_lab]
    keep = order[rank < top_m]
    pairs = np.unique(np.stack([lab[keep], images.numpy()[keep]], 1), axis=0)
    distinct = np.bincount(pairs[:, 0], minlength=k) if len(pairs) else np.zeros(k, dtype=np.int64)
    members = np.bincount(lab, minlength=k)
    return torch.from_numpy(members.astype(np.int64)), torch.from_numpy(distinct.astype(np.int64))


def class_sharedness(class_gig: Tensor, share: float = 0.05) -> Tensor:
    r"""``(K,)``: for each concept, the classes that receive at least ``share`` of their class GIG from it.

    Args:
        class_gig (Tensor): ``(n_classes, K)`` mean class GIG (eq. 7 averaged,
                    e.g. ``ClassAttribution.mean``); each row's positive part
                    is normalised to sum to 1.
        share (float, optional): the threshold. Default: 0.05
    """
    g = torch.as_tensor(class_gig).double().clamp_min(0)
    total = g.sum(1, keepdim=True)
    shares = torch.where(total > 0, g / total.clamp_min(1e-300), torch.zeros_like(g))
    return (shares >= share).sum(0)


def concept_diagnostics(basis, pfvs, class_gig: Optional[Tensor] = None, *, top_m: int = 16, share: float = 0.05,
                        groups: Optional[Tensor] = None, layer: Optional[str] = None,
                        warn: bool = True) -> ConceptDiagnostics:
    r"""Image diversity and sharedness of every concept of a layer.

    Warns (one line naming the layer) when most concepts draw their
    ``top_m`` members from a single image: the dataset is too small for
    ``K`` concepts.

    Args:
        basis (ConceptBasis): the fitted basis (with member ``labels``).
        pfvs (PFVSet): the PFVs it was fitted on.
        class_gig (Tensor, optional): ``(n_classes, K)`` mean class GIG for
                    the sharedness. Default: None
        top_m (int, optional): members per concept looked at. Default: 16
        share (float, optional): sharedness threshold. Default: 0.05
        groups (Tensor, optional): group of each image (see :func:`image_diversity`).
        layer (str, optional): the layer's name for the warning. Default: the basis's
        warn (bool, optional): emit the warning. Default: True

    Returns:
        ConceptDiagnostics

    Examples::

        >>> diag = concept_diagnostics(basis, pfvs, class_gig=ca.mean)
        >>> diag.summary()["median_distinct_images"]
    """
    members, distinct = image_diversity(basis, pfvs, top_m, groups)
    name = layer or basis.layer or pfvs.layer or "the layer"
    single = float((distinct <= 1).double().mean())
    if warn and single > 0.5:
        warnings.warn(f"layer {name}: {single:.0%} of its {basis.n_concepts} concepts draw their top-{top_m} members "
                      f"from a single image; the dataset is too small for K = {basis.n_concepts} (use more images, "
                      "augmentation or fewer concepts)", stacklevel=2)
    n_classes = None
    if class_gig is not None:
        class_gig = torch.as_tensor(class_gig)
        if class_gig.dim() != 2 or class_gig.shape[1] != basis.n_concepts:
            raise ValueError(f"class_gig must be (n_classes, {basis.n_concepts}); got {tuple(class_gig.shape)}")
        n_classes = class_sharedness(class_gig, share)
    return ConceptDiagnostics(name, members, distinct, top_m, n_classes, share)
