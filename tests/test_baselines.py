"""The simpler concept attributions against brute-force computations on a tiny model."""

import pytest
import torch

from captum_gig import (ConceptAblation, ConceptGradientXCoefficient, ConceptMagnitude, GeneralizedIntegratedGradients,
                        _layout)
from captum_gig.baselines import ATTRIBUTIONS, attribution_class
from helpers import Smooth, make_decomposer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Smooth().double().eval()
    images = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    dec_a = make_decomposer(model, "a", images, k_factor=3)
    dec_b = make_decomposer(model, "b", images, k_factor=3)
    x = images[:3]
    with torch.no_grad():
        act = model.a(model.prefix(x))
    U = dec_a.transform(act)  # (N, K, H, W)
    return model, x, dec_a, dec_b, U


def _reconstruction(U, dec):
    """X~ = beta + U V built by hand in the layer's layout."""
    Up = _layout.to_pfvs(U)
    return _layout.from_pfvs(Up @ dec.basis.vectors + dec.basis.offset, (8, 8))


def _concept_score(model, dec_b, t):
    v = dec_b.basis.vectors[t] / dec_b.basis.vectors[t].norm()
    return lambda z: _layout.to_pfvs(model.mid(z)).sum(1) @ v  # eq. 4, one scalar per example


def test_ablation_equals_an_explicit_forward_per_concept(setup):
    model, x, dec_a, dec_b, U = setup
    X_tilde = _reconstruction(U, dec_a)
    V = dec_a.basis.vectors
    for t in (0, 5):
        score = _concept_score(model, dec_b, t)
        ours = ConceptAblation(model, "a", dec_a, "b", dec_b).attribute(x, target=t)
        ref = torch.zeros_like(ours)
        with torch.no_grad():
            for q in range(dec_a.n_concepts):
                removed = X_tilde - U[:, q].unsqueeze(1) * V[q].view(1, -1, 1, 1)  # concept q gone at every position
                ref[:, q] = score(X_tilde) - score(removed)
        assert torch.allclose(ours, ref, atol=1e-10), (ours - ref).abs().max()
        assert (ref != 0).any()
    # classes and several targets at once agree with one target at a time
    abl = ConceptAblation(model, "a", dec_a)
    mat = abl.attribute_matrix(x, targets=[0, 2])
    assert mat.shape == (3, dec_a.n_concepts, 2)
    for j, c in enumerate((0, 2)):
        assert torch.allclose(mat[..., j], abl.attribute(x, target=c), atol=1e-12)
    # only some concepts: the others that are present are unknown (NaN), absent ones are exactly 0
    some = abl.attribute(x, target=1, concepts=[0, 1])
    full = abl.attribute(x, target=1)
    present = (U != 0).flatten(2).any(2)
    assert torch.allclose(some[:, :2], full[:, :2])
    assert torch.isnan(some[:, 2:][present[:, 2:]]).all() and (some[:, 2:][~present[:, 2:]] == 0).all()


def test_endpoint_gradient_equals_autograd_on_the_reconstruction(setup):
    model, x, dec_a, dec_b, U = setup
    V = dec_a.basis.vectors
    for target in (3, None):
        if target is None:  # a class target
            score = lambda z: model.head(model.mid(z))[:, 1]  # noqa: E731
            eg = ConceptGradientXCoefficient(model, "a", dec_a)
            ours, delta = eg.attribute(x, target=1, return_convergence_delta=True)
        else:
            score = _concept_score(model, dec_b, target)
            eg = ConceptGradientXCoefficient(model, "a", dec_a, "b", dec_b)
            ours, delta = eg.attribute(x, target=target, return_convergence_delta=True)
        Up = _layout.to_pfvs(U).clone().requires_grad_(True)  # the gradient with respect to u at alpha = 1
        z = _layout.from_pfvs(Up @ V + dec_a.basis.offset, (8, 8))
        (g,) = torch.autograd.grad(score(z).sum(), Up)
        ref = (Up.detach() * g).sum(1)
        assert torch.allclose(ours, ref, atol=1e-10)
        # not complete: the delta is what integrating the path (GIG) removes
        gig = GeneralizedIntegratedGradients(model, "a", dec_a, *(("b", dec_b) if target is not None else ()))
        _, gig_delta = gig.attribute(x, target=1 if target is None else target, n_steps=64, return_convergence_delta=True)
        assert delta.abs().max() > 100 * gig_delta.abs().max()


def test_magnitude_is_the_summed_coefficient_length(setup):
    model, x, dec_a, dec_b, U = setup
    mag = ConceptMagnitude(model, "a", dec_a, "b", dec_b)
    ref = (U.abs() * dec_a.basis.vectors.norm(dim=1).view(1, -1, 1, 1)).sum((2, 3))
    assert torch.allclose(mag.attribute(x), ref)
    assert torch.allclose(mag.attribute(x, target=4), ref)  # whatever the target
    assert torch.allclose(mag.attribute(x, per_position=True).sum((2, 3)), ref)
    assert mag.attribute_matrix(x, targets=[1, 2, 3]).shape == (3, dec_a.n_concepts, 3)
    with pytest.raises(ValueError, match="convergence delta"):
        mag.attribute(x, return_convergence_delta=True)


def test_shared_coefficients_give_the_same_attributions(setup):
    model, x, dec_a, dec_b, U = setup
    for name in sorted(ATTRIBUTIONS):
        method = attribution_class(name)(model, "a", dec_a, "b", dec_b)
        assert torch.allclose(method.attribute(x, target=2, coefficients=U), method.attribute(x, target=2))
    with pytest.raises(ValueError, match="coefficients"):
        GeneralizedIntegratedGradients(model, "a", dec_a).attribute(x, target=0, coefficients=U[:, :3])
    with pytest.raises(ValueError, match="attribution must be one of"):
        attribution_class("saliency")


def test_all_agree_on_a_linear_transition():
    """Where the layers between are linear, GIG, the endpoint gradient and the ablation effect coincide."""
    torch.manual_seed(1)
    model = Smooth().double().eval()
    model.mid = torch.nn.Conv2d(4, 3, 3, stride=2, padding=1).double()  # linear a -> b
    images = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    dec_a = make_decomposer(model, "a", images, k_factor=3)
    dec_b = make_decomposer(model, "b", images, k_factor=3)
    x = images[:2]
    gig = GeneralizedIntegratedGradients(model, "a", dec_a, "b", dec_b).attribute(x, target=1, n_steps=8)
    eg = ConceptGradientXCoefficient(model, "a", dec_a, "b", dec_b).attribute(x, target=1)
    abl = ConceptAblation(model, "a", dec_a, "b", dec_b).attribute(x, target=1)
    assert torch.allclose(gig, eg, atol=1e-10) and torch.allclose(gig, abl, atol=1e-10)
