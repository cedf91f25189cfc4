"""The one place that reads image batches from what users pass as ``data``."""

from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

Data = Union[Tensor, Iterable]

__all__ = ["iter_batches", "count_batches"]


def _split(item) -> Tuple[Tensor, Optional[Tensor]]:
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, dict):
        images = item.get("image", item.get("images", item.get("pixel_values")))
        labels = item.get("label", item.get("labels"))
        if images is None:
            raise TypeError("a dict batch needs an 'image' / 'images' / 'pixel_values' entry")
        return images, (torch.as_tensor(labels) if labels is not None else None)
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        labels = item[1] if len(item) > 1 else None
        if labels is not None and not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        return item[0], labels
    raise TypeError(
        "data must yield image tensors (N, ...) or (images, labels) pairs; "
        f"got an item of type {type(item).__name__}"
    )


def iter_batches(data: Data, batch_size: int = 32) -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
    """Yield ``(images, labels or None)`` from a tensor, a DataLoader or any iterable of batches."""
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(f"data as a tensor must be a batch of images (N, ...); got shape {tuple(data.shape)}")
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size], None
        return
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a tensor, a DataLoader or an iterable of batches, got {type(data).__name__}")
    for item in data:
        images, labels = _split(item)
        if images.dim() < 2:
            raise ValueError(f"each batch must be (N, ...) images; got shape {tuple(images.shape)}")
        yield images, labels


def count_batches(data: Data, batch_size: int = 32) -> Optional[int]:
    """Number of batches when it is known without iterating (for progress bars)."""
    if isinstance(data, Tensor):
        return (data.shape[0] + batch_size - 1) // batch_size if data.dim() else None
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
