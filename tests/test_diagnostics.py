"""Concept-quality diagnostics against brute-force counts on planted data."""

import pytest
import torch

from captum_gig import ConceptBasis, PFVSet
from captum_gig.diagnostics import class_sharedness, concept_diagnostics, image_diversity


def planted(n_per=40, top_m=5, seed=0):
    """Three planted directions: concept 0 drawn from 20 images, concept 1 from 2, concept 2 from one image."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(6)[:3] * 5
    vectors, images, labels = [], [], []
    for c, pool in enumerate((20, 2, 1)):
        vectors.append(centres[c] + 0.3 * torch.randn(n_per, 6, generator=g))
        images.append(100 * c + torch.randint(0, pool, (n_per,), generator=g))
        labels.append(torch.full((n_per,), c))
    X, img, lab = torch.cat(vectors), torch.cat(images), torch.cat(labels)
    pfvs = PFVSet(vectors=X, image_index=img, position=torch.zeros_like(img), layer="l", spatial_shape=(1,))
    basis = ConceptBasis.fit(pfvs, 3, seed=seed, progress=False)
    return pfvs, basis


def brute_force_distinct(basis, pfvs, top_m, groups=None):
    out = []
    for q in range(basis.n_concepts):
        members = (basis.labels == q).nonzero().flatten()
        v = basis.vectors[q] / basis.vectors[q].norm()
        x = pfvs.vectors[members] - basis.offset
        sim = (x / x.norm(dim=1, keepdim=True)) @ v
        top = members[sim.argsort(descending=True)[:top_m]]
        imgs = pfvs.image_index[top]
        if groups is not None:
            imgs = groups[imgs]
        out.append(len(set(imgs.tolist())))
    return torch.tensor(out)


@pytest.mark.parametrize("top_m", [1, 5, 16, 100])
def test_distinct_images_match_a_brute_force_count(top_m):
    pfvs, basis = planted()
    members, distinct = image_diversity(basis, pfvs, top_m)
    assert torch.equal(distinct, brute_force_distinct(basis, pfvs, top_m))
    assert torch.equal(members, torch.bincount(basis.labels, minlength=3))
    # the planted structure: one concept from many images, one from a single image
    assert sorted(distinct.tolist())[0] == 1 and max(distinct.tolist()) >= min(top_m, 10)


def test_groups_count_copies_of_one_photo_once():
    pfvs, basis = planted()
    groups = torch.arange(400) // 100  # every planted concept's images are copies of one "photo"
    _, distinct = image_diversity(basis, pfvs, 16, groups=groups)
    assert (distinct == 1).all()
    assert torch.equal(distinct, brute_force_distinct(basis, pfvs, 16, groups))


def test_sharedness_counts_classes_above_the_share():
    gig = torch.tensor([[5.0, 4.0, 1.0, -3.0, 0.0],    # shares 0.5, 0.4, 0.1, 0, 0
                        [0.0, 1.0, 0.0, 9.0, 0.04],    # 0, ~0.1, 0, ~0.9, ~0.004
                        [-1.0, -1.0, -1.0, -1.0, -1.0]])  # nothing positive: no class share
    assert class_sharedness(gig, 0.05).tolist() == [1, 2, 1, 1, 0]
    assert class_sharedness(gig, 0.2).tolist() == [1, 1, 0, 1, 0]


def test_diagnostics_warn_when_most_concepts_are_single_images():
    g = torch.Generator().manual_seed(1)
    X = torch.cat([torch.eye(8)[c] * 4 + 0.2 * torch.randn(10, 8, generator=g) for c in range(8)])
    img = torch.arange(8).repeat_interleave(10)  # every cluster is one image's PFVs
    pfvs = PFVSet(vectors=X, image_index=img, position=torch.zeros_like(img), layer="block9", spatial_shape=(1,))
    basis = ConceptBasis.fit(pfvs, 8, seed=0, progress=False)
    with pytest.warns(UserWarning, match="layer block9: .* single image"):
        diag = concept_diagnostics(basis, pfvs, class_gig=torch.rand(3, 8))
    summary = diag.summary()
    assert summary["share_single_image"] == 1.0 and summary["median_distinct_images"] == 1.0
    assert summary["important_concepts"] >= 1 and 0 <= summary["share_shared_of_important"] <= 1
    pfvs_many, basis_many = planted()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two of three concepts span several images: no warning
        concept_diagnostics(basis_many, pfvs_many)
    with pytest.raises(ValueError, match="n_classes"):
        concept_diagnostics(basis_many, pfvs_many, class_gig=torch.rand(3, 4))
