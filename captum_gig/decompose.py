"""Sparse decomposition of PFVs on a concept basis (paper section 3.2.2, eq. 1-2)."""

import warnings
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import _layout
from ._checks import all_finite
from . import distributed as _dist
from .concepts import ConceptBasis
from ._scores import l0_ratio, relative_l2

__all__ = ["PFVDecomposer", "DecompositionScore", "alpha_max", "lasso_objective"]

ArrayLike = Union[Tensor, np.ndarray]

SOLVERS = ("auto", "homotopy", "working_set", "fista")

#: the "auto" solver follows the homotopy path for bases of at most this many channels
HOMOTOPY_CHANNELS = 128


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
    device; a row stops when its duality gap falls below ``tol`` times its
    objective.

    ``solver="homotopy"``: each row follows its exact solution path (LARS-Lasso)
    from all-zero coefficients down to ``alpha``, one event (a concept joins
    or leaves) per step, so a row costs about as many steps as it has
    non-zeros. ``solver="working_set"``: solutions are sparse (a few percent of the
    concepts), so each row's problem is solved exactly on a small set of
    candidate concepts (batched orthant-Newton steps on blocks of the Gram
    matrix ``V V^T``), and one pair of matmuls per round checks optimality on
    all concepts and adds the violators. ``solver="fista"`` is plain batched
    FISTA with adaptive restart. The default ``"auto"`` follows the homotopy
    for narrow layers (at most ``HOMOTOPY_CHANNELS = 128`` channels) and takes
    working sets for wide ones. Equal PFVs (a flat background, zero padding)
    are solved once.

    Inputs may be PFVs ``(..., C)`` (channels last), a token layer
    ``(N, T, C)`` or a whole conv layer ``(N, C, H, W)``; outputs keep the
    layout with ``K`` in place of ``C``. NumPy arrays in give NumPy arrays out,
    so the decomposer also works inside scikit-learn code.

    Args:
        basis (ConceptBasis): concepts ``V`` and offset ``beta``.
        alpha (float, optional): sparsity weight lambda, absolute (see
                    :func:`alpha_max` for a data-scaled choice). Default: 1.0
        max_iter (int, optional): limit on working-set rounds (FISTA: on
                    iterations) per chunk. Default: 1000
        tol (float, optional): relative duality gap at which a row stops.
                    Default: 1e-4
        positive (bool, optional): constrain coefficients to be >= 0.
                    Default: False
        chunk_size (int, optional): rows solved together. Default: 4096
        solver (str, optional): ``"auto"``, ``"homotopy"``, ``"working_set"``
                    or ``"fista"``. Default: ``"auto"``
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
        solver: str = "auto",
        progress: bool = False,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
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
        self.solver = solver
        self.progress = progress
        self._cache: Dict[Tuple, Tuple[Tensor, Tensor, float]] = {}
        self._gram: Dict[Tuple, Tensor] = {}

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
            solver=self.solver,
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

    def _solver(self) -> str:
        if self.solver != "auto":
            return self.solver
        # measured on every position of Fashion-MNIST CNN layers (C = 16-64, K = 8 C, 2-7 non-zeros per PFV):
        # the homotopy 3-17x faster than working sets and FISTA; on wide layers (C >= 256) working sets win
        return "homotopy" if self.n_channels <= HOMOTOPY_CHANNELS else "working_set"

    def _gram_matrix(self, V: Tensor) -> Tensor:
        """``V V^T`` in float64 for the working-set solver's small exact solves (cached)."""
        key = (V.device, V.dtype)
        if key not in self._gram:
            # float64 products are cheap on GPUs and for small K; large CPU Grams are formed in the
            # working dtype and widened (the solver tolerates the round-off: see _orthant_solution)
            wide = V.device.type != "cpu" or V.shape[0] <= 4096
            self._gram[key] = V.double() @ V.double().t() if wide else (V @ V.t()).double()
        return self._gram[key]

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
        if not all_finite(flat):
            raise ValueError("X contains NaN or inf")
        V, beta, lipschitz = self._operands(flat)
        if flat.element_size() < 4:  # half precision: squared norms in the duality gap overflow float16
            flat, V, beta = flat.float(), V.float(), beta.float()
        with torch.no_grad():
            distinct = _distinct_rows(flat)
            if distinct is not None:  # equal PFVs (flat backgrounds, padding) have equal coefficients
                flat, copies = distinct
            U = self._solve(flat, V, beta, lipschitz)
            if distinct is not None:
                U = U[copies]
        U = U.to(Xl.dtype)
        return _layout.move_channels_back(U.reshape(*Xl.shape[:-1], self.n_concepts), X.dim())

    def _solve(self, flat: Tensor, V: Tensor, beta: Tensor, lipschitz: float) -> Tensor:
        """Coefficients ``(n, K)`` of the PFVs ``flat (n, C)``, chunk by chunk."""
        U = torch.empty(flat.shape[0], self.n_concepts, dtype=flat.dtype, device=flat.device)
        starts = range(0, flat.shape[0], self.chunk_size)
        solver = self._solver()
        gram = self._gram_matrix(V) if solver != "fista" else None
        for start in tqdm(starts, disable=not self.progress, desc="Lasso", unit="chunk"):
            chunk = flat[start : start + self.chunk_size] - beta
            if solver == "homotopy":
                part = _homotopy(chunk, V, gram, lipschitz, self.alpha, self.max_iter, self.tol, self.positive)
            elif solver == "working_set":
                part = _working_set(chunk, V, gram, lipschitz, self.alpha, self.max_iter, self.tol, self.positive)
            else:
                part = _fista(chunk, V, lipschitz, self.alpha, self.max_iter, self.tol, self.positive)
            U[start : start + chunk.shape[0]] = part
        return U

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
        flat = Ul.reshape(-1, self.n_concepts)
        return _layout.move_channels_back((sparse_times(flat, V) + beta).reshape(*Ul.shape[:-1], -1), U.dim())

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


def _distinct_rows(flat: Tensor, share: float = 0.9) -> Optional[Tuple[Tensor, Tensor]]:
    """The distinct rows of ``flat (n, C)`` and, per row, the index of its copy among them.

    None when more than ``share`` of the rows are distinct (nothing to gain).
    Rows are keyed by a random projection (equal rows, equal keys) and every row
    is compared with its representative, so a key shared by different rows
    only costs the saving, never a wrong coefficient.
    """
    n = flat.shape[0]
    if n < 2:
        return None
    probe = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys, copies = torch.unique(flat.double() @ probe.to(flat.device), return_inverse=True)
    if keys.shape[0] > share * n:
        return None
    first = torch.full((keys.shape[0],), n, dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, copies, torch.arange(n, device=flat.device), reduce="amin")
    distinct = flat[first]
    if not torch.equal(distinct[copies], flat):
        return None
    return distinct, copies


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
           check_every: int = 10, start: Optional[Tensor] = None) -> Tensor:
    """FISTA with gradient-based adaptive restart on a chunk of centred PFVs ``Xc (n, C)``.

    ``start`` (n, K), if given, is the initial point (a warm start).
    """
    n, k = Xc.shape[0], V.shape[0]
    out = torch.zeros(n, k, dtype=Xc.dtype, device=Xc.device)
    if lipschitz <= 0 or n == 0:
        return out
    step, threshold = 1.0 / lipschitz, alpha / lipschitz
    rows = torch.arange(n, device=Xc.device)
    x = Xc
    u = torch.zeros(n, k, dtype=Xc.dtype, device=Xc.device) if start is None else start.to(Xc.dtype).clone()
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




def _restricted_objective(G: Tensor, b: Tensor, u: Tensor, alpha: float) -> Tensor:
    return 0.5 * (u * torch.bmm(G, u.unsqueeze(2)).squeeze(2)).sum(1) - (b * u).sum(1) + alpha * u.abs().sum(1)




def _orthant_newton(G: Tensor, b: Tensor, u: Tensor, valid: Tensor, alpha: float, positive: bool,
                    rank: int, max_steps: int = 100) -> Tensor:
    """Exact Lasso on small working sets: batched projected orthant-Newton (feature-sign search).

    Per row minimises ``1/2 u^T G u - b^T u + alpha |u|_1`` over the slots
    where ``valid`` is True (``G (n, m, m)``, ``b, u (n, m)``, float64). Each
    step fixes a sign pattern -- the current non-zeros plus the zero
    coefficients whose derivative violates optimality most (at most ``rank``
    in all, so the system stays solvable) -- and solves the quadratic of that
    orthant exactly by Cholesky. Of the full step projected onto the orthant,
    the step up to the first sign change (Lee et al. 2007) and a
    proximal-gradient step, the lowest objective is kept, so the objective
    never increases. A row stops once a full Newton step leaves no violator.
    """
    out = u.clone()
    idx = torch.arange(u.shape[0], device=u.device)
    full_step = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    # proximal-gradient fallback: step 1/L with L >= the largest eigenvalue (Gershgorin)
    lipschitz = G.abs().sum(2).amax(1).clamp_min(1e-30)
    for _ in range(max_steps):
        n, m = u.shape
        g = b - torch.bmm(G, u.unsqueeze(2)).squeeze(2)
        excess = torch.where(valid & (u == 0), (g if positive else g.abs()) - alpha, torch.zeros_like(g))
        violating = excess > 0
        finished = full_step & ~violating.any(1)
        if bool(finished.any()):
            out[idx[finished]] = u[finished]
            keep = ~finished
            idx, G, b, u, valid, g, excess, violating, lipschitz = (
                t[keep] for t in (idx, G, b, u, valid, g, excess, violating, lipschitz)
            )
            n = u.shape[0]
            if n == 0:
                return out
        # the most violating zeros enter, within the rank bound
        room = (rank - (u != 0).sum(1)).clamp_min(1)
        by_excess = torch.argsort(excess, dim=1, descending=True)
        rank_of = torch.empty_like(by_excess).scatter_(1, by_excess, torch.arange(m, device=u.device).expand(n, m))
        entering = violating & (rank_of < room.unsqueeze(1))
        sign = torch.where(u != 0, torch.sign(u), torch.where(entering, torch.sign(g), torch.zeros_like(u)))
        for _attempt in range(3):
            target = _orthant_solution(G, b, sign, alpha)
            # coefficients entering from zero must take the sign their derivative gave them; retry without the rest
            wrong = (u == 0) & (sign != 0) & (torch.sign(target) != sign)
            if not bool(wrong.any()):
                break
            sign = torch.where(wrong, torch.zeros_like(sign), sign)
        support = sign != 0
        agrees = torch.sign(target) == sign
        projected = torch.where(agrees, target, torch.zeros_like(target))
        # the step up to the first sign change of a non-zero coefficient
        direction = target - u
        crossing = (u != 0) & ~agrees
        t = torch.where(crossing, -u / torch.where(crossing, direction, torch.ones_like(direction)), torch.ones_like(u))
        step = t.amin(1).clamp(0, 1)
        safe = u + step.unsqueeze(1) * direction
        safe = torch.where((crossing & (t <= step.unsqueeze(1))) | ~support, torch.zeros_like(safe), safe)
        proximal = torch.where(valid, _prox(u + g / lipschitz.unsqueeze(1), alpha / lipschitz.unsqueeze(1), positive), torch.zeros_like(u))
        candidates = torch.stack([projected, safe, proximal])  # (3, n, m)
        values = torch.stack([_restricted_objective(G, b, c, alpha) for c in candidates])
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
        low = values.min(0).values
        # the Newton step wins ties within round-off (else a row at its optimum never counts as finished)
        best = torch.where(values[0] <= low + 1e-12 * low.abs(), torch.zeros_like(low, dtype=torch.long), values.argmin(0))
        u = candidates.gather(0, best.view(1, n, 1).expand(1, n, m)).squeeze(0)
        full_step = (best == 0) & agrees.all(1)
    out[idx] = u
    return out


def _orthant_solution(G: Tensor, b: Tensor, sign: Tensor, alpha: float) -> Tensor:
    """Minimiser of ``1/2 u^T G u - (b - alpha sign)^T u`` over the slots where ``sign != 0``."""
    n, m = sign.shape
    support = sign != 0
    width = max(1, int(support.sum(1).max()))
    order = torch.argsort((~support).to(torch.int8), dim=1, stable=True)[:, :width]
    inside = support.gather(1, order)
    rows = torch.arange(n, device=G.device).view(n, 1, 1)
    eye = torch.eye(width, dtype=G.dtype, device=G.device)
    M = torch.where(inside.unsqueeze(2) & inside.unsqueeze(1), G[rows, order.unsqueeze(2), order.unsqueeze(1)], eye)
    rhs = torch.where(inside, (b - alpha * sign).gather(1, order), torch.zeros_like(b[:, :width]))
    solution = _ridged_solve(M, rhs, inside)
    return torch.zeros_like(b).scatter_(1, order, solution)


def _prox(z: Tensor, threshold: Tensor, positive: bool) -> Tensor:
    """Soft thresholding with a per-row threshold ``(n, 1)``."""
    if positive:
        return (z - threshold).clamp_min(0)
    return torch.sign(z) * (z.abs() - threshold).clamp_min(0)

def _working_set(Xc: Tensor, V: Tensor, gram: Tensor, lipschitz: float, alpha: float, max_iter: int, tol: float,
                 positive: bool, first_size: int = 8, memory: int = 2**26) -> Tensor:
    """Lasso by working sets: solve on a few concepts per row, add the KKT violators, repeat.

    Each row's solution has few non-zeros, so the problem restricted to a small
    working set (its Gram block gathered from ``gram = V V^T``, float64) is
    solved exactly by :func:`_orthant_newton`; one pair of matmuls per round
    checks the duality gap on all ``K`` concepts and finds the concepts that
    must join (largest violations first, the set at least doubling). Rows leave
    as soon as their relative gap is below ``tol``. A row whose restricted
    problem the Newton steps could not solve (more non-zeros than channels, or
    nearly dependent concepts) is solved again by :func:`_homotopy`.
    """
    n, k = Xc.shape[0], V.shape[0]
    out = torch.zeros(n, k, dtype=Xc.dtype, device=Xc.device)
    if n == 0:
        return out
    rank = min(V.shape)
    b0 = Xc @ V.t()  # <x, v_j> for every concept: the linear term of every restricted problem
    score = b0 if positive else b0.abs()
    # a small first set: the restricted solves cost ~m^2 per row per Newton step, and the set doubles
    # in a few cheap rounds (measured: 8 beats 32 by 1.2-3x at 3 to 40 non-zeros per PFV)
    size = min(first_size, k)
    ws = score.topk(size, dim=1).indices
    valid = score.gather(1, ws) > alpha
    u = torch.zeros(n, size, dtype=gram.dtype, device=Xc.device)
    rows = torch.arange(n, device=Xc.device)
    x = Xc
    for _ in range(max_iter):
        m = ws.shape[1]
        step_rows = max(1, memory // max(m * m, 1))
        for s in range(0, ws.shape[0], step_rows):
            sl = slice(s, s + step_rows)
            w, ok = ws[sl], valid[sl]
            G = gram[w.unsqueeze(2), w.unsqueeze(1)]
            G = torch.where(ok.unsqueeze(2) & ok.unsqueeze(1), G, torch.zeros_like(G))
            G.diagonal(dim1=1, dim2=2).add_((~ok).to(G.dtype))
            b = torch.where(ok, b0[sl].gather(1, w).to(gram.dtype), torch.zeros_like(u[sl]))
            u[sl] = _orthant_newton(G, b, u[sl], ok, alpha, positive, rank)
        # the full problem: residual, correlations with every concept, duality gap
        exact = u * valid
        coef = exact.to(x.dtype)
        R = x - _sparse_rows(ws, coef, k) @ V  # a few non-zeros per row: a sparse product, not (n x K) @ V
        nonzero = coef != 0
        if float(nonzero.sum()) < GRAM_CORRELATIONS_BELOW * R.numel():
            # <r, v_j> = <x, v_j> - sum_i u_i <v_i, v_j>: the Gram rows of the non-zeros cost less than R V'
            corr = b0 - (_sparse_rows(ws, exact, k, nonzero) @ gram).to(x.dtype)
        else:
            corr = R @ V.t()
        bound = corr.clamp_min(0).amax(1) if positive else corr.abs().amax(1)
        scale = torch.where(bound > alpha, alpha / bound.clamp_min(1e-30), torch.ones_like(bound))
        primal = 0.5 * R.pow(2).sum(1) + alpha * coef.abs().sum(1)
        theta = R * scale.unsqueeze(1)
        gap = primal - ((x * theta).sum(1) - 0.5 * theta.pow(2).sum(1))
        done = gap <= tol * primal.clamp_min(1e-30)
        if bool(done.any()):
            out[rows[done]] = _dense_rows(ws[done], coef[done], k)
            keep = ~done
            rows, x, b0, ws, valid, u, corr, coef, bound = (
                t[keep] for t in (rows, x, b0, ws, valid, u, corr, coef, bound)
            )
            if rows.numel() == 0:
                return out
        # violators outside the working set join, largest first; the set at least doubles
        in_set = torch.zeros(ws.shape[0], k, dtype=torch.int32, device=x.device).scatter_add_(1, ws, valid.to(torch.int32)) > 0
        violation = torch.where(in_set, torch.full_like(corr, -float("inf")), (corr if positive else corr.abs()) - alpha)
        grow = min(max(first_size, int(valid.sum(1).max())), k)
        top = violation.topk(grow, dim=1)
        joining = top.values > 0
        # nothing outside the set violates, yet the gap is open: within round-off (an in-set violation
        # under 0.1% of alpha) the row is done; otherwise the Newton steps failed and FISTA finishes it
        stalled = ~joining.any(1)
        if bool(stalled.any()):
            failed = stalled & (bound > alpha * (1 + 1e-3))
            accept = stalled & ~failed
            out[rows[accept]] = _dense_rows(ws[accept], coef[accept], k)
            if bool(failed.any()):
                # few rows (dozens of near-dependent concepts in the set): the exact path costs a few of its
                # steps per non-zero, where FISTA's iterations on a handful of rows are latency-bound (measured:
                # 4 rows of ResNet50 layer4, C = 2,048, K = 1,024: 2.2 s, more than the other 2,044 together)
                out[rows[failed]] = _homotopy(x[failed], V, gram, lipschitz, alpha, max_iter, tol, positive)
            keep = ~stalled
            rows, x, b0, ws, valid, u, coef, top, joining = (
                t[keep] for t in (rows, x, b0, ws, valid, u, coef, top.indices, joining)
            )
            if rows.numel() == 0:
                return out
        else:
            top = top.indices
        ws = torch.cat([ws, top], dim=1)
        valid = torch.cat([valid, joining], dim=1)
        u = torch.cat([u, torch.zeros(u.shape[0], grow, dtype=u.dtype, device=u.device)], dim=1)
        # valid slots first, and drop the columns no row uses
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        width = max(1, int(valid.sum(1).max()))
        ws, valid, u = (t.gather(1, order)[:, :width] for t in (ws, valid, u))
    out[rows] = _dense_rows(ws, (u * valid).to(x.dtype), k)
    return out



def _homotopy(Xc: Tensor, V: Tensor, gram: Tensor, lipschitz: float, alpha: float, max_iter: int, tol: float,
              positive: bool, max_steps: Optional[int] = None) -> Tensor:
    """Lasso by the homotopy (LARS-Lasso) path, batched over rows.

    Each row follows its exact solution path from ``lambda = ||V xc||_inf``
    (all coefficients zero) down to ``lambda = alpha``; the path is linear
    between events where a concept joins (its correlation with the residual
    reaches ``lambda``) or a coefficient crosses zero and leaves. A row needs
    about as many steps as its solution has non-zeros, each a solve on its
    active set (at most ``rank V`` concepts) and one ``(C x K)`` product:
    for small bases (``C`` up to a few hundred) this is far cheaper than the
    hundreds of FISTA iterations an ill-conditioned basis needs. Rows whose
    path did not end within ``max_steps`` events, or whose final duality gap
    exceeds ``tol`` (round-off on degenerate paths), are finished by FISTA
    warm-started at the path's point.
    """
    n, k = Xc.shape[0], V.shape[0]
    out = torch.zeros(n, k, dtype=Xc.dtype, device=Xc.device)
    if n == 0:
        return out
    wide = gram.dtype
    Vw = V.to(wide)
    rank = min(V.shape)
    steps = max_steps if max_steps is not None else 4 * rank + 16
    c = Xc.to(wide) @ Vw.t()  # correlations of every concept with the residual (the residual is xc at u = 0)
    score = c.clamp_min(0) if positive else c.abs()
    # a concept parallel to another never joins: with both active G_AA is singular and the path's direction
    # blows up into huge cancelling coefficients; the Lasso puts the pair's weight on the longer one
    twin = _twins(gram)
    score = score.masked_fill(twin, -1.0)
    lam, first = score.max(1)
    rows = (lam > alpha).nonzero().squeeze(1)  # the others are solved by u = 0
    c, lam = c[rows], lam[rows]
    m = rows.shape[0]
    u = torch.zeros(m, k, dtype=wide, device=Xc.device)
    free = (~twin).expand(m, k).clone()  # concepts that may join
    # the active set as a list of slots per row: a joining concept takes a new slot, a leaving one empties its slot
    idx = first[rows].unsqueeze(1)
    inside = torch.ones(m, 1, dtype=torch.bool, device=Xc.device)
    free[torch.arange(m, device=Xc.device), idx[:, 0]] = False
    inf = torch.tensor(float("inf"), dtype=wide, device=Xc.device)
    alive = torch.ones(m, dtype=torch.bool, device=Xc.device)  # rows whose path goes on
    for _ in range(steps):
        if not bool(alive.any()):
            break
        m = rows.shape[0]
        ar = torch.arange(m, device=Xc.device)
        sign = inside.to(wide) if positive else torch.sign(c.gather(1, idx)) * inside
        # direction of the active coefficients per unit decrease of lambda: G_AA d = sign
        d = _solve_active(gram, idx, inside, sign)
        # change of every correlation along the direction: a = G[:, A] d = V (V_A' d)
        a = torch.bmm(d.unsqueeze(1), Vw[idx]).squeeze(1) @ Vw.t()  # (m, K)
        lam_ = lam.unsqueeze(1)
        tiny = 1e-12 * lam_
        # step at which c_j reaches +lambda (or -lambda); a non-positive or 0/0 step never happens
        g = (lam_ - c) / (1 - a)
        g = torch.where(free & (g > tiny), g, inf)
        if not positive:
            down = (lam_ + c) / (1 + a)
            g = torch.minimum(g, torch.where(free & (down > tiny), down, inf))
        g_join, j_join = g.min(1)
        uA = u.gather(1, idx)
        cross = -uA / d
        cross = torch.where(inside & (uA != 0) & (cross > tiny), cross, inf)
        g_drop, t_drop = cross.min(1)
        g_stop = lam - alpha
        gamma = torch.where(alive, torch.minimum(g_stop, torch.minimum(g_join, g_drop)), torch.zeros_like(lam))
        u.scatter_add_(1, idx, gamma.unsqueeze(1) * d)
        c = c - gamma.unsqueeze(1) * a
        lam = lam - gamma
        stop = alive & (g_stop <= torch.minimum(g_join, g_drop))
        drop = alive & ~stop & (g_drop < g_join)
        join = alive & ~stop & ~drop
        leaving = idx[ar, t_drop]
        u[ar[drop], leaving[drop]] = 0.0
        inside[ar[drop], t_drop[drop]] = False
        free[ar, leaving] |= drop  # it may join again later (not at once: its correlation sits at lambda)
        free[ar[join], j_join[join]] = False
        idx = torch.cat([idx, j_join.unsqueeze(1)], 1)
        inside = torch.cat([inside, join.unsqueeze(1)], 1)
        if bool(stop.any()):
            out[rows[stop]] = u[stop].to(out.dtype)
            alive &= ~stop
            # finished rows ride along (gamma = 0) until a quarter of the batch is done: copying every
            # (m, K) state tensor each time one row ends cost more than the rows' share of the steps
            if int(alive.sum()) < 0.75 * m:
                rows, c, lam, u, free, idx, inside, alive = (
                    t[alive] for t in (rows, c, lam, u, free, idx, inside, alive))
        width = int(inside[alive].sum(1).max()) if bool(alive.any()) else 0
        if inside.shape[1] > 2 * max(1, width):  # drop the emptied slots
            order = torch.argsort((~inside).to(torch.int8), dim=1, stable=True)[:, : max(1, width)]
            idx, inside = idx.gather(1, order), inside.gather(1, order)
    if bool(alive.any()):  # paths that did not end: finish them from where they are
        out[rows[alive]] = u[alive].to(out.dtype)
    # the safety net: any row whose duality gap is open (long or degenerate paths) is finished by FISTA
    primal, gap = _duality_gap(Xc, out, V, alpha, positive)
    open_ = gap > tol * primal.clamp_min(1e-30)
    if bool(open_.any()):
        # a path gone astray (huge cancelling coefficients) is a worse start than zero, which costs 0.5 ||xc||^2
        start = torch.where((primal[open_] > 0.5 * Xc[open_].pow(2).sum(1)).unsqueeze(1),
                            torch.zeros_like(out[open_]), out[open_])
        out[open_] = _fista(Xc[open_], V, lipschitz, alpha, max_iter, tol, positive, start=start)
    return out


def _twins(gram: Tensor) -> Tensor:
    """``(K,)`` concepts parallel to another one at least as long (ties: an earlier one)."""
    k = gram.shape[0]
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    parallel = gram / norms.unsqueeze(1) / norms.unsqueeze(0) > 1 - 1e-9
    parallel.fill_diagonal_(False)
    order = torch.arange(k, device=gram.device)
    longer = (norms.unsqueeze(1) > norms.unsqueeze(0)) | (
        (norms.unsqueeze(1) == norms.unsqueeze(0)) & (order.unsqueeze(1) < order.unsqueeze(0)))
    return (parallel & longer).any(0)  # column j: some i parallel to j and longer


def _solve_active(gram: Tensor, idx: Tensor, inside: Tensor, rhs: Tensor) -> Tensor:
    """``G_AA^{-1} rhs`` per row for the active concepts ``idx`` (padding slots get the identity and 0)."""
    eye = torch.eye(idx.shape[1], dtype=gram.dtype, device=gram.device)
    M = torch.where(inside.unsqueeze(2) & inside.unsqueeze(1), gram[idx.unsqueeze(2), idx.unsqueeze(1)], eye)
    return _ridged_solve(M, rhs, inside)


def _ridged_solve(M: Tensor, rhs: Tensor, inside: Tensor) -> Tensor:
    """Batched ``M^{-1} rhs`` for symmetric positive (semi)definite ``M (n, w, w)`` by Cholesky; rows whose
    ``M`` is numerically singular (nearly dependent concepts) get a growing ridge. Zero outside ``inside``."""
    eye = torch.eye(M.shape[1], dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(M)
    scale = M.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
    for ridge in (1e-12, 1e-9, 1e-6):
        bad = info != 0
        if not bool(bad.any()):
            break
        L_bad, info_bad = torch.linalg.cholesky_ex(M[bad] + (ridge * scale[bad]).view(-1, 1, 1) * eye)
        L[bad], info[bad] = L_bad, info_bad
    return torch.where(inside, torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2), torch.zeros_like(rhs))


#: coefficient matrices with at most this share of non-zeros are multiplied as sparse matrices
SPARSE_DENSITY = 0.1

#: the working-set Lasso takes its correlations from the Gram rows of the non-zeros while there are fewer
#: than this many per PFV and channel (measured at C = 1024, K = 8192: 5x faster than the dense product at 3
#: non-zeros per PFV, 1.5x at 16, even at 32)
GRAM_CORRELATIONS_BELOW = 1 / 64


def mostly_zero(U: Tensor) -> bool:
    """Whether at most ``SPARSE_DENSITY`` of the coefficients ``U`` are non-zero (sparse products pay)."""
    return float((U != 0).sum()) <= SPARSE_DENSITY * U.numel()


def sparse_times(U: Tensor, V: Tensor) -> Tensor:
    """``U @ V`` for coefficients ``U (n, K)``, through a sparse product when few are non-zero.

    Lasso coefficients have a few non-zeros per PFV: the dense product costs
    ``n K C`` multiply-adds for ``n nnz C`` useful ones (19 ms against 2 ms for
    196 PFVs, K = 8192, C = 1024, 20 non-zeros each). Tensors that need
    gradients take the dense product.
    """
    if U.requires_grad or U.numel() == 0 or not mostly_zero(U):
        return U @ V
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "beta state" notices
        return U.to_sparse_csr() @ V


def _dense_rows(ws: Tensor, coef: Tensor, k: int) -> Tensor:
    """``(n, k)`` coefficients from per-row concept indices ``ws`` and values ``coef`` (both ``(n, m)``)."""
    return torch.zeros(ws.shape[0], k, dtype=coef.dtype, device=coef.device).scatter_add_(1, ws, coef)


def _sparse_rows(ws: Tensor, coef: Tensor, k: int, keep: Optional[Tensor] = None) -> Tensor:
    """The same coefficients as a CSR matrix (``m`` stored entries per row, or those where ``keep``;
    repeated indices add up)."""
    n, m = ws.shape
    order = ws.argsort(dim=1)
    if keep is None:
        crow = torch.arange(0, n * m + 1, m, device=ws.device)
        cols, values = ws.gather(1, order).reshape(-1), coef.gather(1, order).reshape(-1)
    else:
        kept = keep.gather(1, order)
        crow = torch.cat([torch.zeros(1, dtype=torch.long, device=ws.device), kept.sum(1).cumsum(0)])
        cols, values = ws.gather(1, order)[kept], coef.gather(1, order)[kept]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "beta state" / invariant-check notices
        return torch.sparse_csr_tensor(crow, cols, values, size=(n, k), check_invariants=False)
