"""ConceptAtlas: nearest PFVs agree with sklearn's cosine ranking, crops are their iERFs, exact save/load;
concept localisation is the upsampled coefficient map."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient
from torch import nn

from captum_gig import ConceptBasis, PFVDecomposer, collect_pfvs
from captum_gig.atlas import ConceptAtlas, concept_localisation, draw_localisation
from captum_gig.ierf import ierf
from conftest import require


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    ).eval()
    images = torch.rand(6, 3, 16, 16)
    pfvs = collect_pfvs(model, "2", images, sampling="uniform", per_image=5, progress=False)
    basis = ConceptBasis.fit(pfvs, 5, offset="mean", progress=False)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    names = ["ant", "bee", "cat", "dog"]
    atlas = ConceptAtlas.build(model, "2", basis, pfvs, images, top_k=4, labels=labels, class_names=names,
                               method=InputXGradient, crop_size=12, progress=False)
    return model, images, pfvs, basis, atlas


def test_nearest_pfvs_match_sklearn_cosine_ranking(setup):
    sklearn_pairwise = require("sklearn.metrics.pairwise")
    _, _, pfvs, basis, atlas = setup
    X = (pfvs.vectors - basis.offset).numpy()
    sim = sklearn_pairwise.cosine_similarity(basis.vectors.numpy(), X)
    assert atlas.concepts == list(range(5))
    for k in atlas.concepts:
        ref = np.argsort(-sim[k], kind="stable")[:4]
        got = [e["pfv"] for e in atlas.entries[k]]
        assert np.allclose(sim[k][got], sim[k][ref], atol=1e-6)  # same similarities (ties may swap)
        assert [e["cosine"] for e in atlas.entries[k]] == pytest.approx(sim[k][got].tolist(), abs=1e-5)


def test_distinct_images_and_an_image_loader(setup):
    model, images, pfvs, basis, atlas = setup
    loaded = []

    def load(indices):
        loaded.extend(indices)
        return images[torch.as_tensor(indices)]

    distinct = ConceptAtlas.build(model, "2", basis, pfvs, load, top_k=4, distinct_images=True,
                                  method=InputXGradient, crop_size=12, progress=False)
    X = F.normalize(pfvs.vectors - basis.offset, dim=1)
    V = F.normalize(basis.vectors, dim=1)
    for k in distinct.concepts:
        items = distinct.entries[k]
        shown = [e["image"] for e in items]
        assert len(set(shown)) == len(shown) == 4  # four different images
        # each is its image's most similar PFV, and the images come in order of that best similarity
        sim = (X @ V[k])
        best = {int(i): float(sim[pfvs.image_index == i].max()) for i in pfvs.image_index.unique()}
        assert [e["cosine"] for e in items] == pytest.approx(sorted(best.values(), reverse=True)[:4], abs=1e-5)
    assert len(loaded) == len(set(loaded))  # each image loaded once, and only those shown


def test_entries_carry_source_image_labels_and_ierf_crops(setup):
    model, images, pfvs, basis, atlas = setup
    k = 2
    items = atlas.entries[k]
    for e in items:
        assert e["image"] == int(pfvs.image_index[e["pfv"]]) and e["position"] == int(pfvs.position[e["pfv"]])
        assert e["class_name"] == ["ant", "bee", "cat", "dog"][[0, 1, 2, 3, 0, 1][e["image"]]]
    idx = torch.tensor([e["pfv"] for e in items])
    res = ierf(model, "2", images[pfvs.image_index[idx]], pfvs.position[idx], method=InputXGradient,
               offset=basis.offset, crop_size=12)
    expected = (res.crops.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(atlas.crops[k], expected)
    assert [e["box"] for e in items] == res.boxes.tolist()
    assert atlas.crops[k].shape == (4, 12, 12, 3) and atlas.thumbnail(k).shape == (12, 12, 3)
    assert atlas.thumbnail(k, n=4).shape == (12, 12, 3)


def test_save_load_round_trip_is_exact_and_pngs_are_written(setup, tmp_path):
    require("PIL")
    _, _, _, _, atlas = setup
    atlas.save(str(tmp_path / "atlas"))
    back = ConceptAtlas.load(str(tmp_path / "atlas"))
    assert back == atlas and back.meta == atlas.meta
    paths = atlas.to_png(str(tmp_path / "grids"), concepts=[0, 3])
    assert len(paths) == 2 and all(os.path.getsize(p) > 1000 for p in paths)
    from PIL import Image

    assert Image.open(paths[0]).size[0] > 4 * 12


def test_subset_of_concepts_and_bad_arguments(setup):
    model, images, pfvs, basis, _ = setup
    with pytest.raises(ValueError, match="concepts"):
        ConceptAtlas.build(model, "2", basis, pfvs, images, concepts=[7], progress=False)
    with pytest.raises(ValueError, match="images"):
        ConceptAtlas.build(model, "2", basis, pfvs, images[:2], progress=False)


def test_concept_localisation_is_the_upsampled_coefficient_map():
    torch.manual_seed(0)
    act = torch.rand(2, 4, 5, 5)
    basis = ConceptBasis(torch.eye(4))  # concepts = channels, so coefficients ~ the activation itself
    dec = PFVDecomposer(basis, alpha=1e-6, tol=1e-10)
    loc = concept_localisation(dec, act, 2, (20, 20))
    ref = F.interpolate(act[:, 2:3], size=(20, 20), mode="bilinear", align_corners=False)
    assert loc.shape == (2, 1, 20, 20)
    assert torch.allclose(loc, ref, atol=1e-4)
    tokens = torch.cat([torch.zeros(2, 1, 4), act.flatten(2).transpose(1, 2)], dim=1)  # class token + 5x5 grid
    assert torch.allclose(concept_localisation(dec, tokens, 2, (20, 20)), ref, atol=1e-4)
    require("matplotlib")
    fig, ax = draw_localisation(torch.rand(3, 20, 20), loc[0])
    assert fig is not None and ax is not None
