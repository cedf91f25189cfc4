"""The one place that reads image batches from what users pass as ``data``."""

from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

Data = Union[Tensor, Iterable]

__all__ = ["iter_batches", "count_batches", "iter_shard", "count_shard"]


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


def _loader_batches(data) -> Optional[list]:
    """The index lists of a map-style DataLoader's batches, without loading any data (else None)."""
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

    if not isinstance(data, DataLoader) or data.batch_sampler is None or isinstance(data.dataset, IterableDataset):
        return None
    if isinstance(data.sampler, RandomSampler):
        raise ValueError(
            "data is a shuffling DataLoader: in a distributed run every process must see the images in the "
            "same order; use shuffle=False (the order defines the global image index)"
        )
    return [list(b) for b in data.batch_sampler]


def iter_shard(
    data: Data, batch_size: int = 32, rank: int = 0, world_size: int = 1
) -> Iterator[Tuple[int, Tensor, Optional[Tensor]]]:
    """Yield ``(global index of the first image, images, labels or None)`` of this rank's batches.

    The data is cut into the same batches as :func:`iter_batches`; rank ``r``
    of ``W`` takes batches ``r, r + W, ...`` and the start index counts images
    in the order of the whole data, so results that depend on the image index
    (e.g. per-image random draws) do not depend on ``W``. Single-process
    (``W = 1``) it yields every batch.

    A tensor is sliced; an object with a method ``shard(rank, world_size)``
    yielding ``(start, batch)`` pairs is asked for its batches; a DataLoader
    over a map-style dataset is rebuilt on this rank's batches only (no other
    image is loaded); any other iterable is read whole by every rank, skipping
    the other ranks' batches.
    """
    if world_size == 1:
        start = 0
        for images, labels in iter_batches(data, batch_size):
            yield start, images, labels
            start += images.shape[0]
        return
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(f"data as a tensor must be a batch of images (N, ...); got shape {tuple(data.shape)}")
        for start in range(rank * batch_size, data.shape[0], world_size * batch_size):
            yield start, data[start : start + batch_size], None
        return
    if callable(getattr(data, "shard", None)):  # data that can load one rank's batches only
        for start, item in data.shard(rank, world_size):
            images, labels = _split(item)
            yield start, images, labels
        return
    batches = _loader_batches(data)
    if batches is not None:
        from torch.utils.data import DataLoader

        starts = [0]
        for b in batches:
            starts.append(starts[-1] + len(b))
        mine = list(range(rank, len(batches), world_size))
        loader = DataLoader(
            data.dataset,
            batch_sampler=[batches[i] for i in mine],
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            worker_init_fn=data.worker_init_fn,
        )
        for i, (images, labels) in zip(mine, iter_batches(loader, batch_size)):
            yield starts[i], images, labels
        return
    start = 0
    for number, (images, labels) in enumerate(iter_batches(data, batch_size)):
        if number % world_size == rank:
            yield start, images, labels
        start += images.shape[0]


def count_shard(data: Data, batch_size: int = 32, rank: int = 0, world_size: int = 1) -> Optional[int]:
    """Number of batches :func:`iter_shard` yields, when known without iterating."""
    total = count_batches(data, batch_size)
    if total is None:
        return None
    return len(range(rank, total, world_size))
