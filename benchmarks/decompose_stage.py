"""The decompose stage on the PFVs and bases of a ``benchmarks/pipeline.py`` run, before and after a change.

Times :meth:`PFVDecomposer.transform` over every layer of each kept run folder
(``<folder>/pfvs/*.safetensors`` and ``<folder>/bases/*.safetensors``, the
layer's fitted alpha in its basis), as the pipeline's decompose stage runs it,
once with the library of this checkout and once with the one under
``--before`` (a source tree of an earlier commit), each in a fresh 1-thread
process, alternating, ``--repeats`` times (the fastest counts).

    python benchmarks/decompose_stage.py --before /tmp/old-tree /tmp/keep/n256-w1 /tmp/keep/n512-w1 ... \
        --prefixes 2048 4096 8192 16384

Writes ``benchmarks/results/decompose-stage-cpu.{md,json}``.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from pipeline import fit_power  # noqa: E402  (the benchmarks' one power-law fit)

WORKER = r"""
import glob, json, os, sys, time, torch
torch.set_num_threads(1)
from captum_gig.concepts import ConceptBasis
from captum_gig.decompose import PFVDecomposer
from captum_gig.pfv import PFVSet
folder = sys.argv[1]
rows = int(sys.argv[2]) if len(sys.argv) > 2 else None  # the first rows of every layer only
out = {"seconds": 0.0, "layers": {}}
for path in sorted(glob.glob(os.path.join(folder, "pfvs", "*.safetensors"))):
    name = os.path.basename(path)[: -len(".safetensors")]
    basis = ConceptBasis.load(os.path.join(folder, "bases", name + ".safetensors"))
    X = PFVSet.load(path).vectors[:rows]
    dec = PFVDecomposer(basis, alpha=float(basis.meta["alpha"]))
    t = time.perf_counter()
    U = dec.transform(X)
    s = time.perf_counter() - t
    obj = float(dec.objective(X, U).double().sum())
    out["layers"][name] = {"seconds": s, "n_pfvs": X.shape[0], "n_channels": X.shape[1], "n_concepts": U.shape[1],
                           "objective": obj, "nonzeros_per_pfv": float((U != 0).sum(1).double().mean())}
    out["seconds"] += s
print(json.dumps(out))
"""


def run(tree, folder, rows=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=tree)
    res = subprocess.run([sys.executable, "-c", WORKER, folder] + ([str(rows)] if rows else []), env=env, capture_output=True, text=True, check=True,
                         cwd=tree)
    return json.loads(res.stdout.strip().splitlines()[-1])


def commit(tree):
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="pipeline run folders with pfvs/ and bases/ (one per N)")
    p.add_argument("--before", required=True, help="source tree of the earlier commit")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--prefixes", type=int, nargs="*", default=[],
                   help="then, with the last folder's bases (this checkout only): its first R PFVs per layer, for each R")
    p.add_argument("--out", default=os.path.join(HERE, "results", "decompose-stage-cpu"))
    args = p.parse_args(argv)
    trees = {"before": os.path.abspath(args.before), "after": ROOT}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "repeats": args.repeats,
              "commits": {k: commit(v) for k, v in trees.items()}, "load_average_at_start": os.getloadavg(),
              "runs": {}}
    for folder in args.folders:
        n = int(os.path.basename(os.path.normpath(folder)).split("-")[0].lstrip("n"))  # pipeline.py's n<N>-... names
        best = {}
        for _ in range(args.repeats):
            for kind, tree in trees.items():
                r = run(tree, folder)
                if kind not in best or r["seconds"] < best[kind]["seconds"]:
                    best[kind] = r
        report["runs"][str(n)] = best
        print(f"N={n}: before {best['before']['seconds']:.1f} s, after {best['after']['seconds']:.1f} s", flush=True)
    report["load_average_at_end"] = os.getloadavg()
    ns = sorted(int(n) for n in report["runs"])

    report["exponent"] = {k: fit_power(ns, [report["runs"][str(n)][k]["seconds"] for n in ns])[1] for k in trees} \
        if len(ns) >= 2 else {}
    if args.prefixes:  # one basis, growing data: the growth with N that is not the basis's
        last = args.folders[-1]
        report["prefixes"] = {"folder": os.path.basename(os.path.normpath(last)),
                              "runs": {str(r): run(ROOT, last, r) for r in args.prefixes}}
        rs = [int(r) for r in report["prefixes"]["runs"]]
        report["prefixes"]["exponent"] = fit_power(rs, [report["prefixes"]["runs"][str(r)]["seconds"] for r in rs])[1]
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    L = ["# The decompose stage before and after (ResNet50 PFVs of `benchmarks/pipeline.py`, 1 thread)", "",
         f"`python benchmarks/decompose_stage.py` ({report['date']}; before = {report['commits']['before']}, after = "
         f"{report['commits']['after']}; fastest of {args.repeats}, alternating, each a fresh process; load average "
         f"{report['load_average_at_start'][0]:.2f} at the start).", "",
         "| N | PFVs per layer | before (s) | after (s) | ratio | objective after / before | non-zeros per PFV |",
         "|---|---|---|---|---|---|---|"]
    for n in ns:
        b, a = report["runs"][str(n)]["before"], report["runs"][str(n)]["after"]
        ob = sum(v["objective"] for v in b["layers"].values())
        oa = sum(v["objective"] for v in a["layers"].values())
        nz = sum(v["nonzeros_per_pfv"] for v in a["layers"].values()) / len(a["layers"])
        L.append(f"| {n} | {next(iter(a['layers'].values()))['n_pfvs']} | {b['seconds']:.1f} | {a['seconds']:.1f} | "
                 f"{b['seconds'] / a['seconds']:.2f} | {oa / ob:.6f} | {nz:.1f} |")
    if report["exponent"]:
        L += ["", "Exponent of seconds in N: before {before:.2f}, after {after:.2f}.".format(**report["exponent"])]
    if "prefixes" in report:
        pr = report["prefixes"]
        L += ["", f"The bases of `{pr['folder']}` decomposing the first R PFVs of each layer (after):", "",
              "| R | " + " | ".join(pr["runs"]) + " |", "|---|" + "---|" * len(pr["runs"]),
              "| seconds | " + " | ".join(f"{v['seconds']:.1f}" for v in pr["runs"].values()) + " |", "",
              f"Exponent in R: {pr['exponent']:.2f}. The rest of the growth above comes from the bases: concepts "
              "fitted on more PFVs per cluster make each PFV's working set take more Newton steps."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
