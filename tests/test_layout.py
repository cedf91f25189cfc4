import pytest
import torch

from captum_gig import _layout


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (2, 7, 5), (2, 5)])
def test_to_and_from_pfvs_round_trip(shape):
    x = torch.randn(*shape)
    pfvs = _layout.to_pfvs(x)
    spatial = _layout.spatial_shape(x)
    assert pfvs.shape == (2, _layout.n_positions(spatial), 5)
    assert torch.equal(_layout.from_pfvs(pfvs, spatial), x)


def test_conv_pfv_is_channel_vector_at_row_major_position():
    x = torch.randn(2, 5, 3, 4)
    pfvs = _layout.to_pfvs(x)
    n, h, w = 1, 2, 3
    assert torch.equal(pfvs[n, h * 4 + w], x[n, :, h, w])
    coords = _layout.unravel_position(torch.tensor([h * 4 + w]), (3, 4))
    assert coords.tolist() == [[h, w]]


def test_token_pfv_is_last_axis():
    x = torch.randn(2, 7, 5)
    assert torch.equal(_layout.to_pfvs(x)[1, 3], x[1, 3])


def test_unsupported_rank_is_rejected():
    with pytest.raises(ValueError, match="dimensions"):
        _layout.to_pfvs(torch.randn(2, 3, 4, 5, 6))
