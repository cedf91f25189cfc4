import pickle

import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

from captum_gig import BisectingSphericalKMeans, ConceptBasis, PFVSet, batchnorm_offset


def planted(n_clusters=8, per_cluster=60, dim=32, noise=0.15, seed=0, offset=None):
    """Points along well-separated directions, with random positive magnitudes."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_clusters, dim, generator=g), dim=1)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    scale = torch.rand(len(labels), 1, generator=g) * 4 + 0.5
    X = scale * (directions[labels] + noise * torch.randn(len(labels), dim, generator=g) / dim**0.5)
    if offset is not None:
        X = X + offset
    return X, labels


def test_recovers_planted_clusters():
    X, truth = planted()
    km = BisectingSphericalKMeans(8, seed=0).fit(X)
    assert adjusted_rand_score(truth.numpy(), km.labels_.numpy()) >= 0.95
    assert km.counts_.sum() == len(X) and km.cluster_centers_.shape == (8, 32)
    assert torch.allclose(km.cluster_centers_.norm(dim=1), torch.ones(8))


def test_recovers_planted_clusters_after_offset():
    offset = torch.randn(32) * 3
    X, truth = planted(offset=offset)
    basis = ConceptBasis.fit(X, 8, offset=offset, progress=False)
    assert adjusted_rand_score(truth.numpy(), basis.labels.numpy()) >= 0.95
    # without removing the offset every point looks alike
    naive = ConceptBasis.fit(X, 8, progress=False)
    assert adjusted_rand_score(truth.numpy(), naive.labels.numpy()) < 0.9


def test_deterministic_for_a_seed():
    X, _ = planted(noise=1.0)
    a = ConceptBasis.fit(X, 16, seed=3, progress=False)
    b = ConceptBasis.fit(X, 16, seed=3, progress=False)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.labels, b.labels)


def test_always_splits_the_largest_cluster():
    X = torch.randn(500, 10).abs()  # no planted structure: unbalanced splits
    km = BisectingSphericalKMeans(40, seed=1).fit(X)
    sizes = {j: int(c) for j, c in enumerate(km.counts_)}
    # walk the history backwards: split i created cluster i + 1 out of cluster j
    for i in reversed(range(len(km.split_history_))):
        j, size = km.split_history_[i]
        sizes[j] += sizes.pop(i + 1)
        assert sizes[j] == size
        assert size == max(sizes.values()), f"split {i} took a cluster of {size}, not the largest"
    assert sizes == {0: 500}


def test_concept_vector_is_mean_of_centred_members():
    X, _ = planted(noise=0.5)
    offset = torch.randn(32)
    basis = ConceptBasis.fit(X, 8, offset=offset, progress=False)
    for k in range(8):
        members = X[basis.labels == k] - offset
        assert torch.allclose(basis.vectors[k], members.mean(0), atol=1e-5)
    assert torch.equal(basis.sizes, torch.bincount(basis.labels, minlength=8))


def test_batchnorm_offset_matches_hand_computation_and_fit_subtracts_it():
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.copy_(torch.randn(6))
    bn.running_var.copy_(torch.rand(6) + 0.1)
    bn.weight.data.copy_(torch.randn(6))
    bn.bias.data.copy_(torch.randn(6))
    hand = torch.tensor(
        [
            bn.bias[c].item() - bn.weight[c].item() * bn.running_mean[c].item() / (bn.running_var[c].item() + bn.eps) ** 0.5
            for c in range(6)
        ]
    )
    assert torch.allclose(batchnorm_offset(bn), hand, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(batchnorm_offset(bn), bn(torch.zeros(1, 6, 1, 1)).flatten(), atol=1e-6)
    X = torch.randn(200, 6)
    with_bn = ConceptBasis.fit(X, 5, offset=bn, progress=False)
    by_hand = ConceptBasis.fit(X - hand, 5, progress=False)
    assert torch.allclose(with_bn.offset, hand, atol=1e-6)
    assert torch.equal(with_bn.labels, by_hand.labels)
    assert torch.allclose(with_bn.vectors, by_hand.vectors, atol=1e-5)


def test_mean_offset_and_pfvset_input():
    X, _ = planted()
    pfvs = PFVSet(X, torch.arange(len(X)), torch.zeros(len(X), dtype=torch.long), "blk", (1,))
    basis = ConceptBasis.fit(pfvs, 4, offset="mean", progress=False)
    assert torch.allclose(basis.offset, X.mean(0)) and basis.layer == "blk"


@pytest.mark.parametrize(
    "X, k, match",
    [
        (torch.randn(10, 4), 11, "exceeds the number of PFVs"),
        (torch.randn(10, 4, 2), 2, r"\(N, C\)"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1, "NaN"),
        (torch.randn(10, 4), 0, "positive int"),
    ],
)
def test_bad_input_is_rejected(X, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ConceptBasis.fit(X, k, progress=False)


def test_bad_offset_is_rejected():
    with pytest.raises(ValueError, match=r"offset must have shape \(4,\)"):
        ConceptBasis.fit(torch.randn(10, 4), 2, offset=torch.zeros(3), progress=False)
    with pytest.raises(TypeError, match="BatchNorm"):
        ConceptBasis.fit(torch.randn(10, 4), 2, offset=nn.Linear(4, 4), progress=False)


def test_wraps_external_vectors_and_round_trips(tmp_path, monkeypatch):
    X, _ = planted()
    basis = ConceptBasis.fit(X, 6, offset="mean", progress=False, max_iter=20)
    path = str(tmp_path / "basis.safetensors")
    basis.save(path)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    loaded = ConceptBasis.load(path)
    assert torch.equal(loaded.vectors, basis.vectors) and torch.equal(loaded.offset, basis.offset)
    assert torch.equal(loaded.labels, basis.labels) and torch.equal(loaded.sizes, basis.sizes)
    assert loaded.method == "bisecting" and loaded.meta["max_iter"] == 20
    external = ConceptBasis(torch.randn(3, 4))
    assert torch.equal(external.offset, torch.zeros(4)) and external.n_concepts == 3
    with pytest.raises(ValueError, match="offset must be a \\(4,\\) tensor"):
        ConceptBasis(torch.randn(3, 4), torch.zeros(5))


def test_cohesion_close_to_sklearn_bisecting():
    from sklearn.cluster import BisectingKMeans

    X, _ = planted(n_clusters=12, noise=2.0, seed=4)
    Y = torch.nn.functional.normalize(X, dim=1)
    ours = BisectingSphericalKMeans(12).fit(X)
    ours_cos = (Y * ours.cluster_centers_[ours.labels_]).sum(1).mean()
    sk = BisectingKMeans(12, bisecting_strategy="largest_cluster", random_state=0).fit(Y.numpy())
    sk_centers = torch.nn.functional.normalize(torch.from_numpy(sk.cluster_centers_).float(), dim=1)
    sk_cos = (Y * sk_centers[torch.from_numpy(sk.labels_).long()]).sum(1).mean()
    assert ours_cos >= sk_cos - 0.01


def test_small_clusters_split_alike_in_a_batch_or_alone():
    # the fit splits the clusters the heap asks for next together: each split must depend on its own rows only
    g = torch.Generator().manual_seed(0)
    Y = torch.nn.functional.normalize(torch.randn(900, 24, generator=g), dim=1)
    sizes = [2, 3, 5, 8, 9, 16, 17, 31, 33, 64, 40, 7, 64, 2]
    cuts = torch.randperm(900, generator=g)[: sum(sizes)].split(sizes)
    km = BisectingSphericalKMeans(2, seed=0)
    together = km._split_small(Y, list(cuts))
    for idx, mask in zip(cuts, together):
        assert mask.shape == idx.shape and 0 < int(mask.sum()) < len(idx)
        assert torch.equal(mask, km._split_small(Y, [idx])[0])


def test_small_cluster_path_recovers_planted_clusters(monkeypatch):
    from captum_gig import concepts

    X, truth = planted(n_clusters=4, per_cluster=12, noise=0.3)  # 48 rows: every split on the batched path
    assert len(X) <= concepts.SMALL_SPLIT_ROWS
    batched = BisectingSphericalKMeans(4, seed=0).fit(X)
    assert adjusted_rand_score(truth.numpy(), batched.labels_.numpy()) >= 0.95
    monkeypatch.setattr(concepts, "SMALL_SPLIT_ROWS", 0)  # every split one by one in the channel space
    one_by_one = BisectingSphericalKMeans(4, seed=0).fit(X)
    assert adjusted_rand_score(batched.labels_.numpy(), one_by_one.labels_.numpy()) >= 0.95


def test_small_clusters_split_into_their_planted_halves():
    # each cluster holds two groups along their own directions: in a batch of clusters of mixed sizes
    # (padded to a common width), every split must separate exactly its two groups
    g = torch.Generator().manual_seed(2)
    rows, halves = [], []
    for a, b in [(3, 5), (10, 6), (20, 30), (1, 9), (33, 31), (7, 7)]:
        d = torch.nn.functional.normalize(torch.randn(2, 24, generator=g), dim=1)
        half = torch.arange(a + b) >= a
        pts = d[half.long()] + 0.05 * torch.randn(a + b, 24, generator=g)
        rows.append(torch.nn.functional.normalize(pts, dim=1))
        halves.append(half)
    Y = torch.cat(rows)
    sizes = [len(h) for h in halves]
    clusters = list(torch.arange(len(Y)).split(sizes))
    for mask, half in zip(BisectingSphericalKMeans(2)._split_small(Y, clusters), halves):
        assert torch.equal(mask, half) or torch.equal(mask, ~half)
