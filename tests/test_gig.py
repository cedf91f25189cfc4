import pytest
import torch
import torchvision
from captum.attr import NoiseTunnel

from captum_gig import ConceptBasis, GeneralizedIntegratedGradients, PFVDecomposer, _layout
from helpers import SmallCNN, Smooth, make_decomposer, randomize_bn, tiny_vit


def reference_gig(U, V, beta, spatial, score, steps=2000):
    """Brute force, independent of the library's projection: Riemann (midpoint) sum of dS/dU along alpha * U.

    ``U (N, P, K)``; ``score(z) -> (N,)`` with ``z`` in the layer's layout. Returns ``(N, K)``.
    """
    total = torch.zeros_like(U)
    for alpha in (torch.arange(steps, dtype=U.dtype) + 0.5) / steps:
        Ua = (alpha * U).detach().requires_grad_(True)
        z = _layout.from_pfvs(Ua @ V + beta, spatial)
        (g,) = torch.autograd.grad(score(z).sum(), Ua)
        total += g / steps
    return (U * total).sum(1)


@pytest.fixture(scope="module")
def smooth_setup():
    torch.manual_seed(0)
    model = Smooth().double().eval()
    images = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    dec_a = make_decomposer(model, "a", images, k_factor=3)
    dec_b = make_decomposer(model, "b", images, k_factor=3)
    return model, images[:2], dec_a, dec_b


def test_agrees_with_brute_force_reference_for_concepts(smooth_setup):
    model, x, dec_a, dec_b = smooth_setup
    gig = GeneralizedIntegratedGradients(model, "a", dec_a, "b", dec_b)
    ours = gig.attribute_matrix(x, n_steps=64)  # (N, K_a, K_b) every (q, t)
    with torch.no_grad():
        act = model.a(model.prefix(x))
    U = _layout.to_pfvs(dec_a.transform(act))
    Vb = dec_b.basis.normalized_vectors
    for t in range(dec_b.n_concepts):
        score = lambda z: _layout.to_pfvs(model.mid(z)).sum(1) @ Vb[t]  # noqa: E731  eq. 4
        ref = reference_gig(U, dec_a.basis.vectors, dec_a.basis.offset, (8, 8), score)
        err = (ours[..., t] - ref).abs().max()
        assert err <= 1e-3 * ref.abs().max(), f"target concept {t}: error {err:.2e} vs scale {ref.abs().max():.2e}"


@pytest.mark.parametrize("output", ["logit", "prob"])
def test_agrees_with_brute_force_reference_for_classes(smooth_setup, output):
    model, x, dec_a, _ = smooth_setup
    gig = GeneralizedIntegratedGradients(model, "a", dec_a, output=output)
    with torch.no_grad():
        act = model.a(model.prefix(x))
    U = _layout.to_pfvs(dec_a.transform(act))
    for c in range(4):
        ours = gig.attribute(x, target=c, n_steps=64)

        def score(z):
            logits = model.head(model.mid(z))
            return (logits.softmax(1) if output == "prob" else logits)[:, c]

        ref = reference_gig(U, dec_a.basis.vectors, dec_a.basis.offset, (8, 8), score)
        assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.fixture(scope="module")
def cnn_setup():
    torch.manual_seed(1)
    model = randomize_bn(SmallCNN()).eval()
    images = torch.randn(16, 3, 16, 16)
    decs = {name: make_decomposer(model, name, images, offset=getattr(model, name)[1]) for name in ("block1", "block2", "block3")}
    return model, images[:3], decs


@pytest.fixture(scope="module")
def vit_setup():
    torch.manual_seed(2)
    model = tiny_vit()
    images = torch.randn(16, 3, 32, 32)
    layers = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    decs = {name: make_decomposer(model, name, images) for name in layers}
    return model, images[:3], layers, decs


def _completeness(gig, x, target, residual, n_steps=64):
    attr, delta = gig.attribute(x, target=target, n_steps=n_steps, residual=residual, return_convergence_delta=True)
    ends = gig._endpoints(x, (), residual)
    with torch.no_grad():
        s_end, s_start = gig._readout_ends(ends, x, ())
    dirs = gig._target_directions(torch.as_tensor(target).expand(len(x)), s_end.shape[1])
    change = ((s_end - s_start) * dirs).sum(1)
    assert torch.allclose(attr.sum(1) - change, delta, atol=1e-5 * change.abs().max())
    assert (delta.abs() <= 1e-2 * change.abs()).all(), f"delta {delta} vs change {change}"
    return attr, change


@pytest.mark.parametrize("residual", [False, True])
def test_completeness_small_cnn(cnn_setup, residual):
    model, x, decs = cnn_setup
    to_concept = GeneralizedIntegratedGradients(model, "block1", decs["block1"], "block3", decs["block3"])
    attr, _ = _completeness(to_concept, x, 5, residual)
    assert attr.shape == (3, decs["block1"].n_concepts + int(residual))
    to_class = GeneralizedIntegratedGradients(model, "block2", decs["block2"], output="prob")
    _completeness(to_class, x, 2, residual)


def test_residual_adds_up_to_the_real_model_change(cnn_setup):
    model, x, decs = cnn_setup
    gig = GeneralizedIntegratedGradients(model, "block2", decs["block2"])
    attr = gig.attribute(x, target=1, n_steps=64, residual=True)
    with torch.no_grad():
        real = model(x)[:, 1]
        beta = decs["block2"].basis.offset.view(1, -1, 1, 1).expand(3, -1, 8, 8)
        offset_only = model.head(model.block3(beta).mean((2, 3)))[:, 1]
    assert torch.allclose(attr.sum(1), real - offset_only, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("residual", [False, True])
def test_completeness_small_vit(vit_setup, residual):
    model, x, layers, decs = vit_setup
    to_concept = GeneralizedIntegratedGradients(model, layers[0], decs[layers[0]], layers[1], decs[layers[1]])
    _completeness(to_concept, x, 3, residual)
    to_class = GeneralizedIntegratedGradients(model, layers[1], decs[layers[1]])
    attr, _ = _completeness(to_class, x, 4, residual)
    per_pos = to_class.attribute(x, target=4, n_steps=64, residual=residual, per_position=True)
    assert per_pos.shape == (3, decs[layers[1]].n_concepts + int(residual), 17)
    assert torch.allclose(per_pos.sum(2), attr, atol=1e-5)


def test_matrix_equals_stacked_attribute_including_via_channels(cnn_setup):
    model, x, decs = cnn_setup
    dec_b = decs["block3"]
    assert dec_b.n_concepts > dec_b.n_channels  # all targets: computed through the C_b channels
    gig = GeneralizedIntegratedGradients(model, "block1", decs["block1"], "block3", dec_b)
    full, delta = gig.attribute_matrix(x, n_steps=16, return_convergence_delta=True)
    few = gig.attribute_matrix(x, targets=[0, 7], n_steps=16)
    for i, t in enumerate([0, 7, dec_b.n_concepts - 1]):
        single, d = gig.attribute(x, target=t, n_steps=16, return_convergence_delta=True)
        scale = single.abs().max()
        assert (full[..., t] - single).abs().max() <= 1e-5 * scale
        assert (delta[:, t] - d).abs().max() <= 1e-4 * scale
        if i < 2:
            assert (few[..., i] - single).abs().max() <= 1e-5 * scale


def test_matrix_for_classes_and_memory_split(cnn_setup):
    model, x, decs = cnn_setup
    gig = GeneralizedIntegratedGradients(model, "block2", decs["block2"])
    whole = gig.attribute_matrix(x, n_steps=8)  # every class
    assert whole.shape == (3, decs["block2"].n_concepts, 5)
    tiny_budget = gig.attribute_matrix(x, n_steps=8, max_memory=1, vjp_batch_size=2, internal_batch_size=6)
    assert torch.allclose(whole, tiny_budget, atol=1e-5 * whole.abs().max())
    for c in range(5):
        assert torch.allclose(whole[..., c], gig.attribute(x, target=c, n_steps=8), atol=1e-5 * whole.abs().max())


def test_sliced_path_equals_hook_path(cnn_setup, vit_setup):
    model, x, decs = cnn_setup
    for layer_b, dec_b in (("block3", decs["block3"]), (None, None)):
        sliced = GeneralizedIntegratedGradients(model, "block1", decs["block1"], layer_b, dec_b)
        hooked = GeneralizedIntegratedGradients(model, "block1", decs["block1"], layer_b, dec_b, slicing=False)
        assert sliced.uses_slicing and not hooked.uses_slicing
        a = sliced.attribute(x, target=2, n_steps=8, residual=True)
        b = hooked.attribute(x, target=2, n_steps=8, residual=True)
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max())
        assert torch.allclose(sliced.attribute_matrix(x, n_steps=4), hooked.attribute_matrix(x, n_steps=4), atol=1e-5 * a.abs().max())
    vit, xv, layers, vdecs = vit_setup
    s = GeneralizedIntegratedGradients(vit, layers[0], vdecs[layers[0]])
    h = GeneralizedIntegratedGradients(vit, layers[0], vdecs[layers[0]], slicing=False)
    assert s.uses_slicing
    assert torch.allclose(s.attribute(xv, target=1, n_steps=8), h.attribute(xv, target=1, n_steps=8), atol=1e-5)


def test_internal_batching_equals_unbatched(cnn_setup):
    model, x, decs = cnn_setup
    gig = GeneralizedIntegratedGradients(model, "block1", decs["block1"], "block2", decs["block2"])
    a = gig.attribute(x, target=[1, 2, 3], n_steps=10)
    b = gig.attribute(x, target=[1, 2, 3], n_steps=10, internal_batch_size=7)
    assert torch.allclose(a, b, atol=1e-5 * a.abs().max())
    m1 = gig.attribute_matrix(x, targets=[4, 5], n_steps=10)
    m2 = gig.attribute_matrix(x, targets=[4, 5], n_steps=10, internal_batch_size=7)
    assert torch.allclose(m1, m2, atol=1e-5 * m1.abs().max())


def test_unused_concept_gets_exactly_zero(cnn_setup):
    model, x, decs = cnn_setup
    basis = decs["block2"].basis
    vectors = torch.cat([basis.vectors, torch.zeros(1, basis.n_channels)])  # a concept no PFV can use
    dec = PFVDecomposer(ConceptBasis(vectors, basis.offset), alpha=decs["block2"].alpha)
    gig = GeneralizedIntegratedGradients(model, "block2", dec)
    attr = gig.attribute(x, target=0, n_steps=16, per_position=True)
    assert (attr[:, -1] == 0).all()
    assert (attr[:, :-1] != 0).any()


def test_noise_tunnel_wraps_gig(cnn_setup):
    model, x, decs = cnn_setup
    gig = GeneralizedIntegratedGradients(model, "block2", decs["block2"])
    nt = NoiseTunnel(gig)
    attr, delta = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.05, target=1, n_steps=8, return_convergence_delta=True)
    assert attr.shape == (3, decs["block2"].n_concepts) and torch.isfinite(attr).all()
    assert delta.shape[0] == 9


def test_resnet_inside_block_cut_uses_hooks_and_stays_complete():
    torch.manual_seed(3)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    images = torch.randn(6, 3, 32, 32)
    dec = make_decomposer(model, "layer2.0.bn2", images)
    gig = GeneralizedIntegratedGradients(model, "layer2.0.bn2", dec)
    assert not gig.uses_slicing  # the skip path around the cut needs the block input
    x = images[:2]
    ends = gig._endpoints(x, (), residual=True)
    s_end, _ = gig._readout_ends(ends, x, ())
    with torch.no_grad():
        assert torch.allclose(s_end, model(x), atol=1e-5)  # the replaced forward ends at the real model
    # ReLU kinks make the integral converge slowly; the delta shrinks with n_steps
    _, coarse = gig.attribute(x, target=3, n_steps=16, residual=True, return_convergence_delta=True)
    _, fine = gig.attribute(x, target=3, n_steps=256, residual=True, return_convergence_delta=True)
    assert fine.abs().max() < coarse.abs().max() / 4
    _completeness(gig, x, 3, residual=True, n_steps=512)
    boundary = GeneralizedIntegratedGradients(model, "layer2", make_decomposer(model, "layer2", images))
    assert boundary.uses_slicing


def test_state_restored_and_no_hooks_left(cnn_setup):
    model, x, decs = cnn_setup
    model.train()
    gig = GeneralizedIntegratedGradients(model, "block1", decs["block1"], slicing=False)
    gig.attribute(x, target=0, n_steps=4)
    with pytest.raises(ValueError, match="out of range"):
        gig.attribute(x, target=99, n_steps=4)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.eval()


def test_bad_arguments(cnn_setup):
    model, x, decs = cnn_setup
    with pytest.raises(ValueError, match="did you mean"):
        GeneralizedIntegratedGradients(model, "blok1", decs["block1"])
    with pytest.raises(TypeError, match="decomposer_b"):
        GeneralizedIntegratedGradients(model, "block1", decs["block1"], "block2")
    with pytest.warns(UserWarning, match="fitted on layer 'block2', not on 'block1'"):
        gig = GeneralizedIntegratedGradients(model, "block1", decs["block2"])  # wrong basis for the layer
    with pytest.raises(ValueError, match="channels"):
        gig.attribute(x, target=0)
    good = GeneralizedIntegratedGradients(model, "block1", decs["block1"])
    with pytest.raises(ValueError, match="n_steps"):
        good.attribute(x, target=0, n_steps=0)
    with pytest.raises(ValueError, match="target is required"):
        good.attribute(x)


def test_sparse_and_dense_projections_agree(cnn_setup, monkeypatch):
    # u_pq <v_q, G_p> over the non-zeros only (sparse coefficients) equals the dense product
    from captum_gig import decompose

    model, x, decs = cnn_setup[:3]
    gig = GeneralizedIntegratedGradients(model, "block1", decs["block1"], "block2", decs["block2"])
    results = {}
    for name, density in (("sparse", 1.0), ("dense", -1.0)):
        monkeypatch.setattr(decompose, "SPARSE_DENSITY", density)
        results[name] = (
            gig.attribute(x, target=1, n_steps=8, per_position=True, residual=True),
            gig.attribute(x, target=1, n_steps=8),
            gig.attribute_matrix(x, targets=[0, 2], n_steps=4, residual=True),
        )
    for sparse, dense in zip(results["sparse"], results["dense"]):
        assert sparse.shape == dense.shape
        assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6 * float(dense.abs().max()))
