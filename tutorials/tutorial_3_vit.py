"""
A Vision Transformer: tokens as PFVs
====================================

For a ViT the PFVs are the token vectors of an encoder block, ``(N, T, C)`` with the channels
last; every function of the library handles that layout like ``(N, C, H, W)`` conv maps. This
uses torchvision's ``vit_b_16``. With internet it loads the ImageNet weights; the documentation
build is offline and uses ``weights=None`` at a small image side (64 pixels: 16 patches plus
the class token), so the numbers are those of an untrained network.
"""

import os

import torch
from torchvision.models import ViT_B_16_Weights, vit_b_16

import captum_gig as cg
from captum_gig import zoo

weights = ViT_B_16_Weights.IMAGENET1K_V1
cached = os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)))
model = None
if cached or os.environ.get("CAPTUM_GIG_DOCS_BUILD") != "1":  # the docs build never tries to download
    try:
        model, size = vit_b_16(weights=weights).eval(), 224  # what a user with internet runs
    except OSError as error:  # no network (urllib's URLError is an OSError)
        print(f"could not download the weights ({error.__class__.__name__})")
if model is None:
    print("offline: weights=None (random weights), image side 64")
    model, size = vit_b_16(weights=None, image_size=64).eval(), 64
    # torchvision initialises the classifier head to zeros, so an untrained ViT's logits are all
    # zero and so is every attribution to a class; random head weights make the page informative
    torch.manual_seed(0)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)

images, names = zoo.real_photos(size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
images = images[:8]

# %%
# Token PFVs of two encoder blocks
# --------------------------------
layers = ["encoder.layers.encoder_layer_9", "encoder.layers.encoder_layer_11"]
decomposers = []
for layer in layers:
    pfvs = cg.collect_pfvs(model, layer, images, sampling="all", progress=False)  # every token
    print(layer, "PFVs", tuple(pfvs.vectors.shape), "token grid", pfvs.spatial_shape)
    basis = cg.ConceptBasis.fit(pfvs, n_concepts=12, offset="mean", progress=False)
    dec = cg.PFVDecomposer(basis, alpha=0.05 * cg.alpha_max(basis, pfvs.vectors).median().item())
    print("  ", dec.score(pfvs.vectors))
    decomposers.append(dec)

# %%
# GIG per token
# -------------
# With ``per_position=True`` the attribution keeps the token axis: which tokens carry a concept's
# contribution to a concept of the later block.
gig = cg.GeneralizedIntegratedGradients(model, layers[0], decomposers[0], layers[1], decomposers[1])
per_token, delta = gig.attribute(images[:2], target=0, n_steps=8, per_position=True, return_convergence_delta=True)
print("per-token GIG", tuple(per_token.shape), "(N, K_a, T); |delta|", delta.abs().max().item())

with torch.no_grad():
    predicted = model(images[:1]).argmax(1)
to_class = cg.GeneralizedIntegratedGradients(model, layers[1], decomposers[1])
attr = to_class.attribute(images[:1], target=predicted, n_steps=8)
print("GIG of encoder_layer_11's concepts to the predicted class:", attr[0].numpy().round(3))
print("their sum", float(attr.sum()), "(the class logit's change along the path, up to the convergence delta)")
