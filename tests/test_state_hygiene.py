"""After any exception inside the library, the model is as it was: no hooks, same modes and flags,
no global torch setting changed (failures injected at each stage)."""

import pytest
import torch
from torch import nn

from captum_gig import ConceptBasis, GeneralizedIntegratedGradients, PFVDecomposer, collect_pfvs
from helpers import SmallCNN, make_decomposer


class Injected(RuntimeError):
    pass


def snapshot(model):
    return {
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "flags": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
            for m in model.modules()
        ),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "rng": torch.get_rng_state().clone(),
    }


def assert_same(before, after):
    for key in before:
        if key == "rng":
            continue  # consuming random numbers is allowed
        assert before[key] == after[key], key


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = SmallCNN()
    m.train()  # a user's model in training mode
    m.block1[0].weight.requires_grad_(False)  # and a frozen parameter: both must survive
    return m


def fail_on_call(module, after_calls=0):
    """Make ``module`` raise on its (after_calls+1)-th forward; returns a restore function."""
    calls = [0]
    original = module.forward

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after_calls:
            raise Injected("injected failure")
        return original(*args, **kwargs)

    module.forward = forward
    return lambda: setattr(module, "forward", original)


@pytest.mark.parametrize("sampling", ["relevance", "uniform", "all"])
@pytest.mark.parametrize("where", ["block1.0", "block3.0", "head"])
def test_collection_failure_leaves_model_untouched(model, sampling, where):
    before = snapshot(model)
    restore = fail_on_call(model.get_submodule(where))
    try:
        with pytest.raises(Injected):
            collect_pfvs(model, "block2", torch.randn(4, 3, 16, 16), sampling=sampling, progress=False)
    finally:
        restore()
    assert_same(before, snapshot(model))


def test_failure_inside_captum_relevance_leaves_model_untouched(model):
    before = snapshot(model)

    def broken_method(model_, layer_):
        class Broken:
            def attribute(self, *a, **k):
                raise Injected("relevance failed")

        return Broken()

    with pytest.raises(Injected):
        collect_pfvs(model, "block2", torch.randn(2, 3, 16, 16), relevance_method=broken_method, progress=False)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("slicing", [True, False])
# leaf modules: the sliced sub-network calls those, not the Sequential containers
@pytest.mark.parametrize("where, after_calls", [("block1.0", 0), ("block3.0", 0), ("block3.0", 1), ("head", 1)])
@pytest.mark.parametrize("matrix", [False, True])
def test_attribution_failure_leaves_model_untouched(slicing, where, after_calls, matrix):
    torch.manual_seed(0)
    m = SmallCNN().eval()
    images = torch.randn(8, 3, 16, 16)
    dec = make_decomposer(m, "block2", images)
    m.train()
    before = snapshot(m)
    gig = GeneralizedIntegratedGradients(m, "block2", dec, slicing=slicing)
    restore = fail_on_call(m.get_submodule(where), after_calls)
    try:
        with pytest.raises(Injected):
            if matrix:
                gig.attribute_matrix(images[:2], targets=[0, 1], n_steps=4)
            else:
                gig.attribute(images[:2], target=0, n_steps=4, internal_batch_size=4)
    finally:
        restore()
    assert_same(before, snapshot(m))


def test_failure_in_decomposition_leaves_model_untouched(model):
    dec = PFVDecomposer(ConceptBasis(torch.randn(10, 12)), alpha=0.1)

    def broken(X):
        raise Injected("lasso failed")

    dec.transform = broken
    before = snapshot(model)
    with pytest.raises(Injected):
        GeneralizedIntegratedGradients(model, "block2", dec).attribute(torch.randn(2, 3, 16, 16), target=0, n_steps=2)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("where, after_calls", [("block2.0", 0), ("block3.0", 2), ("head", 0)])
def test_graph_building_failure_leaves_model_untouched(where, after_calls):
    from captum_gig.graph import ConceptGraph

    torch.manual_seed(0)
    m = SmallCNN().eval()
    images = torch.randn(6, 3, 16, 16)
    decs = [make_decomposer(m, layer, images) for layer in ("block2", "block3")]
    m.train()
    before = snapshot(m)
    restore = fail_on_call(m.get_submodule(where), after_calls)
    try:
        with pytest.raises(Injected):
            ConceptGraph.build(m, ["block2", "block3"], decs, images[:2], target=1, top_k=2, n_steps=4)
    finally:
        restore()
    assert_same(before, snapshot(m))


@pytest.mark.parametrize("where", ["block1.0", "head"])
def test_dataset_aggregation_failure_leaves_model_untouched(where):
    from captum_gig import class_attribution

    torch.manual_seed(0)
    m = SmallCNN().eval()
    images = torch.randn(6, 3, 16, 16)
    dec = make_decomposer(m, "block3", images)
    m.train()
    before = snapshot(m)
    restore = fail_on_call(m.get_submodule(where), 2)
    try:
        with pytest.raises(Injected):
            class_attribution(m, "block3", dec, images, n_steps=4, batch_size=3, progress=False)
    finally:
        restore()
    assert_same(before, snapshot(m))
