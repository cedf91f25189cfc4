"""Small models shared by the tests."""

import torch
from torch import nn


def tiny_vit(image_size=32, patch_size=8, num_layers=2, hidden_dim=32, num_classes=5):
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=hidden_dim,
        mlp_dim=2 * hidden_dim,
        num_classes=num_classes,
    ).eval()


class SmallCNN(nn.Module):
    """conv-BN-ReLU x3 then a linear head; ``block1``/``block2``/``block3`` are clean cuts."""

    def __init__(self, channels=(8, 12, 16), num_classes=5, in_channels=3):
        super().__init__()
        layers = []
        c_in = in_channels
        for i, c in enumerate(channels):
            layers.append(
                nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2) if i else nn.Identity())
            )
            c_in = c
        self.block1, self.block2, self.block3 = layers
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.head(x.mean((2, 3)))


def randomize_bn(model, seed=0):
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def make_decomposer(model, layer, images, k_factor=2, alpha_fraction=0.05, offset="mean", seed=0, attribute_to_layer_input=False):
    """Concepts of ``layer`` fitted on every PFV of ``images`` and a Lasso decomposer for them."""
    from captum_gig import ConceptBasis, PFVDecomposer, alpha_max, collect_pfvs

    pfvs = collect_pfvs(model, layer, images, sampling="all", progress=False, attribute_to_layer_input=attribute_to_layer_input)
    k = min(k_factor * pfvs.n_channels, len(pfvs))
    basis = ConceptBasis.fit(pfvs, k, offset=offset, seed=seed, progress=False)
    alpha = alpha_fraction * float(alpha_max(basis, pfvs.vectors).median())
    return PFVDecomposer(basis, alpha=alpha, tol=1e-6)


class Smooth(nn.Module):
    """A tiny float64 network with explicit parts, so the reference needs no hooks."""

    def __init__(self):
        super().__init__()
        self.prefix = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh())
        self.a = nn.Identity()
        self.mid = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.Softplus(), nn.Conv2d(5, 3, 3, stride=2, padding=1))
        self.b = nn.Identity()
        self.head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))

    def forward(self, x):
        return self.head(self.b(self.mid(self.a(self.prefix(x)))))
