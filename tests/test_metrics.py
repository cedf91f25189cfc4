"""C-Deletion/C-Insertion and inter-layer deletion/insertion (paper 4.2.1, 4.2.3).

Checked against hand-made substitutions (hooks written here, not the library's),
exact linear algebra on linear models, and a planted two-layer model."""

import pytest
import torch
from torch import nn

from captum_gig import (
    ConceptBasis,
    GeneralizedIntegratedGradients,
    PFVDecomposer,
    concept_deletion,
    concept_insertion,
    interlayer_deletion,
    interlayer_insertion,
)
from captum_gig.metrics import auc
from helpers import SmallCNN, make_decomposer, randomize_bn


def substituted_output(model, layer, inputs, fn):
    """The model output with ``layer``'s output replaced by ``fn(original)`` (an independent hook)."""
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: fn(out))
    try:
        with torch.no_grad():
            return model(inputs)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN()).eval()
    images = torch.randn(6, 3, 16, 16)
    dec = make_decomposer(model, "block2", images, k_factor=2)
    return model, images, PFVDecomposer(dec.basis, alpha=dec.alpha)  # default tol: fast enough for tests


@pytest.mark.parametrize("output", ["logit", "prob"])
def test_endpoints_are_reconstruction_and_offset_only(cnn, output):
    model, images, dec = cnn
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    dele = concept_deletion(model, "block2", dec, images, target, steps=4, output=output)
    ins = concept_insertion(model, "block2", dec, images, target, steps=4, output=output)

    def score(out):
        s = out.softmax(1) if output == "prob" else out
        return s.gather(1, target.view(-1, 1)).mean()

    beta = dec.basis.offset.view(1, -1, 1, 1)
    offset_only = score(substituted_output(model, "block2", images, lambda out: beta.expand_as(out).clone()))
    recon = score(substituted_output(model, "block2", images, lambda out: dec.inverse_transform(dec.transform(out))))
    torch.testing.assert_close(dele.scores[-1], offset_only, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ins.scores[0], offset_only, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dele.scores[0], recon, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ins.scores[-1], recon, rtol=1e-4, atol=1e-5)
    assert dele.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert dele.auc == pytest.approx(float(torch.trapezoid(dele.scores.double(), dele.fractions.double())))


def test_default_importance_is_class_gig_averaged(cnn):
    model, images, dec = cnn
    gig = GeneralizedIntegratedGradients(model, "block2", dec, output="prob")
    imp = gig.attribute(images, target=2, n_steps=32).mean(0)
    a = concept_deletion(model, "block2", dec, images, 2, steps=5)
    b = concept_deletion(model, "block2", dec, images, 2, steps=5, importance=imp)
    torch.testing.assert_close(a.scores, b.scores)


class LinearHead(nn.Module):
    """``a`` is the input itself; the class logits are linear in it: ``W sum_p a_p + b``."""

    def __init__(self, weight, bias):
        super().__init__()
        self.a = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        self.fc.weight.data.copy_(weight)
        self.fc.bias.data.copy_(bias)

    def forward(self, x):
        return self.fc(self.a(x).sum((2, 3)))


def linear_setup(positive):
    g = torch.Generator().manual_seed(1)
    c, k, n = 6, 12, 5
    if positive:
        V = torch.rand(k, c, generator=g) + 0.05
        W = torch.rand(3, c, generator=g) + 0.1
        U = torch.rand(n, 4, 4, k, generator=g) * (torch.rand(n, 4, 4, k, generator=g) < 0.3)
    else:
        V = torch.randn(k, c, generator=g)
        W = torch.randn(3, c, generator=g)
        U = torch.randn(n, 4, 4, k, generator=g) * (torch.rand(n, 4, 4, k, generator=g) < 0.3)
    beta = torch.randn(c, generator=g) * 0.1
    X = (U @ V + beta).permute(0, 3, 1, 2).contiguous()
    model = LinearHead(W, torch.zeros(3)).eval()
    dec = PFVDecomposer(ConceptBasis(V, beta), alpha=1e-3, positive=positive)
    return model, dec, X


def test_linear_model_curves_monotone_and_exact():
    model, dec, X = linear_setup(positive=True)
    dele = concept_deletion(model, "a", dec, X, 1, steps=12, output="logit")
    ins = concept_insertion(model, "a", dec, X, 1, steps=12, output="logit")
    d, i = dele.scores, ins.scores
    assert (d[1:] <= d[:-1] + 1e-4).all(), d  # every concept adds to class 1: removing only lowers it
    assert (i[1:] >= i[:-1] - 1e-4).all(), i
    assert d[0] - d[-1] > 1.0
    # exact: with a linear score, GIG_q = sum_p u_pq <v_q, w> and each step removes the next largest one
    U = dec.transform(X)  # (N, K, H, W)
    gig = (U.sum((2, 3)) * (dec.basis.vectors @ model.fc.weight[1])).mean(0)  # (K,)
    steps = torch.sort(gig, descending=True).values
    expected = d[0] - torch.cat([torch.zeros(1), torch.cumsum(steps, 0)])
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-3)


def test_linear_model_gig_order_beats_every_other_order():
    model, dec, X = linear_setup(positive=False)
    dele = concept_deletion(model, "a", dec, X, 0, steps=12, output="logit")
    ins = concept_insertion(model, "a", dec, X, 0, steps=12, output="logit")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # on a linear model the GIG order is the pointwise-optimal order
        imp = torch.randn(12, generator=g)
        other_d = concept_deletion(model, "a", dec, X, 0, steps=12, output="logit", importance=imp)
        other_i = concept_insertion(model, "a", dec, X, 0, steps=12, output="logit", importance=imp)
        assert (dele.scores <= other_d.scores + 1e-4).all()
        assert (ins.scores >= other_i.scores - 1e-4).all()
        assert dele.auc <= other_d.auc + 1e-6 and ins.auc >= other_i.auc - 1e-6


def test_accuracy_output_and_per_input_orders(cnn):
    model, images, dec = cnn
    with torch.no_grad():
        pred = model(images).argmax(1)
    imp = torch.randn(images.shape[0], dec.n_concepts)
    curve = concept_deletion(model, "block2", dec, images, pred, steps=3, output="accuracy", importance=imp)
    assert ((curve.scores * images.shape[0]).round() == curve.scores * images.shape[0]).all()
    assert 0 <= curve.scores.min() and curve.scores.max() <= 1


class Planted(nn.Module):
    """Layer ``a`` = input (8 channels); layer ``b``'s channel 0 is built from channels 2 and 5 only."""

    def __init__(self):
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.Conv2d(16, 4, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        w = torch.rand(4, 16, 3, 3, generator=g) * 0.2
        w[0] = 0
        w[0, 2] = 1.0 + torch.rand(3, 3, generator=g)
        w[0, 5] = 1.0 + torch.rand(3, 3, generator=g)
        self.b.weight.data.copy_(w)
        self.b.bias.data.zero_()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_planted_interlayer_ranks_builders_first_and_beats_random():
    torch.manual_seed(0)
    model = Planted().eval()
    x = torch.rand(6, 16, 8, 8) + 0.1
    dec_a = PFVDecomposer(ConceptBasis(torch.eye(16)), alpha=1e-3)
    basis_b = ConceptBasis(torch.eye(4))
    gig = GeneralizedIntegratedGradients(model, "a", dec_a, "b", basis_b)
    top = gig.attribute(x, target=0, n_steps=16).mean(0).topk(2).indices
    assert set(top.tolist()) == {2, 5}
    dele = interlayer_deletion(model, "a", dec_a, "b", basis_b, x, 0, steps=16, n_random=8)
    ins = interlayer_insertion(model, "a", dec_a, "b", basis_b, x, 0, steps=16, n_random=8)
    # two of sixteen concepts build the target: removing them first kills it at once
    assert dele.gig.scores[0] == pytest.approx(1.0) and ins.gig.scores[-1] == pytest.approx(1.0)
    assert dele.gig.scores[2] == pytest.approx(0.0, abs=1e-5)
    assert ins.gig.scores[2] == pytest.approx(1.0, abs=1e-4)
    assert dele.auc_difference > 0.3 and ins.auc_difference > 0.3
    assert dele.random.auc > 2 * dele.gig.auc


def test_interlayer_multiple_targets_and_seeded_random(cnn):
    model, images, dec2 = cnn
    dec3 = make_decomposer(model, "block3", images, k_factor=1).basis
    kw = dict(steps=4, n_random=2, seed=7, n_steps=8)
    r1 = interlayer_deletion(model, "block2", dec2, "block3", dec3, images, [0, 1], **kw)
    r2 = interlayer_deletion(model, "block2", dec2, "block3", dec3, images, [0, 1], **kw)
    torch.testing.assert_close(r1.random.scores, r2.random.scores)
    assert r1.gig.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert r1.auc_difference == pytest.approx(r1.random.auc - r1.gig.auc)


def test_interlayer_baselines_share_the_machinery_and_given_orders_are_used(cnn):
    model, images, dec2 = cnn
    dec3 = make_decomposer(model, "block3", images, k_factor=1).basis
    kw = dict(steps=4, n_random=2, n_steps=8)
    res = interlayer_deletion(model, "block2", dec2, "block3", dec3, images, [0, 1],
                              baselines=("endpoint", "magnitude", "ablation"), **kw)
    assert sorted(res.baselines) == ["ablation", "endpoint", "magnitude"]
    plain = interlayer_deletion(model, "block2", dec2, "block3", dec3, images, [0, 1], **kw)
    torch.testing.assert_close(res.gig.scores, plain.gig.scores)  # the baselines change nothing else
    # a baseline given as an order is the same as GIG given that order
    from captum_gig import ConceptMagnitude

    mag = ConceptMagnitude(model, "block2", dec2, "block3", dec3).attribute_matrix(images, targets=[0, 1])
    order = mag.permute(2, 0, 1)
    as_gig = interlayer_deletion(model, "block2", dec2, "block3", dec3, images, [0, 1], importance=order, **kw)
    torch.testing.assert_close(res.baselines["magnitude"].scores, as_gig.gig.scores)
    with pytest.raises(ValueError, match="always there"):
        interlayer_deletion(model, "block2", dec2, "block3", dec3, images, 0, baselines=("random",), **kw)


def test_planted_interlayer_baselines_on_a_linear_transition():
    """Layer a -> b is linear before b's ReLU: GIG, the endpoint gradient and the ablation give one order."""
    torch.manual_seed(0)
    model = Planted().eval()
    x = torch.rand(6, 16, 8, 8) + 0.1
    dec_a = PFVDecomposer(ConceptBasis(torch.eye(16)), alpha=1e-3)
    basis_b = ConceptBasis(torch.eye(4))
    res = interlayer_insertion(model, "a", dec_a, "b", basis_b, x, 0, steps=16, n_random=4,
                               baselines=("endpoint", "ablation"))
    for name in ("endpoint", "ablation"):
        torch.testing.assert_close(res.baselines[name].scores, res.gig.scores)


def test_auc_trapezoid():
    assert auc(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(0.75)


def dec1(model, images):
    d = make_decomposer(model, "block1", images, k_factor=1)
    return PFVDecomposer(d.basis, alpha=d.alpha)


class Injected(RuntimeError):
    pass


def snapshot(model):
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()),
        torch.is_grad_enabled(),
    )


@pytest.mark.parametrize("metric", ["deletion", "insertion", "interlayer"])
@pytest.mark.parametrize("after_calls", [0, 1])
def test_failure_leaves_model_untouched(cnn, metric, after_calls):
    model, images, dec = cnn
    model.train()
    model.block1[0].weight.requires_grad_(False)
    before = snapshot(model)
    where = model.block3 if metric == "interlayer" else model.head
    calls = [0]
    original = where.forward

    def broken(*args):
        calls[0] += 1
        if calls[0] > after_calls:
            raise Injected("injected")
        return original(*args)

    where.forward = broken
    try:
        with pytest.raises(Injected):
            if metric == "deletion":
                concept_deletion(model, "block2", dec, images, 0, steps=3)
            elif metric == "insertion":
                concept_insertion(model, "block2", dec, images, 0, steps=3, importance=torch.randn(dec.n_concepts))
            else:
                interlayer_deletion(model, "block1", dec1(model, images), "block3",
                                    ConceptBasis(torch.eye(16)), images, 0, steps=3, n_random=1, n_steps=4)
    finally:
        where.forward = original
        after = snapshot(model)
        model.eval()
        model.block1[0].weight.requires_grad_(True)
    assert before == after


def test_bad_arguments(cnn):
    model, images, dec = cnn
    with pytest.raises(ValueError, match="output"):
        concept_deletion(model, "block2", dec, images, 0, output="loss")
    with pytest.raises(ValueError, match="importance"):
        concept_deletion(model, "block2", dec, images, 0, importance=torch.randn(3))
    with pytest.raises(ValueError, match="target"):
        concept_insertion(model, "block2", dec, images, 99)
    with pytest.raises(ValueError, match="steps"):
        concept_insertion(model, "block2", dec, images, 0, steps=0)
    with pytest.raises(TypeError, match="decomposer"):
        concept_deletion(model, "block2", dec.basis, images, 0)
    with pytest.raises(ValueError, match="target_concept"):
        interlayer_deletion(model, "block1", dec, "block2", dec, images, 10**6)


def test_per_input_aucs_average_to_the_curve_auc(cnn):
    model, images, dec2 = cnn
    with torch.no_grad():
        pred = model(images).argmax(1)
    curve = concept_deletion(model, "block2", dec2, images, pred, steps=5)
    assert curve.per_input.shape == (images.shape[0],)
    assert float(curve.per_input.mean()) == pytest.approx(curve.auc, abs=1e-6)  # the trapezoid rule is linear
    dec3 = make_decomposer(model, "block3", images, k_factor=1).basis
    res = interlayer_insertion(model, "block2", dec2, "block3", dec3, images, 0, steps=4, n_random=1, n_steps=8)
    valid = ~torch.isnan(res.gig.per_input)
    assert float(res.gig.per_input[valid].mean()) == pytest.approx(res.gig.auc, abs=1e-6)


def test_per_input_targets_equal_each_input_with_its_own_targets(cnn):
    model, images, dec2 = cnn
    dec3 = make_decomposer(model, "block3", images, k_factor=1).basis
    x = images[:3]
    own = torch.tensor([[0, 1], [2, 0], [1, 3]])  # each input's two targets
    kw = dict(steps=4, n_random=1, n_steps=6, baselines=("magnitude",))
    both = interlayer_insertion(model, "block2", dec2, "block3", dec3, x, own, **kw)
    for i in range(3):
        alone = interlayer_insertion(model, "block2", dec2, "block3", dec3, x[i : i + 1], own[i].tolist(), **kw)
        assert float(both.gig.per_input[i]) == pytest.approx(float(alone.gig.per_input[0]), abs=1e-5)
        assert float(both.baselines["magnitude"].per_input[i]) == pytest.approx(
            float(alone.baselines["magnitude"].per_input[0]), abs=1e-5)


def test_sparse_substitution_equals_the_dense_reconstruction():
    from captum_gig import _layout
    from captum_gig.metrics import _SparseCoefficients

    g = torch.Generator().manual_seed(0)
    n, h, w, k, c, s = 5, 3, 4, 40, 6, 7
    U = torch.randn(n, h * w, k, generator=g) * (torch.rand(n, h * w, k, generator=g) < 0.05)
    V, beta = torch.randn(k, c, generator=g), torch.randn(c, generator=g)
    keep = (torch.rand(s, 3, k, generator=g) < 0.5).float()
    sparse = _SparseCoefficients.of(U, V)
    assert sparse is not None
    got = sparse.substitute(1, 4, keep, beta, (h, w))  # inputs 1..3, every step
    dense = beta + (U[1:4].unsqueeze(0) * keep.unsqueeze(2)) @ V  # (s, 3, P, C)
    expected = _layout.from_pfvs(dense.reshape(s * 3, h * w, c), (h, w))
    assert got.shape == (s * 3, c, h, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert _SparseCoefficients.of(torch.randn(n, h * w, k, generator=g), V) is None  # dense: the dense product
