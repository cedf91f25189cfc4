import pytest
import torch
from torch import nn

from captum_gig._hooks import frozen, replace, resolve_layer, run_until, tap


def net():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_resolve_layer_by_name_and_module():
    m = net()
    assert resolve_layer(m, "2") == ("2", m[2])
    assert resolve_layer(m, m[0]) == ("0", m[0])


def test_unknown_name_suggests_close_matches():
    m = nn.Sequential()
    m.add_module("block1", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="did you mean 'block1'"):
        resolve_layer(m, "blok1")


def test_foreign_module_is_rejected():
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(net(), nn.Linear(2, 2))


def test_reused_module_is_detected():
    relu = nn.ReLU()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = relu

        def forward(self, x):
            return self.relu(self.relu(x) - 1)

    m = Twice()
    with tap(m, "relu") as record:
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="ran 2 times"):
        record.value


def test_hooks_removed_and_state_restored_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    m = Boom().train()
    m.lin.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(m), tap(m, "lin"), replace(m, "lin", lambda t: t * 0):
            assert not m.training and not m.lin.weight.requires_grad
            m(torch.randn(1, 3))
    assert not m.lin._forward_hooks and not m.lin._forward_pre_hooks
    assert m.training and m.lin.weight.requires_grad and not m.lin.bias.requires_grad


def test_replace_output_and_input():
    m = net()
    x = torch.randn(3, 4)
    with replace(m, "1", lambda t: torch.zeros_like(t)):
        out = m(x)
    assert torch.allclose(out, m[2].bias.expand(3, 2))
    with replace(m, "2", lambda t: torch.ones_like(t), attribute_to_layer_input=True):
        out = m(x)
    assert torch.allclose(out, m[2](torch.ones(3, 4)))


def test_run_until_stops_early_and_returns_activation():
    calls = []
    m = net()
    m[2].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 4)
    act = run_until(m, "1", x)
    assert torch.equal(act, torch.relu(m[0](x)))
    assert calls == []
    assert not m[1]._forward_hooks


def test_tuple_output_is_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    m = nn.Sequential(Pair())
    with pytest.raises(TypeError, match="not a single tensor"):
        with tap(m, "0"):
            m(torch.randn(1, 2))


def test_tap_records_values_before_a_following_inplace_op():
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
    x = torch.randn(8, 3)
    with torch.no_grad():
        expected = m[0](x)
        with tap(m, "0") as record:
            m(x)
    assert (record.value < 0).any()
    assert torch.equal(record.value, expected)
