"""The one place that knows how a layer's activation is laid out.

A pointwise feature vector (PFV) is the channel vector at one position:

* ``(N, C, H, W)`` -- conv layers, channel axis 1, positions ``H x W``;
* ``(N, T, C)``    -- token layers (ViT), channel axis last, positions ``T``;
* ``(N, C)``       -- one position per example (pooled features, logits).

Everything in the library goes through :func:`to_pfvs` / :func:`from_pfvs` so
that CNNs and ViTs are handled by the same code.
"""

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["channel_axis", "spatial_shape", "n_positions", "to_pfvs", "from_pfvs", "move_channels_last", "move_channels_back"]


def channel_axis(ndim: int) -> int:
    """Channel axis of an activation with ``ndim`` dimensions (batch included)."""
    if ndim == 4:
        return 1
    if ndim in (2, 3):
        return ndim - 1
    raise ValueError(
        f"a layer activation must be (N, C, H, W), (N, T, C) or (N, C); got {ndim} dimensions"
    )


def spatial_shape(activation: Tensor) -> Tuple[int, ...]:
    """Shape of the position grid: ``(H, W)``, ``(T,)`` or ``()``."""
    if activation.dim() == 4:
        return tuple(activation.shape[2:])
    if activation.dim() == 3:
        return (activation.shape[1],)
    channel_axis(activation.dim())
    return ()


def n_positions(spatial: Tuple[int, ...]) -> int:
    n = 1
    for s in spatial:
        n *= int(s)
    return n


def to_pfvs(activation: Tensor) -> Tensor:
    """``(N, C, H, W)`` / ``(N, T, C)`` / ``(N, C)`` -> ``(N, P, C)`` (a view where possible)."""
    if activation.dim() == 4:
        return activation.flatten(2).transpose(1, 2)
    if activation.dim() == 3:
        return activation
    if activation.dim() == 2:
        return activation.unsqueeze(1)
    channel_axis(activation.dim())  # raises
    raise AssertionError


def from_pfvs(pfvs: Tensor, spatial: Tuple[int, ...]) -> Tensor:
    """Inverse of :func:`to_pfvs`: ``(N, P, C)`` -> the layer's layout for ``spatial``."""
    if pfvs.dim() != 3:
        raise ValueError(f"expected (N, P, C) PFVs, got shape {tuple(pfvs.shape)}")
    if len(spatial) == 2:
        n, _, c = pfvs.shape
        return pfvs.transpose(1, 2).reshape(n, c, *spatial)
    if len(spatial) == 1:
        return pfvs
    if len(spatial) == 0:
        return pfvs[:, 0]
    raise ValueError(f"unsupported position grid {spatial}")


def move_channels_last(x: Tensor) -> Tensor:
    """Any activation (or a single vector ``(C,)``) with channels moved to the last axis.

    4-D tensors are read as ``(N, C, H, W)``; 1-, 2- and 3-D tensors already have
    channels last.
    """
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1)
    if x.dim() in (1, 2, 3):
        return x
    raise ValueError(
        f"expected PFVs (..., C), (N, T, C) or an (N, C, H, W) activation; got shape {tuple(x.shape)}"
    )


def move_channels_back(x: Tensor, ndim: int) -> Tensor:
    """Inverse of :func:`move_channels_last` for an input that had ``ndim`` dimensions."""
    if ndim == 4:
        return x.permute(0, 3, 1, 2)
    return x


def unravel_position(position: Tensor, spatial: Tuple[int, ...]) -> Tensor:
    """Flat position indices -> ``(n, len(spatial))`` grid coordinates (row, col) or (token,)."""
    if len(spatial) == 0:
        return position.new_zeros((position.shape[0], 0))
    coords = []
    rest = position.clone()
    for size in reversed(spatial):
        coords.append(rest % size)
        rest = torch.div(rest, size, rounding_mode="floor")
    return torch.stack(coords[::-1], dim=1)
