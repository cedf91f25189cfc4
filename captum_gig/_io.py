"""The one artifact format: a safetensors file whose header carries JSON metadata.

Loading never unpickles: safetensors holds raw tensor bytes, and the metadata
is plain JSON. Writes go to a temporary file in the same folder first and are
renamed into place, so an interrupted run never leaves a half-written artifact.
"""

import json
import os
import tempfile
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._version import __version__

_KEY = "captum_gig"

__all__ = ["save_artifact", "load_artifact", "read_metadata", "atomic_write_text"]


def _atomic_target(path: str) -> Tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)


def _publish(tmp: str, path: str) -> None:
    """Move a finished temporary file into place."""
    # mkstemp makes owner-only files; artifacts get the permissions of an ordinary new file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file (JSON, HTML, ...) atomically."""
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_artifact(path: str, kind: str, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> None:
    """Save ``tensors`` with JSON ``meta`` (plus ``kind`` and library version) atomically."""
    header = dict(meta)
    header["kind"] = kind
    header["captum_gig_version"] = __version__
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if v is not None}
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file(data, tmp, metadata={_KEY: json.dumps(header)})
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metadata(path: str) -> Dict[str, Any]:
    """The JSON metadata of an artifact, without loading its tensors."""
    return _open(path, kind=None, device="cpu", tensors=False)[1]


def load_artifact(
    path: str, kind: Optional[str], device: str = "cpu"
) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Load an artifact written by :func:`save_artifact`, checking its ``kind``."""
    return _open(path, kind, device, tensors=True)


def _open(path: str, kind: Optional[str], device, tensors: bool):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no artifact at {path!r}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get(_KEY)
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path!r} is not a readable captum_gig artifact (corrupt or truncated?): {err}") from err
    if raw is None:
        raise ValueError(f"{path!r} is a safetensors file without captum_gig metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r} has unreadable captum_gig metadata: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r} has unreadable captum_gig metadata")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path!r} holds a {meta.get('kind')!r}, not a {kind!r}")
    written_by = str(meta.get("captum_gig_version", "unknown"))
    if written_by.split(".")[:2] != __version__.split(".")[:2]:
        warnings.warn(f"{path!r} was written by captum_gig {written_by}; this is {__version__}")
    return data, meta


def as_json_value(x):
    """Tuples -> lists etc. so metadata is plain JSON."""
    if isinstance(x, (list, tuple)):
        return [as_json_value(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x
