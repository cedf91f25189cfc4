"""Generalized Integrated Gradients (paper section 3.3, eq. 3-7)."""

import warnings
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from captum.attr import GradientAttribution, IntegratedGradients
from captum.log import log_usage
from torch import Tensor, nn

from . import _layout
from ._captum_compat import path_points
from ._hooks import LayerSpec, check_inputs, ensure_runs_once, frozen, replace, resolve_layer, run_until
from ._slicing import slice_between
from .decompose import PFVDecomposer, mostly_zero

__all__ = ["GeneralizedIntegratedGradients"]

TargetSpec = Union[None, int, Sequence[int], Tensor]


class _Endpoints(NamedTuple):
    activation: Tensor  # X^a, layer layout
    coefficients: Tensor  # U^a as (N, P, K_a)
    reconstruction: Tensor  # X~^a = U V + beta, layer layout
    baseline: Tensor  # beta broadcast to the layer's shape
    end: Tensor  # X~^a, or X^a with residual=True


class GeneralizedIntegratedGradients(GradientAttribution):
    r"""Attribution of layer-``a`` concepts to a layer-``b`` concept or a class (eq. 3-7).

    Layer ``a``'s activation is replaced by the path
    ``z(alpha) = beta_a + alpha * U_a V_a`` (the offset plus the scaled
    concept reconstruction), and for a target score ``s`` the attribution of
    concept ``q`` at position ``p`` is

    .. math::

        GIG(v_q|_p \to t) = u_{pq} \int_0^1 \frac{\partial s(z(\alpha))}{\partial u_{pq}} d\alpha
                          = u_{pq} \langle v_q, \bar G_p \rangle, \qquad
        \bar G = \int_0^1 \frac{\partial s}{\partial z}(z(\alpha))\, d\alpha

    where ``G-bar`` is the integrated gradient with respect to the layer
    activation, computed by Captum's :class:`~captum.attr.IntegratedGradients`
    (``multiply_by_inputs=False``) with its quadrature and internal batching.
    ``GIG(v_q -> t)`` sums over positions (eq. 5).

    Targets (eq. 4, 6, 7):

    * layer-``b`` concept ``t``: ``s = sum_i <w_i^b, v-bar_t>``, the projection
      of every position of layer ``b``'s output on the unit concept vector;
    * class ``c`` (``layer_b=None``): the logit, or with ``output="prob"`` the
      softmax probability -- the one-hot "concept" ``e_c`` of the output layer.

    The attributions satisfy completeness, ``sum_q GIG = s(X~) - s(beta)`` up
    to the integration error returned as the convergence delta. With
    ``residual=True`` the path ends at the real activation ``X`` and one more
    column holds the residual node ``sum_p <X_p - X~_p, G-bar_p>``, so the
    attributions add up to the real model's change ``s(X) - s(beta)``.

    When layer ``a`` is a clean cut of the model's graph, only the sub-network
    between ``a`` and ``b`` runs on the path points (torch.fx slicing);
    otherwise layer ``a``'s output is replaced with hooks on the full forward,
    which stops at layer ``b``. Both give the same numbers.

    Args:
        model (nn.Module): the image model.
        layer_a (nn.Module or str): the source layer (or its dotted name).
        decomposer_a (PFVDecomposer): concepts and Lasso of layer ``a``.
        layer_b (nn.Module or str, optional): the target layer; None for the
                    model output (class targets). Default: None
        decomposer_b (PFVDecomposer or ConceptBasis, optional): concepts of
                    layer ``b``; required when ``layer_b`` is given.
        output (str, optional): class score, ``"logit"`` or ``"prob"``.
                    Default: ``"logit"``
        attribute_to_layer_input (bool, optional): the PFVs of layer ``a`` are
                    its input rather than its output (Captum's convention;
                    layer ``b`` always uses its output). Default: False
        slicing (bool, optional): allow the sliced sub-network path.
                    Default: True

    Examples::

        >>> gig = GeneralizedIntegratedGradients(model, "layer3.5.preact", dec3, "layer4.2.preact", dec4)
        >>> attr, delta = gig.attribute(images, target=17, return_convergence_delta=True)
        >>> attr.shape          # (N, K_a): every layer-a concept's GIG to layer-b concept 17
        >>> mat = gig.attribute_matrix(images)   # (N, K_a, K_b), C_b backward passes per path point
        >>> to_class = GeneralizedIntegratedGradients(model, "layer4.2.preact", dec4)
        >>> to_class.attribute(images, target=predicted_class)
    """

    def __init__(
        self,
        model: nn.Module,
        layer_a: LayerSpec,
        decomposer_a: PFVDecomposer,
        layer_b: Optional[LayerSpec] = None,
        decomposer_b: Optional[PFVDecomposer] = None,
        *,
        output: str = "logit",
        attribute_to_layer_input: bool = False,
        slicing: bool = True,
    ) -> None:
        GradientAttribution.__init__(self, model)
        self.model = model
        self.layer_a, _ = resolve_layer(model, layer_a, "layer_a")
        self.layer_b = resolve_layer(model, layer_b, "layer_b")[0] if layer_b is not None else None
        if self.layer_b == self.layer_a:
            raise ValueError("layer_b must be a later layer than layer_a, not the same one")
        if not isinstance(decomposer_a, PFVDecomposer):
            raise TypeError(f"decomposer_a must be a PFVDecomposer; got {type(decomposer_a).__name__}")
        if self.layer_b is not None:
            from .concepts import ConceptBasis

            if isinstance(decomposer_b, ConceptBasis):
                decomposer_b = PFVDecomposer(decomposer_b)
            if not isinstance(decomposer_b, PFVDecomposer):
                raise TypeError("decomposer_b (a PFVDecomposer or ConceptBasis of layer_b) is required with layer_b")
        if output not in ("logit", "prob"):
            raise ValueError(f"output must be 'logit' or 'prob'; got {output!r}")
        for role, dec, layer in (("decomposer_a", decomposer_a, self.layer_a), ("decomposer_b", decomposer_b, self.layer_b)):
            fitted_on = dec.basis.layer if dec is not None else None
            if fitted_on is not None and layer is not None and fitted_on != layer:
                warnings.warn(f"{role}'s concept basis was fitted on layer {fitted_on!r}, not on {layer!r}")
        self.decomposer_a = decomposer_a
        self.decomposer_b = decomposer_b
        self.output = output
        self.attribute_to_layer_input = attribute_to_layer_input
        self.slicing = slicing
        self._suffix: Optional[nn.Module] = None
        self._sliced = False
        self._checked_once = False

    # -- Captum's interface -------------------------------------------------------------------
    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return True  # attributions are coefficients times integrated gradients

    @property
    def uses_slicing(self) -> bool:
        """Whether path points run through the sliced sub-network (True) or hooks (False)."""
        self._prepare_suffix()
        return self._suffix is not None

    # -- building blocks ----------------------------------------------------------------------
    def _prepare_suffix(self) -> None:
        if self.slicing and not self._sliced:
            self._sliced = True
            self._suffix = slice_between(self.model, self.layer_a, self.layer_b, self.attribute_to_layer_input)

    def _readout(self, z: Tensor, inputs: Optional[Tensor], additional: tuple) -> Tensor:
        """The score vector ``(M, D)`` the targets are read from, for layer-a activations ``z``.

        Layer ``b``: the spatial sum of its output over positions ``(M, C_b)``;
        classes: logits or probabilities ``(M, n_classes)``.
        """
        if self._suffix is not None:
            out = self._suffix(z)
        else:

            def swap(original: Tensor) -> Tensor:
                if original.shape != z.shape:
                    raise ValueError(f"layer_a activation has shape {tuple(original.shape)}, path point {tuple(z.shape)}")
                return z

            with replace(self.model, self.layer_a, swap, self.attribute_to_layer_input):
                out = run_until(self.model, self.layer_b, inputs, additional)
        if self.layer_b is not None:
            if not isinstance(out, Tensor):
                raise TypeError(f"layer_b {self.layer_b!r} must return a tensor; got {type(out).__name__}")
            readout = _layout.to_pfvs(out).sum(1)
        else:
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise TypeError(
                    "with layer_b=None the model must return (N, n_classes) scores; "
                    f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
                )
            readout = out.softmax(dim=1) if self.output == "prob" else out
        if not readout.is_floating_point():
            raise TypeError(f"the target scores are {readout.dtype}, not floating point: nothing to differentiate")
        if z.requires_grad and torch.is_grad_enabled() and not readout.requires_grad:
            where = f"layer_b {self.layer_b!r}" if self.layer_b else "the model output"
            raise ValueError(
                f"{where} does not depend differentiably on layer_a {self.layer_a!r} (detached or "
                "non-differentiable modules in between); GIG needs gradients along the path"
            )
        return readout

    def _score(self, z: Tensor, *args) -> Tensor:
        """Forward function handed to Captum: one scalar per path point, ``<readout, direction>``."""
        if self._suffix is not None:
            (directions,) = args
            inputs, additional = None, ()
        else:
            inputs, directions, *rest = args
            additional = tuple(rest)
        return (self._readout(z, inputs, additional) * directions).sum(1)

    def _endpoints(self, inputs: Tensor, additional: tuple, residual: bool, coefficients: Optional[Tensor] = None) -> _Endpoints:
        if not self._checked_once:  # run_until cannot see a second call of a reused layer
            for layer in (self.layer_a, self.layer_b):
                if layer is not None:
                    ensure_runs_once(self.model, layer, inputs, additional,
                                     layer == self.layer_a and self.attribute_to_layer_input)
            self._checked_once = True
        dec = self.decomposer_a
        if coefficients is not None and not residual:
            # the caller's Lasso solution: the path needs only U (the real activation only for the residual)
            U = _check_coefficients(coefficients, dec, inputs.shape[0])
            X_tilde = dec.inverse_transform(U)
            X = X_tilde
        else:
            X = run_until(self.model, self.layer_a, inputs, additional, self.attribute_to_layer_input).detach()
            Xl = _layout.move_channels_last(X)
            if X.dim() < 2 or Xl.shape[-1] != dec.n_channels:
                raise ValueError(
                    f"layer_a {self.layer_a!r} has activation shape {tuple(X.shape)} but decomposer_a's basis has "
                    f"{dec.n_channels} channels"
                )
            if coefficients is None:
                U = dec.transform(X)
            else:
                U = _check_coefficients(coefficients, dec, inputs.shape[0])
                expected = list(X.shape)
                expected[_layout.channel_axis(X.dim())] = dec.n_concepts
                if tuple(U.shape) != tuple(expected):
                    raise ValueError(f"coefficients must be layer_a's coefficients of these inputs, shape "
                                     f"{tuple(expected)}; got {tuple(U.shape)}")
                U = U.to(device=X.device, dtype=X.dtype)
            X_tilde = dec.inverse_transform(U)
        Xl = _layout.move_channels_last(X)
        beta = dec.basis.offset.to(device=X.device, dtype=X.dtype)
        baseline = _layout.move_channels_back(beta.expand(Xl.shape), X.dim()).contiguous()
        return _Endpoints(
            activation=X,
            coefficients=_layout.to_pfvs(U),
            reconstruction=X_tilde,
            baseline=baseline,
            end=X if residual else X_tilde,
        )

    def _readout_ends(self, ends: _Endpoints, inputs: Tensor, additional: tuple, end: bool = True) -> Tuple[Optional[Tensor], Tensor]:
        """Target scores at the path's end (unless ``end=False``: only the delta needs them) and start."""
        with torch.no_grad():
            if not end:
                return None, self._readout(ends.baseline, inputs if self._suffix is None else None, additional)
            both = self._readout(
                torch.cat([ends.end, ends.baseline]),
                torch.cat([inputs, inputs]) if self._suffix is None else None,
                tuple(torch.cat([a, a]) if isinstance(a, Tensor) and a.dim() > 0 else a for a in additional),
            )
        n = inputs.shape[0]
        return both[:n], both[n:]

    def _readout_width(self, inputs: Tensor, additional: tuple) -> int:
        """``D``, the length of the readout vector: layer ``b``'s channels, or the model's classes."""
        if self.layer_b is not None:
            return self.decomposer_b.n_channels
        with frozen(self.model), torch.no_grad():
            out = self.model(inputs[:1], *(a[:1] if isinstance(a, Tensor) and a.dim() > 0 else a for a in additional))
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise TypeError("with layer_b=None the model must return (N, n_classes) scores")
        return out.shape[1]

    def _target_directions(self, targets: Tensor, width: int) -> Tensor:
        """Unit concept vectors of layer ``b`` or one-hot class vectors, ``(len(targets), D)``."""
        if self.layer_b is not None:
            V = self.decomposer_b.basis.vectors
            if V.shape[1] != width:
                raise ValueError(
                    f"layer_b {self.layer_b!r} has {width} channels but decomposer_b's basis has {V.shape[1]}"
                )
            # only the targets' rows: normalising all K_b concepts costs more than a short attribution
            return torch.nn.functional.normalize(V.index_select(0, targets.to(V.device)), dim=1)
        return torch.nn.functional.one_hot(targets, width).to(torch.get_default_dtype())

    def _check_targets(self, target: TargetSpec, n: int, width: int, device, per_example: bool) -> Tensor:
        limit = self.decomposer_b.n_concepts if self.layer_b is not None else width
        what = f"concept of layer_b ({limit} concepts)" if self.layer_b is not None else f"class ({limit} classes)"
        if target is None:
            if per_example:
                raise ValueError(f"target is required: the index of a {what}")
            return torch.arange(limit, device=device)
        t = torch.as_tensor(target, device=device)
        if t.is_floating_point() or t.dim() > 1:
            raise ValueError(f"target must be an int or a 1-D sequence of ints; got {target!r}")
        if t.dim() == 0:
            t = t.expand(n) if per_example else t.view(1)
        elif per_example and t.shape[0] != n:
            raise ValueError(f"target has {t.shape[0]} entries for {n} examples")
        if ((t < 0) | (t >= limit)).any():
            raise ValueError(f"target {t.tolist()} out of range: each must index a {what}")
        return t.long()

    def _project(self, Gbar: Tensor, ends: _Endpoints, residual: bool, per_position: bool) -> Tensor:
        """``u_pq <v_q, G-bar_p>`` per concept (and the residual node), summed over p unless per_position.

        ``Gbar`` is ``(B, *layer shape)``; returns ``(B, K_a (+1))`` or ``(B, K_a (+1), *positions)``.
        """
        V = self.decomposer_a.basis.vectors.to(Gbar.dtype)
        spatial = _layout.spatial_shape(Gbar)
        Gp = _layout.to_pfvs(Gbar)  # (B, P, C)
        U = ends.coefficients  # (N, P, K); Gbar's row r N + n belongs to example n
        reps = Gp.shape[0] // U.shape[0]
        if not mostly_zero(U):
            contrib = U.repeat(reps, 1, 1) * (Gp @ V.t())  # (B, P, K)
            if not per_position:
                contrib = contrib.sum(1)
        else:  # only u_pq != 0 contribute: nnz C multiply-adds instead of P K C
            contrib = _sparse_projection(Gp.view(reps, *U.shape[:2], -1), U, V, per_position)
            contrib = contrib.view(Gp.shape[0], *contrib.shape[2:])
        if residual:
            err = (_layout.to_pfvs(ends.activation - ends.reconstruction).repeat(reps, 1, 1) * Gp).sum(-1, keepdim=True)
            contrib = torch.cat([contrib, err if per_position else err.sum(1)], dim=-1)
        if per_position:
            return contrib.transpose(1, 2).reshape(contrib.shape[0], contrib.shape[2], *spatial)
        return contrib

    def _integrated_gradient(self, ends: _Endpoints, extra: tuple, n_steps: int, method: str,
                             internal_batch_size: Optional[int]) -> Tensor:
        """``G-bar``: the gradient of the target score integrated along the path, by Captum's IG."""
        ig = IntegratedGradients(self._score, multiply_by_inputs=False)
        return ig.attribute(ends.end, baselines=ends.baseline, additional_forward_args=extra, n_steps=n_steps,
                            method=method, internal_batch_size=internal_batch_size)

    def _path(self, method: str, n_steps: int):
        """``(step_sizes, alphas)`` of the path points for :meth:`attribute_matrix`."""
        return path_points(method, n_steps)

    def _check_inputs(self, inputs, n_steps: int, additional) -> tuple:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a tensor of images (N, ...); got {type(inputs).__name__}")
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int; got {n_steps!r}")
        check_inputs(self.model, inputs)
        if additional is None:
            return ()
        return additional if isinstance(additional, tuple) else (additional,)

    # -- public API ---------------------------------------------------------------------------
    @log_usage()
    def attribute(
        self,
        inputs: Tensor,
        target: TargetSpec = None,
        additional_forward_args: Any = None,
        *,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: Optional[int] = None,
        return_convergence_delta: bool = False,
        per_position: bool = False,
        residual: bool = False,
        coefficients: Optional[Tensor] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        r"""GIG of every layer-``a`` concept to one target per example (eq. 5, 7).

        Args:
            inputs (Tensor): ``(N, ...)`` images, on the model's device.
            target (int, sequence or Tensor): a concept index of
                        ``decomposer_b`` (or a class index with
                        ``layer_b=None``), one for all examples or one per
                        example ``(N,)``.
            additional_forward_args (optional): further arguments of the
                        model's forward, as in Captum. Default: None
            n_steps (int, optional): path points. Default: 50
            method (str, optional): Captum's quadrature, ``"gausslegendre"``
                        or ``"riemann_left"|"riemann_right"|"riemann_middle"|
                        "riemann_trapezoid"``. Default: ``"gausslegendre"``
            internal_batch_size (int, optional): at most this many path points
                        (times examples) per forward, as in Captum. Default: None
            return_convergence_delta (bool, optional): also return
                        ``delta = sum(attr) - (s(end) - s(beta))``. Default: False
            per_position (bool, optional): keep positions ``p`` instead of
                        summing them. Default: False
            residual (bool, optional): integrate to the real activation and add
                        the residual node as the last column. Default: False
            coefficients (Tensor, optional): layer ``a``'s Lasso coefficients of
                        these inputs in the layer's layout (``(N, K_a, H, W)`` or
                        ``(N, T, K_a)``), to share one solve between several
                        attributions. Default: None (solved here)

        Returns:
            Tensor or (Tensor, Tensor):
            - **attributions**: ``(N, K_a)``, ``(N, K_a + 1)`` with residual,
              or ``(N, K_a (+1), *positions)`` with per_position (``(H, W)``
              for conv layers, ``(T,)`` for tokens).
            - **delta** (with return_convergence_delta): ``(N,)``.
        """
        additional = self._check_inputs(inputs, n_steps, additional_forward_args)
        n = inputs.shape[0]
        with frozen(self.model):
            self._prepare_suffix()
            ends = self._endpoints(inputs, additional, residual, coefficients)
            s_end, s_start = self._readout_ends(ends, inputs, additional, end=return_convergence_delta)
            targets = self._check_targets(target, n, s_start.shape[1], s_start.device, per_example=True)
            directions = self._target_directions(targets, s_start.shape[1]).to(s_start)
            extra = (directions,) if self._suffix is not None else (inputs, directions) + additional
            Gbar = self._integrated_gradient(ends, extra, n_steps, method, internal_batch_size)
            attributions = self._project(Gbar, ends, residual, per_position)
        if not return_convergence_delta:
            return attributions
        total = attributions.reshape(n, -1).sum(1)
        delta = total - ((s_end - s_start) * directions).sum(1)
        return attributions, delta

    def attribute_matrix(
        self,
        inputs: Tensor,
        targets: TargetSpec = None,
        additional_forward_args: Any = None,
        *,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: Optional[int] = None,
        return_convergence_delta: bool = False,
        residual: bool = False,
        vjp_batch_size: int = 32,
        max_memory: int = 2 * 1024**3,
        coefficients: Optional[Tensor] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        r"""GIG of every layer-``a`` concept to many targets at once: ``(N, K_a, T)``.

        Uses linearity in the target: every target score is a linear function
        ``<readout, d_t>`` of one readout vector (the spatial sum of layer
        ``b``'s output, or the class scores), so each path point needs one
        forward and one backward per readout direction, shared by all targets.
        With more targets than readout channels (e.g. all ``K_b = 8 C_b``
        concepts) the ``C_b`` channel attributions are computed and multiplied
        by the unit concept matrix; with fewer, the target directions are used
        directly. Backward passes are batched (``is_grads_batched``).

        Args:
            inputs (Tensor): ``(N, ...)`` images.
            targets (sequence or Tensor, optional): ``T`` concept indices of
                        ``decomposer_b`` (class indices with ``layer_b=None``),
                        shared by all examples; None for all of them.
            additional_forward_args (optional): as in :meth:`attribute`.
            n_steps (int, optional): path points. Default: 50
            method (str, optional): Captum's quadrature. Default: ``"gausslegendre"``
            internal_batch_size (int, optional): at most this many path points
                        times examples per forward. Default: None (all at once)
            return_convergence_delta (bool, optional): also return ``(N, T)`` deltas.
            residual (bool, optional): add the residual node as row ``K_a``.
            vjp_batch_size (int, optional): readout directions per batched
                        backward. Default: 32
            max_memory (int, optional): bytes for the accumulated integrated
                        gradients; more directions than fit are handled in
                        further passes over the path points. Default: 2 GiB
            coefficients (Tensor, optional): layer ``a``'s coefficients of these
                        inputs, as in :meth:`attribute`. Default: None

        Returns:
            Tensor or (Tensor, Tensor): ``(N, K_a (+1), T)`` and, with
            return_convergence_delta, ``(N, T)``.
        """
        additional = self._check_inputs(inputs, n_steps, additional_forward_args)
        n = inputs.shape[0]
        with frozen(self.model):
            self._prepare_suffix()
            ends = self._endpoints(inputs, additional, residual, coefficients)
            s_end, s_start = self._readout_ends(ends, inputs, additional)
            width = s_end.shape[1]
            t_idx = self._check_targets(targets, n, width, s_end.device, per_example=False)
            target_dirs = self._target_directions(t_idx, width).to(s_end)  # (T, D)
            via_channels = target_dirs.shape[0] > width
            dirs = torch.eye(width, dtype=s_end.dtype, device=s_end.device) if via_channels else target_dirs
            step_sizes, alphas = self._path(method, n_steps)
            steps_per_chunk = n_steps if internal_batch_size is None else max(1, internal_batch_size // n)
            per_dir = ends.end.numel() * ends.end.element_size()
            group = max(1, min(dirs.shape[0], max_memory // max(per_dir, 1)))
            results = []
            for g0 in range(0, dirs.shape[0], group):
                Gbar = self._integrate(
                    ends, inputs, additional, dirs[g0 : g0 + group], step_sizes, alphas, steps_per_chunk, vjp_batch_size
                )  # (g, N, *A)
                g = Gbar.shape[0]
                proj = self._project(Gbar.reshape(g * n, *Gbar.shape[2:]), ends, residual, per_position=False)
                results.append(proj.view(g, n, -1).permute(1, 2, 0))  # (N, K(+1), g)
            M = torch.cat(results, dim=2)
            if via_channels:
                M = M @ target_dirs.t()
        if not return_convergence_delta:
            return M
        delta = M.sum(1) - (s_end - s_start) @ target_dirs.t()
        return M, delta

    def _integrate(self, ends, inputs, additional, dirs, step_sizes, alphas, steps_per_chunk, vjp_batch_size) -> Tensor:
        """Integrated gradients of ``<readout, d>`` for each direction ``d``: ``(len(dirs), N, *A)``."""
        n = inputs.shape[0]
        base, diff = ends.baseline, ends.end - ends.baseline
        total = torch.zeros(dirs.shape[0], *ends.end.shape, dtype=ends.end.dtype, device=ends.end.device)
        for s0 in range(0, len(alphas), steps_per_chunk):
            a = torch.tensor(alphas[s0 : s0 + steps_per_chunk], dtype=base.dtype, device=base.device)
            w = torch.tensor(step_sizes[s0 : s0 + steps_per_chunk], dtype=base.dtype, device=base.device)
            s = a.shape[0]
            shape = (s,) + (1,) * base.dim()
            z = (base.unsqueeze(0) + a.view(shape) * diff.unsqueeze(0)).reshape(s * n, *base.shape[1:])
            z.requires_grad_(True)
            expanded_inputs = inputs.repeat(s, *([1] * (inputs.dim() - 1))) if self._suffix is None else None
            expanded_args = tuple(
                a_.repeat(s, *([1] * (a_.dim() - 1))) if isinstance(a_, Tensor) and a_.dim() > 0 else a_
                for a_ in additional
            )
            with torch.enable_grad():
                R = self._readout(z, expanded_inputs, expanded_args)  # (s*n, D)
                for d0 in range(0, dirs.shape[0], vjp_batch_size):
                    d = dirs[d0 : d0 + vjp_batch_size]
                    grads = _batched_vjp(R, z, d)  # (c, s*n, *A)
                    grads = grads.view(d.shape[0], s, n, *base.shape[1:])
                    total[d0 : d0 + d.shape[0]] += torch.einsum("cs...,s->c...", grads, w)
        return total


def _check_coefficients(coefficients, dec: PFVDecomposer, n: int) -> Tensor:
    """Coefficients handed in by the caller: a tensor of ``n`` examples with ``K_a`` concepts on its concept axis."""
    if not isinstance(coefficients, Tensor) or coefficients.dim() < 2:
        raise ValueError(f"coefficients must be layer_a's coefficients of these inputs, a tensor (N, K_a, ...) or "
                         f"(N, T, K_a); got {type(coefficients).__name__} {tuple(getattr(coefficients, 'shape', ()))}")
    axis = _layout.channel_axis(coefficients.dim())
    if coefficients.shape[0] != n or coefficients.shape[axis] != dec.n_concepts:
        raise ValueError(f"coefficients must be layer_a's coefficients of these inputs: {n} examples with "
                         f"{dec.n_concepts} concepts on axis {axis}; got shape {tuple(coefficients.shape)}")
    return coefficients.to(dec.basis.vectors.device)


def _sparse_projection(G: Tensor, U: Tensor, V: Tensor, per_position: bool, budget: int = 1 << 22) -> Tensor:
    """``u_pq <v_q, G_p>`` for integrated gradients ``G (R, N, P, C)`` and sparse coefficients ``U (N, P, K)``.

    Returns ``(R, N, P, K)``, or ``(R, N, K)`` summed over positions unless ``per_position``.
    """
    n_idx, p_idx, q_idx = U.nonzero(as_tuple=True)
    values = U[n_idx, p_idx, q_idx]
    shape = U.shape if per_position else (U.shape[0], U.shape[2])
    out = torch.zeros(G.shape[0], *shape, dtype=G.dtype, device=G.device)
    rows = torch.arange(G.shape[0], device=G.device).unsqueeze(1)
    chunk = max(1, budget // (G.shape[0] * G.shape[-1]))  # the (R, chunk, C) gathers stay under budget elements
    for s in range(0, values.shape[0], chunk):
        sl = slice(s, s + chunk)
        dots = (G[:, n_idx[sl], p_idx[sl]] * V[q_idx[sl]]).sum(-1) * values[sl]
        where = (n_idx[sl], p_idx[sl], q_idx[sl]) if per_position else (n_idx[sl], q_idx[sl])
        out.index_put_((rows,) + tuple(i.unsqueeze(0) for i in where), dots, accumulate=True)
    return out


_warned_fallback = False


def _batched_vjp(R: Tensor, z: Tensor, directions: Tensor) -> Tensor:
    """``d <R, direction> / dz`` for several directions at once: ``(len(directions), *z.shape)``."""
    global _warned_fallback
    grad_outputs = directions.unsqueeze(1).expand(directions.shape[0], *R.shape).contiguous()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            (g,) = torch.autograd.grad(R, z, grad_outputs, retain_graph=True, is_grads_batched=True)
        return g
    except RuntimeError as err:  # an op without a batching rule: one backward per direction
        if not _warned_fallback:
            warnings.warn(f"batched backward unavailable ({err}); falling back to one backward per target")
            _warned_fallback = True
        return torch.stack([torch.autograd.grad(R, z, go, retain_graph=True)[0] for go in grad_outputs])
