"""The inter-layer attribute stage before and after, at equal numbers, on the configuration issue 18 measured.

The shipped Fashion-MNIST CNN, ``block1 -> block2`` (K = 128 -> 256 concepts, 8 x channels, fitted on
relevance-sampled PFVs of training images), 16 path points, on test images:

* **before**: every layer-b concept's column (``attribute_matrix`` with all K_b targets: the channel-linearity
  matrix, one backward per channel of block2) and the FISTA Lasso for layer a's coefficients -- what the
  attribute stage computed for every image when the issue was filed (219 ms per image there);
* **after**: what the stage computes now: the Lasso by the homotopy path (``solver="auto"``) and only the
  columns of the concepts a class graph keeps (the union over the 10 class graphs' ``top_k = 5`` block2
  concepts; one backward per target).

Both run in this process, alternating, on the same images; the script checks that the kept columns of the
two agree (the FISTA and homotopy coefficients differ within the Lasso's tolerance, so the attributions do
too) and prints ``ratio`` lines.

    python benchmarks/attribute_stage.py            # ~2 minutes on 2 cores
    python benchmarks/attribute_stage.py --quick
"""

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None, help="test images timed (default 32; quick 8)")
    ap.add_argument("--fit-images", type=int, default=None, help="training images the concepts come from")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_images = args.images or (8 if args.quick else 32)
    n_fit = args.fit_images or (1000 if args.quick else 5000)

    from captum_gig import ConceptBasis, GeneralizedIntegratedGradients, PFVDecomposer, alpha_max, collect_pfvs
    from captum_gig import zoo
    from captum_gig._hooks import run_until

    model = zoo.fashion_mnist_cnn()
    train, train_labels = zoo.fashion_mnist("train", limit=n_fit)
    test, _ = zoo.fashion_mnist("test", limit=n_images)
    decs = {}
    batches = [(train[i : i + 256], train_labels[i : i + 256]) for i in range(0, len(train), 256)]
    collected = collect_pfvs(model, ["block1", "block2"], batches, per_image=4, target="label", progress=False)
    for layer, pfvs in collected.items():
        k = 8 * pfvs.n_channels
        basis = ConceptBasis.fit(pfvs, k, offset=model.get_submodule(layer)[-1], seed=0)
        alpha = 0.1 * float(alpha_max(basis, pfvs.vectors).median())
        decs[layer] = basis, alpha
    basis_b = decs["block2"][0]
    # the columns a class graph keeps: each class's top-5 block2 concepts by class GIG
    gig_class = GeneralizedIntegratedGradients(model, "block2", PFVDecomposer(basis_b, alpha=decs["block2"][1]))
    logits = model(test).argmax(1)
    class_gig = gig_class.attribute(test, target=logits, n_steps=16).detach()
    # per class, as the stage does: the class's images, the block2 concepts its graph keeps (top 5 by class GIG)
    groups = {int(c): (logits == c).nonzero().flatten() for c in logits.unique()}
    keep = {c: sorted(int(q) for q in class_gig[rows].mean(0).topk(5).indices) for c, rows in groups.items()}

    def stage(solver: str, targets, n_steps: int = 16):
        """Seconds, attributions and deltas: ``targets`` a list for all images, or a dict per class."""
        dec_a = PFVDecomposer(decs["block1"][0], alpha=decs["block1"][1], solver=solver)
        gig = GeneralizedIntegratedGradients(model, "block1", dec_a, "block2", basis_b)
        t0 = time.perf_counter()
        if isinstance(targets, list):
            out, delta = gig.attribute_matrix(test, targets=targets, n_steps=n_steps, return_convergence_delta=True)
            return time.perf_counter() - t0, out.detach(), delta.detach()
        parts = {c: gig.attribute_matrix(test[groups[c]], targets=targets[c], n_steps=n_steps,
                                         return_convergence_delta=True) for c in groups}
        seconds = time.perf_counter() - t0
        return seconds, {c: m.detach() for c, (m, _d) in parts.items()}, {c: d.detach() for c, (_m, d) in parts.items()}

    all_targets = list(range(basis_b.n_concepts))
    before, after, after8 = [], [], []
    for _ in range(args.repeats):  # alternating, medians
        t, full, _d = stage("fista", all_targets)
        before.append(t)
        t, kept, delta16 = stage("auto", keep)
        after.append(t)
        t, kept8, delta8 = stage("auto", keep, 8)  # Gauss-Legendre with half the points
        after8.append(t)
    b, a, a8 = statistics.median(before), statistics.median(after), statistics.median(after8)
    cat = lambda d: torch.cat([d[c].flatten() for c in groups])  # noqa: E731
    total = torch.cat([kept[c].sum(1).flatten() for c in groups]).abs().clamp_min(1e-30)
    delta_rel = {16: float((cat(delta16).abs() / total).median()), 8: float((cat(delta8).abs() / total).median())}
    dev8 = float((cat(kept8) - cat(kept)).abs().amax() / cat(kept).abs().amax().clamp_min(1e-30))
    reference = torch.cat([full[groups[c]][:, :, keep[c]].flatten() for c in groups])
    deviation = float((cat(kept) - reference).abs().amax() / reference.abs().amax().clamp_min(1e-30))
    with torch.no_grad():
        X = run_until(model, "block1", test)
    U_f = PFVDecomposer(decs["block1"][0], alpha=decs["block1"][1], solver="fista").transform(X)
    U_h = PFVDecomposer(decs["block1"][0], alpha=decs["block1"][1], solver="auto").transform(X)
    coef_dev = float((U_f - U_h).abs().amax() / U_f.abs().amax().clamp_min(1e-30))

    print(f"Fashion-MNIST CNN block1 -> block2, K = {decs['block1'][0].n_concepts} -> {basis_b.n_concepts}, "
          f"16 path points, {n_images} test images, {torch.get_num_threads()} threads")
    print(f"before (all {len(all_targets)} columns, FISTA): {1000 * b / n_images:.1f} ms per image")
    print(f"after (each class's {len(next(iter(keep.values())))} graph columns on its images, homotopy): "
          f"{1000 * a / n_images:.1f} ms per image")
    print(f"kept columns: largest deviation {deviation:.2e} of the largest attribution "
          f"(the two solvers' coefficients differ by {coef_dev:.2e} of the largest)")
    print(f"after with 8 Gauss-Legendre points:          {1000 * a8 / n_images:.1f} ms per image; largest deviation "
          f"{dev8:.2e} from 16 points; median completeness delta / total {delta_rel[8]:.1e} (16 points: "
          f"{delta_rel[16]:.1e})")
    print(f"ratio attribute_stage_before_over_after {b / a:.1f}")
    print(f"ratio attribute_stage_before_over_after_8_points {b / a8:.1f}")


if __name__ == "__main__":
    main()
