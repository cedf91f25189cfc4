import pickle

import numpy as np
import pytest
import torch
import torchvision
from scipy import stats
from torch import nn

from captum_gig import PFVSet, collect_pfvs
from captum_gig._hooks import tap
from helpers import tiny_vit


class KnownRelevance(nn.Module):
    """Layer ``feature`` is the input itself; the class-0 logit is ``sum(w * feature)``.

    Gradient x activation at position p for class 0 is therefore ``x_p * w_p``.
    """

    def __init__(self, w):
        super().__init__()
        self.feature = nn.Identity()
        self.register_buffer("w", w)

    def forward(self, x):
        score = (self.feature(x)[:, 0] * self.w).sum((1, 2))
        return torch.stack([score, -score], 1)


def test_relevance_sampling_draws_in_proportion_to_relevance():
    w = torch.tensor([[4.0, 0.0, 1.0, -2.0], [2.0, 3.0, 0.0, 1.0], [0.5, -1.0, 6.0, 0.0], [1.5, 2.0, 0.0, 3.0]])
    model = KnownRelevance(w)
    images = torch.ones(4000, 1, 4, 4)
    pfvs = collect_pfvs(model, "feature", images, batch_size=1000, progress=False, seed=3)
    counts = torch.bincount(pfvs.position, minlength=16).double()
    relevance = w.flatten().clamp_min(0)
    assert counts[relevance == 0].sum() == 0, "a position without positive relevance was drawn"
    positive = relevance > 0
    expected = relevance[positive] / relevance.sum() * len(pfvs)
    _, p_value = stats.chisquare(counts[positive].numpy(), expected.numpy())
    assert p_value > 1e-3
    assert torch.allclose(pfvs.relevance, relevance[pfvs.position].float())
    assert (pfvs.target == 0).all()


def test_uniform_sampling_is_uniform_and_without_replacement():
    model = KnownRelevance(torch.ones(4, 4))
    images = torch.ones(3000, 1, 4, 4)
    pfvs = collect_pfvs(model, "feature", images, sampling="uniform", per_image=3, batch_size=1000, progress=False)
    counts = torch.bincount(pfvs.position, minlength=16).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    per_image = pfvs.position.view(3000, 3)
    assert all(len(set(row.tolist())) == 3 for row in per_image[:200])


def test_draws_depend_only_on_seed_and_image_index():
    model = KnownRelevance(torch.rand(4, 4) + 0.1)
    images = torch.rand(20, 1, 4, 4) + 0.1
    a = collect_pfvs(model, "feature", images, batch_size=3, per_image=2, progress=False, seed=7)
    b = collect_pfvs(model, "feature", images, batch_size=8, per_image=2, progress=False, seed=7)
    c = collect_pfvs(model, "feature", images, batch_size=8, per_image=2, progress=False, seed=8)
    assert torch.equal(a.position, b.position) and torch.equal(a.vectors, b.vectors)
    assert not torch.equal(a.position, c.position)


def _activation(model, layer, images):
    with torch.no_grad(), tap(model, layer) as record:
        model(images)
    return record.value


def test_resnet18_conv_pfvs_are_the_layer_channel_vectors():
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(5, 3, 64, 64)
    loader = [(images[:3], torch.tensor([1, 2, 3])), (images[3:], torch.tensor([4, 5]))]
    pfvs = collect_pfvs(model, model.layer3, loader, per_image=2, progress=False)
    assert pfvs.layer == "layer3" and pfvs.spatial_shape == (4, 4) and pfvs.vectors.shape == (10, 256)
    act = _activation(model, "layer3", images)
    rows, cols = pfvs.coordinates().unbind(1)
    expected = act[pfvs.image_index, :, rows, cols]
    assert torch.allclose(pfvs.vectors, expected, atol=1e-5)
    assert pfvs.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with torch.no_grad():
        predicted = model(images).argmax(1)
    assert torch.equal(pfvs.target, predicted.repeat_interleave(2))


def test_vit_token_pfvs():
    model = tiny_vit()
    images = torch.randn(4, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1"
    pfvs = collect_pfvs(model, layer, images, per_image=3, progress=False)
    assert pfvs.spatial_shape == (17,) and pfvs.vectors.shape == (12, 32)
    act = _activation(model, layer, images)
    assert torch.allclose(pfvs.vectors, act[pfvs.image_index, pfvs.position], atol=1e-5)


def test_all_sampling_and_layer_input():
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(2, 3, 64, 64)
    pfvs = collect_pfvs(model, "layer4", images, sampling="all", attribute_to_layer_input=True, progress=False)
    assert pfvs.vectors.shape == (2 * 16, 256)  # layer4's input is layer3's output (256 x 4 x 4)
    act = _activation(model, "layer3", images)
    assert torch.allclose(pfvs.vectors, act.flatten(2).transpose(1, 2).reshape(-1, 256), atol=1e-5)


def test_hooks_removed_and_mode_restored_when_model_raises():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.conv(x)
            raise RuntimeError("model failure")

    model = Fails().train()
    with pytest.raises(RuntimeError, match="model failure"):
        collect_pfvs(model, "conv", torch.randn(2, 3, 8, 8), progress=False)
    assert not model.conv._forward_hooks and not model.conv._forward_pre_hooks
    assert model.training and model.conv.weight.requires_grad


def test_relevance_hooks_removed_after_success():
    model = torchvision.models.resnet18(weights=None).eval()
    collect_pfvs(model, "layer2", torch.randn(2, 3, 32, 32), progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_bad_arguments_are_named():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="sampling"):
        collect_pfvs(model, "layer2", x, sampling="random", progress=False)
    with pytest.raises(ValueError, match="did you mean"):
        collect_pfvs(model, "layer_2", x, progress=False)
    with pytest.raises(ValueError, match="per_image"):
        collect_pfvs(model, "layer4", x, per_image=5, progress=False)  # layer4 has 1x1 positions here
    with pytest.raises(ValueError, match="no images"):
        collect_pfvs(model, "layer2", [], progress=False)
    with pytest.raises(ValueError, match="target='label'"):
        collect_pfvs(model, "layer2", x, target="label", progress=False)


def test_save_load_round_trip_is_exact_and_unpickles_nothing(tmp_path, monkeypatch):
    model = torchvision.models.resnet18(weights=None).eval()
    pfvs = collect_pfvs(model, "layer2", [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))], per_image=2, progress=False)
    path = str(tmp_path / "pfvs.safetensors")
    pfvs.save(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = PFVSet.load(path)
    for name, value in pfvs._fields().items():
        assert torch.equal(getattr(loaded, name), value), name
    assert loaded.layer == pfvs.layer and loaded.spatial_shape == pfvs.spatial_shape
    assert loaded.meta == pfvs.meta


def test_truncated_file_gives_clear_error(tmp_path):
    pfvs = PFVSet(torch.randn(4, 3), torch.arange(4), torch.zeros(4, dtype=torch.long), "x", (2, 2))
    path = tmp_path / "p.safetensors"
    pfvs.save(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PFVSet.load(str(path))


def test_concat_and_subset():
    a = PFVSet(torch.randn(4, 3), torch.arange(4), torch.zeros(4, dtype=torch.long), "x", (2, 2))
    b = PFVSet(torch.randn(2, 3), torch.arange(4, 6), torch.ones(2, dtype=torch.long), "x", (2, 2))
    c = PFVSet.concat([a, b])
    assert len(c) == 6 and torch.equal(c[4:].vectors, b.vectors)
    with pytest.raises(ValueError, match="cannot concatenate"):
        PFVSet.concat([a, PFVSet(torch.randn(1, 5), torch.arange(1), torch.zeros(1, dtype=torch.long), "y", (2, 2))])


@pytest.mark.parametrize("sampling", ["relevance", "uniform"])
def test_several_layers_in_one_pass_equal_one_layer_at_a_time(sampling):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    images = torch.randn(5, 3, 48, 48)
    layers = ["layer1.1", "layer2.0", "layer3.1"]
    together = collect_pfvs(model, layers, images, sampling=sampling, per_image=3, batch_size=2, progress=False)
    assert list(together) == layers
    for name in layers:
        alone = collect_pfvs(model, name, images, sampling=sampling, per_image=3, batch_size=2, progress=False)
        mine = together[name]
        assert torch.equal(mine.position, alone.position) and torch.equal(mine.image_index, alone.image_index)
        torch.testing.assert_close(mine.vectors, alone.vectors)
        torch.testing.assert_close(mine.relevance, alone.relevance)
        assert mine.layer == name and mine.spatial_shape == alone.spatial_shape
    with pytest.raises(ValueError, match="twice"):
        collect_pfvs(model, ["layer1.1", "layer1.1"], images, progress=False)
