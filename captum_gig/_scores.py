"""Reconstruction scores of a decomposition (paper 4.2.2), below both the Lasso and the evaluation."""

from torch import Tensor

__all__ = ["relative_l2", "l0_ratio"]


def relative_l2(X: Tensor, X_hat: Tensor) -> Tensor:
    r"""Mean over PFVs of ``||x - x_hat|| / ||x||`` (Rel-l2, paper 4.2.2).

    Args:
        X (Tensor): ``(..., C)`` original PFVs (channels last).
        X_hat (Tensor): ``(..., C)`` their reconstructions.

    Returns:
        Tensor: scalar. PFVs with ``||x|| = 0`` are left out.
    """
    if X.shape != X_hat.shape:
        raise ValueError(f"X and X_hat must have the same shape; got {tuple(X.shape)} and {tuple(X_hat.shape)}")
    X, X_hat = X.reshape(-1, X.shape[-1]), X_hat.reshape(-1, X.shape[-1])
    norm = X.norm(dim=1)
    keep = norm > 0
    return ((X - X_hat).norm(dim=1)[keep] / norm[keep]).mean()


def l0_ratio(U: Tensor) -> Tensor:
    r"""Fraction of zero coefficients (the paper's l0 ratio, higher is sparser).

    Args:
        U (Tensor): ``(..., K)`` coefficients.

    Returns:
        Tensor: scalar in [0, 1].
    """
    return (U == 0).float().mean()
