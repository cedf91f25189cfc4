"""iERF: theoretical receptive fields match the conv arithmetic; heat maps are input x gradient inside them."""

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients
from torch import nn

from captum_gig.ierf import ierf, receptive_fields
from helpers import tiny_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_stack():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 10 * 10, 4),
    ).eval()


def analytic_rf(i, j, size=20):
    """Output (i, j) of the stride-2 conv reads rows 2i-1..2i+1 of a map two 3x3 convs above the input."""
    return (max(0, 2 * i - 3), max(0, 2 * j - 3), min(size, 2 * i + 4), min(size, 2 * j + 4))


def test_receptive_fields_match_conv_arithmetic():
    model = conv_stack()
    boxes = receptive_fields(model, "4", (3, 20, 20))
    assert boxes.shape == (100, 4)
    for p in range(100):
        assert tuple(boxes[p].tolist()) == analytic_rf(p // 10, p % 10)


def test_receptive_fields_of_several_layers_come_from_one_probe_pass():
    import copy

    model = conv_stack()
    calls = []
    model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    first, last = receptive_fields(model, ["0", "4"], (3, 20, 20), batch_size=8)
    assert len(calls) == 5  # (20 + 20) probes / 8 per forward, for both layers together
    assert all(tuple(last[p].tolist()) == analytic_rf(p // 10, p % 10) for p in range(100))
    alone = receptive_fields(copy.deepcopy(model), "0", (3, 20, 20))  # a fresh cache
    assert torch.equal(first, alone)
    for p in range(400):  # a 3x3 conv with padding 1: the pixel's 3x3 neighbourhood
        i, j = divmod(p, 20)
        assert tuple(first[p].tolist()) == (max(0, i - 1), max(0, j - 1), min(20, i + 2), min(20, j + 2))
    calls.clear()
    assert torch.equal(receptive_fields(model, "4", (3, 20, 20)), last) and not calls  # cached

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.spare = conv_stack(), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.net(x)

    with pytest.raises(RuntimeError, match="'spare' was not run by the model's forward"):
        receptive_fields(WithSpare(), ["net.4", "spare"], (3, 20, 20))


def test_receptive_fields_of_vit_patches_and_tokens():
    model = tiny_vit()  # 32x32 images, 8x8 patches
    patches = receptive_fields(model, "conv_proj", (3, 32, 32))
    assert tuple(patches[5].tolist()) == (8, 8, 16, 16)  # patch (1, 1)
    tokens = receptive_fields(model, "encoder.layers.encoder_layer_0", (3, 32, 32))
    assert (tokens == torch.tensor([0, 0, 32, 32])).all()  # attention: every token sees the whole image


def test_heatmap_is_input_x_gradient_of_the_projection_and_zero_outside_the_rf():
    model = conv_stack()
    x = torch.randn(2, 3, 20, 20)
    images = x[[0, 0, 1, 1]]
    coords = torch.tensor([[3, 4], [0, 9], [5, 5], [9, 0]])
    res = ierf(model, "4", images, coords, method=InputXGradient, context=0.25, crop_size=16, batch_size=3)
    for b in range(4):
        i, j = coords[b].tolist()
        xb = images[b : b + 1].clone().requires_grad_(True)
        pfv = model[:5](xb)[0, :, i, j]
        direction = pfv.detach() / pfv.detach().norm()
        (g,) = torch.autograd.grad((pfv * direction).sum(), xb)
        ref = (g * xb.detach())[0].sum(0)  # independent input x gradient
        assert torch.allclose(res.heatmaps[b], ref, atol=1e-6)
        t, l, bt, r = analytic_rf(i, j)
        outside = torch.ones(20, 20, dtype=torch.bool)
        outside[t:bt, l:r] = False
        assert (ref[outside] == 0).all() and (res.heatmaps[b][outside] == 0).all()
        assert res.heatmaps[b][~outside].abs().sum() > 0
        bt0, bl0, bb0, br0 = res.boxes[b].tolist()
        assert t <= bt0 < bb0 <= bt and l <= bl0 < br0 <= r  # the box lies inside the receptive field
        ct, cl, cb, cr = res.crop_boxes[b].tolist()
        assert ct <= bt0 and cl <= bl0 and cb >= bb0 and cr >= br0 and 0 <= ct and cb <= 20 and cr <= 20
        assert res.scores[b] == pytest.approx(float(pfv.detach().norm()), rel=1e-5)
    assert res.crops.shape == (4, 3, 16, 16) and 0 <= res.crops.min() and res.crops.max() <= 1


def test_integrated_gradients_default_is_complete_and_batched_consistently():
    model = conv_stack()
    x = torch.randn(3, 3, 20, 20)
    pos = torch.tensor([11, 47, 99])
    a = ierf(model, "4", x, pos, attribute_kwargs={"n_steps": 64})
    b = ierf(model, "4", x, pos, attribute_kwargs={"n_steps": 64}, batch_size=1)
    assert torch.allclose(a.heatmaps, b.heatmaps, atol=1e-6)
    # completeness of IG from a zero baseline: the map sums to s(x) - s(0) (zero input -> bias-only PFV)
    with torch.no_grad():
        zero = model[:5](torch.zeros(1, 3, 20, 20)).flatten(2)[0]  # (C, P)
        own = model[:5](x).flatten(2)
    for k in range(3):
        d = own[k, :, pos[k]] / own[k, :, pos[k]].norm()
        s_x, s_0 = float(own[k, :, pos[k]] @ d), float(zero[:, pos[k]] @ d)
        assert float(a.heatmaps[k].sum()) == pytest.approx(s_x - s_0, abs=1e-2 * (abs(s_x) + abs(s_0)))


def test_bad_arguments_are_named():
    model = conv_stack()
    x = torch.randn(2, 3, 20, 20)
    with pytest.raises(ValueError, match="positions"):
        ierf(model, "4", x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="images"):
        ierf(model, "4", x[0], torch.tensor([0]))
    with pytest.raises(ValueError, match="mass"):
        ierf(model, "4", x, torch.tensor([0, 1]), mass=0)
    assert IntegratedGradients  # the default method
