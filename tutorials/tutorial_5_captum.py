"""
GIG inside existing Captum code
===============================

:class:`captum_gig.GeneralizedIntegratedGradients` is a Captum ``GradientAttribution``: it has
Captum's ``attribute(inputs, target=..., n_steps=..., method=..., internal_batch_size=...,
return_convergence_delta=...)`` signature, so Captum's wrappers and visualisation work with
it. Here: SmoothGrad over GIG with :class:`captum.attr.NoiseTunnel`, and a per-position GIG map
drawn with :func:`captum.attr.visualization.visualize_image_attr`, next to Captum's own
LayerIntegratedGradients.
"""

import matplotlib.pyplot as plt
import torch
from captum.attr import GradientAttribution, LayerAttribution, LayerIntegratedGradients, NoiseTunnel
from captum.attr import visualization as viz

import captum_gig as cg
from captum_gig import zoo

torch.manual_seed(0)
model = zoo.efficientnet_lite0()
images, names = zoo.real_photos(size=160)
layer = "_blocks.10"
pfvs = cg.collect_pfvs(model, layer, images, per_image=16, progress=False)
basis = cg.ConceptBasis.fit(pfvs, n_concepts=16, offset="mean", progress=False)
dec = cg.PFVDecomposer(basis, alpha=0.1 * cg.alpha_max(basis, pfvs.vectors).median().item())

gig = cg.GeneralizedIntegratedGradients(model, layer, dec)
print(isinstance(gig, GradientAttribution), gig.has_convergence_delta(), gig.multiplies_by_inputs)

x = images[names.index("skimage:coffee")].unsqueeze(0)
with torch.no_grad():
    c = int(model(x).argmax(1))

# %%
# SmoothGrad with NoiseTunnel
# ---------------------------
# NoiseTunnel adds Gaussian noise to the *images* and averages the GIG attributions of the
# concepts over the noisy copies.
nt = NoiseTunnel(gig)
smooth = nt.attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=c, n_steps=8)
plain = gig.attribute(x, target=c, n_steps=8)
print("plain GIG   ", plain[0, :8].numpy().round(3))
print("SmoothGrad  ", smooth[0, :8].numpy().round(3))

# %%
# Where the top concept contributes: a per-position map with Captum's visualisation
# ---------------------------------------------------------------------------------
# ``per_position=True`` keeps the positions of layer ``_blocks.10`` (10 x 10 here); Captum's
# ``LayerAttribution.interpolate`` brings the map to the image size.
maps = gig.attribute(x, target=c, n_steps=8, per_position=True)  # (1, K, H, W)
q = int(plain[0].argmax())
heat = LayerAttribution.interpolate(maps[:, q : q + 1], tuple(x.shape[-2:]), interpolate_mode="bilinear")
image = (x[0] * (128 / 255) + 127 / 255).clamp(0, 1).permute(1, 2, 0).numpy()
fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
viz.visualize_image_attr(heat[0].permute(1, 2, 0).detach().numpy(), image, method="blended_heat_map", sign="positive",
                         plt_fig_axis=(fig, axes[0]), use_pyplot=False, title=f"GIG of concept {q}")

# Captum's LayerIntegratedGradients of the whole layer, for comparison
lig = LayerIntegratedGradients(model, model.get_submodule(layer))
layer_attr = lig.attribute(x, target=c, n_steps=8).sum(1, keepdim=True)
heat2 = LayerAttribution.interpolate(layer_attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
viz.visualize_image_attr(heat2[0].permute(1, 2, 0).detach().numpy(), image, method="blended_heat_map", sign="positive",
                         plt_fig_axis=(fig, axes[1]), use_pyplot=False, title="LayerIntegratedGradients (all channels)")
fig.tight_layout()
