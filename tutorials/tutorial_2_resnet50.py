"""
ResNet50 with ImageNet weights, the way a user with internet runs it
====================================================================

The paper's main model is torchvision's ResNet50. With internet, this script loads the
ImageNet weights through torchvision (``ResNet50_Weights.IMAGENET1K_V2``, downloaded once into
torch's cache). **The documentation is built without network**: when the weights are neither
cached nor downloadable, the same code runs with ``weights=None`` (random weights), and the
numbers below are then those of an untrained network -- the code path is what this page shows.

The paper takes PFVs at each bottleneck's pre-ReLU sum ``bn3(conv3(...)) + identity``;
:func:`captum_gig.expose_preactivations` makes it hookable as ``<block>.preact`` without
changing the model's outputs.
"""

import os

import torch
from torchvision.models import ResNet50_Weights, resnet50

import captum_gig as cg
from captum_gig import zoo

weights = ResNet50_Weights.IMAGENET1K_V2
cached = os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)))
may_download = os.environ.get("CAPTUM_GIG_DOCS_BUILD") != "1"  # the docs build never tries to download
model = None
if cached or may_download:
    try:
        model = resnet50(weights=weights).eval()  # what a user with internet runs
        print("ImageNet weights loaded")
    except OSError as error:  # no network (urllib's URLError is an OSError)
        print(f"could not download the weights ({error.__class__.__name__})")
if model is None:
    model = resnet50(weights=None).eval()
    print("offline: weights=None (random weights), same code path")

names = cg.expose_preactivations(model)
print(len(names), "hookable pre-activations, e.g.", names[-4:])

# %%
# Data: the bundled photos, preprocessed with the ImageNet statistics torchvision's weights expect
# (a small image side keeps the documentation build fast; use 224 for real analyses).
mean, std = weights.transforms().mean, weights.transforms().std
images, photo_names = zoo.real_photos(size=128, mean=mean, std=std)
images, photo_names = images[:6], photo_names[:6]  # 6 photos: a fast documentation build
with torch.no_grad():
    predicted = model(images).argmax(1)

# %%
# Concepts of two layers
# ----------------------
# The paper uses ``K = 8 x channels`` (8192 concepts for layer3) on ImageNet; here the basis is
# sized for 6 photos. The offset of a BatchNorm-ended block is BN's net shift (eq. 8).
layers = ["layer3.5.preact", "layer4.2.preact"]
decomposers = []
for layer in layers:
    pfvs = cg.collect_pfvs(model, layer, images, per_image=8, progress=False)
    block = model.get_submodule(layer.rsplit(".", 1)[0])
    basis = cg.ConceptBasis.fit(pfvs, n_concepts=12, offset=block.bn3, progress=False)
    dec = cg.PFVDecomposer(basis, alpha=0.1 * cg.alpha_max(basis, pfvs.vectors).median().item())
    print(layer, basis, dec.score(pfvs.vectors))
    decomposers.append(dec)

# %%
# GIG between the layers and to the class
# ---------------------------------------
# ``attribute_matrix`` gives every layer3 concept's GIG to every layer4 concept (eq. 5) at once.
gig = cg.GeneralizedIntegratedGradients(model, layers[0], decomposers[0], layers[1], decomposers[1])
matrix, delta = gig.attribute_matrix(images[:2], n_steps=8, return_convergence_delta=True)
print("concept-to-concept GIG", tuple(matrix.shape), "max |delta|", float(delta.abs().max()))

graph = cg.ConceptGraph.build(model, layers, decomposers, images[0], target=int(predicted[0]), top_k=3, n_steps=8,
                              progress=False)
print(graph)
fig = graph.plot(title=f"{photo_names[0]}: concept graph of ResNet50")
