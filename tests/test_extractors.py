"""The alternative extractors ("kmeans", "dictionary", "sae"): planted structure, save/load, decomposition."""

import numpy as np
import pytest
import torch

import captum_gig  # noqa: F401  (registers the extractors)
from captum_gig import ConceptBasis, PFVDecomposer, alpha_max
from captum_gig.extractors import fit_sae


def planted_clusters(n_per=80, c=10, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(k, c, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(n_per)
    norms = torch.rand(k * n_per, 1, generator=g) * 3 + 0.5  # spherical: the norm must not matter
    X = norms * (directions[labels] + 0.08 * torch.randn(k * n_per, c, generator=g))
    return X, labels, directions


def planted_sparse(n=1500, c=10, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(m, c, generator=g), dim=1)
    active = torch.rand(n, m, generator=g) < 0.2
    coef = (torch.rand(n, m, generator=g) + 0.5) * active
    return coef @ D + 0.01 * torch.randn(n, c, generator=g), D


def test_kmeans_recovers_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    X, labels, directions = planted_clusters()
    beta = torch.randn(X.shape[1]) * 0.1
    basis = ConceptBasis.fit(X + beta, 5, method="kmeans", offset=beta, seed=0, progress=False)
    assert adjusted_rand_score(labels.numpy(), basis.labels.numpy()) > 0.98
    cos = basis.normalized_vectors @ directions.t()
    assert cos.max(0).values.min() > 0.99  # every planted direction is a concept
    assert basis.sizes.sum() == X.shape[0] and (basis.sizes > 0).all()


def test_kmeans_is_seeded():
    X, _, _ = planted_clusters(k=8, n_per=30)
    a = ConceptBasis.fit(X, 12, method="kmeans", seed=3, progress=False)
    b = ConceptBasis.fit(X, 12, method="kmeans", seed=3, progress=False)
    torch.testing.assert_close(a.vectors, b.vectors)


def test_dictionary_matches_sklearn():
    from sklearn.decomposition import MiniBatchDictionaryLearning

    X, _ = planted_sparse(n=400)
    basis = ConceptBasis.fit(X, 8, method="dictionary", seed=0, progress=False, alpha=0.1, alpha_scale="absolute",
                             max_iter=5)
    ref = MiniBatchDictionaryLearning(n_components=8, alpha=0.1, max_iter=5, batch_size=256, random_state=0,
                                      transform_algorithm="lasso_lars").fit(X.double().numpy())
    np.testing.assert_allclose(basis.vectors.double().numpy(), ref.components_, rtol=1e-5, atol=1e-6)


def test_sae_recovers_planted_directions_and_is_reproducible():
    X, D = planted_sparse(n=1000)
    kw = dict(n_steps=300, batch_size=128, l1_coefficient=0.5, lr=1e-2)
    a = fit_sae(X, 12, seed=0, **kw)["vectors"]
    b = fit_sae(X, 12, seed=0, **kw)["vectors"]
    assert torch.equal(a, b)  # seeded: bit-identical on CPU
    c0 = fit_sae(X, 12, seed=0, n_steps=2)["vectors"]
    c1 = fit_sae(X, 12, seed=1, n_steps=2)["vectors"]
    assert not torch.allclose(c0, c1)
    cos = torch.nn.functional.normalize(a, dim=1) @ D.t()
    assert cos.max(0).values.min() > 0.95, cos.max(0).values  # every planted direction is a decoder column


def test_sae_leaves_global_rng_alone():
    X, _ = planted_sparse(n=200)
    state = torch.get_rng_state()
    fit_sae(X, 8, seed=0, n_steps=10)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("method,kwargs", [
    ("kmeans", {}),
    ("dictionary", {"max_iter": 3}),
    ("sae", {"n_steps": 200}),
])
def test_round_trip_and_decompose(tmp_path, method, kwargs):
    X, _ = planted_sparse(n=500)
    beta = torch.linspace(-0.2, 0.2, X.shape[1])
    basis = ConceptBasis.fit(X + beta, 12, method=method, offset=beta, seed=0, progress=False, **kwargs)
    assert basis.method == method and basis.vectors.shape == (12, X.shape[1])
    torch.testing.assert_close(basis.offset, beta)
    path = str(tmp_path / f"{method}.safetensors")
    basis.save(path)
    loaded = ConceptBasis.load(path)
    assert torch.equal(loaded.vectors, basis.vectors) and torch.equal(loaded.offset, basis.offset)
    assert loaded.method == method
    alpha = 0.01 * float(alpha_max(loaded, X + beta).median())
    score = PFVDecomposer(loaded, alpha=alpha).score(X + beta)
    assert score.rel_l2 < 0.5 and 0 <= score.l0_ratio < 1
    # the same decomposer class is used for every method: its reconstruction is offset + U V
    dec = PFVDecomposer(loaded, alpha=alpha)
    U = dec.transform(X + beta)
    torch.testing.assert_close(dec.inverse_transform(U), U @ loaded.vectors + beta)
