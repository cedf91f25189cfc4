"""The pipeline's output folder: where each artifact lives and how it is written and read back.

Every tensor artifact is safetensors with JSON metadata (:mod:`captum_gig._io`),
every summary plain JSON; only the main process writes.
"""

import json
import os
from typing import Any, Dict, List

import torch
from torch import Tensor

from . import distributed as _dist
from ._io import atomic_write_text, load_artifact, save_artifact
from ._sources import safe_name

__all__ = ["load_coefficients", "load_class_attribution"]


def pfv_path(run, layer: str, heldout: bool = False) -> str:
    return run.path("pfvs", *(["heldout"] if heldout else []), f"{safe_name(layer)}.safetensors")


def basis_path(run, layer: str) -> str:
    return run.path("bases", f"{safe_name(layer)}.safetensors")


def coef_path(run, layer: str) -> str:
    return run.path("coefficients", f"{safe_name(layer)}.safetensors")


def class_attr_path(run, layer: str) -> str:
    return run.path("attribution", "class", f"{safe_name(layer)}.safetensors")


def inter_path(run, a: str, b: str) -> str:
    return run.path("attribution", "interlayer", f"{safe_name(a)}--{safe_name(b)}.safetensors")


def save(path: str, kind: str, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> str:
    if _dist.is_main_process():
        save_artifact(path, kind, tensors, meta)
    return path


def write_json(path: str, obj: Any) -> str:
    if _dist.is_main_process():
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def files_under(folder: str) -> List[str]:
    out = []
    for dirpath, _d, files in os.walk(folder):
        out += [os.path.join(dirpath, f) for f in sorted(files) if not f.startswith(".tmp-") and not f.endswith(".tmp")]
    return out


def load_coefficients(path: str) -> Tensor:
    """The dense ``(N, K)`` coefficients stored by the pipeline's ``decompose`` stage."""
    tensors, meta = load_artifact(path, "SparseCoefficients")
    U = torch.zeros(meta["shape"], dtype=tensors["values"].dtype)
    U[tensors["indices"][:, 0], tensors["indices"][:, 1]] = tensors["values"]
    return U


def save_class_attribution(path: str, result, meta: Dict[str, Any]) -> str:
    tensors = {"classes": result.classes, "mean": result.mean, "counts": result.counts}
    if getattr(result, "targets", None) is not None:
        tensors["targets"] = result.targets
    return save(path, "ClassAttribution", tensors, meta)


def load_class_attribution(path: str):
    """A :class:`~captum_gig.ClassAttribution` written by the pipeline's ``attribute`` stage."""
    from .aggregate import ClassAttribution

    tensors, _ = load_artifact(path, "ClassAttribution")
    return ClassAttribution(tensors["classes"], tensors["mean"], tensors["counts"], tensors.get("targets"))
