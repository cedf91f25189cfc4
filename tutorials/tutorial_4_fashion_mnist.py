"""
Dataset-wide analysis: the Fashion-MNIST CNN, from the shell and from Python
============================================================================

The small BatchNorm CNN shipped with the package (:func:`captum_gig.zoo.fashion_mnist_cnn`)
on Fashion-MNIST test images (Debian's ``dataset-fashion-mnist``). First the ``captum-gig``
command runs the whole pipeline over the images; then the same artifacts are opened from
Python. Equivalent shell command::

    captum-gig run --model fashion-mnist-cnn --data fashion-mnist --limit 24 --by label \\
        --layers block1 block2 block3 --per-image 4 --concepts 16 --n-steps 8 --top-k 3 \\
        --graph class:Sneaker --graph pair:Pullover,Coat --atlas-top 3 --atlas-images 24 \\
        --eval-steps 5 --eval-images 8 --out fashion-out

(sized for a fast documentation build: a real analysis uses thousands of images and the
defaults, ``--concepts`` being ``8 x channels`` there)
"""

import json
import os
import tempfile

import matplotlib.pyplot as plt

import captum_gig as cg
from captum_gig import zoo
from captum_gig.cli import main
from captum_gig.pipeline import load_class_attribution

out = os.path.join(tempfile.mkdtemp(), "fashion-out")
status = main(["run", "--model", "fashion-mnist-cnn", "--data", "fashion-mnist", "--limit", "24", "--by", "label",
               "--layers", *zoo.FASHION_MNIST_LAYERS, "--per-image", "4", "--concepts", "16", "--n-steps", "8",
               "--top-k", "3", "--graph", "class:Sneaker", "--graph", "pair:Pullover,Coat", "--atlas-top", "3",
               "--atlas-images", "24", "--eval-steps", "5", "--eval-images", "8",
               "--out", out, "--quiet", "--device", "cpu"])
assert status == 0
print(sorted(os.listdir(out)))

# %%
# The decomposition of every layer
# --------------------------------
for layer, d in json.load(open(os.path.join(out, "decomposition.json"))).items():
    print(f"{layer}: {d['n_pfvs']} PFVs, {d['n_concepts']} concepts, rel-l2 {d['rel_l2']:.3f}, l0 ratio {d['l0_ratio']:.3f}")

# %%
# The same artifacts from Python
# ------------------------------
# PFV sets and bases load with their classes' ``load``; class-averaged GIG with
# :func:`captum_gig.pipeline.load_class_attribution`; graphs with :meth:`ConceptGraph.from_json`.
basis = cg.ConceptBasis.load(os.path.join(out, "bases", "block3.safetensors"))
ca = load_class_attribution(os.path.join(out, "attribution", "class", "block3.safetensors"))
sneaker = zoo.FASHION_MNIST_CLASSES.index("Sneaker")
row = ca.mean[(ca.classes == sneaker).nonzero()[0, 0]]
print(basis, "- the block3 concepts most relevant for 'Sneaker':", row.argsort(descending=True)[:5].tolist())

graph = cg.ConceptGraph.from_json(os.path.join(out, "graphs", f"class_{sneaker}.json"))
print(graph)
fig = graph.plot(title="Fashion-MNIST CNN: concepts of 'Sneaker'")

# %%
# Evaluation curves written by the ``evaluate`` stage
# ---------------------------------------------------
img = plt.imread(os.path.join(out, "evaluation", "curves.png"))
fig, ax = plt.subplots(figsize=(10, 3))
ax.imshow(img)
ax.axis("off")
