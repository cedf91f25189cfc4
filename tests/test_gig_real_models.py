"""GIG on real architectures: torchvision ResNet pre-activations and the pretrained EfficientNet-Lite0."""

import pytest
import torch
import torchvision

from captum_gig import GeneralizedIntegratedGradients, collect_pfvs, expose_preactivations
from conftest import require
from helpers import make_decomposer, randomize_bn


def test_resnet_preactivation_blocks_are_clean_cuts():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    expose_preactivations(model)
    images = torch.randn(6, 3, 64, 64)
    dec_a = make_decomposer(model, "layer2.1.preact", images, offset=model.layer2[1].bn2)
    dec_b = make_decomposer(model, "layer3.1.preact", images, offset=model.layer3[1].bn2)
    sliced = GeneralizedIntegratedGradients(model, "layer2.1.preact", dec_a, "layer3.1.preact", dec_b)
    hooked = GeneralizedIntegratedGradients(model, "layer2.1.preact", dec_a, "layer3.1.preact", dec_b, slicing=False)
    assert sliced.uses_slicing
    x = images[:2]
    a, delta = sliced.attribute_matrix(x, targets=[0, 1, 2], n_steps=32, return_convergence_delta=True)
    b = hooked.attribute_matrix(x, targets=[0, 1, 2], n_steps=32)
    assert torch.allclose(a, b, atol=1e-5 * a.abs().max())
    assert a.shape == (2, dec_a.n_concepts, 3) and torch.isfinite(delta).all()


@pytest.mark.slow
def test_efficientnet_lite0_real_photos_completeness_with_residual():
    require("efficientnet_lite_pytorch")
    require("skimage")
    from captum_gig.zoo import efficientnet_lite0, imagenet_categories, real_photos

    model = efficientnet_lite0()
    images, names = real_photos()
    with torch.no_grad():
        predicted = model(images).argmax(1)
    categories = imagenet_categories()
    assert "cat" in categories[predicted[names.index("skimage:chelsea")]]  # the pretrained weights are real
    assert categories[predicted[names.index("skimage:coffee")]] == "espresso"

    layer = "_blocks.10"
    pfvs = collect_pfvs(model, layer, images, per_image=40, progress=False)
    from captum_gig import ConceptBasis, PFVDecomposer, alpha_max

    basis = ConceptBasis.fit(pfvs, 2 * pfvs.n_channels, offset=model._blocks[10]._bn2, progress=False)
    dec = PFVDecomposer(basis, alpha=0.05 * float(alpha_max(basis, pfvs.vectors).median()))
    gig = GeneralizedIntegratedGradients(model, layer, dec)
    assert gig.uses_slicing
    x, target = images[:3], predicted[:3]
    # ReLU6 kinks along the path: 256 Gauss-Legendre points bring the delta well under 1% here
    attr, delta = gig.attribute(x, target=target, n_steps=256, internal_batch_size=192, residual=True, return_convergence_delta=True)
    ends = gig._endpoints(x, (), residual=True)
    s_end, s_start = gig._readout_ends(ends, x, ())
    change = s_end.gather(1, target[:, None])[:, 0] - s_start.gather(1, target[:, None])[:, 0]
    with torch.no_grad():
        assert torch.allclose(s_end, model(x), atol=1e-4)  # residual path ends at the real logits
    assert (delta.abs() <= 1e-2 * change.abs()).all(), f"delta {delta} vs change {change}"
    assert attr.shape == (3, basis.n_concepts + 1)
