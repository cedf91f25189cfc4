"""Bad input gets a clear error naming the argument and what was expected (one test per case)."""

import pytest
import torch
from torch import nn

from captum_gig import ConceptBasis, GeneralizedIntegratedGradients, PFVDecomposer, collect_pfvs
from helpers import SmallCNN, make_decomposer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    images = torch.randn(8, 3, 16, 16)
    decs = {n: make_decomposer(model, n, images) for n in ("block1", "block2", "block3")}
    return model, images[:2], decs


def test_unknown_layer_name_suggests_close_matches(setup):
    model, x, decs = setup
    with pytest.raises(ValueError, match=r"layer_a='blocks2'.*did you mean 'block2'"):
        GeneralizedIntegratedGradients(model, "blocks2", decs["block2"])
    with pytest.raises(ValueError, match=r"layer='block_3'.*did you mean 'block3'"):
        collect_pfvs(model, "block_3", x, progress=False)


def test_layer_with_tuple_output_is_refused():
    class Split(nn.Module):
        def forward(self, x):
            return x, -x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.split = Split()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            a, _ = self.split(self.conv(x))
            return self.head(a.mean((2, 3)))

    with pytest.raises(TypeError, match="'split' returns a tuple, not a single tensor"):
        collect_pfvs(Model(), "split", torch.randn(2, 3, 8, 8), progress=False)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()  # used twice per forward
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("sampling", ["relevance", "uniform", "all"])
def test_layer_that_runs_twice_is_refused_by_collection(sampling):
    with pytest.raises(ValueError, match="'act' ran 2 times"):
        collect_pfvs(Reused().eval(), "act", torch.randn(2, 3, 8, 8), sampling=sampling, progress=False)


def test_layer_that_runs_twice_is_refused_by_gig():
    model = Reused().eval()
    dec = PFVDecomposer(ConceptBasis(torch.randn(6, 4)), alpha=0.1)
    with pytest.raises(ValueError, match="'act' ran 2 times"):
        GeneralizedIntegratedGradients(model, "act", dec).attribute(torch.randn(2, 3, 8, 8), target=0, n_steps=2)


def test_basis_channel_mismatch(setup):
    model, x, decs = setup
    with pytest.warns(UserWarning, match="fitted on layer 'block1', not on 'block3'"):
        gig = GeneralizedIntegratedGradients(model, "block3", decs["block1"])
    with pytest.raises(ValueError, match=r"layer_a 'block3' has activation shape \(2, 16, 4, 4\).*8 channels"):
        gig.attribute(x, target=0)
    with pytest.warns(UserWarning, match="fitted on layer 'block2', not on 'block3'"):
        gig = GeneralizedIntegratedGradients(model, "block1", decs["block1"], "block3", decs["block2"])
    with pytest.raises(ValueError, match="layer_b 'block3' has 16 channels but decomposer_b's basis has 12"):
        gig.attribute(x, target=0)


def test_target_concept_out_of_range(setup):
    model, x, decs = setup
    gig = GeneralizedIntegratedGradients(model, "block1", decs["block1"], "block2", decs["block2"])
    k = decs["block2"].n_concepts
    with pytest.raises(ValueError, match=rf"out of range: each must index a concept of layer_b \({k} concepts\)"):
        gig.attribute(x, target=k)
    with pytest.raises(ValueError, match="out of range"):
        gig.attribute_matrix(x, targets=[0, -1])


def test_target_class_out_of_range(setup):
    model, x, decs = setup
    gig = GeneralizedIntegratedGradients(model, "block2", decs["block2"])
    with pytest.raises(ValueError, match=r"out of range: each must index a class \(5 classes\)"):
        gig.attribute(x, target=[0, 5])
    with pytest.raises(ValueError, match="target has 3 entries for 2 examples"):
        gig.attribute(x, target=[0, 1, 2])


def test_nan_in_inputs(setup):
    model, x, decs = setup
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs contain NaN or inf"):
        GeneralizedIntegratedGradients(model, "block2", decs["block2"]).attribute(bad, target=0)
    with pytest.raises(ValueError, match="images of batch 0 contain NaN or inf"):
        collect_pfvs(model, "block2", bad, progress=False)


def test_nan_in_pfvs_and_bases():
    X = torch.randn(10, 4)
    X[3, 1] = float("inf")
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        ConceptBasis.fit(X, 2, progress=False)
    with pytest.raises(ValueError, match="concept vectors contain NaN or inf"):
        ConceptBasis(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="offset contains NaN or inf"):
        ConceptBasis(torch.ones(2, 2), torch.tensor([float("inf"), 0.0]))
    dec = PFVDecomposer(ConceptBasis(torch.randn(3, 4)))
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        dec.transform(X)


def test_finite_check_survives_an_overflowing_sum():
    # the check sums first (cheap) and tests element by element only when the sum is not finite
    from captum_gig._checks import all_finite

    huge = torch.full((4, 3), 3e38)  # finite values whose sum overflows float32
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5, 2)
        t[4, 1] = bad
        assert not all_finite(t)
    assert all_finite(torch.arange(3)) and all_finite(torch.empty(0))


def test_more_concepts_than_pfvs():
    with pytest.raises(ValueError, match="n_concepts=11 exceeds the number of PFVs \\(10\\)"):
        ConceptBasis.fit(torch.randn(10, 4), 11, progress=False)


def test_empty_data(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="data yielded no images"):
        collect_pfvs(model, "block1", iter([]), progress=False)
    with pytest.raises(ValueError, match="data as a tensor must be a batch of images"):
        collect_pfvs(model, "block1", torch.tensor(1.0), progress=False)


def test_n_steps_below_one(setup):
    model, x, decs = setup
    gig = GeneralizedIntegratedGradients(model, "block2", decs["block2"])
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n_steps must be a positive int"):
            gig.attribute(x, target=0, n_steps=bad)
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        gig.attribute_matrix(x, n_steps=0)


def test_detached_path_is_refused():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(x).detach().mean((2, 3)))

    model = Detached().eval()
    dec = PFVDecomposer(ConceptBasis(torch.randn(5, 4)), alpha=0.1)
    with pytest.raises(ValueError, match="does not depend differentiably on layer_a 'conv'"):
        GeneralizedIntegratedGradients(model, "conv", dec).attribute(torch.randn(2, 3, 8, 8), target=0, n_steps=2)


def test_integer_outputs_are_refused():
    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3)).round().long()

    dec = PFVDecomposer(ConceptBasis(torch.randn(5, 4)), alpha=0.1)
    with pytest.raises(TypeError, match="not floating point"):
        GeneralizedIntegratedGradients(Argmax().eval(), "conv", dec).attribute(torch.randn(2, 3, 8, 8), target=0, n_steps=2)


def test_mixed_dtypes(setup):
    model, x, decs = setup
    gig = GeneralizedIntegratedGradients(model, "block2", decs["block2"])
    with pytest.raises(TypeError, match="inputs are torch.float64 but the model's parameters are torch.float32"):
        gig.attribute(x.double(), target=0)
    with pytest.raises(TypeError, match="images of batch 0 are torch.float64"):
        collect_pfvs(model, "block2", x.double(), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices(setup):
    model, x, decs = setup
    gig = GeneralizedIntegratedGradients(model, "block2", decs["block2"])
    with pytest.raises(ValueError, match="inputs are on cuda:0 but the model is on cpu"):
        gig.attribute(x.cuda(), target=0)


def test_decomposer_on_another_device_is_named():
    # the "meta" device stands in for a second device on a CPU-only machine
    dec = PFVDecomposer(ConceptBasis(torch.randn(3, 4)))
    dec.basis.vectors = dec.basis.vectors.to("meta")
    with pytest.raises(ValueError, match="PFVs are on cpu but the concept basis is on meta"):
        dec.transform(torch.randn(2, 4))
