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


def _moving_mask(idx, parts):
    """The mask over ``idx`` of the rows that ``_split_batch`` moved, checking the parts cover it once."""
    stay, move = parts
    assert torch.equal(torch.sort(torch.cat([stay, move])).values, torch.sort(idx).values)
    return torch.isin(idx, move)


# cluster sizes that reach both batched paths for 24 channels: row space (<= 64 rows), channel space (65-2048)
MIXED_SIZES = [2, 3, 5, 8, 9, 16, 17, 31, 33, 64, 40, 7, 64, 2, 65, 90, 130, 300, 2]


def test_batched_splits_alike_in_a_batch_or_alone():
    # the fit splits the clusters the heap asks for next together: each split must depend on its own rows only
    g = torch.Generator().manual_seed(0)
    Y = torch.nn.functional.normalize(torch.randn(1200, 24, generator=g), dim=1)
    cuts = torch.randperm(1200, generator=g)[: sum(MIXED_SIZES)].split(MIXED_SIZES)
    km = BisectingSphericalKMeans(2, seed=0)
    together = km._split_batch(Y, list(cuts))
    for idx, parts in zip(cuts, together):
        mask = _moving_mask(idx, parts)
        assert 0 < int(mask.sum()) < len(idx)
        assert torch.equal(mask, _moving_mask(idx, km._split_batch(Y, [idx])[0]))


def test_cluster_split_off_splits_alike_from_the_kept_gram_matrix():
    # the second split of a cluster reads a block of the Gram matrix kept from the first: same result as fresh
    from captum_gig.concepts import _GramStore

    g = torch.Generator().manual_seed(5)
    Y = torch.nn.functional.normalize(torch.randn(300, 24, generator=g), dim=1)
    idx = torch.randperm(300, generator=g)[:60].sort().values
    km = BisectingSphericalKMeans(2, seed=0)
    grams = _GramStore(300, Y.device)
    stay, move = km._split_batch(Y, [idx], grams)[0]
    for child in (stay, move):
        if len(child) >= 2:
            kept = km._split_batch(Y, [child], grams)[0]
            fresh = km._split_batch(Y, [child])[0]
            assert torch.equal(_moving_mask(child, kept), _moving_mask(child, fresh))


@pytest.mark.parametrize("path", ["batched", "one_by_one"])
def test_every_split_is_a_two_means_fixed_point_with_tol_zero(monkeypatch, path):
    # with tol=0 the 2-means runs until no row changes side: every row is nearer (cosine) its own centroid
    from captum_gig import concepts

    if path == "one_by_one":
        monkeypatch.setattr(concepts, "BATCH_SPLIT_ROWS", 0)
        monkeypatch.setattr(concepts, "SMALL_SPLIT_ROWS", 0)
    for n in (40, 500):  # row-space path, channel-space path (or one by one)
        X, _ = planted(n_clusters=3, per_cluster=n // 3, noise=3.0, seed=n)
        km = BisectingSphericalKMeans(2, tol=0.0, max_iter=500).fit(X)
        Y = torch.nn.functional.normalize(X, dim=1)
        cos = Y @ km.cluster_centers_.t()
        own = cos.gather(1, km.labels_.unsqueeze(1)).squeeze(1)
        assert (own >= cos.max(1).values - 1e-6).all()


def test_looser_tol_trades_little_cohesion():
    X, _ = planted(n_clusters=40, per_cluster=30, dim=32, noise=4.0, seed=6)
    Y = torch.nn.functional.normalize(X, dim=1)

    def cohesion(km):
        return float((Y * km.cluster_centers_[km.labels_]).sum(1).mean())

    strict = cohesion(BisectingSphericalKMeans(40, tol=0.0).fit(X))
    default = cohesion(BisectingSphericalKMeans(40).fit(X))  # tol=3e-5
    assert default >= strict - 0.01
    with pytest.raises(ValueError, match="tol"):
        BisectingSphericalKMeans(4, tol=-1.0).fit(X)


def test_batched_path_recovers_planted_clusters(monkeypatch):
    from captum_gig import concepts

    for per_cluster in (12, 150):  # 48 rows: row space; 600 rows: channel space
        X, truth = planted(n_clusters=4, per_cluster=per_cluster, noise=0.3)
        assert len(X) <= concepts.BATCH_SPLIT_ROWS
        batched = BisectingSphericalKMeans(4, seed=0).fit(X)
        assert adjusted_rand_score(truth.numpy(), batched.labels_.numpy()) >= 0.95
        with monkeypatch.context() as m:  # every split one by one in the channel space
            m.setattr(concepts, "BATCH_SPLIT_ROWS", 0)
            m.setattr(concepts, "SMALL_SPLIT_ROWS", 0)
            one_by_one = BisectingSphericalKMeans(4, seed=0).fit(X)
        assert adjusted_rand_score(batched.labels_.numpy(), one_by_one.labels_.numpy()) >= 0.95


def test_batched_clusters_split_into_their_planted_halves():
    # each cluster holds two groups along their own directions: in a batch of clusters of mixed sizes
    # (padded to a common width), every split must separate exactly its two groups
    g = torch.Generator().manual_seed(2)
    rows, halves = [], []
    for a, b in [(3, 5), (10, 6), (20, 30), (1, 9), (33, 31), (7, 7), (40, 60), (150, 90), (33, 34)]:
        d = torch.nn.functional.normalize(torch.randn(2, 24, generator=g), dim=1)
        half = torch.arange(a + b) >= a
        pts = d[half.long()] + 0.05 * torch.randn(a + b, 24, generator=g)
        rows.append(torch.nn.functional.normalize(pts, dim=1))
        halves.append(half)
    Y = torch.cat(rows)
    clusters = list(torch.arange(len(Y)).split([len(h) for h in halves]))
    for idx, parts, half in zip(clusters, BisectingSphericalKMeans(2)._split_batch(Y, clusters), halves):
        mask = _moving_mask(idx, parts)
        assert torch.equal(mask, half) or torch.equal(mask, ~half)


def test_large_cluster_split_from_a_sample(monkeypatch):
    # clusters above _SAMPLE_ABOVE rows start their 2-means from a sample's split; it must find the same halves
    from captum_gig import concepts
    from captum_gig.concepts import _sample

    X, truth = planted(n_clusters=2, per_cluster=400, noise=0.3, seed=3)
    Y = torch.nn.functional.normalize(X, dim=1)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    chosen = _sample(Y, 0.25, direction)
    assert 0.15 < float(chosen.double().mean()) < 0.35  # about the fraction asked for
    perm = torch.randperm(len(Y), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_sample(Y[perm], 0.25, direction), chosen[perm])  # by value, not by position
    monkeypatch.setattr(concepts, "BATCH_SPLIT_ROWS", 0)
    monkeypatch.setattr(concepts, "SMALL_SPLIT_ROWS", 0)
    whole = BisectingSphericalKMeans(2, seed=0).fit(X).labels_
    monkeypatch.setattr(concepts, "_SAMPLE_ABOVE", 100)
    monkeypatch.setattr(concepts, "_SAMPLE_ROWS", 200)
    sampled = BisectingSphericalKMeans(2, seed=0).fit(X).labels_
    assert adjusted_rand_score(truth.numpy(), sampled.numpy()) >= 0.99
    assert adjusted_rand_score(whole.numpy(), sampled.numpy()) >= 0.99


def test_lanczos_and_power_directions_find_the_top_eigenvector():
    from captum_gig.concepts import _lanczos_directions, _power_directions

    g = torch.Generator().manual_seed(4)
    d = 30
    ops = []
    for gap in (1.5, 3.0, 10.0):  # top eigenvalue `gap` times the next
        Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        spectrum = torch.linspace(1.0, 0.05, d, dtype=torch.float64)
        spectrum[0] = gap
        ops.append((Q * spectrum) @ Q.t())
    A = torch.stack(ops)
    start = torch.randn(3, d, generator=g, dtype=torch.float64)
    apply = lambda x: (A @ x.unsqueeze(2)).squeeze(2)  # noqa: E731
    truth = torch.linalg.eigh(A).eigenvectors[:, :, -1]
    for find in (_lanczos_directions, _power_directions):
        v = find(apply, start, 60)
        assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64))
        assert ((v * truth).sum(1).abs() > 0.99).all(), find.__name__
        for i in range(3):  # each operator's result is its own, whatever else is in the batch
            alone = find(lambda x, i=i: (A[i : i + 1] @ x.unsqueeze(2)).squeeze(2), start[i : i + 1], 60)
            assert torch.allclose(alone[0], v[i], atol=1e-10)


def test_a_cluster_of_one_direction_is_never_split_into_copies():
    # 60% of the rows are one direction (like every image's blank background), the rest 12 planted clusters:
    # splitting the largest cluster would copy the background concept again and again
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1)
    planted = centres[torch.randint(0, 12, (800,), generator=g)] + 0.15 * torch.randn(800, 16, generator=g)
    background = torch.randn(1, 16, generator=g).expand(1200, 16) * (1 + 1e-3 * torch.rand(1200, 1, generator=g))
    X = torch.cat([background, planted])
    km = BisectingSphericalKMeans(24, seed=0).fit(X)
    C = km.cluster_centers_.double()
    cos = C @ C.t() - 2 * torch.eye(24, dtype=torch.float64)
    assert float(cos.max()) < 0.99  # no two concepts are one direction
    assert torch.unique(km.labels_[:1200]).numel() == 1  # the background is one concept, all of it
    assert int(km.counts_.max()) == 1200
    with pytest.raises(ValueError, match="distinct directions"):
        BisectingSphericalKMeans(3, seed=0).fit(background[:50].clone())
