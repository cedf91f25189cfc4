"""Synthetic PFV-like data for benchmarks: mostly non-negative, ReLU-like, with concept structure.

Real PFVs of post-ReLU-heavy CNNs share a common positive direction, which makes
their concept matrices ill-conditioned (DESIGN.md section 7); this generator
reproduces that, so solvers are measured on the hard case, not on Gaussian noise.
"""

import torch


def relu_like_pfvs(n, c, n_atoms=None, active=6, noise=0.2, seed=0, device="cpu", dtype=torch.float32):
    """``(n, c)`` PFVs: ReLU of a few non-negative atoms mixed with positive weights, plus noise."""
    g = torch.Generator().manual_seed(seed)
    n_atoms = n_atoms or 4 * c
    atoms = torch.randn(n_atoms, c, generator=g).clamp_min(0) + 0.1 * torch.rand(n_atoms, c, generator=g)
    idx = torch.randint(n_atoms, (n, active), generator=g)
    weight = torch.rand(n, active, 1, generator=g) * 2
    X = (weight * atoms[idx]).sum(1) + noise * torch.randn(n, c, generator=g)
    return X.clamp_min(0).to(device=device, dtype=dtype)


def concept_matrix(k, c, seed=1, device="cpu", dtype=torch.float32):
    """``(k, c)`` concept vectors drawn like cluster means of such PFVs (centred on the data mean)."""
    X = relu_like_pfvs(max(4 * k, 2048), c, seed=seed)
    g = torch.Generator().manual_seed(seed)
    members = torch.randint(X.shape[0], (k, 8), generator=g)
    V = X[members].mean(1) - X.mean(0)
    return V.to(device=device, dtype=dtype), X.mean(0).to(device=device, dtype=dtype)
