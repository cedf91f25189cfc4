"""Quality measures of concept decompositions and attributions (paper section 4.2).

* Reconstruction (4.2.2): :func:`relative_l2`, :func:`l0_ratio` (shared with
  :meth:`PFVDecomposer.score <captum_gig.PFVDecomposer.score>`).
* Concept extraction (4.2.1, Fel et al. 2024): :func:`concept_deletion` and
  :func:`concept_insertion` remove or insert a layer's concepts in order of
  their importance (default: class GIG, eq. 7) and follow the class score.
* Inter-layer attribution (4.2.3): :func:`interlayer_deletion` and
  :func:`interlayer_insertion` remove or insert layer-``a`` concepts in order
  of their GIG to a layer-``b`` concept and follow the normalised maximum
  projection of layer ``b``'s PFVs on that concept, against random orders.

Removing concept ``q`` sets its coefficients ``u_pq`` to zero at every
position, i.e. layer ``a``'s activation is replaced by ``offset + U' V``
(eq. 9): with every concept present this is the reconstruction ``X~``, with
none the offset ``beta`` alone.
"""

import warnings
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _layout
from ._hooks import LayerSpec, check_inputs, check_runs_once, ensure_runs_once, frozen, replace, resolve_layer, run_until
from ._slicing import slice_between
from ._scores import l0_ratio, relative_l2
from .concepts import ConceptBasis
from .baselines import attribution_class
from .decompose import PFVDecomposer, mostly_zero
from .gig import GeneralizedIntegratedGradients

__all__ = [
    "relative_l2",
    "l0_ratio",
    "Curve",
    "InterlayerCurves",
    "concept_deletion",
    "concept_insertion",
    "interlayer_deletion",
    "interlayer_insertion",
    "auc",
]

TargetSpec = Union[int, Sequence[int], Tensor]


class Curve(NamedTuple):
    """A deletion or insertion curve.

    Attributes:
        fractions (Tensor): ``(S,)`` fraction of the concepts removed (deletion)
                    or inserted (insertion), from 0 to 1.
        scores (Tensor): ``(S,)`` score at each fraction, mean over inputs.
        auc (float): area under the curve (trapezoid rule over ``fractions``).
        per_input (Tensor or None): ``(N,)`` each input's own AUC (NaN for an
                    input left out), for comparing orders image by image.
    """

    fractions: Tensor
    scores: Tensor
    auc: float
    per_input: Optional[Tensor] = None


class InterlayerCurves(NamedTuple):
    """Inter-layer deletion/insertion in GIG order and in random order (paper Fig. 5).

    Attributes:
        gig (Curve): concepts taken in order of their importance (GIG).
        random (Curve): mean over ``n_random`` seeded random orders.
        auc_difference (float): how much better the GIG order is, positive when
                    GIG wins: ``random.auc - gig.auc`` for deletion,
                    ``gig.auc - random.auc`` for insertion.
        baselines (mapping of str to Curve): the curves of the further orders asked
                    for (``"endpoint"``, ``"magnitude"``, ...); empty by default.
    """

    gig: Curve
    random: Curve
    auc_difference: float
    baselines: Mapping[str, Curve] = MappingProxyType({})


def _aucs(fractions: Tensor, scores: Tensor) -> Tensor:
    """Per-column AUCs of ``scores (S, N)`` (trapezoid over ``fractions``), float64 on the CPU."""
    return torch.trapezoid(scores.detach().double().cpu(), fractions.detach().double().cpu(), dim=0)


def auc(fractions: Tensor, scores: Tensor) -> float:
    """Trapezoid-rule area under ``scores`` over ``fractions`` (both ``(S,)``)."""
    f = fractions.detach().double().cpu()
    s = scores.detach().double().cpu()
    return float(torch.trapezoid(s, f)) if f.numel() > 1 else 0.0


# --------------------------------------------------------------------------- helpers


class _Substitution:
    """Runs a model with layer ``a``'s activation replaced, up to layer ``b`` (or the output).

    Uses the sliced sub-network between the layers when ``a`` is a clean cut of
    the graph, hooks on the full forward otherwise (as
    :class:`~captum_gig.GeneralizedIntegratedGradients` does).
    """

    def __init__(self, model: nn.Module, layer_a: str, layer_b: Optional[str]):
        self.model = model
        self.layer_a = layer_a
        self.layer_b = layer_b
        self.suffix = slice_between(model, layer_a, layer_b)

    def activation(self, inputs: Tensor) -> Tensor:
        return run_until(self.model, self.layer_a, inputs).detach()

    def __call__(self, z: Tensor, inputs: Tensor) -> Tensor:
        if self.suffix is not None:
            return self.suffix(z)

        def swap(original: Tensor) -> Tensor:
            if original.shape != z.shape:
                raise ValueError(f"layer {self.layer_a!r} activation has shape {tuple(original.shape)}, "
                                 f"substitute {tuple(z.shape)}")
            return z

        with replace(self.model, self.layer_a, swap):
            return run_until(self.model, self.layer_b, inputs)


def _as_decomposer(decomposer, argument: str):
    if isinstance(decomposer, ConceptBasis):
        raise TypeError(f"{argument} must be a PFVDecomposer (a ConceptBasis has no Lasso); wrap it: PFVDecomposer(basis, alpha=...)")
    if not isinstance(decomposer, PFVDecomposer):
        raise TypeError(f"{argument} must be a PFVDecomposer; got {type(decomposer).__name__}")
    return decomposer


def _check_common(model, inputs, steps, batch_size) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    check_inputs(model, inputs)
    if inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError(f"inputs must be a non-empty batch (N, ...); got shape {tuple(inputs.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (number of fractions after 0); got {steps!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}")


def _targets(target: TargetSpec, n: int, limit: int, what: str, device) -> Tensor:
    t = torch.as_tensor(target, device=device)
    if t.is_floating_point() or t.dim() > 1:
        raise ValueError(f"target must be an int or a 1-D sequence of ints ({what}); got {target!r}")
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape[0] != n:
        raise ValueError(f"target has {t.shape[0]} entries for {n} inputs")
    if ((t < 0) | (t >= limit)).any():
        raise ValueError(f"target {t.tolist()} out of range: each must index a {what} (0..{limit - 1})")
    return t.long()


def _ranks(importance: Tensor, n: int, k: int, argument: str = "importance") -> Tensor:
    """``(N, K)`` rank of every concept (0 = most important; ties keep index order)."""
    if not isinstance(importance, Tensor):
        importance = torch.as_tensor(importance)
    if importance.dim() == 1:
        importance = importance.unsqueeze(0).expand(n, -1)
    if importance.shape != (n, k):
        raise ValueError(f"{argument} must be ({k},) or ({n}, {k}) scores per concept; got {tuple(importance.shape)}")
    if not torch.isfinite(importance).all():
        raise ValueError(f"{argument} contains NaN or inf")
    order = torch.sort(importance.double(), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(k, device=order.device).expand(n, k).contiguous())
    return ranks


def _fractions(steps: int, k: int, device) -> tuple:
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    counts = torch.round(fractions * k).long()
    return fractions.float().to(device), counts.to(device)


class _SparseCoefficients:
    """The non-zero coefficients of ``U (N, P, K)`` times their concept vectors, found once per ``U``.

    Every order, step and target of a curve substitutes the same ``U``: the non-zeros are listed
    once (by input, as ``nonzero`` returns them) and each batch takes its inputs' slice.
    """

    def __init__(self, U: Tensor, V: Tensor):
        n, self.p, _ = U.shape
        self.e, self.pos, self.q = U.nonzero(as_tuple=True)
        self.contrib = U[self.e, self.pos, self.q].unsqueeze(1) * V[self.q]  # (M, C)
        self.starts = torch.searchsorted(self.e, torch.arange(n + 1, device=U.device)).tolist()

    @classmethod
    def of(cls, U: Tensor, V: Tensor) -> Optional["_SparseCoefficients"]:
        return cls(U, V) if mostly_zero(U) else None

    def substitute(self, i0: int, i1: int, keep: Tensor, beta: Tensor, spatial, budget: int = 1 << 24):
        """``beta + (U * keep_s) V`` of inputs ``i0:i1`` for every step ``s`` of ``keep (S, i1 - i0, K)``,
        in the layer's layout; None when the ``(S, nnz, C)`` products would exceed ``budget`` elements."""
        a, b = self.starts[i0], self.starts[i1]
        S, C = keep.shape[0], self.contrib.shape[1]
        if S * (b - a) * C > budget:
            return None
        e, q = self.e[a:b] - i0, self.q[a:b]
        z = beta.expand(S, (i1 - i0) * self.p, C).clone()
        z.index_add_(1, e * self.p + self.pos[a:b], keep[:, e, q].unsqueeze(2) * self.contrib[a:b].unsqueeze(0))
        return _layout.from_pfvs(z.reshape(S * (i1 - i0), self.p, C), spatial).contiguous()


#: inter-layer curves count a target in an input where its projection at the full reconstruction is at least
#: this share of its largest over the inputs (ratios to a near-zero projection are noise, not evidence)
SHOWS_AT = 0.01


def _substituted_scores(run: _Substitution, dec, inputs: Tensor, U: Tensor, ranks: Tensor,
                        counts: Tensor, deletion: bool, readout, batch_size: Optional[int], progress: bool,
                        desc: str, sparse: Optional[_SparseCoefficients] = None) -> Tensor:
    """``(S, N)`` readout of the model with layer ``a`` = ``beta + U' V`` at every step.

    ``U`` is ``(N, P, K)``, ``ranks`` ``(N, K)``; at step ``s`` the concepts of
    rank ``< counts[s]`` are removed (deletion) or are the only ones kept
    (insertion). ``readout(out, rows_inputs_index)`` maps the forward's output
    to one number per row, or to ``T`` numbers (then ``(S, N, T)``: one forward
    serves several targets). ``sparse``: ``U``'s non-zeros, when few (the substitution
    then costs a product per non-zero, not per concept).
    """
    n, p, k = U.shape
    spatial = run.spatial
    V = dec.basis.vectors.to(U)
    beta = dec.basis.offset.to(U)
    S = counts.shape[0]
    rows = batch_size or max(S, 64)
    b = max(1, min(n, rows // S)) if rows >= S else 1
    s_chunk = max(1, min(S, rows // b))
    scores: Optional[Tensor] = None
    chunks = [(i0, s0) for i0 in range(0, n, b) for s0 in range(0, S, s_chunk)]
    for i0, s0 in tqdm(chunks, disable=not progress, desc=desc, unit="batch"):
        idx = torch.arange(i0, min(n, i0 + b), device=U.device)
        c = counts[s0 : s0 + s_chunk]  # (s,)
        r = ranks[idx]  # (b, K)
        removed = r.unsqueeze(0) < c.view(-1, 1, 1)  # (s, b, K)
        keep = (~removed if deletion else removed).to(U.dtype)
        Ub = U[idx].unsqueeze(0)  # (1, b, P, K)
        z = None if sparse is None else sparse.substitute(i0, i0 + idx.shape[0], keep, beta, spatial)
        if z is not None:
            pass
        elif len(spatial) == 2:  # conv layer: build (C, P) directly, the layout the model takes
            if V.shape[1] < p:  # (U * keep) V = U (keep * V): the masked basis is the smaller operand
                z = (keep.unsqueeze(3) * V).transpose(2, 3) @ Ub.transpose(2, 3)  # (s, b, C, P)
            else:
                z = V.t() @ (Ub * keep.unsqueeze(2)).transpose(2, 3)
            z = (z + beta.view(-1, 1)).reshape(-1, V.shape[1], *spatial)
        else:
            z = Ub @ (keep.unsqueeze(3) * V) if V.shape[1] < p else (Ub * keep.unsqueeze(2)) @ V  # (s, b, P, C)
            z = _layout.from_pfvs((z + beta).reshape(-1, p, V.shape[1]), spatial).contiguous()
        rep_inputs = None if run.suffix is not None else inputs[idx].repeat(c.shape[0], *([1] * (inputs.dim() - 1)))
        out = run(z, rep_inputs)
        row_input = idx.repeat(c.shape[0])
        value = readout(out, row_input)
        if scores is None:
            scores = torch.empty(S, n, *value.shape[1:], dtype=U.dtype, device=U.device)
        scores[s0 : s0 + c.shape[0], i0 : i0 + idx.shape[0]] = value.view(c.shape[0], idx.shape[0], *value.shape[1:])
    return scores


def _prepare(run: _Substitution, dec, inputs: Tensor, layer_name: str, argument: str,
             coefficients: Optional[Tensor] = None) -> Tensor:
    """Layer ``a``'s coefficients of ``inputs`` as ``(N, P, K)``: solved here, or the caller's checked."""
    if coefficients is not None:  # the caller's solution: no forward needed
        if not isinstance(coefficients, Tensor) or coefficients.dim() < 2:
            raise ValueError(f"coefficients must be {layer_name!r}'s coefficients of these inputs; "
                             f"got {type(coefficients).__name__}")
        axis = _layout.channel_axis(coefficients.dim())
        if coefficients.shape[0] != inputs.shape[0] or coefficients.shape[axis] != dec.n_concepts:
            raise ValueError(f"coefficients must be {layer_name!r}'s coefficients of these inputs: "
                             f"{inputs.shape[0]} examples with {dec.n_concepts} concepts on axis {axis}; "
                             f"got shape {tuple(coefficients.shape)}")
        run.spatial = _layout.spatial_shape(coefficients)
        return _layout.to_pfvs(coefficients.to(device=inputs.device, dtype=dec.basis.vectors.dtype))
    X = check_runs_once(run.model, run.layer_a, inputs).detach()
    if _layout.move_channels_last(X).shape[-1] != dec.n_channels:
        raise ValueError(f"layer {layer_name!r} has activation shape {tuple(X.shape)} but {argument}'s basis has "
                         f"{dec.n_channels} channels")
    run.spatial = _layout.spatial_shape(X)
    return _layout.to_pfvs(dec.transform(X))


# --------------------------------------------------------------------------- C-Deletion / C-Insertion


def _class_curve(deletion: bool, model, layer, decomposer, inputs, target, importance, steps, output, batch_size,
                 n_steps, progress, coefficients=None) -> Curve:
    _check_common(model, inputs, steps, batch_size)
    dec = _as_decomposer(decomposer, "decomposer")
    if output not in ("prob", "logit", "accuracy"):
        raise ValueError(f"output must be 'prob', 'logit' or 'accuracy'; got {output!r}")
    name, _ = resolve_layer(model, layer, "layer")
    n = inputs.shape[0]
    with frozen(model), torch.no_grad():
        logits = model(inputs)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise TypeError(f"the model must return (N, n_classes) scores; got {type(logits).__name__}")
        t = _targets(target, n, logits.shape[1], "class", inputs.device)
        if importance is None:
            gig = GeneralizedIntegratedGradients(model, name, dec, output="logit" if output == "logit" else "prob")
            chunk = batch_size or n
            with torch.enable_grad():
                parts = [gig.attribute(inputs[i : i + chunk], target=t[i : i + chunk], n_steps=n_steps,
                                       coefficients=None if coefficients is None else coefficients[i : i + chunk])
                         for i in range(0, n, chunk)]
            importance = torch.cat(parts).mean(0)  # (K,): class GIG averaged over inputs (eq. 7)
        run = _Substitution(model, name, None)
        U = _prepare(run, dec, inputs, name, "decomposer", coefficients)
        ranks = _ranks(importance.to(U.device), n, dec.n_concepts)
        fractions, counts = _fractions(steps, dec.n_concepts, U.device)

        def readout(out: Tensor, row_input: Tensor) -> Tensor:
            tt = t[row_input]
            if output == "accuracy":
                return (out.argmax(1) == tt).to(U.dtype)
            scores = out.softmax(1) if output == "prob" else out
            return scores.gather(1, tt.view(-1, 1)).squeeze(1).to(U.dtype)

        desc = "C-Deletion" if deletion else "C-Insertion"
        sparse = _SparseCoefficients.of(U, dec.basis.vectors.to(U))
        per_input = _substituted_scores(run, dec, inputs, U, ranks, counts, deletion, readout, batch_size, progress, desc,
                                        sparse)
    scores = per_input.mean(1)
    return Curve(fractions, scores, auc(fractions, scores), _aucs(fractions, per_input))


_CLASS_DOC = r"""

    Concepts of ``layer`` are taken in decreasing order of ``importance``;
    after removing/inserting a fraction ``f`` of them (``f = 0, 1/steps, ...,
    1``, so K = 16384 costs no more than K = 64) layer ``a``'s activation is
    replaced by ``offset + U' V`` and the class score of ``target`` is
    recorded. Fraction 0 of a deletion (and 1 of an insertion) is the
    reconstruction ``X~``; fraction 1 of a deletion (0 of an insertion) the
    offset alone. All steps run batched; the model's mode, hooks and
    ``requires_grad`` flags are restored on every exit.

    Args:
        model (nn.Module): the classifier, returning ``(N, n_classes)``.
        layer (nn.Module or str): the layer whose concepts are removed/inserted.
        decomposer (PFVDecomposer): concepts, offset and Lasso of ``layer``.
        inputs (Tensor): ``(N, ...)`` images on the model's device.
        target (int, sequence or Tensor): the class, one for all or ``(N,)``.
        importance (Tensor, optional): ``(K,)`` score per concept (one order for
                    all inputs) or ``(N, K)`` (one order per input). Default:
                    None, the class GIG of eq. 7 averaged over the inputs.
        steps (int, optional): the curve has ``steps + 1`` points. Default: 20
        output (str, optional): ``"prob"`` (softmax probability of the
                    target), ``"logit"``, or ``"accuracy"`` (share of inputs
                    still classified as their target). Default: ``"prob"``
        batch_size (int, optional): at most this many (step, input) rows per
                    forward; also the GIG chunk. Default: None (64 rows)
        n_steps (int, optional): GIG path points for the default importance.
                    Default: 32
        progress (bool, optional): show a progress bar. Default: False
        coefficients (Tensor, optional): ``layer``'s Lasso coefficients of
                    ``inputs`` in the layer's layout, when already solved (one
                    solve shared by several curves). Default: None

    Returns:
        Curve: ``fractions (steps + 1,)``, ``scores (steps + 1,)`` (mean over
        inputs) and their ``auc``.

    Examples::

        >>> dec = PFVDecomposer(basis, alpha=0.05)
        >>> curve = concept_deletion(model, "block2", dec, images, target=labels)
        >>> curve.auc, curve.scores[0], curve.scores[-1]
    """


def concept_deletion(model: nn.Module, layer: LayerSpec, decomposer: PFVDecomposer, inputs: Tensor, target: TargetSpec,
                     *, importance: Optional[Tensor] = None, steps: int = 20, output: str = "prob",
                     batch_size: Optional[int] = None, n_steps: int = 32, progress: bool = False,
                     coefficients: Optional[Tensor] = None) -> Curve:
    return _class_curve(True, model, layer, decomposer, inputs, target, importance, steps, output, batch_size,
                        n_steps, progress, coefficients)


def concept_insertion(model: nn.Module, layer: LayerSpec, decomposer: PFVDecomposer, inputs: Tensor, target: TargetSpec,
                      *, importance: Optional[Tensor] = None, steps: int = 20, output: str = "prob",
                      batch_size: Optional[int] = None, n_steps: int = 32, progress: bool = False,
                      coefficients: Optional[Tensor] = None) -> Curve:
    return _class_curve(False, model, layer, decomposer, inputs, target, importance, steps, output, batch_size,
                        n_steps, progress, coefficients)


concept_deletion.__doc__ = (
    "C-Deletion (paper 4.2.1, Fel et al. 2024): remove concepts, most important first; lower AUC is better."
    + _CLASS_DOC
)
concept_insertion.__doc__ = (
    "C-Insertion (paper 4.2.1, Fel et al. 2024): insert concepts into the offset, most important first; "
    "higher AUC is better." + _CLASS_DOC
)


# --------------------------------------------------------------------------- inter-layer


def _check_importance(importance, targets: list, argument: str) -> Tensor:
    importance = torch.as_tensor(importance)
    if len(targets) == 1 and importance.dim() in (1, 2):
        importance = importance.unsqueeze(0)
    if importance.shape[0] != len(targets):
        raise ValueError(f"{argument} needs a leading axis of {len(targets)} targets; got {tuple(importance.shape)}")
    return importance


def _interlayer(deletion: bool, model, layer_a, decomposer_a, layer_b, decomposer_b, inputs, target_concept,
                importance, steps, n_random, seed, batch_size, n_steps, progress, baselines=(),
                coefficients=None) -> InterlayerCurves:
    _check_common(model, inputs, steps, batch_size)
    dec_a = _as_decomposer(decomposer_a, "decomposer_a")
    if isinstance(decomposer_b, ConceptBasis):
        decomposer_b = PFVDecomposer(decomposer_b)
    dec_b = _as_decomposer(decomposer_b, "decomposer_b")
    if not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be a positive int; got {n_random!r}")
    name_a, _ = resolve_layer(model, layer_a, "layer_a")
    name_b, _ = resolve_layer(model, layer_b, "layer_b")
    if name_a == name_b:
        raise ValueError("layer_b must be a later layer than layer_a, not the same one")
    n, k = inputs.shape[0], dec_a.n_concepts
    tc = torch.as_tensor(target_concept)
    if tc.is_floating_point() or tc.dim() > 2 or (tc.dim() == 2 and tc.shape[0] != n):
        raise ValueError(f"target_concept must be an int, a 1-D sequence of ints (shared) or ({n}, T) per input; "
                         f"got {target_concept!r}")
    per_input = tc.dim() == 2  # each input its own T targets
    table = (tc if per_input else tc.view(1, -1)).long()  # (N or 1, T)
    if table.numel() == 0 or int(table.min()) < 0 or int(table.max()) >= dec_b.n_concepts:
        raise ValueError(f"target_concept {tc.tolist()} out of range: decomposer_b has {dec_b.n_concepts} concepts")
    slots = table.shape[1]
    given = dict(baselines) if isinstance(baselines, dict) else {name: None for name in baselines}
    if "gig" in given or "random" in given:
        raise ValueError("baselines name the orders compared with GIG and random; 'gig' and 'random' are always there")
    orders = {"gig": importance, **given}
    for name, value in orders.items():
        if value is not None:
            orders[name] = _check_importance(value, list(range(slots)), "importance" if name == "gig" else f"baselines[{name!r}]")
        elif name != "gig":
            attribution_class(name)  # an unknown name fails before any work

    with frozen(model), torch.no_grad():
        ensure_runs_once(model, name_b, inputs)
        run = _Substitution(model, name_a, name_b)
        U = _prepare(run, dec_a, inputs, name_a, "decomposer_a", coefficients)
        layer_U = _layout.from_pfvs(U, run.spatial)  # one Lasso solve for every order computed here
        table = table.to(U.device)
        chunk = batch_size or n
        for name, value in orders.items():
            if value is None:  # per-input attribution of each layer-a concept to each target (eq. 5)
                method = attribution_class(name)(model, name_a, dec_a, name_b, dec_b)
                with torch.enable_grad():
                    if per_input:  # one target per input and slot
                        parts = [torch.stack([method.attribute(inputs[i : i + chunk], target=table[i : i + chunk, j],
                                                               n_steps=n_steps, coefficients=layer_U[i : i + chunk])
                                              for j in range(slots)])
                                 for i in range(0, n, chunk)]
                        orders[name] = torch.cat(parts, 1)  # (T, N, K_a)
                    else:
                        parts = [method.attribute_matrix(inputs[i : i + chunk], targets=table[0], n_steps=n_steps,
                                                         coefficients=layer_U[i : i + chunk])
                                 for i in range(0, n, chunk)]
                        orders[name] = torch.cat(parts).permute(2, 0, 1)  # (T, N, K_a)
        V_b = dec_b.basis.normalized_vectors.to(U)
        beta_b = dec_b.basis.offset.to(U)
        fractions, counts = _fractions(steps, k, U.device)
        # the reference: layer b's max projection with layer a at its full reconstruction
        ref_counts = torch.zeros(1, dtype=torch.long, device=U.device) if deletion else \
            torch.full((1,), k, dtype=torch.long, device=U.device)

        gen = torch.Generator().manual_seed(seed)
        random_ranks = []
        for _ in range(n_random):
            perm = torch.randperm(k, generator=gen).to(U.device)
            r = torch.empty_like(perm)
            r[perm] = torch.arange(k, device=U.device)
            random_ranks.append(r.unsqueeze(0).expand(n, k))
        desc = "Inter-layer deletion" if deletion else "Inter-layer insertion"
        directions = V_b[table]  # (N or 1, T, C_b)

        def readout(out: Tensor, row_input: Tensor) -> Tensor:
            # every target at once: the forward does not depend on the target, only this projection does
            d = directions[row_input] if per_input else directions[0].unsqueeze(0)
            return torch.einsum("rpc,rtc->rpt", _layout.to_pfvs(out) - beta_b, d.expand(out.shape[0], -1, -1)).amax(1)

        sparse = _SparseCoefficients.of(U, dec_a.basis.vectors.to(U))
        any_ranks = torch.zeros(n, k, dtype=torch.long, device=U.device)
        ref = _substituted_scores(run, dec_a, inputs, U, any_ranks, ref_counts, deletion, readout, batch_size,
                                  False, desc, sparse)[0]  # (N, T)
        # the curves divide by ref: an input where the target barely shows (a projection near zero) would
        # dominate every mean, so a target counts where it reaches SHOWS_AT of its largest projection
        valid = (ref > 0) & (ref >= SHOWS_AT * ref.amax(0, keepdim=True))
        absent = [j for j in range(slots) if not bool(valid[:, j].any())]
        named = table[0].tolist() if not per_input else list(range(slots))
        what = "target concept" if not per_input else "target slot"
        if len(absent) == slots:
            raise ValueError(f"{what}s {[named[j] for j in absent]} of layer_b have no positive projection in any "
                             "input; choose concepts present in these images")
        if absent:
            warnings.warn(f"{what}s {[named[j] for j in absent]} have no positive projection in any input and are "
                          "left out")
        for j in range(slots):
            if j not in absent and not bool(valid[:, j].all()):
                warnings.warn(f"{what} {named[j]}: {int((~valid[:, j]).sum())} of {n} inputs have no positive "
                              f"projection on it above {SHOWS_AT:.0%} of its largest and are left out")
        kept = torch.tensor([j not in absent for j in range(slots)], device=U.device)

        def normalised(x: Tensor) -> Tensor:  # (S, N, T) over the reference, NaN where left out
            return torch.where(valid.unsqueeze(0), x / ref.clamp_min(1e-30).unsqueeze(0), torch.full_like(x, float("nan")))

        def curve_of(order: Tensor, show: bool) -> Tensor:
            """(S, N, T) scores of an order ``(T, N, K)``; one pass for an order every target shares."""
            if all(torch.equal(order[0], order[j]) for j in range(1, order.shape[0])):
                ranks = _ranks(order[0].to(U.device), n, k)
                return normalised(_substituted_scores(run, dec_a, inputs, U, ranks, counts, deletion, readout,
                                                      batch_size, show, desc, sparse))
            parts = []
            for j in range(order.shape[0]):
                ranks = _ranks(order[j].to(U.device), n, k)
                parts.append(_substituted_scores(run, dec_a, inputs, U, ranks, counts, deletion, readout, batch_size,
                                                 show, desc, sparse)[:, :, j])
            return normalised(torch.stack(parts, 2))

        for name, value in orders.items():  # every order checked before the first forward
            for j in range(value.shape[0]):
                _ranks(value[j].to(U.device), n, k, "importance" if name == "gig" else f"baselines[{name!r}]")
        curves = {}
        for name, value in orders.items():
            x = curve_of(value, progress and name == "gig")[:, :, kept]
            mean = x.nanmean(1).mean(1)  # mean over the inputs each target has, then over targets
            curves[name] = Curve(fractions, mean, auc(fractions, mean),
                                 torch.trapezoid(x.double().cpu(), fractions.double().cpu(), dim=0).nanmean(1))
        rs = [normalised(_substituted_scores(run, dec_a, inputs, U, r, counts, deletion, readout, batch_size, False,
                                             desc, sparse))[:, :, kept].nanmean(1).mean(1) for r in random_ranks]
    r = torch.stack(rs).mean(0)
    random_curve = Curve(fractions, r, auc(fractions, r))
    gig_curve = curves.pop("gig")
    diff = random_curve.auc - gig_curve.auc if deletion else gig_curve.auc - random_curve.auc
    return InterlayerCurves(gig_curve, random_curve, diff, curves)


_INTER_DOC = r"""

    Layer-``a`` concepts are taken in decreasing order of their GIG to the
    layer-``b`` concept ``t`` (eq. 5; by default computed per input), and
    after each fraction of them is removed/inserted (layer ``a`` replaced by
    ``offset + U' V``) the score is the maximum over layer-``b`` positions of
    the projection of the centred PFV ``w_i - beta_b`` on the unit concept
    vector ``v-bar_t``, divided by the same maximum with layer ``a`` at its full
    reconstruction (the paper's projection score). The same is done for
    ``n_random`` seeded random orders; their mean is the baseline. Several
    target concepts give curves averaged over targets (the paper uses the five
    most important concepts of layer ``b``). Inputs in which the target has no
    positive projection are left out with a warning.

    Args:
        model (nn.Module): the model.
        layer_a (nn.Module or str): the source layer.
        decomposer_a (PFVDecomposer): concepts and Lasso of ``layer_a``.
        layer_b (nn.Module or str): a later layer.
        decomposer_b (PFVDecomposer or ConceptBasis): concepts of ``layer_b``.
        inputs (Tensor): ``(N, ...)`` images.
        target_concept (int, sequence of int or Tensor): concept(s) of
                    ``layer_b`` shared by all inputs, or ``(N, T)``: each input's
                    own ``T`` targets (e.g. its class's top concepts).
        importance (Tensor, optional): ``(K_a,)`` or ``(N, K_a)`` scores for one
                    target, ``(T, K_a)`` / ``(T, N, K_a)`` for ``T`` targets (or
                    target slots with per-input targets).
                    Default: None (GIG per input, via ``attribute_matrix``).
        steps (int, optional): the curves have ``steps + 1`` points. Default: 20
        n_random (int, optional): random orders averaged. Default: 5
        seed (int, optional): seed of the random orders. Default: 0
        batch_size (int, optional): (step, input) rows per forward. Default: None
        n_steps (int, optional): GIG path points. Default: 32
        progress (bool, optional): show a progress bar. Default: False
        baselines (sequence of str or dict, optional): further orders to
                    compare, by name of an attribution in
                    :data:`captum_gig.baselines.ATTRIBUTIONS` (``"endpoint"``,
                    ``"magnitude"``, ``"ablation"``; computed per input like GIG)
                    or as ``{name: importance}`` with the shapes of
                    ``importance``. Default: () (GIG and random only)
        coefficients (Tensor, optional): ``layer_a``'s Lasso coefficients of
                    ``inputs`` in the layer's layout, when already solved. Default: None

    Returns:
        InterlayerCurves: ``gig`` and ``random`` :class:`Curve`, the
        ``auc_difference`` (positive when the GIG order beats random) and one
        curve per baseline in ``baselines``.

    Examples::

        >>> res = interlayer_deletion(model, "block1", dec1, "block2", dec2, images, target_concept=[3, 7])
        >>> res.gig.auc, res.random.auc, res.auc_difference
    """


def interlayer_deletion(model: nn.Module, layer_a: LayerSpec, decomposer_a: PFVDecomposer, layer_b: LayerSpec,
                        decomposer_b, inputs: Tensor, target_concept, *, importance: Optional[Tensor] = None,
                        steps: int = 20, n_random: int = 5, seed: int = 0, batch_size: Optional[int] = None,
                        n_steps: int = 32, progress: bool = False,
                        baselines=(), coefficients: Optional[Tensor] = None) -> InterlayerCurves:
    return _interlayer(True, model, layer_a, decomposer_a, layer_b, decomposer_b, inputs, target_concept, importance,
                       steps, n_random, seed, batch_size, n_steps, progress, baselines, coefficients)


def interlayer_insertion(model: nn.Module, layer_a: LayerSpec, decomposer_a: PFVDecomposer, layer_b: LayerSpec,
                         decomposer_b, inputs: Tensor, target_concept, *, importance: Optional[Tensor] = None,
                         steps: int = 20, n_random: int = 5, seed: int = 0, batch_size: Optional[int] = None,
                         n_steps: int = 32, progress: bool = False,
                         baselines=(), coefficients: Optional[Tensor] = None) -> InterlayerCurves:
    return _interlayer(False, model, layer_a, decomposer_a, layer_b, decomposer_b, inputs, target_concept, importance,
                       steps, n_random, seed, batch_size, n_steps, progress, baselines, coefficients)


interlayer_deletion.__doc__ = (
    "Inter-layer deletion (paper 4.2.3, Fig. 5): remove layer-a concepts in GIG order; lower AUC is better."
    + _INTER_DOC
)
interlayer_insertion.__doc__ = (
    "Inter-layer insertion (paper 4.2.3, Fig. 5): insert layer-a concepts in GIG order; higher AUC is better."
    + _INTER_DOC
)
