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
    keep = sorted({int(q) for c in logits.unique() for q in class_gig[logits == c].mean(0).topk(5).indices})

    def stage(solver: str, targets):
        dec_a = PFVDecomposer(decs["block1"][0], alpha=decs["block1"][1], solver=solver)
        gig = GeneralizedIntegratedGradients(model, "block1", dec_a, "block2", basis_b)
        t0 = time.perf_counter()
        out = gig.attribute_matrix(test, targets=targets, n_steps=16).detach()
        return time.perf_counter() - t0, out

    all_targets = list(range(basis_b.n_concepts))
    before, after = [], []
    for _ in range(args.repeats):  # alternating, medians
        t, full = stage("fista", all_targets)
        before.append(t)
        t, kept = stage("auto", keep)
        after.append(t)
    b, a = statistics.median(before), statistics.median(after)
    reference = full[:, :, keep]
    scale = reference.abs().amax().clamp_min(1e-30)
    deviation = float((kept - reference).abs().amax() / scale)
    with torch.no_grad():
        X = run_until(model, "block1", test)
    U_f = PFVDecomposer(decs["block1"][0], alpha=decs["block1"][1], solver="fista").transform(X)
    U_h = PFVDecomposer(decs["block1"][0], alpha=decs["block1"][1], solver="auto").transform(X)
    coef_dev = float((U_f - U_h).abs().amax() / U_f.abs().amax().clamp_min(1e-30))

    print(f"Fashion-MNIST CNN block1 -> block2, K = {decs['block1'][0].n_concepts} -> {basis_b.n_concepts}, "
          f"16 path points, {n_images} test images, {torch.get_num_threads()} threads")
    print(f"before (all {len(all_targets)} columns, FISTA): {1000 * b / n_images:.1f} ms per image")
    print(f"after ({len(keep)} graph columns, homotopy):   {1000 * a / n_images:.1f} ms per image")
    print(f"kept columns: largest deviation {deviation:.2e} of the largest attribution "
          f"(the two solvers' coefficients differ by {coef_dev:.2e} of the largest)")
    print(f"ratio attribute_stage_before_over_after {b / a:.1f}")


if __name__ == "__main__":
    main()
