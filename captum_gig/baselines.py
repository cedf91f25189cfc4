r"""Simpler concept attributions to weigh GIG against, and the exact effect they approximate.

GIG integrates the gradient along the whole path ``beta + alpha U V``. The
paper's reviewers asked what that integration buys over two cheap scores; a
third, exact but costly, is the ground truth all of them approximate:

* :class:`ConceptMagnitude` -- how much of the concept is there:
  ``sum_p |u_pq| ||v_q||``, whatever the target;
* :class:`ConceptGradientXCoefficient` -- the gradient at the path's end only:
  ``sum_p u_pq <v_q, ds/dz(X~)_p>``, i.e. GIG with a single point at
  ``alpha = 1``. Equal to GIG where the layers between are linear; its
  convergence delta shows how far from complete it is elsewhere;
* :class:`ConceptAblation` -- the exact effect of removing concept ``q`` from
  layer ``a``'s reconstruction: ``s(X~) - s(X~ - sum_p u_pq v_q e_p)``, one
  forward of the layers between per concept (batched).

Each subclasses :class:`~captum_gig.GeneralizedIntegratedGradients`, takes
the same constructor arguments and returns the same shapes from
:meth:`attribute` ``(N, K_a)`` and :meth:`attribute_matrix` ``(N, K_a, T)``,
so every place that orders concepts (the aggregation, the evaluation, the
CLI's ``--attributions``) can take any of them by name (:data:`ATTRIBUTIONS`).
"""

from typing import Any, Optional

import torch
from captum.log import log_usage
from torch import Tensor

from . import _layout
from ._hooks import frozen
from .gig import GeneralizedIntegratedGradients, TargetSpec

__all__ = ["ConceptMagnitude", "ConceptGradientXCoefficient", "ConceptAblation", "ATTRIBUTIONS", "attribution_class"]


class ConceptGradientXCoefficient(GeneralizedIntegratedGradients):
    r"""Endpoint gradient times coefficient: GIG with one path point at ``alpha = 1``.

    .. math:: EG(v_q|_p \to t) = u_{pq} \left\langle v_q, \frac{\partial s}{\partial z}(\tilde X)_p \right\rangle

    The constructor and :meth:`attribute` / :meth:`attribute_matrix` are those
    of :class:`~captum_gig.GeneralizedIntegratedGradients`; ``n_steps``,
    ``method`` and ``internal_batch_size`` are ignored. The convergence delta ``sum EG - (s(X~) - s(beta))`` is not
    small in general: it is the completeness that the integration restores.

    Examples::

        >>> eg = ConceptGradientXCoefficient(model, "block2", dec2, "block3", dec3)
        >>> attr, delta = eg.attribute(images, target=7, return_convergence_delta=True)
    """

    def _integrated_gradient(self, ends, extra: tuple, n_steps: int, method: str,
                             internal_batch_size: Optional[int]) -> Tensor:
        z = ends.end.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self._score(z, *extra).sum(), z)
        return grad

    def _path(self, method: str, n_steps: int):
        return [1.0], [1.0]


class ConceptMagnitude(GeneralizedIntegratedGradients):
    r"""Coefficient magnitude ``sum_p |u_pq| ||v_q||``: how much of each concept layer ``a`` holds.

    It ignores the target (every target gets the same scores), runs no
    gradient and has no convergence delta. The constructor is that of
    :class:`~captum_gig.GeneralizedIntegratedGradients`.

    Examples::

        >>> mag = ConceptMagnitude(model, "block2", dec2)
        >>> mag.attribute(images).shape     # (N, K_a)
    """

    def has_convergence_delta(self) -> bool:
        return False

    def _magnitude(self, inputs: Tensor, additional: tuple, coefficients: Optional[Tensor], per_position: bool) -> Tensor:
        with frozen(self.model), torch.no_grad():
            self._prepare_suffix()
            ends = self._endpoints(inputs, additional, False, coefficients)
        norms = self.decomposer_a.basis.vectors.norm(dim=1).to(ends.coefficients)
        mag = ends.coefficients.abs() * norms  # (N, P, K)
        if per_position:
            spatial = _layout.spatial_shape(ends.activation)
            return mag.transpose(1, 2).reshape(mag.shape[0], mag.shape[2], *spatial)
        return mag.sum(1)

    @log_usage()
    def attribute(self, inputs: Tensor, target: TargetSpec = None, additional_forward_args: Any = None, *,
                  n_steps: int = 1, method: str = "riemann_right", internal_batch_size: Optional[int] = None,
                  return_convergence_delta: bool = False, per_position: bool = False, residual: bool = False,
                  coefficients: Optional[Tensor] = None) -> Tensor:
        r"""``(N, K_a)`` magnitudes (``(N, K_a, *positions)`` with per_position); ``target`` is ignored.

        ``n_steps``, ``method`` and ``internal_batch_size`` are accepted for a common
        call signature and ignored.
        """
        if return_convergence_delta or residual:
            raise ValueError("ConceptMagnitude has no convergence delta and no residual node")
        additional = self._check_inputs(inputs, 1, additional_forward_args)
        return self._magnitude(inputs, additional, coefficients, per_position)

    def attribute_matrix(self, inputs: Tensor, targets: TargetSpec = None, additional_forward_args: Any = None, *,
                         coefficients: Optional[Tensor] = None, **_ignored: Any) -> Tensor:
        """``(N, K_a, T)``: the magnitudes repeated for each of the ``T`` targets (None: all of them)."""
        additional = self._check_inputs(inputs, 1, additional_forward_args)
        mag = self._magnitude(inputs, additional, coefficients, False)
        with torch.no_grad():
            width = self._readout_width(inputs, additional)
        t = self._check_targets(targets, inputs.shape[0], width, mag.device, per_example=False)
        return mag.unsqueeze(2).expand(*mag.shape, t.shape[0])


class ConceptAblation(GeneralizedIntegratedGradients):
    r"""Exact effect of removing each concept from layer ``a``'s reconstruction.

    .. math:: A(v_q \to t) = s_t(\tilde X) - s_t\Big(\tilde X - \sum_p u_{pq} v_q e_p\Big)

    One forward of the layers between ``a`` and ``b`` per concept present in
    an example (a concept whose coefficients are all zero has effect 0 without
    a forward), ``batch_size`` of them at a time. Where the layers between are
    linear, GIG, the endpoint gradient and the ablation effect coincide. The
    constructor is that of :class:`~captum_gig.GeneralizedIntegratedGradients`.

    Examples::

        >>> abl = ConceptAblation(model, "block2", dec2, "block3", dec3)
        >>> effect = abl.attribute(images, target=7)            # (N, K_a)
        >>> top = abl.attribute(images, target=7, concepts=[3, 9])   # only those two (others: NaN)
    """

    def has_convergence_delta(self) -> bool:
        return False

    def _effects(self, inputs: Tensor, additional: tuple, directions: Tensor, per_example: bool,
                 coefficients: Optional[Tensor], concepts: Optional[Tensor], batch_size: int) -> Tensor:
        """``(N, K_a, T)``: the change of the readout projected on ``directions``: one per example ``(N, D)``
        (``T = 1``) or ``(T, D)`` shared by all."""
        n = inputs.shape[0]
        with frozen(self.model), torch.no_grad():
            self._prepare_suffix()
            ends = self._endpoints(inputs, additional, False, coefficients)
            U = ends.coefficients  # (N, P, K)
            V = self.decomposer_a.basis.vectors.to(U)
            spatial = _layout.spatial_shape(ends.activation)
            full = self._readout(ends.reconstruction, inputs if self._suffix is None else None, additional)  # (N, D)
            present = (U != 0).any(1)  # (N, K)
            wanted = present
            if concepts is not None:
                asked = torch.zeros_like(present)
                asked[:, concepts.to(present.device)] = True
                wanted = present & asked
            example, concept = wanted.nonzero(as_tuple=True)
            directions = directions.to(full)
            out = torch.zeros(n, U.shape[2], 1 if per_example else directions.shape[0], dtype=full.dtype,
                              device=full.device)
            if concepts is not None:  # asked for, present, not computed: unknown
                out[present & ~wanted] = float("nan")
            recon = _layout.to_pfvs(ends.reconstruction)  # (N, P, C)
            for s in range(0, example.shape[0], batch_size):
                e, q = example[s : s + batch_size], concept[s : s + batch_size]
                z = recon[e] - U[e, :, q].unsqueeze(2) * V[q].unsqueeze(1)  # (b, P, C)
                z = _layout.from_pfvs(z, spatial).contiguous()
                rows_in = inputs[e] if self._suffix is None else None
                rows_add = tuple(a[e] if isinstance(a, Tensor) and a.dim() > 0 else a for a in additional)
                change = full[e] - self._readout(z, rows_in, rows_add)  # (b, D)
                if per_example:
                    out[e, q] = (change * directions[e]).sum(1, keepdim=True)
                else:
                    out[e, q] = change @ directions.t()
        return out

    @log_usage()
    def attribute(self, inputs: Tensor, target: TargetSpec = None, additional_forward_args: Any = None, *,
                  n_steps: int = 1, method: str = "riemann_right", internal_batch_size: Optional[int] = None,
                  return_convergence_delta: bool = False, per_position: bool = False, residual: bool = False,
                  coefficients: Optional[Tensor] = None, concepts: Optional[Any] = None, batch_size: int = 64) -> Tensor:
        r"""``(N, K_a)`` ablation effects on one target per example.

        Args:
            inputs, target, additional_forward_args, coefficients: as in
                        :meth:`GeneralizedIntegratedGradients.attribute`.
            concepts (sequence of int, optional): compute only these concepts;
                        the others present in an example are NaN. Default: None (all)
            batch_size (int, optional): ablated activations per forward. Default: 64

        ``n_steps``, ``method`` and ``internal_batch_size`` are accepted for a
        common call signature and ignored; ``per_position`` and ``residual`` are
        not supported.
        """
        if return_convergence_delta or per_position or residual:
            raise ValueError("ConceptAblation has no convergence delta, per-position maps or residual node")
        additional = self._check_inputs(inputs, 1, additional_forward_args)
        n = inputs.shape[0]
        with torch.no_grad():
            width = self._readout_width(inputs, additional)
        device = inputs.device
        targets = self._check_targets(target, n, width, device, per_example=True)
        dirs = self._target_directions(targets, width)
        chosen = None if concepts is None else torch.as_tensor(concepts, dtype=torch.long).reshape(-1)
        out = self._effects(inputs, additional, dirs.to(device), True, coefficients, chosen, batch_size)
        return out.squeeze(2)

    def attribute_matrix(self, inputs: Tensor, targets: TargetSpec = None, additional_forward_args: Any = None, *,
                         coefficients: Optional[Tensor] = None, concepts: Optional[Any] = None, batch_size: int = 64,
                         **_ignored: Any) -> Tensor:
        """``(N, K_a, T)`` ablation effects on ``T`` targets shared by the examples (None: all of them)."""
        additional = self._check_inputs(inputs, 1, additional_forward_args)
        with torch.no_grad():
            width = self._readout_width(inputs, additional)
        t = self._check_targets(targets, inputs.shape[0], width, inputs.device, per_example=False)
        dirs = self._target_directions(t, width).to(inputs.device)
        chosen = None if concepts is None else torch.as_tensor(concepts, dtype=torch.long).reshape(-1)
        return self._effects(inputs, additional, dirs, False, coefficients, chosen, batch_size)


#: concept attributions by name: the orders the aggregation and evaluation can use
ATTRIBUTIONS = {
    "gig": GeneralizedIntegratedGradients,
    "endpoint": ConceptGradientXCoefficient,
    "magnitude": ConceptMagnitude,
    "ablation": ConceptAblation,
}


def attribution_class(name: str):
    """The attribution class called ``name`` in :data:`ATTRIBUTIONS`."""
    if name not in ATTRIBUTIONS:
        raise ValueError(f"attribution must be one of {sorted(ATTRIBUTIONS)}; got {name!r}")
    return ATTRIBUTIONS[name]
