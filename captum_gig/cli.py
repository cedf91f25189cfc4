r"""``captum-gig``: the GIG pipeline over a dataset, from the shell (argument parsing over :mod:`captum_gig.pipeline`).

Every subcommand writes its artifacts into one output folder (``--out``) and
can be resumed: a stage whose complete artifacts exist for the same settings
is skipped, so ``captum-gig run`` after an interrupted run only computes what
is missing. Settings given once are remembered in ``config.json`` of the
output folder, so later subcommands need only ``--out``.

Stages (``run`` does them all, in order)::

    extract    PFVs of every layer (pfvs/<layer>.safetensors) and the predictions
    fit        concept bases (bases/<layer>.safetensors)
    decompose  Lasso coefficients and rel-l2 / l0 ratio (coefficients/, decomposition.json)
    attribute  GIG between consecutive layers and to classes, averaged per class (attribution/)
    graph      concept atlases and ConceptGraphs (JSON, PNG, HTML) for a class, an image, a class pair
    evaluate   C-Deletion / C-Insertion and inter-layer deletion curves (evaluation/)

and ``demo`` runs them all, offline, on the whole of Fashion-MNIST and on EfficientNet-Lite0 with real photos
(:mod:`captum_gig.demo`).

Examples::

    captum-gig demo --out demo
    captum-gig run --model torchvision:resnet50 --weights IMAGENET1K_V2 --data ./images \
        --layers layer3.5 layer4.0 layer4.2 --out out
    captum-gig run --model torchvision:resnet50 --list-layers
    captum-gig graph --out out --graph class:goldfish --graph pair:1,2 --graph image:0
"""

import argparse
import os
import sys
import warnings
from typing import Any, Dict, List, Optional

import torch

from .distributed import is_main_process
from ._sources import NORMALIZATIONS, list_layers, load_model  # noqa: F401  (load_model: public here before)
from ._version import __version__
from .decompose import SOLVERS
from .pipeline import (DEFAULTS, STAGES, Config, Pipeline, PipelineError, _read_json,  # noqa: F401
                       load_class_attribution, load_coefficients)

__all__ = ["main", "build_parser", "CLIError"]

#: a user error: printed as ``captum-gig: error: ...`` with exit status 2
CLIError = PipelineError


# ============================================================================ argument parsing


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and data (remembered in OUT/config.json)")
    g.add_argument("--model", help="efficientnet-lite0, fashion-mnist-cnn, torchvision:<name> or module:<file.py|module>:<callable>")
    g.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V2 (downloads; default: none)")
    g.add_argument("--data", help="an ImageFolder directory (one sub-folder per class, or a flat folder), "
                                  "'photos' (bundled real photos) or 'fashion-mnist'")
    g.add_argument("--split", choices=["train", "test"], help="fashion-mnist split (default: test)")
    g.add_argument("--fit-data", help="images whose PFVs the concepts are fitted on, when not --data "
                                      "(e.g. the training set; --data is then held out)")
    g.add_argument("--fit-split", choices=["train", "test"], help="fashion-mnist split of the fit data")
    g.add_argument("--fit-limit", type=int, help="use at most this many fit images")
    g.add_argument("--limit", type=int, help="use at most this many images")
    g.add_argument("--augment", type=int, help="add this many mirrored / cropped variants of every image (default: 0)")
    g.add_argument("--image-size", type=int, help="input side in pixels (default: 224, 28 for Fashion-MNIST)")
    g.add_argument("--normalize", choices=sorted(NORMALIZATIONS), help="pixel normalisation (default: from the model)")
    g.add_argument("--layers", nargs="+", help="dotted layer names, early to late (see --list-layers)")
    g.add_argument("--by", choices=["prediction", "label"], help="class of an image: its prediction or its label (default: prediction)")
    g.add_argument("--seed", type=int, help="random seed (default: 0)")
    g.add_argument("--batch-size", type=int, help="images per batch (default: 16)")
    g = p.add_argument_group("stages")
    g.add_argument("--sampling", choices=["relevance", "uniform", "all"], help="PFV sampling (default: relevance)")
    g.add_argument("--per-image", type=int, help="PFVs drawn per image (default: 8)")
    g.add_argument("--concepts", type=int, help="concepts per layer (default: min(8 x channels, PFVs / --min-members))")
    g.add_argument("--concept-factor", type=int, help="concepts per channel (default: 8, the paper's)")
    g.add_argument("--min-members", type=int, help="PFVs per concept at least, on average (default: 8)")
    g.add_argument("--offset", choices=["auto", "mean", "zero"], help="PFV offset: BatchNorm shift where the layer ends in BN, else the mean (default: auto)")
    g.add_argument("--extractor", help="concept extractor registered with register_extractor (default: bisecting)")
    g.add_argument("--alpha", type=float, help="Lasso alpha as a fraction of the median alpha_max (default: 0.1)")
    g.add_argument("--solver", choices=SOLVERS,
                   help="Lasso solver of the decomposition (default: auto, homotopy up to 128 channels, else working set)")
    g.add_argument("--n-steps", type=int, help="GIG path points (default: 16)")
    g.add_argument("--output", choices=["logit", "prob"], help="class score for GIG (default: logit)")
    g.add_argument("--classes", nargs="+", help="restrict class attributions to these classes (indices or names)")
    g.add_argument("--class-layers", choices=["last", "all"], help="layers whose GIG to classes is computed (default: last)")
    g.add_argument("--attribute-images", type=int, help="class GIG on a class-stratified subset of this many images "
                                                        "(default: every image)")
    g.add_argument("--interlayer", choices=["graph", "all"], help="GIG between layers to the concepts the graphs keep, "
                                                                 "or to every concept (default: graph)")
    g.add_argument("--interlayer-images", type=int, help="images per class for the GIG between layers (default: 64)")
    g.add_argument("--graph", action="append", help="graph target: class:<c>, class:all, pair:<a>,<b>, image:<i> or auto "
                                                    "(repeatable; default: auto = most frequent class, most confident image, top class pair)")
    g.add_argument("--top-k", type=int, help="concepts per layer in a graph (default: 5)")
    g.add_argument("--atlas-top", type=int, help="example patches per concept in the atlas (default: 6)")
    g.add_argument("--ierf", choices=["ig", "ixg", "saliency"], help="Captum method of the atlas crops' iERFs: "
                   "IntegratedGradients, InputXGradient or Saliency (default: ig)")
    g.add_argument("--atlas-images", type=int, help="fit images searched for atlas patches (default: 2000)")
    g.add_argument("--diversity-top", type=int, help="members per concept in the image-diversity diagnostic (default: 16)")
    g.add_argument("--eval-steps", type=int, help="points of the deletion / insertion curves (default: 10)")
    g.add_argument("--eval-images", type=int, help="images evaluated, class-stratified (default: 16)")
    g.add_argument("--eval-seeds", type=int, help="evaluate this many subsets, drawn with seeds seed, seed+1, ... "
                                                  "(the AUCs' spread; default: 1)")
    g.add_argument("--eval-interlayer-images", type=int,
                   help="of each subset, images (class-stratified) for the inter-layer curves, which need the earlier "
                        "layers' Lasso at every position (default: all of them)")
    g.add_argument("--eval-pairs", choices=["last", "all"], help="layer transitions of the inter-layer curves (default: last)")
    g.add_argument("--eval-targets", type=int, help="layer-b concepts per class the inter-layer curves follow (default: 3)")
    g.add_argument("--baselines", nargs="*", help="attributions compared with GIG wherever concepts are ordered: "
                                                  "endpoint, magnitude, ablation (default: endpoint magnitude)")
    g = p.add_argument_group("running")
    g.add_argument("--out", default=None, help="output folder (default: captum-gig-out; demo: captum-gig-demo)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--force", action="store_true", help="recompute stages even when their artifacts exist")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    g.add_argument("--list-layers", action="store_true", help="print the model's layers with output shapes and exit")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-gig",
        description="Generalized Integrated Gradients (arXiv 2409.01610) over a dataset: PFVs, concepts, "
                    "sparse decompositions, GIG attributions, concept graphs and their evaluation.",
        epilog="Run `captum-gig demo` for the whole pipeline on Fashion-MNIST and on EfficientNet-Lite0 with real "
               "photos (offline, about 5 minutes on 2 CPU cores).",
    )
    parser.add_argument("--version", action="version", version=f"captum-gig {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    common = _common_parser()
    helps = {
        "extract": "collect PFVs of every layer (and the model's predictions)",
        "fit": "fit a concept basis per layer (bisecting spherical k-means)",
        "decompose": "sparse concept coefficients of every PFV, rel-l2 and l0 ratio",
        "attribute": "GIG between consecutive layers and to classes, averaged per class",
        "graph": "concept atlases and ConceptGraphs (JSON, PNG, HTML)",
        "evaluate": "C-Deletion / C-Insertion and inter-layer deletion / insertion curves",
        "run": "all stages, resuming from what exists, and an index.html report",
        "demo": "the whole pipeline on Fashion-MNIST and on EfficientNet-Lite0 with real photos (offline, ~5 minutes)",
    }
    for name, text in helps.items():
        if name == "demo":  # fixed settings: only the running options apply
            demo = sub.add_parser(name, help=text, description=text)
            g = demo.add_argument_group("running")
            g.add_argument("--out", default=None, help="output folder (default: captum-gig-demo)")
            g.add_argument("--device", default=None, help="torch device (default: cuda if available)")
            g.add_argument("--force", action="store_true", help="recompute what exists")
            g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
            g.add_argument("--quick", action="store_true", help="small sizes (seconds; for tests)")
            continue
        sub.add_parser(name, parents=[common], help=text, description=text)
    return parser


def _settings(args: argparse.Namespace, out: str) -> Config:
    """Defaults, then what OUT/config.json remembers, then the options given."""
    stored: Dict[str, Any] = {}
    cfg = os.path.join(out, "config.json")
    if os.path.isfile(cfg):
        try:
            stored = _read_json(cfg).get("settings", {})
        except (OSError, ValueError) as err:
            raise CLIError(f"{cfg} is unreadable ({err}); delete it or use another --out") from None
    s = dict(DEFAULTS)
    s.update({k: v for k, v in stored.items() if k in DEFAULTS})
    s.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    return Config(**s).resolved()


def _summary(run: Pipeline, report: Optional[str]) -> str:
    lines = [f"captum-gig: artifacts in {run.out}"]
    for name, t in run.timings.items():
        arts = run.artifacts.get(name, [])
        shown = ", ".join(arts[:4]) + (f", ... ({len(arts)} files)" if len(arts) > 4 else "")
        lines.append(f"  {name:<9} {t['status']:<8} {t['seconds']:7.1f} s  {shown}")
    if run._data is not None and run._data.skipped:
        lines.append(f"  skipped {run._data.skipped} unreadable image(s) (listed in data.json)")
    lines.append(f"  manifest  {run.path('manifest.json')}")
    if report:
        lines.append(f"  report    {report}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``captum-gig`` / ``python -m captum_gig``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    demo = args.command == "demo"
    out = args.out or ("captum-gig-demo" if demo else "captum-gig-out")
    from .distributed import init_from_env, leave

    # under torchrun: join the process group (NCCL with CUDA unless --device cpu, else Gloo)
    joined = init_from_env("gloo" if (args.device or "").startswith("cpu") or not torch.cuda.is_available() else None)
    status = 1
    try:
        status = _main(args, argv, demo, out)
        return status
    finally:
        if joined:
            leave(clean=status == 0)


def _main(args, argv: List[str], demo: bool, out: str) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if demo:
            from .demo import run_demo

            report = run_demo(out, quick=args.quick, device=device, quiet=args.quiet, force=args.force,
                              command=["captum-gig"] + argv)
            if not args.quiet:
                print(f"captum-gig: demo report in {os.path.abspath(report)}")
            return 0
        config = _settings(args, out)
        run = Pipeline(config, out, quiet=args.quiet, device=device, force=args.force, command=["captum-gig"] + argv)
        settings = run.s
        if args.list_layers:
            model = run.model
            if settings.get("data"):
                example = run.data.get(range(1))
            else:
                size = int(settings.get("image_size") or 224)
                example = torch.zeros(1, run.in_channels, size, size)
            print(list_layers(model, example.to(run.device)))
            return 0
        stages = STAGES if args.command == "run" else [args.command]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was written by captum_gig.*")
            for name in stages:
                run.stage(name)
        report = run.report() if args.command == "run" else None
        run.write_manifest()
        if not args.quiet and is_main_process():
            print(_summary(run, report))
        return 0
    except CLIError as err:
        print(f"captum-gig: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as err:
        if os.environ.get("CAPTUM_GIG_DEBUG"):
            raise
        print(f"captum-gig: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("captum-gig: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
