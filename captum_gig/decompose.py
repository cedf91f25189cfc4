"""Sparse decomposition of PFVs on a concept basis (paper section 3.2.2, eq. 1-2)."""

from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import _layout
from . import distributed as _dist
from .concepts import ConceptBasis
from .metrics import l0_ratio, relative_l2

__all__ = ["PFVDecomposer", "DecompositionScore", "alpha_max", "lasso_objective"]

ArrayLike = Union[Tensor, np.ndarray]


class DecompositionScore(NamedTuple):
    rel_l2: float
    """mean ``||x - x_hat|| / ||x||`` over PFVs (lower is better)"""
    l0_ratio: float
    """fraction of zero coefficients (higher is sparser)"""


def lasso_objective(Xc: Tensor, U: Tensor, V: Tensor, alpha: float) -> Tensor:
    r"""Per-row ``1/2 ||xc - u V||^2 + alpha ||u||_1`` for centred PFVs ``Xc (n, C)``."""
    return 0.5 * (Xc - U @ V).pow(2).sum(1) + alpha * U.abs().sum(1)


def alpha_max(basis: ConceptBasis, X: Tensor) -> Tensor:
    r"""Per PFV, the smallest ``alpha`` for which its coefficients are all zero.

    ``alpha_max(x) = ||(x - beta) V^T||_inf``; a fraction of its median is a
    data-scaled choice of ``alpha``.

    Args:
        basis (ConceptBasis): the concepts.
        X (Tensor): ``(n, C)`` PFVs.

    Returns:
        Tensor: ``(n,)``.
    """
    V = basis.vectors.to(device=X.device, dtype=X.dtype)
    return ((X - basis.offset.to(V)) @ V.t()).abs().amax(dim=1)


class PFVDecomposer:
    r"""Decompose PFVs into sparse concept coefficients with the Lasso (eq. 2).

    For every PFV ``x`` it solves

    .. math:: u^* = \arg\min_u \tfrac12 \|(x - \beta) - u V\|_2^2 + \alpha \|u\|_1

    with ``V (K, C)`` and ``beta`` from the :class:`ConceptBasis` -- the same
    objective as ``sklearn.decomposition.sparse_encode(alpha=...)``. All PFVs
    are solved at once, in chunks of ``chunk_size`` rows, on the tensors'
    device, by FISTA with adaptive restart; a row stops when its duality gap
    falls below ``tol`` times its objective.

    Inputs may be PFVs ``(..., C)`` (channels last), a token layer
    ``(N, T, C)`` or a whole conv layer ``(N, C, H, W)``; outputs keep the
    layout with ``K`` in place of ``C``. NumPy arrays in give NumPy arrays out,
    so the decomposer also works inside scikit-learn code.

    Args:
        basis (ConceptBasis): concepts ``V`` and offset ``beta``.
        alpha (float, optional): sparsity weight lambda, absolute (see
                    :func:`alpha_max` for a data-scaled choice). Default: 1.0
        max_iter (int, optional): iteration limit per row. Default: 1000
        tol (float, optional): relative duality gap at which a row stops.
                    Default: 1e-4
        positive (bool, optional): constrain coefficients to be >= 0.
                    Default: False
        chunk_size (int, optional): rows solved together. Default: 4096
        progress (bool, optional): progress bar over chunks. Default: False

    Examples::

        >>> dec = PFVDecomposer(basis, alpha=0.1)
        >>> U = dec.transform(pfvs.vectors)           # (N, K)
        >>> X_hat = dec.inverse_transform(U)           # (N, C), offset included
        >>> dec.score(pfvs.vectors)
        DecompositionScore(rel_l2=0.41, l0_ratio=0.996)
    """

    def __init__(
        self,
        basis: ConceptBasis,
        alpha: float = 1.0,
        *,
        max_iter: int = 1000,
        tol: float = 1e-4,
        positive: bool = False,
        chunk_size: int = 4096,
        progress: bool = False,
    ):
        if not isinstance(basis, ConceptBasis):
            raise TypeError(f"basis must be a ConceptBasis; got {type(basis).__name__}")
        if not (isinstance(alpha, (int, float)) and alpha >= 0 and np.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number >= 0; got {alpha!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int; got {max_iter!r}")
        self.basis = basis
        self.alpha = float(alpha)
        self.max_iter = max_iter
        self.tol = tol
        self.positive = positive
        self.chunk_size = chunk_size
        self.progress = progress
        self._cache: Dict[Tuple, Tuple[Tensor, Tensor, float]] = {}

    @property
    def n_concepts(self) -> int:
        return self.basis.n_concepts

    @property
    def n_channels(self) -> int:
        return self.basis.n_channels

    def to(self, device=None, dtype=None) -> "PFVDecomposer":
        """A decomposer whose basis lives on ``device`` / in ``dtype``."""
        return PFVDecomposer(
            self.basis.to(device, dtype),
            self.alpha,
            max_iter=self.max_iter,
            tol=self.tol,
            positive=self.positive,
            chunk_size=self.chunk_size,
            progress=self.progress,
        )

    def fit(self, X=None, y=None) -> "PFVDecomposer":
        """No-op (the basis is fitted already); here for scikit-learn pipelines."""
        return self

    # -- helpers ---------------------------------------------------------------------------
    def _operands(self, like: Tensor) -> Tuple[Tensor, Tensor, float]:
        """``V``, ``beta`` in ``like``'s dtype and the Lipschitz constant ``||V||_2^2``."""
        if like.device != self.basis.vectors.device:
            raise ValueError(
                f"PFVs are on {like.device} but the concept basis is on {self.basis.vectors.device}; "
                "move one of them (decomposer.to(device))"
            )
        if not like.is_floating_point():
            raise TypeError(f"PFVs must be floating point; got {like.dtype}")
        key = (like.device, like.dtype)
        if key not in self._cache:
            V = self.basis.vectors.to(like.dtype)
            V64 = self.basis.vectors.double()
            gram = V64.t() @ V64 if V64.shape[1] <= V64.shape[0] else V64 @ V64.t()
            lipschitz = float(torch.linalg.eigvalsh(gram)[-1])
            self._cache[key] = (V, self.basis.offset.to(like.dtype), lipschitz)
        return self._cache[key]

    def _channels_last(self, X: Tensor, argument: str) -> Tensor:
        Xl = _layout.move_channels_last(X)
        if Xl.shape[-1] != self.n_channels:
            raise ValueError(
                f"{argument} has {Xl.shape[-1]} channels on its channel axis (shape {tuple(X.shape)}) but the "
                f"concept basis has {self.n_channels}"
            )
        return Xl

    # -- API -------------------------------------------------------------------------------
    def transform(self, X: ArrayLike, *, distributed: bool = False) -> ArrayLike:
        r"""Sparse coefficients of PFVs.

        Args:
            X (Tensor or ndarray): ``(..., C)``, ``(N, T, C)`` or ``(N, C, H, W)``.
            distributed (bool, optional): every process passes the same ``X``;
                        under ``torch.distributed`` each solves its share of the
                        chunks of ``chunk_size`` rows and the coefficients are
                        gathered (see :mod:`captum_gig.distributed`). Default: False

        Returns:
            Tensor or ndarray: ``(..., K)``, ``(N, T, K)`` or ``(N, K, H, W)``.
        """
        if isinstance(X, np.ndarray):
            return self.transform(torch.from_numpy(X).to(self.basis.vectors.device), distributed=distributed).cpu().numpy()
        if not isinstance(X, Tensor):
            raise TypeError(f"X must be a tensor or ndarray; got {type(X).__name__}")
        if distributed and _dist.is_distributed():
            return _dist.sharded_transform(self, X)
        Xl = self._channels_last(X, "X")
        flat = Xl.reshape(-1, self.n_channels)
        if not torch.isfinite(flat).all():
            raise ValueError("X contains NaN or inf")
        V, beta, lipschitz = self._operands(flat)
        U = torch.empty(flat.shape[0], self.n_concepts, dtype=flat.dtype, device=flat.device)
        starts = range(0, flat.shape[0], self.chunk_size)
        with torch.no_grad():
            for start in tqdm(starts, disable=not self.progress, desc="Lasso", unit="chunk"):
                chunk = flat[start : start + self.chunk_size] - beta
                U[start : start + chunk.shape[0]] = _fista(chunk, V, lipschitz, self.alpha, self.max_iter, self.tol, self.positive)
        return _layout.move_channels_back(U.reshape(*Xl.shape[:-1], self.n_concepts), X.dim())

    def inverse_transform(self, U: ArrayLike) -> ArrayLike:
        r"""Reconstruction ``X_hat = U V + beta`` (eq. 9), layout as ``U``'s.

        Args:
            U (Tensor or ndarray): ``(..., K)``, ``(N, T, K)`` or ``(N, K, H, W)``.

        Returns:
            Tensor or ndarray: ``(..., C)``, ``(N, T, C)`` or ``(N, C, H, W)``.
        """
        if isinstance(U, np.ndarray):
            return self.inverse_transform(torch.from_numpy(U).to(self.basis.vectors.device)).cpu().numpy()
        Ul = _layout.move_channels_last(U)
        if Ul.shape[-1] != self.n_concepts:
            raise ValueError(
                f"U has {Ul.shape[-1]} coefficients on its concept axis (shape {tuple(U.shape)}) "
                f"but the basis has {self.n_concepts} concepts"
            )
        V, beta, _ = self._operands(Ul)
        return _layout.move_channels_back(Ul @ V + beta, U.dim())

    def objective(self, X: Tensor, U: Tensor) -> Tensor:
        """Per-PFV Lasso objective of coefficients ``U`` for PFVs ``X`` (any layout)."""
        Xl = self._channels_last(X, "X").reshape(-1, self.n_channels)
        Ul = _layout.move_channels_last(U).reshape(-1, self.n_concepts)
        V, beta, _ = self._operands(Xl)
        return lasso_objective(Xl - beta, Ul, V, self.alpha)

    def score(self, X: ArrayLike) -> DecompositionScore:
        r"""Relative l2 reconstruction error and l0 ratio on ``X`` (paper 4.2.2)."""
        if isinstance(X, np.ndarray):
            X = torch.from_numpy(X).to(self.basis.vectors.device)
        U = self.transform(X)
        X_hat = self.inverse_transform(U)
        Xl = _layout.move_channels_last(X)
        return DecompositionScore(
            rel_l2=float(relative_l2(Xl, _layout.move_channels_last(X_hat))),
            l0_ratio=float(l0_ratio(U)),
        )


def _soft_threshold(z: Tensor, threshold: float, positive: bool) -> Tensor:
    if positive:
        return (z - threshold).clamp_min(0)
    return torch.sign(z) * (z.abs() - threshold).clamp_min(0)


def _duality_gap(Xc: Tensor, U: Tensor, V: Tensor, alpha: float, positive: bool) -> Tuple[Tensor, Tensor]:
    """Per-row ``(primal objective, duality gap)`` of the Lasso at ``U``."""
    R = Xc - U @ V
    corr = R @ V.t()
    bound = corr.clamp_min(0).amax(1) if positive else corr.abs().amax(1)
    scale = torch.where(bound > alpha, alpha / bound.clamp_min(1e-30), torch.ones_like(bound))
    primal = 0.5 * R.pow(2).sum(1) + alpha * U.abs().sum(1)
    theta = R * scale.unsqueeze(1)
    dual = (Xc * theta).sum(1) - 0.5 * theta.pow(2).sum(1)
    return primal, primal - dual


def _fista(Xc: Tensor, V: Tensor, lipschitz: float, alpha: float, max_iter: int, tol: float, positive: bool,
           check_every: int = 10) -> Tensor:
    """FISTA with gradient-based adaptive restart on a chunk of centred PFVs ``Xc (n, C)``."""
    n, k = Xc.shape[0], V.shape[0]
    out = torch.zeros(n, k, dtype=Xc.dtype, device=Xc.device)
    if lipschitz <= 0 or n == 0:
        return out
    step, threshold = 1.0 / lipschitz, alpha / lipschitz
    rows = torch.arange(n, device=Xc.device)
    x = Xc
    u = torch.zeros(n, k, dtype=Xc.dtype, device=Xc.device)
    y = u.clone()
    t = torch.ones(n, 1, dtype=Xc.dtype, device=Xc.device)
    for it in range(1, max_iter + 1):
        grad = (y @ V - x) @ V.t()
        u_new = _soft_threshold(y - step * grad, threshold, positive)
        t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
        momentum = (t - 1) / t_new
        # restart where the momentum points uphill (O'Donoghue & Candes 2015)
        uphill = ((y - u_new) * (u_new - u)).sum(1, keepdim=True) > 0
        y = torch.where(uphill, u_new, u_new + momentum * (u_new - u))
        t = torch.where(uphill, torch.ones_like(t_new), t_new)
        u = u_new
        if it % check_every == 0 or it == max_iter:
            primal, gap = _duality_gap(x, u, V, alpha, positive)
            done = gap <= tol * primal.clamp_min(1e-30)
            if it == max_iter:
                done = torch.ones_like(done)
            if done.any():
                out[rows[done]] = u[done]
                keep = ~done
                rows, x, u, y, t = rows[keep], x[keep], u[keep], y[keep], t[keep]
                if rows.numel() == 0:
                    break
    return out
