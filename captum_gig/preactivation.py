"""Expose the pre-ReLU sum of torchvision ResNet blocks as a hookable module.

The paper's PFVs of a ResNet block are pre-activation: ``bn3(conv3(...)) +
identity`` before the final ReLU. torchvision computes that sum inline and
reuses one ``relu`` module three times per block, so there is nothing to hook.
:func:`expose_preactivations` gives every block an ``nn.Identity`` named
``preact`` through which the sum passes; the model's outputs and state dict are
unchanged, and ``"layer3.5.preact"`` becomes a layer like any other.
"""

from typing import List

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["expose_preactivations", "remove_preactivations"]


class _PreactBasicBlock(BasicBlock):
    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # out-of-place: torchvision's relu is in-place and would overwrite the hooked sum
        return torch.relu(self.preact(out + identity))


class _PreactBottleneck(Bottleneck):
    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(self.preact(out + identity))


_SWAP = {BasicBlock: _PreactBasicBlock, Bottleneck: _PreactBottleneck}
_UNSWAP = {v: k for k, v in _SWAP.items()}


def expose_preactivations(model: nn.Module) -> List[str]:
    r"""Add a hookable ``preact`` module to every torchvision ResNet block, in place.

    Args:
        model (nn.Module): a model containing torchvision ``BasicBlock`` or
                    ``Bottleneck`` modules (e.g. ``torchvision.models.resnet50()``).

    Returns:
        list of str: the dotted names of the new modules, e.g.
        ``["layer1.0.preact", ..., "layer4.2.preact"]``.

    Examples::

        >>> model = torchvision.models.resnet50(weights=None).eval()
        >>> names = expose_preactivations(model)
        >>> pfvs = collect_pfvs(model, "layer3.5.preact", images)
    """
    names = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _UNSWAP:
            names.append(f"{name}.preact")
        elif cls in _SWAP:
            module.preact = nn.Identity()
            module.__class__ = _SWAP[cls]
            names.append(f"{name}.preact")
    if not names:
        raise ValueError("the model has no torchvision ResNet BasicBlock/Bottleneck blocks")
    return names


def remove_preactivations(model: nn.Module) -> None:
    """Undo :func:`expose_preactivations`."""
    for module in model.modules():
        cls = type(module)
        if cls in _UNSWAP:
            del module.preact
            module.__class__ = _UNSWAP[cls]
