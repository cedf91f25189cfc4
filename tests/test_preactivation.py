import pytest
import torch
import torchvision

from captum_gig import collect_pfvs, expose_preactivations, remove_preactivations
from captum_gig._hooks import tap


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_outputs_and_state_dict_unchanged(arch):
    model = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
        names = expose_preactivations(model)
        after = model(x)
    assert torch.equal(before, after)
    assert list(model.state_dict()) == keys
    assert len(names) == (8 if arch == "resnet18" else 16)
    remove_preactivations(model)
    assert not any(hasattr(m, "preact") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_preact_is_the_pre_relu_sum():
    model = torchvision.models.resnet50(weights=None).eval()
    expose_preactivations(model)
    block = model.layer2[0]  # has a downsample branch
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), tap(model, "layer1") as inp, tap(model, "layer2.0.bn3") as bn3, tap(
        model, "layer2.0.preact"
    ) as pre, tap(model, "layer2.0") as out:
        model(x)
        identity = block.downsample(inp.value)
    assert torch.allclose(pre.value, bn3.value + identity)
    assert torch.equal(out.value, torch.relu(pre.value))
    assert (pre.value < 0).any(), "pre-activation PFVs should keep negative values"
    pfvs = collect_pfvs(model, "layer2.0.preact", x, progress=False)
    assert pfvs.vectors.shape == (2, 512)


def test_pipeline_models_from_torchvision_have_their_preactivations_hookable():
    from captum_gig._sources import load_model

    torch.manual_seed(0)
    model = load_model("torchvision:resnet18", "none").eval()  # "none": random weights, as the docs say
    names = {n for n, _ in model.named_modules() if n.endswith(".preact")}
    assert names == {f"layer{i}.{j}.preact" for i in range(1, 5) for j in range(2)}
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))  # the same network: only hook points were added
