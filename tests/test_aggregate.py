"""Dataset-wide GIG aggregation: per-class means equal direct GIG averaged over each class's images."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from captum_gig import GeneralizedIntegratedGradients, PFVDecomposer
from captum_gig.aggregate import ClassAttribution, class_attribution, interlayer_attribution

from helpers import SmallCNN, make_decomposer, randomize_bn

N_STEPS = 6


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN(channels=(4, 6, 8), num_classes=4)).eval()
    images = torch.randn(11, 3, 12, 12)
    labels = torch.tensor([0, 1, 2, 1, 0, 3, 1, 2, 2, 1, 0])
    # the default Lasso tolerance keeps this fast; every check compares with direct GIG on the same decomposer
    dec2, dec3 = (make_decomposer(model, name, images[:6], k_factor=2) for name in ("block2", "block3"))
    dec2, dec3 = (PFVDecomposer(d.basis, alpha=d.alpha) for d in (dec2, dec3))
    return model, images, labels, dec2, dec3


def _direct_class_means(model, dec, images, cls, **kw):
    gig = GeneralizedIntegratedGradients(model, "block3", dec, **kw)
    out = {}
    for c in sorted(set(cls.tolist())):
        idx = (cls == c).nonzero().flatten()
        out[c] = gig.attribute(images[idx], target=c, n_steps=N_STEPS).mean(0)
    return out


def _assert_matches(res, expected, counts):
    assert isinstance(res, ClassAttribution)
    assert res.classes.tolist() == sorted(expected)
    assert res.counts.tolist() == [counts[c] for c in sorted(expected)]
    for i, c in enumerate(res.classes.tolist()):
        torch.testing.assert_close(res.mean[i], expected[c], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.of(c), expected[c], rtol=1e-5, atol=1e-6)


def test_class_attribution_by_label_streams_loader(setup):
    model, images, labels, _, dec3 = setup
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # 3 batches, last one short
    res = class_attribution(model, "block3", dec3, loader, by="label", n_steps=N_STEPS, progress=False)
    expected = _direct_class_means(model, dec3, images, labels)
    _assert_matches(res, expected, {c: int((labels == c).sum()) for c in expected})
    assert res.mean.shape == (4, dec3.n_concepts)


def test_class_attribution_by_prediction_and_class_filter(setup):
    model, images, labels, _, dec3 = setup
    with torch.no_grad():
        pred = model(images).argmax(1)
    res = class_attribution(model, "block3", dec3, images, by="prediction", n_steps=N_STEPS, batch_size=3, progress=False)
    expected = _direct_class_means(model, dec3, images, pred)
    _assert_matches(res, expected, {c: int((pred == c).sum()) for c in expected})

    keep = sorted(expected)[:1]
    only = class_attribution(
        model, "block3", dec3, images, by="prediction", classes=keep, n_steps=N_STEPS, batch_size=5, progress=False
    )
    _assert_matches(only, {keep[0]: expected[keep[0]]}, {keep[0]: int((pred == keep[0]).sum())})


def test_class_attribution_prob_and_residual_complete(setup):
    model, images, labels, _, dec3 = setup
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]  # a plain list of pairs
    res = class_attribution(
        model, "block3", dec3, batches, by="label", output="prob", residual=True, n_steps=N_STEPS, progress=False
    )
    assert res.mean.shape == (4, dec3.n_concepts + 1)
    gig = GeneralizedIntegratedGradients(model, "block3", dec3, output="prob")
    for i, c in enumerate(res.classes.tolist()):
        idx = (labels == c).nonzero().flatten()
        direct = gig.attribute(images[idx], target=c, n_steps=N_STEPS, residual=True).mean(0)
        torch.testing.assert_close(res.mean[i], direct, rtol=1e-5, atol=1e-6)


def test_interlayer_by_all_label_and_targets(setup):
    model, images, labels, dec2, dec3 = setup
    gig = GeneralizedIntegratedGradients(model, "block2", dec2, "block3", dec3)
    # the reference uses the same batches: the Lasso's rounding depends on how many rows it solves together
    full = torch.cat([gig.attribute_matrix(images[i : i + 4], n_steps=N_STEPS) for i in range(0, 11, 4)])  # (N, K_a, K_b)

    res = interlayer_attribution(model, "block2", dec2, "block3", dec3, images, by="all", n_steps=N_STEPS, batch_size=4, progress=False)
    assert res.classes.tolist() == [-1] and res.counts.tolist() == [images.shape[0]]
    torch.testing.assert_close(res.mean[0], full.mean(0), rtol=1e-5, atol=1e-6)

    targets = [3, 0, 5]
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    by_label = interlayer_attribution(
        model, "block2", dec2, "block3", dec3, loader, targets=targets, by="label", n_steps=N_STEPS, progress=False
    )
    assert by_label.mean.shape == (4, dec2.n_concepts, 3)
    for i, c in enumerate(by_label.classes.tolist()):
        idx = labels == c
        torch.testing.assert_close(by_label.mean[i], full[idx][:, :, targets].mean(0), rtol=1e-5, atol=1e-6)
        assert by_label.counts[i] == int(idx.sum())


def test_bad_arguments(setup):
    model, images, labels, dec2, dec3 = setup
    with pytest.raises(ValueError, match="by"):
        class_attribution(model, "block3", dec3, images, by="everything", progress=False)
    with pytest.raises(ValueError, match="by"):
        class_attribution(model, "block3", dec3, images, by="all", progress=False)
    with pytest.raises(ValueError, match="label"):
        class_attribution(model, "block3", dec3, images, by="label", progress=False)
    with pytest.raises(ValueError, match="classes"):
        interlayer_attribution(model, "block2", dec2, "block3", dec3, images, by="all", classes=[1], progress=False)
    with pytest.raises(KeyError):
        ClassAttribution(torch.tensor([0]), torch.zeros(1, 2), torch.tensor([1])).of(3)


def test_baseline_attributions_are_averaged_the_same_way(setup):
    from captum_gig import ConceptGradientXCoefficient, ConceptMagnitude

    model, images, labels, dec2, dec3 = setup
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    for name, cls in (("endpoint", ConceptGradientXCoefficient), ("magnitude", ConceptMagnitude)):
        res = class_attribution(model, "block3", dec3, loader, by="label", attribution=name, progress=False)
        direct = cls(model, "block3", dec3)
        expected = {c: direct.attribute(images[labels == c], target=c).mean(0) for c in sorted(set(labels.tolist()))}
        _assert_matches(res, expected, {c: int((labels == c).sum()) for c in expected})
    inter = interlayer_attribution(model, "block2", dec2, "block3", dec3, loader, by="all", targets=[0, 3],
                                   attribution="endpoint", progress=False)
    eg = ConceptGradientXCoefficient(model, "block2", dec2, "block3", dec3)
    torch.testing.assert_close(inter.mean[0], eg.attribute_matrix(images, targets=[0, 3]).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attribution must be one of"):
        class_attribution(model, "block3", dec3, loader, by="label", attribution="lrp", progress=False)
