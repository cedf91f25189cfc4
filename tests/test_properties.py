"""Property-based tests (hypothesis) of the axioms the library promises.

Random small CNNs and token models, random concept bases and inputs; every
property is checked against its definition, not against stored numbers.
"""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_gig import BisectingSphericalKMeans, ConceptBasis, GeneralizedIntegratedGradients, PFVDecomposer, alpha_max
from captum_gig.decompose import lasso_objective

SETTINGS = dict(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class RandomCNN(nn.Module):
    """conv -> act -> [a] -> conv -> act -> [b] -> pooled linear head; smooth or ReLU activations."""

    def __init__(self, c_in, c_a, c_b, classes, act, seed):
        super().__init__()
        torch.manual_seed(seed)
        Act = {"tanh": nn.Tanh, "softplus": nn.Softplus, "relu": nn.ReLU}[act]
        self.pre = nn.Sequential(nn.Conv2d(c_in, c_a, 3, padding=1), Act())
        self.a = nn.Identity()
        self.mid = nn.Sequential(nn.Conv2d(c_a, c_b, 3, padding=1), Act())
        self.b = nn.Identity()
        self.head = nn.Linear(c_b, classes)

    def forward(self, x):
        return self.head(self.b(self.mid(self.a(self.pre(x)))).mean((2, 3)))


class RandomTokenModel(nn.Module):
    """(N, T, C) tokens: per-token MLPs with a token-mixing step, then a pooled head."""

    def __init__(self, c_in, c_a, c_b, classes, act, seed):
        super().__init__()
        torch.manual_seed(seed)
        Act = {"tanh": nn.Tanh, "softplus": nn.Softplus, "relu": nn.GELU}[act]
        self.pre = nn.Sequential(nn.Linear(c_in, c_a), Act())
        self.a = nn.Identity()
        self.mix = nn.Linear(6, 6)  # mixes tokens
        self.mid = nn.Sequential(nn.Linear(c_a, c_b), Act())
        self.b = nn.Identity()
        self.head = nn.Linear(c_b, classes)

    def forward(self, x):
        z = self.a(self.pre(x))
        z = z + self.mix(z.transpose(1, 2)).transpose(1, 2)
        return self.head(self.b(self.mid(z)).mean(1))


def random_setup(kind, c_a, c_b, act, seed, k_factor=2):
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        model = RandomCNN(2, c_a, c_b, 3, act, seed).double().eval()
        x = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)
    else:
        model = RandomTokenModel(3, c_a, c_b, 3, act, seed).double().eval()
        x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    bases = {}
    for layer, c in (("a", c_a), ("b", c_b)):
        vectors = torch.randn(k_factor * c, c, generator=g, dtype=torch.float64)
        offset = 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
        bases[layer] = ConceptBasis(vectors, offset)
    return model, x, bases


def decomposer(basis, alpha=0.05):
    return PFVDecomposer(basis, alpha=alpha, tol=1e-8, max_iter=5000)


shapes = st.tuples(st.sampled_from(["cnn", "tokens"]), st.integers(2, 5), st.integers(2, 5), st.integers(0, 10_000))


@settings(**SETTINGS)
@given(shapes, st.sampled_from(["tanh", "softplus"]), st.booleans(), st.booleans())
def test_completeness_delta_small_and_shrinking(shape, act, residual, to_class):
    kind, c_a, c_b, seed = shape
    model, x, bases = random_setup(kind, c_a, c_b, act, seed)
    if to_class:
        gig = GeneralizedIntegratedGradients(model, "a", decomposer(bases["a"]))
    else:
        gig = GeneralizedIntegratedGradients(model, "a", decomposer(bases["a"]), "b", decomposer(bases["b"]))
    target = 1
    coarse = gig.attribute(x, target, n_steps=1, residual=residual, return_convergence_delta=True)[1]
    attr, fine = gig.attribute(x, target, n_steps=64, residual=residual, return_convergence_delta=True)
    change = attr.sum(1) - fine
    assume((change.abs() > 1e-6).all())
    assert (fine.abs() <= 1e-3 * change.abs() + 1e-9).all()
    # Captum weights path points in float32: deltas below ~1e-6 relative are round-off
    assert fine.abs().max() <= coarse.abs().max() + 1e-6 * change.abs().max()


@settings(**SETTINGS)
@given(shapes, st.sampled_from(["tanh", "relu"]))
def test_linearity_in_the_target(shape, act):
    kind, c_a, c_b, seed = shape
    model, x, bases = random_setup(kind, c_a, c_b, act, seed)
    g = torch.Generator().manual_seed(seed + 1)
    v1, v2 = torch.randn(2, c_b, generator=g, dtype=torch.float64)
    # concept 2 points along v1/|v1| + v2/|v2|: its GIG times its norm is the sum of the other two
    u1, u2 = v1 / v1.norm(), v2 / v2.norm()
    basis_b = ConceptBasis(torch.stack([v1, v2, u1 + u2]))
    gig = GeneralizedIntegratedGradients(model, "a", decomposer(bases["a"]), "b", PFVDecomposer(basis_b))
    m = gig.attribute_matrix(x, n_steps=16)
    assert torch.allclose(m[..., 2] * (u1 + u2).norm(), m[..., 0] + m[..., 1], atol=1e-10, rtol=1e-8)


@settings(**SETTINGS)
@given(shapes, st.sampled_from(["tanh", "relu"]), st.booleans())
def test_dummy_concept_gets_exactly_zero(shape, act, per_position):
    kind, c_a, c_b, seed = shape
    model, x, bases = random_setup(kind, c_a, c_b, act, seed)
    basis = bases["a"]
    vectors = torch.cat([basis.vectors[:2], torch.zeros(1, c_a, dtype=torch.float64), basis.vectors[2:]])
    gig = GeneralizedIntegratedGradients(model, "a", decomposer(ConceptBasis(vectors, basis.offset)))
    attr = gig.attribute(x, 0, n_steps=8, per_position=per_position)
    assert (attr[:, 2] == 0).all()


@settings(**SETTINGS)
@given(shapes, st.sampled_from(["tanh", "relu"]))
def test_symmetry_of_identical_concepts(shape, act):
    kind, c_a, c_b, seed = shape
    model, x, bases = random_setup(kind, c_a, c_b, act, seed)
    basis = bases["a"]
    vectors = torch.cat([basis.vectors, basis.vectors[:1]])  # concept K duplicates concept 0
    dec = decomposer(ConceptBasis(vectors, basis.offset))
    gig = GeneralizedIntegratedGradients(model, "a", dec)
    attr = gig.attribute(x, 0, n_steps=8, per_position=True)
    with torch.no_grad():
        U = dec.transform(model.a(model.pre(x)))
    U = U.movedim(-1, 1) if kind == "tokens" else U  # (N, K, *positions) like attr
    # the Lasso may split weight between duplicates in any proportion; per unit coefficient the two
    # concepts get the same attribution <v, G-bar_p>, so equal coefficients get equal attributions
    u0, uk, a0, ak = U[:, 0], U[:, -1], attr[:, 0], attr[:, -1]
    assert torch.allclose(a0 * uk, ak * u0, rtol=1e-9, atol=1e-12 * (a0.abs().max() * u0.abs().max() + 1))
    same = u0 == uk
    assert torch.allclose(a0[same], ak[same], rtol=1e-12, atol=1e-15)  # equal up to float64 round-off


problems = st.tuples(st.integers(3, 12), st.integers(1, 8), st.integers(2, 40), st.booleans(), st.integers(0, 10_000))


@settings(**SETTINGS)
@given(problems, st.floats(0.02, 0.5), st.booleans(), st.sampled_from(["working_set", "fista"]))
def test_decomposer_kkt_and_objective_vs_sklearn(problem, alpha_fraction, positive, solver):
    from sklearn.decomposition import sparse_encode

    c, k_factor, n, relu_like, seed = problem
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(k_factor * c, c, generator=g, dtype=torch.float64)
    if relu_like:
        V = V.clamp_min(0) + 0.02
    X = torch.randn(n, c, generator=g, dtype=torch.float64)
    if relu_like:
        X = X.clamp_min(0)
    basis = ConceptBasis(V)
    alpha = float(alpha_fraction * alpha_max(basis, X).max()) + 1e-6
    U = PFVDecomposer(basis, alpha=alpha, tol=1e-10, max_iter=20000, positive=positive, solver=solver).transform(X)
    corr = (X - U @ V) @ V.t()
    slack = 1e-3 * alpha
    if positive:
        assert (U >= 0).all() and (corr <= alpha + slack).all()
        on = U > 0
        assert ((corr[on] - alpha).abs() <= slack).all()
    else:
        assert (corr.abs() <= alpha + slack).all()
        on = U != 0
        assert ((corr[on] - alpha * U[on].sign()).abs() <= slack).all()
    U_sk = torch.from_numpy(sparse_encode(X.numpy(), V.numpy(), algorithm="lasso_cd", alpha=alpha, positive=positive, max_iter=5000))
    ours, theirs = lasso_objective(X, U, V, alpha).sum(), lasso_objective(X, U_sk, V, alpha).sum()
    assert ours <= theirs * 1.001 + 1e-12


@settings(**SETTINGS)
@given(st.integers(20, 120), st.integers(2, 6), st.integers(1, 15), st.integers(0, 10_000))
def test_clustering_invariants(n, dim, k, seed):
    assume(k <= n)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dim, generator=g, dtype=torch.float64)
    km = BisectingSphericalKMeans(k, seed=seed).fit(X)
    assert km.labels_.shape == (n,) and ((km.labels_ >= 0) & (km.labels_ < k)).all()
    assert (km.counts_ > 0).all() and len(km.counts_) == k and int(km.counts_.sum()) == n
    perm = torch.randperm(n, generator=g)
    permuted = BisectingSphericalKMeans(k, seed=seed).fit(X[perm])
    # the same partition, possibly relabelled: co-membership is identical
    same = km.labels_[perm].unsqueeze(0) == km.labels_[perm].unsqueeze(1)
    same_p = permuted.labels_.unsqueeze(0) == permuted.labels_.unsqueeze(1)
    assert torch.equal(same, same_p)
