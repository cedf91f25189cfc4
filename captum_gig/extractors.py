"""Alternative concept extractors for comparison with bisecting clustering (paper 4.2, appendix F).

Importing :mod:`captum_gig` registers them with
:func:`~captum_gig.concepts.register_extractor`, so each is one argument away::

    ConceptBasis.fit(pfvs, n_concepts, method="kmeans" | "dictionary" | "sae", offset=...)

and every basis then decomposes with the same :class:`~captum_gig.PFVDecomposer`,
which keeps the comparisons of Tables 1-2 fair.

* ``"kmeans"``: plain (non-bisecting) spherical k-means on the centred,
  L2-normalised PFVs (cosine similarity, centroid = normalised sum, k-means++
  seeding); concept vectors are the cluster means, as for ``"bisecting"``.
* ``"dictionary"``: scikit-learn's ``MiniBatchDictionaryLearning``; the
  dictionary atoms (unit norm) are the concept vectors.
* ``"sae"``: a sparse autoencoder trained in torch with the loss of eq. 11
  (Templeton et al. 2024), ``mean ||x - x_hat||^2 + lambda sum_i f_i(x) ||W_d,i||``,
  ``f(x) = ReLU(W_e x + b_e)``, ``x_hat = W_d f(x) + b_d``; the decoder columns
  ``W_d,i`` become the concept vectors.
"""

import math
from typing import Dict

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .concepts import register_extractor

__all__ = ["spherical_kmeans", "fit_dictionary", "fit_sae", "EXTRACTORS"]

#: the extractors this module registers (plus the built-in ``"bisecting"``)
EXTRACTORS = ["kmeans", "dictionary", "sae"]


def _unit(X: Tensor) -> Tensor:
    return torch.nn.functional.normalize(X, dim=1)


def spherical_kmeans(Xc: Tensor, n_concepts: int, seed: int = 0, progress: bool = False, *, max_iter: int = 100,
                     tol: float = 1e-6, n_init: int = 1) -> Dict[str, Tensor]:
    r"""Spherical k-means (Dhillon & Modha 2001), all ``K`` clusters at once.

    Args:
        Xc (Tensor): ``(N, C)`` centred PFVs.
        n_concepts (int): number of clusters K.
        seed (int, optional): seed of the k-means++ initialisation. Default: 0
        progress (bool, optional): progress bar over iterations. Default: False
        max_iter (int, optional): Lloyd iterations. Default: 100
        tol (float, optional): stop when the mean cosine cohesion improves by
                    less than this. Default: 1e-6
        n_init (int, optional): restarts; the most cohesive is kept. Default: 1

    Returns:
        dict: ``{"labels": (N,) int64}`` (ConceptBasis.fit makes the cluster means the concepts).
    """
    Y = _unit(Xc)
    n = Y.shape[0]
    gen = torch.Generator().manual_seed(seed)
    best_labels, best_cohesion = None, -math.inf
    for _ in range(n_init):
        # k-means++ on the cosine distance 1 - cos
        first = int(torch.randint(n, (1,), generator=gen))
        centers = [Y[first]]
        dist = (1 - Y @ Y[first]).clamp_min(0)
        for _k in range(1, n_concepts):
            p = dist.double().cpu()
            total = float(p.sum())
            if total <= 0:
                idx = int(torch.randint(n, (1,), generator=gen))
            else:
                idx = int(torch.multinomial(p / total, 1, generator=gen))
            centers.append(Y[idx])
            dist = torch.minimum(dist, (1 - Y @ Y[idx]).clamp_min(0))
        C = torch.stack(centers)
        previous = -math.inf
        for _it in tqdm(range(max_iter), disable=not progress, desc="spherical k-means", unit="it"):
            sim = Y @ C.t()
            cos, labels = sim.max(1)
            cohesion = float(cos.mean())
            sums = torch.zeros_like(C).index_add_(0, labels, Y)
            counts = torch.bincount(labels, minlength=n_concepts)
            empty = (counts == 0).nonzero().flatten()
            if empty.numel():  # re-seed empty clusters with the least well represented PFVs
                worst = torch.argsort(cos)[: empty.numel()]
                sums[empty] = Y[worst]
                labels = labels.clone()
                labels[worst] = empty
            C = _unit(sums)
            if cohesion - previous < tol and not empty.numel():
                break
            previous = cohesion
        labels = (Y @ C.t()).argmax(1)
        counts = torch.bincount(labels, minlength=n_concepts)
        missing = (counts == 0).nonzero().flatten()
        if missing.numel():  # keep every concept non-empty
            cos = (Y @ C.t()).gather(1, labels.view(-1, 1)).squeeze(1)
            order = torch.argsort(cos)
            taken = 0
            for k in missing.tolist():
                while counts[labels[order[taken]]] <= 1:
                    taken += 1
                counts[labels[order[taken]]] -= 1
                labels[order[taken]] = k
                counts[k] = 1
                taken += 1
        cohesion = float((Y * _unit(torch.zeros_like(C).index_add_(0, labels, Y))[labels]).sum(1).mean())
        if cohesion > best_cohesion:
            best_cohesion, best_labels = cohesion, labels
    return {"labels": best_labels}


def fit_dictionary(Xc: Tensor, n_concepts: int, seed: int = 0, progress: bool = False, *, alpha: float = 1.0,
                   alpha_scale: str = "relative", max_iter: int = 20, batch_size: int = 256,
                   transform_algorithm: str = "lasso_lars") -> Dict[str, Tensor]:
    r"""Dictionary learning with scikit-learn's ``MiniBatchDictionaryLearning`` (the paper's baseline).

    Args:
        Xc (Tensor): ``(N, C)`` centred PFVs.
        n_concepts (int): dictionary size K.
        seed (int, optional): ``random_state``. Default: 0
        progress (bool, optional): sklearn's verbose output. Default: False
        alpha (float, optional): sparsity weight of the dictionary fit.
                    Default: 1.0
        alpha_scale (str, optional): ``"relative"`` multiplies ``alpha`` by
                    the mean PFV norm / sqrt(C) so one value suits every layer;
                    ``"absolute"`` uses it as is. Default: ``"relative"``
        max_iter (int, optional): passes over the data. Default: 20
        batch_size (int, optional): mini-batch size. Default: 256
        transform_algorithm (str, optional): sklearn's coding algorithm
                    (the paper: LARS). Default: ``"lasso_lars"``

    Returns:
        dict: ``{"vectors": (K, C)}`` unit-norm atoms.
    """
    from sklearn.decomposition import MiniBatchDictionaryLearning

    if alpha_scale not in ("relative", "absolute"):
        raise ValueError(f"alpha_scale must be 'relative' or 'absolute'; got {alpha_scale!r}")
    X = Xc.detach().double().cpu().numpy()
    a = alpha
    if alpha_scale == "relative":
        a = alpha * float(Xc.norm(dim=1).mean()) / math.sqrt(Xc.shape[1])
    dl = MiniBatchDictionaryLearning(
        n_components=n_concepts, alpha=a, max_iter=max_iter, batch_size=batch_size, random_state=seed,
        transform_algorithm=transform_algorithm, verbose=bool(progress),
    )
    dl.fit(X)
    V = torch.from_numpy(dl.components_).to(device=Xc.device, dtype=Xc.dtype)
    return {"vectors": V}


def fit_sae(Xc: Tensor, n_concepts: int, seed: int = 0, progress: bool = False, *, l1_coefficient: float = 5.0,
            n_steps: int = 3000, batch_size: int = 512, lr: float = 1e-3, warmup: float = 0.05) -> Dict[str, Tensor]:
    r"""Train a sparse autoencoder with the loss of eq. 11 and return its decoder columns.

    The PFVs are scaled by one constant so that ``E ||x||^2 = n`` (Templeton
    et al. 2024); the decoder starts as random directions of norm 0.1 with
    ``W_e = W_d^T``; Adam, the sparsity weight ramped up over the first
    ``warmup`` share of the steps. Everything is drawn from a generator seeded
    with ``seed`` (no global RNG state is touched), so on CPU the result is
    reproducible.

    The concept vector of latent ``i`` is its decoder column ``W_d,i`` times
    the latent's mean non-zero activation (in the PFVs' units): the typical
    contribution of the concept, comparable with the cluster means of the
    clustering methods. Dead latents keep their direction with the median scale.

    Args:
        Xc (Tensor): ``(N, C)`` centred PFVs.
        n_concepts (int): latents m (the paper: 8 x C).
        seed (int, optional): seed. Default: 0
        progress (bool, optional): progress bar over steps. Default: False
        l1_coefficient (float, optional): lambda of eq. 11. Default: 5.0
        n_steps (int, optional): Adam steps. Default: 3000
        batch_size (int, optional): PFVs per step. Default: 512
        lr (float, optional): learning rate. Default: 1e-3
        warmup (float, optional): share of steps over which lambda ramps up
                    from 0. Default: 0.05

    Returns:
        dict: ``{"vectors": (K, C)}``.
    """
    gen = torch.Generator().manual_seed(seed)
    device, dtype = Xc.device, Xc.dtype
    n_pfvs, n = Xc.shape
    m = n_concepts
    scale = math.sqrt(n / float(Xc.pow(2).sum(1).mean().clamp_min(1e-30)))
    X = (Xc.detach() * scale).to(dtype)
    W_d = torch.randn(n, m, generator=gen, dtype=dtype).to(device)
    W_d = (0.1 * W_d / W_d.norm(dim=0, keepdim=True)).requires_grad_(True)
    W_e = W_d.detach().t().clone().requires_grad_(True)
    b_e = torch.zeros(m, dtype=dtype, device=device, requires_grad=True)
    b_d = torch.zeros(n, dtype=dtype, device=device, requires_grad=True)
    params = [W_e, b_e, W_d, b_d]
    opt = torch.optim.Adam(params, lr=lr)
    ramp = max(1, int(warmup * n_steps))
    with torch.enable_grad():
        for step in tqdm(range(n_steps), disable=not progress, desc="SAE", unit="step"):
            idx = torch.randint(n_pfvs, (min(batch_size, n_pfvs),), generator=gen).to(device)
            x = X[idx]
            f = torch.relu(x @ W_e.t() + b_e)
            x_hat = f @ W_d.t() + b_d
            lam = l1_coefficient * min(1.0, (step + 1) / ramp)
            loss = (x - x_hat).pow(2).sum(1).mean() + lam * (f * W_d.norm(dim=0)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        f = torch.relu(X @ W_e.t() + b_e)
        active = (f > 0).sum(0)
        mean_act = f.sum(0) / active.clamp_min(1)
        contribution = mean_act * W_d.norm(dim=0)
        alive = active > 0
        fallback = contribution[alive].median() if bool(alive.any()) else torch.tensor(1.0, dtype=dtype)
        units = W_d / W_d.norm(dim=0, keepdim=True).clamp_min(1e-30)
        size = torch.where(alive, contribution, fallback.to(contribution))
        V = (units * size).t() / scale  # (m, n) in the PFVs' units
    return {"vectors": V.detach().contiguous()}


def _kmeans(Xc, n_concepts, seed, progress, **kwargs):
    return spherical_kmeans(Xc, n_concepts, seed=seed, progress=progress, **kwargs)


def _dictionary(Xc, n_concepts, seed, progress, **kwargs):
    return fit_dictionary(Xc, n_concepts, seed=seed, progress=progress, **kwargs)


def _sae(Xc, n_concepts, seed, progress, **kwargs):
    return fit_sae(Xc, n_concepts, seed=seed, progress=progress, **kwargs)


register_extractor("kmeans", _kmeans)
register_extractor("dictionary", _dictionary)
register_extractor("sae", _sae)
