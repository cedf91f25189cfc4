r"""``captum-gig demo``: the method at dataset scale, offline, in one report.

Two parts, each a :class:`~captum_gig.pipeline.Pipeline` run in a folder of its
own, shown together in ``OUT/index.html``:

1. **Fashion-MNIST, the whole dataset** (Debian's ``dataset-fashion-mnist``)
   with the CNN shipped in the package: concepts fitted on PFVs of 20,000
   training images, K = 8 x channels in every layer, every held-out test PFV
   decomposed, class GIG over a class-stratified 2,000 test images, a graph
   for every class and for three pairs of classes the model confuses, and the
   evaluation on 1,000 test images drawn twice (the AUCs' spread; the
   inter-layer curves, which need every position's Lasso, on 250 of them).
2. **EfficientNet-Lite0 (ImageNet weights) on every real photo available
   offline** (scikit-image, scikit-learn, matplotlib and Debian's
   ``opencv-doc``), each photo with seven crops and flips so that concepts
   gather members from many photos, at mid-level blocks (5, 8, 10) where 43
   photos support shared concepts.

A part whose data is missing says so in one line and is skipped; the demo
does not fail for it.
"""

import os
import sys
from typing import Any, Dict, List, Optional

from ._sources import PipelineError
from .pipeline import Config, Pipeline

__all__ = ["FASHION_MNIST_DEMO", "PHOTOS_DEMO", "run_demo"]

#: part 1: Fashion-MNIST, every class, concepts from 20,000 training images
FASHION_MNIST_DEMO: Dict[str, Any] = {
    "model": "fashion-mnist-cnn", "data": "fashion-mnist", "split": "test", "fit_split": "train", "fit_limit": 20000,
    "layers": ["block1", "block2", "block3"], "per_image": 4, "concept_factor": 8, "by": "label",
    "attribute_images": 2000, "interlayer_images": 64, "n_steps": 16, "top_k": 5,
    "graph": ["class:all", "pair:Shirt,T-shirt/top", "pair:Pullover,Coat", "pair:Sneaker,Ankle boot"],
    "atlas_top": 6, "ierf": "ixg", "eval_images": 1000, "eval_seeds": 2, "eval_pairs": "all", "eval_steps": 8,
    "eval_interlayer_images": 250, "eval_targets": 3, "batch_size": 64,
}

#: part 2: EfficientNet-Lite0 on the real photos, augmented
PHOTOS_DEMO: Dict[str, Any] = {
    "model": "efficientnet-lite0", "data": "photos", "augment": 7, "image_size": 160,
    "layers": ["_blocks.5", "_blocks.8", "_blocks.10"], "per_image": 16, "concept_factor": 8, "min_members": 32,
    "n_steps": 8, "top_k": 4, "atlas_top": 4, "ierf": "ixg", "attribute_images": 96, "interlayer_images": 16,
    "eval_images": 24, "eval_seeds": 1, "eval_steps": 8, "eval_targets": 3, "batch_size": 16,
}

#: ``--quick``: the same parts at sizes for tests (seconds, not minutes)
QUICK = {
    "fashion-mnist": {"limit": 300, "fit_limit": 600, "per_image": 2, "attribute_images": 200, "interlayer_images": 8,
                      "eval_images": 60, "eval_pairs": "last", "n_steps": 6, "atlas_top": 3,
                      "graph": ["class:all", "pair:Shirt,T-shirt/top"]},
    "photos": {"limit": 6, "augment": 2, "image_size": 96, "per_image": 8, "min_members": 8, "n_steps": 4,
               "eval_images": 12, "eval_seeds": 1, "interlayer_images": 4, "atlas_top": 3},
}


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[captum-gig] {message}", file=sys.stderr, flush=True)


def run_demo(out: str, *, quick: bool = False, device: Optional[str] = None, quiet: bool = False,
             force: bool = False, command: Optional[List[str]] = None) -> str:
    """Run both parts into ``out`` (``out/fashion-mnist``, ``out/photos``) and write ``out/index.html``.

    Args:
        out (str): the output folder.
        quick (bool, optional): small sizes (for tests). Default: False
        device (str, optional): torch device. Default: cuda if available
        quiet (bool, optional): no progress or log lines. Default: False
        force (bool, optional): recompute what exists. Default: False
        command (list of str, optional): the command line, for the manifests.

    Returns:
        str: the path of ``index.html``.
    """
    from . import zoo
    from .report import report_page, report_sections

    os.makedirs(out, exist_ok=True)
    sections, notes = [], []
    parts = (("fashion-mnist", "Part 1: Fashion-MNIST, the whole dataset", FASHION_MNIST_DEMO),
             ("photos", "Part 2: an ImageNet model on real photos", PHOTOS_DEMO))
    for folder, title, settings in parts:
        settings = dict(settings, **(QUICK[folder] if quick else {}))
        if folder == "fashion-mnist" and not zoo.fashion_mnist_available():
            note = ("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): "
                    "the demo's Fashion-MNIST part is skipped")
            print(f"captum-gig: note: {note}", file=sys.stderr, flush=True)
            notes.append(note)
            continue
        if folder == "photos" and not zoo.opencv_photos_available():
            note = ("opencv-doc is not installed (apt-get install opencv-doc): the photos part uses only the photos "
                    "of scikit-image, scikit-learn and matplotlib")
            print(f"captum-gig: note: {note}", file=sys.stderr, flush=True)
            notes.append(note)
        _say(title, quiet)
        pipe = Pipeline(Config(**settings), os.path.join(out, folder), device=device, quiet=quiet, force=force,
                        command=command)
        pipe.run()
        sections.append(report_sections(pipe, base=f"{folder}/", title=title, intro=_intro(folder, pipe)))
    if not sections:
        raise PipelineError("neither demo part can run: install dataset-fashion-mnist, or the examples extra "
                            "(pip install 'captum-gig[examples]') for the photos")
    body = ["<nav>" + "".join(f"<a href='{f}/index.html'>{t}</a>" for f, t, _s in parts
                              if os.path.isfile(os.path.join(out, f, "index.html"))) + "</nav>",
            "<p>The whole method of the paper on real data: pointwise feature vectors (PFVs) collected over a "
            "dataset, concept vectors found with bisecting spherical k-means, every PFV decomposed into a sparse "
            "mix of concepts (Lasso), Generalized Integrated Gradients from each layer's concepts to the next "
            "layer's concepts and to the classes, and the resulting graphs from the classifier down.</p>"]
    body += [f"<p class='note'>{n}.</p>" for n in notes]
    body += [f"<div class='part'>{s}</div>" for s in sections]
    return report_page("captum-gig demo", body, os.path.join(out, "index.html"))


def _intro(folder: str, pipe: Pipeline) -> str:
    if folder == "fashion-mnist":
        s = pipe.s
        return (f"<p>The CNN shipped with captum-gig (three BatchNorm blocks). Concepts of every layer come from "
                f"{s['per_image']} relevance-sampled PFVs of each of {s['fit_limit']} training images; the graphs, the "
                f"heat map and the evaluation use the {len(pipe.data)} test images the concepts never saw.</p>")
    data = pipe.data
    photos = int(data.sources.max()) + 1 if len(data) else 0
    return (f"<p>EfficientNet-Lite0 with its ImageNet weights on {photos} real photos, each with "
            f"{pipe.s['augment']} crops and flips ({len(data)} images). A concept is worth the name when its members "
            "come from several photos: see the diversity column. The layers are mid-level blocks, where so few "
            "photos still share concepts; the deeper blocks (11 to 15, a 5 x 5 grid at this size) draw most of "
            "their concepts from a single photo at any K with this data, and the fit stage's diagnostics say so "
            "when they are chosen.</p>")
