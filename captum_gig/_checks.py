"""Input checks shared by the stages."""

import torch
from torch import Tensor


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf.

    A finite sum proves it in one cheap reduction (a NaN or inf anywhere makes
    the sum NaN or inf); only a sum that overflows needs the elementwise test,
    which allocates a mask as large as ``t``.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
