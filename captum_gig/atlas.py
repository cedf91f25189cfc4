r"""Concept atlas and concept localisation (paper section 3.2.1, Fig. 1 bottom, Fig. 3 right).

A concept is shown by the PFVs closest to it: for every concept vector of a
:class:`~captum_gig.ConceptBasis`, the ``top_k`` PFVs of a
:class:`~captum_gig.PFVSet` with the highest cosine similarity to it (both
centred by the basis offset), each shown by its iERF crop with context
(:func:`captum_gig.ierf.ierf`) and the label of its source image.

Concept localisation is where in one image a concept is used: its Lasso
coefficient at every position of the layer, upsampled to the input with
Captum's :meth:`LayerAttribution.interpolate` and drawn over the image with
``captum.attr.visualization``.
"""

import base64
import io
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution
from torch import Tensor, nn

from ._hooks import LayerSpec, model_device, resolve_layer
from ._io import atomic_write_text
from ._version import __version__
from .ierf import ierf

__all__ = ["ConceptAtlas", "concept_localisation", "draw_localisation"]


def _to_uint8_rgb(crops: Tensor) -> np.ndarray:
    """``(n, C, s, s)`` in [0, 1] -> ``(n, s, s, 3)`` uint8."""
    x = crops.detach().cpu().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3]
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(image: np.ndarray) -> str:
    """An ``(H, W, 3)`` uint8 array as a ``data:image/png;base64,...`` URI (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


class ConceptAtlas:
    r"""The nearest PFVs of each concept of one layer, with their iERF crops.

    Build with :meth:`build`; save with :meth:`save` (a folder with
    ``atlas.json`` and one PNG strip of crops per concept; no pickle) and read
    back with :meth:`load`.

    Attributes:
        layer (str): the layer.
        concepts (list of int): the concepts shown.
        entries (dict): concept -> list of dicts, nearest first: ``pfv``
                    (index into the PFVSet), ``image``, ``position``,
                    ``cosine``, ``label``, ``class_name``, ``rf_box``, ``box``,
                    ``crop_box`` (boxes ``(top, left, bottom, right)`` in input
                    pixels).
        crops (dict): concept -> ``(n, s, s, 3)`` uint8 array of iERF crops.
        meta (dict): how it was built.

    Examples::

        >>> atlas = ConceptAtlas.build(model, "_blocks.10", basis, pfvs, images, top_k=8,
        ...                            concepts=graph.concepts("_blocks.10"), class_names=imagenet_categories())
        >>> atlas.to_png("atlas/")           # one grid per concept
        >>> atlas.save("atlas_blocks10"); ConceptAtlas.load("atlas_blocks10")
    """

    def __init__(self, layer: str, entries: Dict[int, List[Dict[str, Any]]], crops: Dict[int, np.ndarray],
                 meta: Optional[Dict[str, Any]] = None):
        self.layer = str(layer)
        self.entries = {int(k): list(v) for k, v in entries.items()}
        self.crops = {int(k): np.asarray(v, dtype=np.uint8) for k, v in crops.items()}
        if set(self.entries) != set(self.crops):
            raise ValueError("entries and crops must cover the same concepts")
        for k in self.entries:
            if len(self.entries[k]) != len(self.crops[k]):
                raise ValueError(f"concept {k}: {len(self.entries[k])} entries but {len(self.crops[k])} crops")
        self.meta = dict(meta or {})

    @property
    def concepts(self) -> List[int]:
        return sorted(self.entries)

    def __repr__(self) -> str:
        return f"ConceptAtlas(layer={self.layer!r}, concepts={len(self.entries)}, top_k={self.meta.get('top_k')})"

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, ConceptAtlas)
            and self.layer == other.layer
            and self.entries == other.entries
            and self.concepts == other.concepts
            and all(np.array_equal(self.crops[k], other.crops[k]) for k in self.concepts)
        )

    @staticmethod
    def nearest(basis, pfvs, top_k: int, concepts: Optional[Sequence[int]] = None,
                distinct_images: bool = False) -> Tuple[Tensor, Tensor]:
        """Indices ``(n_concepts, k)`` of the PFVs most cosine-similar to each concept, and the similarities.

        With ``distinct_images`` at most one PFV per image (its most similar) is
        taken, so a concept's examples come from ``k`` different images where
        there are that many.
        """
        V = basis.vectors
        X = pfvs.vectors.to(V) - basis.offset.to(V)
        if concepts is not None:
            V = V[torch.as_tensor(list(concepts), dtype=torch.long, device=V.device)]
        sim = F.normalize(V, dim=1) @ F.normalize(X, dim=1).t()  # (n_concepts, N)
        k = min(top_k, X.shape[0])
        if not distinct_images:
            values, index = sim.topk(k, dim=1)
            return index, values
        images = pfvs.image_index.to(sim.device)
        order = sim.argsort(dim=1, descending=True)
        rows = []
        for j in range(sim.shape[0]):
            seen, picked = set(), []
            for i in order[j].tolist():
                image = int(images[i])
                if image not in seen:
                    seen.add(image)
                    picked.append(i)
                    if len(picked) == k:
                        break
            rows.append(picked)
        k = min(len(r) for r in rows)  # the images available bound every concept alike
        index = torch.tensor([r[:k] for r in rows], dtype=torch.long, device=sim.device)
        return index, sim.gather(1, index)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        layer: LayerSpec,
        basis,
        pfvs,
        images: Union[Tensor, Callable[[Sequence[int]], Tensor]],
        *,
        top_k: int = 8,
        distinct_images: bool = False,
        labels: Optional[Tensor] = None,
        class_names: Optional[Sequence[str]] = None,
        concepts: Optional[Sequence[int]] = None,
        method: Callable[..., Any] = IntegratedGradients,
        attribute_kwargs: Optional[Dict[str, Any]] = None,
        attribute_to_layer_input: bool = False,
        context: float = 0.25,
        crop_size: int = 64,
        display: Optional[Callable[[Tensor], Tensor]] = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> "ConceptAtlas":
        r"""The atlas of ``basis``'s concepts from the PFVs ``pfvs`` of ``images``.

        Args:
            model (nn.Module): the image model.
            layer (nn.Module or str): the layer of ``basis`` and ``pfvs``.
            basis (ConceptBasis): the concepts (``K`` vectors).
            pfvs (PFVSet): PFVs of the layer with image indices and positions.
            images (Tensor or callable): ``(N_images, C, H, W)`` model inputs,
                        indexed by ``pfvs.image_index`` (the order collect_pfvs
                        saw them), or a function ``indices -> (n, C, H, W)``
                        that loads just the images the atlas shows (a dataset
                        too large to hold at once).
            top_k (int, optional): nearest PFVs per concept. Default: 8
            distinct_images (bool, optional): each concept's examples from
                        different images (the most similar PFV of each).
                        Default: False
            labels (Tensor, optional): ``(N_images,)`` labels; default
                        ``pfvs.labels``.
            class_names (list of str, optional): label -> name.
            concepts (list of int, optional): only these concepts (e.g. a
                        graph's nodes); all ``K`` by default.
            method (type, optional): Captum attribution class for the iERF.
                        Default: ``IntegratedGradients``
            attribute_kwargs (dict, optional): for ``method.attribute``.
                        Default: ``{"n_steps": 16}`` for IntegratedGradients
            attribute_to_layer_input (bool, optional): Default: False
            context (float, optional): crop context, see :func:`ierf`. Default: 0.25
            crop_size (int, optional): crop side in pixels. Default: 64
            display (callable, optional): model inputs -> [0, 1] images.
            batch_size (int, optional): PFVs per iERF call. Default: 8
            progress (bool, optional): show progress. Default: True

        Returns:
            ConceptAtlas
        """
        name, module = resolve_layer(model, layer)
        if pfvs.layer != name:
            raise ValueError(f"pfvs are of layer {pfvs.layer!r}, not {name!r}")
        if basis.n_channels != pfvs.n_channels:
            raise ValueError(f"basis has {basis.n_channels} channels but pfvs have {pfvs.n_channels}")
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"images must be a (N_images, C, H, W) tensor; got {tuple(images.shape)}")
            if int(pfvs.image_index.max()) >= images.shape[0]:
                raise ValueError(
                    f"pfvs refer to image {int(pfvs.image_index.max())} but images holds {images.shape[0]}: pass the "
                    "images in the order collect_pfvs read them"
                )
            held = images
            images = lambda idx: held[torch.as_tensor(idx, dtype=torch.long).to(held.device)]  # noqa: E731
        elif not callable(images):
            raise ValueError(f"images must be a (N_images, C, H, W) tensor or a loader function; got {type(images).__name__}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int; got {top_k!r}")
        chosen = list(range(basis.n_concepts)) if concepts is None else [int(c) for c in concepts]
        for c in chosen:
            if not 0 <= c < basis.n_concepts:
                raise ValueError(f"concepts: {c} is not a concept of the basis ({basis.n_concepts} concepts)")
        if attribute_kwargs is None:
            attribute_kwargs = {"n_steps": 16} if method is IntegratedGradients else {}
        index, cosine = cls.nearest(basis, pfvs, top_k, chosen, distinct_images)
        unique = torch.unique(index.flatten()).cpu()
        img_idx = pfvs.image_index[unique].long().cpu()
        pos = pfvs.position[unique].long().cpu()
        needed, copy = torch.unique(img_idx, return_inverse=True)  # each image loaded once
        shown = images(needed.tolist())
        shown = shown[copy.to(shown.device)].to(model_device(model))
        res = ierf(
            model, module, shown, pos, method=method,
            attribute_to_layer_input=attribute_to_layer_input, offset=basis.offset, context=context,
            crop_size=crop_size, batch_size=batch_size, display=display, attribute_kwargs=attribute_kwargs,
            progress=progress,
        )
        row_of = {int(u): r for r, u in enumerate(unique.tolist())}
        rgb = _to_uint8_rgb(res.crops)
        lab = labels if labels is not None else None
        entries: Dict[int, List[Dict[str, Any]]] = {}
        crops: Dict[int, np.ndarray] = {}
        for j, c in enumerate(chosen):
            items, rows = [], []
            for i, cos in zip(index[j].tolist(), cosine[j].tolist()):
                r = row_of[i]
                image = int(pfvs.image_index[i])
                if lab is not None:
                    label = int(lab[image])
                elif pfvs.labels is not None:
                    label = int(pfvs.labels[i])
                else:
                    label = -1
                cname = class_names[label] if class_names is not None and 0 <= label < len(class_names) else None
                items.append({
                    "pfv": int(i), "image": image, "position": int(pfvs.position[i]), "cosine": float(cos),
                    "label": label, "class_name": cname, "rf_box": res.rf_boxes[r].tolist(),
                    "box": res.boxes[r].tolist(), "crop_box": res.crop_boxes[r].tolist(),
                })
                rows.append(r)
            entries[c] = items
            crops[c] = rgb[rows]
        meta = {"top_k": top_k, "method": getattr(method, "__name__", str(method)), "context": context,
                "crop_size": crop_size, "image_size": list(shown.shape[2:]), "n_pfvs": len(pfvs),
                "distinct_images": distinct_images}
        return cls(name, entries, crops, meta)

    # -- pictures -----------------------------------------------------------------------------
    def thumbnail(self, concept: int, n: int = 1) -> np.ndarray:
        """``(s, s, 3)`` uint8: the nearest crop, or a mosaic of the ``n`` nearest (n = 4 or 9 ...)."""
        crops = self.crops[int(concept)]
        if n <= 1 or len(crops) == 1:
            return crops[0]
        side = int(np.ceil(np.sqrt(min(n, len(crops)))))
        s = crops.shape[1]
        tile = np.zeros((side * s, side * s, 3), dtype=np.uint8)
        for i, crop in enumerate(crops[: side * side]):
            tile[(i // side) * s : (i // side + 1) * s, (i % side) * s : (i % side + 1) * s] = crop
        small = torch.from_numpy(tile).permute(2, 0, 1).unsqueeze(0).float()
        small = F.interpolate(small, size=(s, s), mode="area")[0].permute(1, 2, 0)
        return small.round().clamp(0, 255).byte().numpy()

    def figure(self, concept: int, title: Optional[str] = None):
        """A matplotlib figure: the crops of one concept in a row, with cosine and class."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        crops, items = self.crops[int(concept)], self.entries[int(concept)]
        n = len(crops)
        fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
        for ax, crop, item in zip(axes[0], crops, items):
            ax.imshow(crop)
            ax.set_xticks([]), ax.set_yticks([])
            name = item["class_name"] or (f"label {item['label']}" if item["label"] >= 0 else f"image {item['image']}")
            ax.set_title(f"{name[:14]}\ncos {item['cosine']:.2f}", fontsize=7)
        fig.suptitle(title or f"{self.layer} concept {concept}", fontsize=9)
        fig.tight_layout()
        return fig

    def to_png(self, folder: str, concepts: Optional[Sequence[int]] = None, dpi: int = 100) -> List[str]:
        """Write one annotated grid per concept, ``folder/<layer>_concept<k>.png``; returns the paths."""
        import matplotlib.pyplot as plt

        os.makedirs(folder, exist_ok=True)
        paths = []
        for k in concepts if concepts is not None else self.concepts:
            fig = self.figure(k)
            path = os.path.join(folder, f"{self.layer.replace('.', '_')}_concept{int(k)}.png")
            tmp = path + ".tmp.png"
            fig.savefig(tmp, dpi=dpi)
            plt.close(fig)
            os.replace(tmp, path)
            paths.append(path)
        return paths

    # -- files --------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Save as ``folder/atlas.json`` plus ``folder/concept_<k>.png`` (crops side by side); no pickle."""
        os.makedirs(folder, exist_ok=True)
        for k in self.concepts:
            strip = np.concatenate(list(self.crops[k]), axis=1)
            data = png_bytes(strip)
            path = os.path.join(folder, f"concept_{k}.png")
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        doc = {
            "kind": "ConceptAtlas", "captum_gig_version": __version__, "layer": self.layer, "meta": self.meta,
            "concepts": [{"concept": k, "file": f"concept_{k}.png", "entries": self.entries[k]} for k in self.concepts],
        }
        atomic_write_text(os.path.join(folder, "atlas.json"), json.dumps(doc, indent=1))

    @classmethod
    def load(cls, folder: str) -> "ConceptAtlas":
        """Read an atlas written by :meth:`save`."""
        from PIL import Image

        path = os.path.join(folder, "atlas.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no atlas.json in {folder!r}")
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("kind") != "ConceptAtlas":
            raise ValueError(f"{path!r} does not hold a ConceptAtlas")
        entries, crops = {}, {}
        for item in doc["concepts"]:
            k = int(item["concept"])
            fname = os.path.basename(item["file"])  # never leave the folder
            strip = np.asarray(Image.open(os.path.join(folder, fname)).convert("RGB"))
            n = len(item["entries"])
            s = strip.shape[0]
            if n == 0 or strip.shape[1] != n * s:
                raise ValueError(f"{fname}: a {strip.shape[1]}x{s} strip cannot hold {n} crops of {s}x{s}")
            crops[k] = np.stack([strip[:, i * s : (i + 1) * s] for i in range(n)])
            entries[k] = item["entries"]
        return cls(doc["layer"], entries, crops, doc.get("meta"))


def concept_localisation(decomposer, activation: Tensor, concept: int, input_size: Tuple[int, int],
                         interpolate_mode: str = "bilinear") -> Tensor:
    r"""Where a concept is used in an image: its coefficient map, upsampled to the input.

    Args:
        decomposer (PFVDecomposer): the layer's decomposer.
        activation (Tensor): the layer's activation, ``(N, C, h, w)`` or
                    ``(N, T, C)`` (tokens on a square grid, optionally after
                    one class token).
        concept (int): the concept index.
        input_size (tuple): ``(H, W)`` of the input.
        interpolate_mode (str, optional): passed to Captum's
                    ``LayerAttribution.interpolate``. Default: ``"bilinear"``

    Returns:
        Tensor: ``(N, 1, H, W)`` the coefficient ``u_{p, concept}`` at every
        position, upsampled.

    Examples::

        >>> act = run_until(model, "_blocks.10", images)
        >>> loc = concept_localisation(dec, act, 17, images.shape[-2:])
        >>> fig, ax = draw_localisation(display_image, loc[0])
    """
    if not 0 <= int(concept) < decomposer.n_concepts:
        raise ValueError(f"concept must index one of the {decomposer.n_concepts} concepts; got {concept}")
    U = decomposer.transform(activation.detach())
    if U.dim() == 4:
        m = U[:, int(concept) : int(concept) + 1]
    elif U.dim() == 3:
        t = U.shape[1]
        side = int(round(t**0.5))
        skip = 0
        if side * side != t:
            side = int(round((t - 1) ** 0.5))
            skip = 1
            if side * side != t - 1:
                raise ValueError(f"token layer with {t} tokens is not a square grid (with or without a class token)")
        m = U[:, skip:, int(concept)].reshape(U.shape[0], 1, side, side)
    else:
        raise ValueError(f"activation must be (N, C, h, w) or (N, T, C); got shape {tuple(activation.shape)}")
    return LayerAttribution.interpolate(m, tuple(int(s) for s in input_size), interpolate_mode=interpolate_mode)


def draw_localisation(image: Tensor, localisation: Tensor, *, sign: str = "positive", title: Optional[str] = None,
                      plt_fig_axis=None, **kwargs):
    """Draw a concept localisation over an image with ``captum.attr.visualization.visualize_image_attr``.

    Args:
        image (Tensor): ``(C, H, W)`` display image in [0, 1].
        localisation (Tensor): ``(1, H, W)`` or ``(H, W)`` map from :func:`concept_localisation`.
        sign (str, optional): Captum's sign option. Default: ``"positive"``

    Returns:
        (figure, axis) from Captum.
    """
    from captum.attr import visualization as viz

    loc = localisation.detach().cpu().float()
    if loc.dim() == 3:
        loc = loc[0]
    img = image.detach().cpu().float().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return viz.visualize_image_attr(
        loc.unsqueeze(-1).numpy(), img.permute(1, 2, 0).numpy(), method="blended_heat_map", sign=sign,
        title=title, use_pyplot=False, plt_fig_axis=plt_fig_axis, **kwargs,
    )
