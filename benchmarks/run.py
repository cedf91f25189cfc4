"""Benchmarks of captum_gig against the tools a user would otherwise glue together.

    python benchmarks/run.py [--quick] [--device cuda] [--only decompose,cluster,gig,memory,peers]
    python benchmarks/run.py --only peers [--quick]        # against faiss, skglm and celer (pip install -e '.[bench]')
    python benchmarks/run.py --only scale [--device cuda]   # ImageNet-scale layer: fit + decomposition

Every comparison runs both sides in one process, each ``--repeats`` times, and
reports medians; each part (decompose, cluster, ...) runs in a process of its
own. Results go to ``benchmarks/results/<mode>-<device>.json`` and ``.md``; the run ends with one line per comparison, ``ratio <name> <value>``
(peer time / our time, higher is better) and ``quality <name> <value>``.

Where a peer is too slow to run at the stated size it is run on a subsample of
the PFVs (or of the targets) and extrapolated linearly -- its cost is linear in
the number of PFVs (targets) -- and the table says so.

``peers`` (parts ``decompose_peers`` and ``cluster_peers``) compares with the
strongest specialised peers: skglm's and celer's Lasso, faiss's spherical
k-means. They are benchmark-only dependencies (the ``bench`` extra); a missing
one is reported in one line and its rows are skipped.
"""

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from synthetic import concept_matrix, relu_like_pfvs  # noqa: E402

from captum_gig import ConceptBasis, PFVDecomposer, alpha_max  # noqa: E402
from captum_gig._io import atomic_write_text  # noqa: E402
from captum_gig.concepts import BisectingSphericalKMeans  # noqa: E402
from captum_gig.decompose import lasso_objective  # noqa: E402

ROWS = []  # (name, ours_s, peer_s, ratio, quality, note)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device="cpu"):
    """Median wall time of ``fn()`` over ``repeats`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def record(name, ours, peer, quality=None, note=""):
    ratio = peer / ours if ours > 0 else float("inf")
    ROWS.append(dict(name=name, ours_s=ours, peer_s=peer, ratio=ratio, quality=quality, note=note))
    q = "" if quality is None else f" quality {quality:.6f}"
    print(f"  {name}: ours {ours:.3f}s peer {peer:.3f}s ratio {ratio:.2f}{q}  {note}", flush=True)


# -- Lasso decomposition ------------------------------------------------------------------------
def _our_decomposition(n, c, k, args):
    """One decomposition case, timed with our Lasso: ``(V, alpha, centred X, seconds, U)`` (X and U float64 on CPU)."""
    X = relu_like_pfvs(n, c, seed=0)
    V, mu = concept_matrix(k, c)
    basis = ConceptBasis(V, mu)
    alpha = float(args.alpha_fraction * alpha_max(basis, X).median())
    dev = args.device
    dec = PFVDecomposer(basis.to(dev), alpha=alpha, tol=1e-4)
    Xd = X.to(dev)
    dec.transform(Xd[:8])  # Gram matrix and Lipschitz constant: once per basis, reused over layers' data
    ours, U = timed(lambda: dec.transform(Xd), args.repeats, dev)
    return V, alpha, (X - mu).double(), ours, U.double().cpu()


def bench_decompose(sizes, args):
    from sklearn.decomposition import sparse_encode

    sparse_encode(torch.rand(4, 8).numpy(), torch.rand(16, 8).numpy(), algorithm="lasso_cd", alpha=0.1, n_jobs=2)
    for n, c, k, n_sk, n_lars in sizes:
        V, alpha, Xc, ours, U = _our_decomposition(n, c, k, args)
        sub = slice(0, n_sk)
        Xs = Xc[sub].float().numpy()
        peer_t, U_sk = timed(
            lambda: sparse_encode(Xs, V.numpy(), algorithm="lasso_cd", alpha=alpha, n_jobs=2), max(1, args.repeats - 1)
        )
        U_sk = torch.from_numpy(U_sk).double()
        Vd = V.double()
        ours_obj = float(lasso_objective(Xc[sub], U[sub], Vd, alpha).sum())
        sk_obj = float(lasso_objective(Xc[sub], U_sk, Vd, alpha).sum())
        zero_agree = float(((U[sub] != 0) == (U_sk != 0)).double().mean())
        nnz = float((U != 0).sum(1).double().mean())
        tag = f"N={n},C={c},K={k}"
        note = (f"{tag}; alpha={args.alpha_fraction}*median alpha_max, {nnz:.0f} non-zeros/PFV; zero patterns agree "
                f"{zero_agree:.4f}; sklearn n_jobs=2")
        if n_sk < n:
            note += f"; sklearn run on {n_sk} PFVs, time x{n / n_sk:.1f} (linear in N)"
        record(f"decompose_vs_sklearn_cd[{tag}]", ours, peer_t * n / n_sk, ours_obj / sk_obj, note)
        if n_lars:
            Xl = Xc[:n_lars].float().numpy()
            lars_t, U_l = timed(lambda: sparse_encode(Xl, V.numpy(), algorithm="lasso_lars", alpha=alpha, n_jobs=2), 1)
            U_l = torch.from_numpy(U_l).double()
            q = float(lasso_objective(Xc[:n_lars], U[:n_lars], Vd, alpha).sum()
                      / lasso_objective(Xc[:n_lars], U_l, Vd, alpha).sum())
            record(f"decompose_vs_sklearn_lars[{tag}]", ours, lars_t * n / n_lars, q,
                   f"{tag}; sklearn lasso_lars on {n_lars} PFVs, time x{n / n_lars:.1f}")


def _peer(module, rows):
    """The peer ``module``, or None (after one line saying so) when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # an OSError of a broken native library is a real failure: not caught
        print(f"  {module} is not installed ({e}): skipping the {rows} rows (pip install -e '.[bench]')", flush=True)
        return None


PEER_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8)  # the peers' tolerances, loosest first


def bench_decompose_peers(sizes, args):
    """Ours against skglm's and celer's Lasso: one regression per PFV, design ``V^T (C x K)``, ``alpha / C``.

    sklearn-style estimators minimise ``1/(2 n_samples) ||y - X w||^2 + alpha' ||w||_1``; with ``n_samples = C``
    and ``alpha' = alpha / C`` that is our per-PFV objective divided by C (checked on the data below). Each peer
    gets the loosest tolerance of ``PEER_TOLS`` at which every PFV's objective is within 0.1% of ours, and is
    timed single-threaded on a subsample, extrapolated to N and credited with perfect scaling over the cores
    torch uses (the problems are independent).
    """
    import numpy as np
    from threadpoolctl import threadpool_limits

    peers = []
    for module in ("skglm", "celer"):
        mod = _peer(module, f"decompose_vs_{module}")
        if mod is not None:
            peers.append((module, mod.Lasso))
    if not peers:
        return
    cores = torch.get_num_threads() if torch.device(args.device).type == "cpu" else 1
    for n, c, k, n_peer in sizes:
        V, alpha, Xc, ours, U = _our_decomposition(n, c, k, args)
        Vd = V.double()
        A = np.asfortranarray(Vd.numpy().T)  # the design matrix (C x K), in the layout both peers use
        Y = Xc[:n_peer].numpy()
        ours_obj = lasso_objective(Xc[:n_peer], U[:n_peer], Vd, alpha)
        # the objective mapping: ours = C x the peers' objective at alpha / C
        w, y = U[0].numpy(), Y[0]
        peer_form = 0.5 / c * float(np.sum((y - A @ w) ** 2)) + alpha / c * float(np.abs(w).sum())
        mapping = c * peer_form / float(ours_obj[0])
        assert abs(mapping - 1) < 1e-9, mapping
        nnz = float((U != 0).sum(1).double().mean())
        tag = f"N={n},C={c},K={k}"
        for name, Lasso in peers:
            def solve(tol, rows=n_peer):
                est = Lasso(alpha=alpha / c, tol=tol, fit_intercept=False, warm_start=False)
                W = np.empty((rows, k))
                for i in range(rows):
                    W[i] = est.fit(A, Y[i]).coef_
                return W

            # one thread, credited below with perfect scaling over the cores: on an idle machine 2 BLAS threads
            # gave skglm at most 10% and celer nothing, and on a busy one they made skglm 2x slower
            with threadpool_limits(1):
                solve(1e-4, 2)  # warm-up before any timing: numba's JIT compilation (skglm), first calls
                for tol in PEER_TOLS:  # the loosest tolerance reaching ours on every PFV of the subsample
                    q_each = ours_obj / lasso_objective(Xc[:n_peer], torch.from_numpy(solve(tol)), Vd, alpha)
                    matched = float(q_each.min()) >= 0.999
                    if matched:
                        break
                peer_t, W = timed(lambda: solve(tol), max(1, args.repeats - 1))
            W = torch.from_numpy(W)
            peer_obj = lasso_objective(Xc[:n_peer], W, Vd, alpha)
            q_each = ours_obj / peer_obj
            q = float(ours_obj.sum() / peer_obj.sum())
            zero_agree = float(((U[:n_peer] != 0) == (W != 0)).double().mean())
            seq = peer_t * n / n_peer
            how = (f"loosest of {PEER_TOLS[0]:g}..{PEER_TOLS[-1]:g} with every PFV's objective within 0.1% of ours"
                   if matched else "NOT within 0.1% of ours on every PFV even at the tightest tolerance")
            note = (f"{tag}; alpha={args.alpha_fraction}*median alpha_max (peer: alpha/C={alpha / c:.4g}), {nnz:.0f} "
                    f"non-zeros/PFV; {name} tol={tol:g} ({how}); objective ours/{name} per PFV "
                    f"{float(q_each.min()):.6f}..{float(q_each.max()):.6f}; zero patterns agree {zero_agree:.4f}; "
                    f"objective mapping C*peer/ours {mapping:.12f}; {name} one PFV per fit, fit_intercept=False, "
                    f"warm_start=False, 1 thread, on {n_peer} PFVs, time x{n / n_peer:.0f} (linear in N) = {seq:.2f}s "
                    f"on one core, /{cores} (perfect scaling over {cores} cores credited to the peer); ratio to the "
                    f"peer on one core {seq / ours:.1f}")
            record(f"decompose_vs_{name}[{tag}]", ours, seq / cores, q, note)


# -- clustering ---------------------------------------------------------------------------------
def cohesion(Xn, labels, k):
    """Mean cosine similarity of unit rows to the normalised sum of their cluster."""
    sums = torch.zeros(k, Xn.shape[1], dtype=Xn.dtype).index_add_(0, labels, Xn)
    centres = torch.nn.functional.normalize(sums, dim=1)
    return float((Xn * centres[labels]).sum(1).mean())


def bench_cluster(sizes, args):
    from sklearn.cluster import BisectingKMeans

    for n, c, k in sizes:
        X = relu_like_pfvs(n, c, seed=3)
        Xc = X - X.mean(0)
        Xn = torch.nn.functional.normalize(Xc, dim=1)
        dev = args.device
        Xd = Xc.to(dev)
        # ours with the default tolerance and with tol=0 (every 2-means to a fixed point) and sklearn alternate,
        # so that all see the same machine (a shared one drifts over a minute)
        ours_t, strict_t, peer_t = [], [], []
        for _ in range(args.repeats):
            t, km = timed(lambda: BisectingSphericalKMeans(k, seed=0).fit(Xd), 1, dev)
            ours_t.append(t)
            t, km0 = timed(lambda: BisectingSphericalKMeans(k, seed=0, tol=0.0).fit(Xd), 1, dev)
            strict_t.append(t)
            t, sk = timed(
                lambda: BisectingKMeans(k, bisecting_strategy="largest_cluster", random_state=0, n_init=1).fit(Xn.numpy()),
                1,
            )
            peer_t.append(t)
        peer = statistics.median(peer_t)
        q_sk = cohesion(Xn, torch.from_numpy(sk.labels_).long(), k)
        for tag, model, times in (("", km, ours_t), ("_tol0", km0, strict_t)):
            q_ours = cohesion(Xn, model.labels_.cpu().long(), k)
            record(f"cluster{tag}_vs_sklearn_bisecting[N={n},C={c},K={k}]", statistics.median(times), peer, q_ours / q_sk,
                   f"tol={model.tol}; cohesion (mean cosine to concept) ours {q_ours:.4f} sklearn {q_sk:.4f} "
                   "(sklearn on unit rows)")


FAISS_NITERS = (1, 2, 3, 5, 8, 12, 16, 25, 40, 64, 100)  # tried in turn until faiss's cohesion reaches ours
FAISS_NREDOS = (2, 4, 8)  # then, at the best niter, more restarts


def bench_cluster_peers(sizes, args):
    """Ours (as bench_cluster fits it) against ``faiss.Kmeans(spherical=True)`` at equal cohesion.

    faiss gets the smallest ``niter`` of ``FAISS_NITERS`` (then ``nredo`` of ``FAISS_NREDOS``) whose cohesion
    reaches ours -- or its best setting, said in the note -- and is also timed at its default ``niter``. Its time
    is ``train`` plus one search of the rows for their labels (what our fit returns).
    """
    import numpy as np

    faiss = _peer("faiss", "cluster_vs_faiss_spherical")
    if faiss is None:
        return
    threads = torch.get_num_threads() if torch.device(args.device).type == "cpu" else 2
    faiss.omp_set_num_threads(threads)
    default_niter = faiss.ClusteringParameters().niter
    for n, c, k in sizes:
        X = relu_like_pfvs(n, c, seed=3)
        Xc = X - X.mean(0)
        Xn = torch.nn.functional.normalize(Xc, dim=1)
        xn = np.ascontiguousarray(Xn.numpy(), dtype=np.float32)  # faiss clusters the unit rows, like sklearn
        dev = args.device
        Xd = Xc.to(dev)

        def fit_faiss(niter, nredo=1, parts=None):
            # min_points_per_centroid=1 only silences the warning about fewer than 39 rows per centroid
            km = faiss.Kmeans(c, k, spherical=True, niter=niter, nredo=nredo, seed=1234, min_points_per_centroid=1)
            t = time.perf_counter()
            km.train(xn)
            t1 = time.perf_counter()
            labels = km.assign(xn)[1]
            if parts is not None:
                parts.append((t1 - t, time.perf_counter() - t1))
            return torch.from_numpy(labels.astype(np.int64))

        km = BisectingSphericalKMeans(k, seed=0).fit(Xd)  # the cohesion to reach (the fit is deterministic)
        q_ours = cohesion(Xn, km.labels_.cpu().long(), k)
        tried = []  # (niter, nredo, cohesion)

        def attempt(niter, nredo):
            tried.append((niter, nredo, cohesion(Xn, fit_faiss(niter, nredo), k)))
            return tried[-1][2] >= q_ours

        reached = any(attempt(niter, 1) for niter in FAISS_NITERS)  # stops at the first that reaches ours
        if not reached:  # more restarts at the best niter
            best_niter = max(tried, key=lambda t: t[2])[0]
            reached = any(attempt(best_niter, nredo) for nredo in FAISS_NREDOS)
        niter, nredo, _ = tried[-1] if reached else max(tried, key=lambda t: t[2])
        tried = ", ".join(f"{a}/{b}: {q:.4f}" for a, b, q in tried)
        # ours, faiss at the matched setting and faiss at its default alternate, so that all see the same machine
        ours_t, match_t, default_t, match_parts, default_parts = [], [], [], [], []
        for _ in range(args.repeats):
            t, km = timed(lambda: BisectingSphericalKMeans(k, seed=0).fit(Xd), 1, dev)
            ours_t.append(t)
            t, lab_m = timed(lambda: fit_faiss(niter, nredo, match_parts), 1)
            match_t.append(t)
            t, lab_d = timed(lambda: fit_faiss(default_niter, 1, default_parts), 1)
            default_t.append(t)
        q_ours = cohesion(Xn, km.labels_.cpu().long(), k)
        ours = statistics.median(ours_t)
        for what, lab, times, parts in (("", lab_m, match_t, match_parts),
                                        (f"_niter{default_niter}", lab_d, default_t, default_parts)):
            q_f = cohesion(Xn, lab, k)
            train = statistics.median(p[0] for p in parts)
            search = statistics.median(p[1] for p in parts)
            if what:
                how = f"faiss at its default niter={default_niter}"
            elif reached:
                how = (f"faiss niter={niter} nredo={nredo}: the smallest setting tried whose cohesion reaches ours "
                       f"(niter/nredo: cohesion {tried})")
            else:
                how = (f"faiss CANNOT reach our cohesion at the settings tried: its best, niter={niter} "
                       f"nredo={nredo}, is shown (niter/nredo: cohesion {tried})")
            record(f"cluster{what}_vs_faiss_spherical[N={n},C={c},K={k}]", ours, statistics.median(times),
                   q_ours / q_f,
                   f"{how}; cohesion (mean cosine to concept) ours {q_ours:.4f} faiss {q_f:.4f}; faiss time = train "
                   f"{train:.3f}s + one search for the labels {search:.3f}s, {threads} OpenMP threads, on the unit "
                   f"rows; ours tol={km.tol}; {args.repeats} alternating repeats")


# -- GIG ----------------------------------------------------------------------------------------
def _resnet(args):
    import torchvision

    arch = getattr(torchvision.models, args.arch)
    torch.manual_seed(0)
    model = arch(weights=None).eval().to(args.device)
    return model


def _basis_from(acts, k, seed):
    """Concepts drawn from the layer's own PFVs (centred), offset = their mean: realistic and instant."""
    P = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(P.shape[0], (k, 4), generator=g)
    mu = P.mean(0)
    V = P[idx.to(P.device)].mean(1) - mu + 0.01 * torch.randn(k, P.shape[1], generator=g).to(P)
    return ConceptBasis(V, mu)


def bench_gig(args):
    from captum.attr import LayerIntegratedGradients

    from captum_gig import GeneralizedIntegratedGradients

    dev = args.device
    model = _resnet(args)
    la, lb = args.layers
    blk_a = model.get_submodule(la)
    size = args.image_size
    image = torch.rand(1, 3, size, size, device=dev)
    images = torch.rand(4, 3, size, size, device=dev)

    def upto(x, stop):
        """The torchvision ResNet forward, stopped after ``stop`` (a block name 'layerI.J')."""
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for j, block in enumerate(model.get_submodule(name)):
                x = block(x)
                if f"{name}.{j}" == stop:
                    return x
        raise ValueError(stop)

    with torch.no_grad():
        acts_a, acts_b = upto(images, la), upto(images, lb)
    ka, kb = args.k_factor * acts_a.shape[1], args.k_factor * acts_b.shape[1]
    dec_a = PFVDecomposer(_basis_from(acts_a, ka, 0), alpha=float(0.3 * alpha_max(_basis_from(acts_a, ka, 0),
                          acts_a.permute(0, 2, 3, 1).reshape(-1, acts_a.shape[1])).median()))
    dec_b = PFVDecomposer(_basis_from(acts_b, kb, 1))
    gig = GeneralizedIntegratedGradients(model, la, dec_a, lb, dec_b)
    full = GeneralizedIntegratedGradients(model, la, dec_a, lb, dec_b, slicing=False)
    n_steps, ibs = args.n_steps, args.n_steps
    target = 3
    vbar = dec_b.basis.normalized_vectors[target]

    def projection(x):
        return (upto(x, lb) * vbar.view(1, -1, 1, 1)).sum((2, 3))

    lig = LayerIntegratedGradients(lambda x: projection(x)[:, 0], blk_a)
    gig.attribute(image, target=target, n_steps=2)  # slicing, Gram caches: set up once per layer pair
    full.attribute(image, target=target, n_steps=2)
    reps = args.repeats
    ours, attr = timed(lambda: gig.attribute(image, target=target, n_steps=n_steps, internal_batch_size=ibs), reps, dev)
    peer, _ = timed(lambda: lig.attribute(image, n_steps=n_steps, internal_batch_size=ibs), reps, dev)
    record(f"gig_single_vs_captum[{args.arch} {la}->{lb}, {size}px, {n_steps} steps]", ours, peer, None,
           "same n_steps and internal_batch_size; Captum LIG with a forward returning the target projection")
    hooks, attr_full = timed(lambda: full.attribute(image, target=target, n_steps=n_steps, internal_batch_size=ibs),
                             reps, dev)
    record("gig_suffix_vs_full", ours, hooks, float((attr - attr_full).abs().max() / attr.abs().max().clamp_min(1e-30)),
           "sliced sub-network vs hooks on the full model; quality = max relative difference of the attributions")

    # floor: n_steps x (forward + backward of only the sub-network between a and b)
    suffix = gig._suffix
    with torch.no_grad():
        za = upto(image, la)

    def floor_single():
        z = za.repeat(n_steps, 1, 1, 1).requires_grad_(True)
        out = (suffix(z) * vbar.view(1, -1, 1, 1)).sum()
        return torch.autograd.grad(out, z)[0]

    # ours and the floor alternate, so that both see the same machine (a shared one drifts over a minute)
    pairs = [(timed(lambda: gig.attribute(image, target=target, n_steps=n_steps, internal_batch_size=ibs), 1, dev)[0],
              timed(floor_single, 1, dev)[0]) for _ in range(max(reps, 5))]
    record("gig_single_vs_floor", statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs), None,
           f"peer = floor (n_steps forward+backward of the sub-network), the two alternating {len(pairs)} times; "
           "ratio >= 0.67 means within 1.5x of the floor")

    # matrix: every layer-b concept; Captum loops over targets (timed on a few, extrapolated linearly)
    c_b = acts_b.shape[1]
    dirs = args.matrix_dirs or c_b  # readout directions actually run; the full matrix needs C_b of them
    if dirs >= c_b:
        ours_m, _ = timed(lambda: gig.attribute_matrix(image, n_steps=n_steps, internal_batch_size=ibs), 1, dev)
        how = "full attribute_matrix"
    else:  # time `dirs` target directions (one backward each) and scale to the C_b the full matrix uses
        t_dirs, _ = timed(lambda: gig.attribute_matrix(image, list(range(dirs)), n_steps=n_steps,
                                                       internal_batch_size=ibs), 1, dev)
        ours_m = t_dirs * c_b / dirs
        how = f"ours timed on {dirs} readout directions, x{c_b / dirs:.0f} to the C_b={c_b} the full matrix needs"
    loop_targets = args.loop_targets
    vb = dec_b.basis.normalized_vectors

    def captum_loop():
        for t in range(loop_targets):
            LayerIntegratedGradients(lambda x, t=t: (upto(x, lb) * vb[t].view(1, -1, 1, 1)).sum((1, 2, 3)),
                                     blk_a).attribute(image, n_steps=n_steps, internal_batch_size=ibs)

    loop_t, _ = timed(captum_loop, 1, dev)
    record(f"gig_matrix_vs_captum_loop[K_b={kb}]", ours_m, loop_t * kb / loop_targets, None,
           f"Captum loop timed on {loop_targets} targets, x{kb / loop_targets:.0f} to all K_b={kb}; {how}")

    def floor_matrix():
        z = za.repeat(n_steps, 1, 1, 1).requires_grad_(True)
        out = suffix(z).sum((2, 3))  # (n_steps, C_b)
        eye = torch.eye(c_b, device=dev)[: min(dirs, c_b)]
        for s in range(0, eye.shape[0], 32):
            torch.autograd.grad(out, z, eye[s : s + 32].unsqueeze(1).expand(-1, n_steps, -1), retain_graph=True,
                                is_grads_batched=True)

    floor_m, _ = timed(floor_matrix, 1, dev)
    floor_m *= c_b / min(dirs, c_b)
    record("gig_vs_floor", ours_m, floor_m, None,
           f"attribute_matrix vs its floor: n_steps forwards + C_b={c_b} batched backwards of the sub-network "
           f"(both timed on {min(dirs, c_b)} directions); ratio >= 0.67 means within 1.5x")


# -- memory of a streamed large decomposition ---------------------------------------------------
MEMORY_CHILD = r"""
import resource, sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
from synthetic import relu_like_pfvs
from synthetic import concept_matrix
from captum_gig import ConceptBasis, PFVDecomposer, alpha_max
n, c, k, dev = {n}, {c}, {k}, {dev!r}
V, mu = concept_matrix(k, c, device=dev)
X = relu_like_pfvs(n, c, seed=0, device=dev)
basis = ConceptBasis(V, mu)
dec = PFVDecomposer(basis, alpha=float(0.3 * alpha_max(basis, X[:256]).median()), chunk_size={chunk})
if dev == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:  # reset the RSS high-water mark (Linux), so set-up transients do not hide the solver's peak
    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    open("/proc/self/clear_refs", "w").write("5")
    base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
t = time.perf_counter()
U = dec.transform(X)
if dev == "cuda":
    torch.cuda.synchronize()
el = time.perf_counter() - t
peak = torch.cuda.max_memory_allocated() if dev == "cuda" else hwm()
output = U.numel() * U.element_size()  # the coefficients are an output: not counted
nnz = float((U != 0).sum(1).double().mean())
print("RESULT", (peak - base - output) / 2**30, el, nnz)
"""


def bench_memory(args):
    n, c, k, chunk = args.memory_size
    code = MEMORY_CHILD.format(root=os.path.dirname(HERE), here=HERE, n=n, c=c, k=k, dev=args.device, chunk=chunk)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    if not line:
        print(out.stderr[-2000:])
        return
    gib, el, nnz = map(float, line[0].split()[1:])
    # beyond inputs and outputs the solver holds the K x K float64 Gram matrix and O(chunk x K) buffers;
    # at the paper's scale (K=16384, chunk 4096) that is 2 GiB + chunk buffers, independent of N
    ROWS.append(dict(name=f"memory_streamed[N={n},C={c},K={k},chunk={chunk}]", ours_s=el, peer_s=None, ratio=None,
                     quality=gib, note=f"quality = peak GiB beyond inputs and the (N x K) output (RSS high-water mark on CPU, "
                          f"peak allocated on CUDA); {nnz:.0f} non-zeros/PFV"))
    print(f"  memory: {gib:.2f} GiB beyond inputs/outputs, {el:.1f}s", flush=True)


# -- an ImageNet-scale layer: fit and decomposition times (no peer) -----------------------------
def bench_scale(args):
    n, c, k = args.scale_size
    dev = args.device
    X = relu_like_pfvs(n, c, seed=0, device=dev)
    sync(dev)
    t = time.perf_counter()
    basis = ConceptBasis.fit(X, k, offset="mean", progress=False)
    sync(dev)
    fit_s = time.perf_counter() - t
    alpha = float(args.alpha_fraction * alpha_max(basis, X[:1024]).median())
    dec = PFVDecomposer(basis, alpha=alpha, chunk_size=4096)
    sync(dev)
    t = time.perf_counter()
    U = dec.transform(X)  # includes the K x K Gram matrix, formed once per basis
    sync(dev)
    dec_s = time.perf_counter() - t
    nnz = float((U != 0).sum(1).double().mean())
    for what, sec, goal in (("fit", fit_s, 60), ("decompose", dec_s, 120)):
        ROWS.append(dict(name=f"scale_{what}[N={n},C={c},K={k}]", ours_s=sec, peer_s=None, ratio=None, quality=None,
                         note=f"target on one H100: < {goal} s; {nnz:.0f} non-zeros/PFV" + (
                             "; includes the K x K Gram matrix" if what == "decompose" else "")))
        print(f"  scale {what}: {sec:.1f}s", flush=True)


PARTS = ("decompose", "decompose_peers", "cluster", "cluster_peers", "gig", "memory", "scale")
PEER_PARTS = ("decompose_peers", "cluster_peers")  # what --only peers means


def _without_only(argv):
    """``argv`` less its ``--only`` option (given as ``--only X`` or ``--only=X``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--only":
            skip = True
        elif not arg.startswith("--only="):
            out.append(arg)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, < 3 min on 2 CPU cores")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default="decompose,cluster,gig,memory,peers",
                   help="comma-separated parts of " + ", ".join(PARTS) + "; 'peers' = " + ",".join(PEER_PARTS) +
                   " (faiss, skglm, celer; skipped when not installed); 'scale' (an ImageNet-scale layer, minutes "
                   "on a CPU) is opt-in")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--memory-size", dest="memory_size_arg", default=None, metavar="N,C,K,CHUNK",
                   help="size of the streamed-memory run (the paper's scale: 50000,2048,16384,4096)")
    p.add_argument("--rows-to", default=None, help=argparse.SUPPRESS)  # a part run in its own process: its rows
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    a.alpha_fraction = 0.3
    if a.quick:
        a.repeats = a.repeats or 3
        decompose = [(400, 128, 1024, 100, 0), (400, 256, 2048, 50, 0)]
        decompose_peers = [(400, 128, 1024, 40), (400, 256, 2048, 40)]  # N, C, K, PFVs the peers solve
        cluster = [(4000, 128, 256)]
        a.arch, a.layers, a.image_size, a.n_steps, a.k_factor, a.loop_targets = "resnet18", ("layer3.1", "layer4.1"), 112, 16, 8, 2
        a.matrix_dirs = 32
        a.memory_size = (2048, 256, 2048, 512)
        a.scale_size = (5000, 256, 1024)
    else:
        a.repeats = a.repeats or 3
        decompose = [(2000, 256, 2048, 40, 10), (2000, 1024, 8192, 10, 0)]
        decompose_peers = [(2000, 256, 2048, 40), (2000, 1024, 8192, 40)]
        cluster = [(20000, 512, 512), (20000, 512, 4096)]
        a.arch, a.layers, a.image_size, a.n_steps, a.k_factor, a.loop_targets = "resnet50", ("layer3.5", "layer4.0"), 224, 50, 8, 8
        a.matrix_dirs = 64
        a.memory_size = (8192, 1024, 8192, 4096)
        a.scale_size = (50000, 2048, 16384)
    if a.memory_size_arg is not None:
        a.memory_size = tuple(int(v) for v in a.memory_size_arg.split(","))
    asked = set(a.only.split(","))
    asked |= set(PEER_PARTS) if "peers" in asked else set()
    only = [part for part in PARTS if part in asked]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)) if a.device == "cpu" else torch.get_num_threads())
    start = time.time()
    if len(only) > 1:
        # each part in a process of its own (ours and the peer still side by side in it): the memory state one
        # part leaves behind slowed the next part's allocations (clustering 15-25% after the decomposition)
        for part in only:
            with tempfile.TemporaryDirectory() as tmp:
                rows = os.path.join(tmp, "rows.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), *_without_only(sys.argv[1:]), "--only", part,
                                "--rows-to", rows], check=True)
                with open(rows) as f:
                    ROWS.extend(json.load(f))
        only = []
    if "decompose" in only:
        print("decompose", flush=True)
        bench_decompose(decompose, a)
    if "decompose_peers" in only:
        print("decompose_peers", flush=True)
        bench_decompose_peers(decompose_peers, a)
    if "cluster" in only:
        print("cluster", flush=True)
        bench_cluster(cluster, a)
    if "cluster_peers" in only:
        print("cluster_peers", flush=True)
        bench_cluster_peers(cluster, a)
    if "gig" in only:
        print("gig", flush=True)
        bench_gig(a)
    if "memory" in only:
        print("memory", flush=True)
        bench_memory(a)
    if "scale" in only:
        print("scale", flush=True)
        bench_scale(a)
    if a.rows_to:
        with open(a.rows_to, "w") as f:
            json.dump(ROWS, f)
        return
    mode = "quick" if a.quick else "full"
    meta = dict(mode=mode, device=a.device, machine=platform.platform(), processor=platform.processor(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                load_average=os.getloadavg(), seconds=time.time() - start, repeats=a.repeats,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stem = os.path.join(HERE, "results", f"{mode}-{a.device}{a.tag}")
    atomic_write_text(stem + ".json", json.dumps(dict(meta=meta, rows=ROWS), indent=1))
    lines = [f"# captum_gig benchmarks ({mode}, {a.device})", "", "```", json.dumps(meta), "```", "",
             "| comparison | ours (s) | peer (s) | ratio | quality | how |", "|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in ROWS:
        lines.append(f"| {r['name']} | {fmt(r['ours_s'], '.3f')} | {fmt(r['peer_s'], '.3f')} | {fmt(r['ratio'], '.2f')} "
                     f"| {fmt(r['quality'], '.6f')} | {r['note']} |")
    atomic_write_text(stem + ".md", "\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md ({time.time() - start:.0f}s)")
    for r in ROWS:
        if r["ratio"] is not None:
            print(f"ratio {r['name']} {r['ratio']:.4g}")
        if r["quality"] is not None:
            print(f"quality {r['name']} {r['quality']:.6g}")


if __name__ == "__main__":
    main()
