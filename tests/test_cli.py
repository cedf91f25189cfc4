"""The ``captum-gig`` command end to end on a tiny CNN and a small ImageFolder.

Artifacts are checked against independent computations (the model's own
activations, the library's GIG run directly, the Lasso), resuming is checked
by the manifest and by file modification times, and the error cases by their
messages and exit status.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from captum_gig import ConceptBasis, GeneralizedIntegratedGradients, PFVDecomposer, PFVSet
from captum_gig.cli import load_class_attribution, load_coefficients, main

MODEL_SOURCE = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(x))).mean((2, 3)))


def build():
    torch.manual_seed(0)
    model = TinyCNN()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()
'''

LAYERS = ["block1", "block2", "block3"]
N_PER_CLASS = 6
PER_IMAGE = 4


def _write_images(root, rng):
    from PIL import Image

    for c, name in enumerate(["apples", "bricks", "clouds"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(N_PER_CLASS):
            img = rng.integers(0, 60, size=(24, 24, 3))
            img[..., c] += 150  # a planted colour per class
            if c == 1:
                img[::4] = 255  # stripes
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    (root / "apples" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "model.py").write_text(MODEL_SOURCE)
    _write_images(root / "images", np.random.default_rng(0))
    return root


def common(ws, out="out"):
    return [
        "--model", f"module:{ws / 'model.py'}:build", "--data", str(ws / "images"), "--layers", *LAYERS,
        "--image-size", "16", "--by", "label", "--per-image", str(PER_IMAGE), "--concepts", "6", "--n-steps", "8",
        "--top-k", "2", "--atlas-top", "2", "--eval-steps", "4", "--eval-images", "4", "--batch-size", "7",
        "--device", "cpu", "--out", str(ws / out), "--quiet",
    ]


def _model(ws):
    from captum_gig.cli import load_model

    return load_model(f"module:{ws / 'model.py'}:build")


def _images(ws):
    from captum_gig._sources import ImageData

    settings = {"data": str(ws / "images"), "image_size": 16, "normalize": "none", "augment": 0, "seed": 0}
    return ImageData.open(settings, 3, warn=lambda m: None)


def _manifest(out):
    with open(out / "manifest.json") as f:
        return json.load(f)


def _mtimes(out):
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(out)
        for f in files
        if f not in ("manifest.json", "config.json", "index.html") and ".state" not in d
    }


@pytest.mark.slow
def test_every_subcommand_then_run_resumes(workspace, capsys):
    ws, out = workspace, workspace / "out"
    args = common(ws)
    for command in ("extract", "fit", "decompose", "attribute", "graph", "evaluate"):
        assert main([command] + args) == 0, command
        assert _manifest(out)["this_invocation"][command]["status"] == "computed"
    model, data = _model(ws), _images(ws)
    assert len(data) == 3 * N_PER_CLASS and data.skipped == 1

    # extract: each PFV is the model's activation at its recorded image and position
    data_json = json.loads((out / "data.json").read_text())
    assert data_json["skipped_unreadable"] == 1 and data_json["n_images"] == 3 * N_PER_CLASS
    acts = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in LAYERS]
    with torch.no_grad():
        model(data.get(range(len(data))))
    for h in hooks:
        h.remove()
    for layer in LAYERS:
        pfvs = PFVSet.load(str(out / "pfvs" / f"{layer}.safetensors"))
        assert len(pfvs) == len(data) * PER_IMAGE and pfvs.layer == layer
        a = acts[layer].flatten(2)  # (N, C, P)
        expected = a[pfvs.image_index, :, pfvs.position]
        torch.testing.assert_close(pfvs.vectors, expected)
        assert (pfvs.labels == data.labels[pfvs.image_index]).all()

    # fit + decompose: stored coefficients are the Lasso solution on the stored basis; scores match
    decs = {}
    summary = json.loads((out / "decomposition.json").read_text())
    for layer in LAYERS:
        basis = ConceptBasis.load(str(out / "bases" / f"{layer}.safetensors"))
        assert basis.n_concepts == 6 and basis.layer == layer
        decs[layer] = PFVDecomposer(basis, alpha=basis.meta["alpha"])
        pfvs = PFVSet.load(str(out / "pfvs" / f"{layer}.safetensors"))
        U = load_coefficients(str(out / "coefficients" / f"{layer}.safetensors"))
        torch.testing.assert_close(U, decs[layer].transform(pfvs.vectors), atol=1e-5, rtol=1e-4)
        X_hat = decs[layer].inverse_transform(U)
        rel = ((pfvs.vectors - X_hat).norm(dim=1) / pfvs.vectors.norm(dim=1)).mean()
        assert summary[layer]["rel_l2"] == pytest.approx(float(rel), rel=1e-4)
        assert summary[layer]["l0_ratio"] == pytest.approx(float((U == 0).float().mean()), abs=1e-6)

    # attribute: per-class means equal GIG run directly over each class's images
    images = data.get(range(len(data)))
    ca = load_class_attribution(str(out / "attribution" / "class" / "block3.safetensors"))
    assert ca.classes.tolist() == [0, 1, 2] and ca.counts.tolist() == [N_PER_CLASS] * 3
    to_class = GeneralizedIntegratedGradients(model, "block3", decs["block3"])
    inter = load_class_attribution(str(out / "attribution" / "interlayer" / "block2--block3.safetensors"))
    g23 = GeneralizedIntegratedGradients(model, "block2", decs["block2"], "block3", decs["block3"])
    for c in range(3):
        idx = data.labels == c
        direct = to_class.attribute(images[idx], target=c, n_steps=8).mean(0)
        torch.testing.assert_close(ca.mean[c], direct, atol=1e-4, rtol=1e-3)
        # the GIG between layers is computed for the concepts the graphs keep, per class
        cols = [int(t) for t in inter.targets[inter.classes.tolist().index(c)] if t >= 0] if c in inter.classes else []
        if cols:
            mat = g23.attribute_matrix(images[idx], targets=cols, n_steps=8).mean(0)
            torch.testing.assert_close(inter.columns(c, cols), mat, atol=1e-4, rtol=1e-3)
    graphs = json.loads((out / "attribution" / "graphs.json").read_text())["graphs"]
    for spec, g in graphs.items():  # every edge into block3 of every graph has its column computed
        needed = {n["concept"] for n in g["nodes"] if n["layer"] == "block3"}
        for c in ({int(x) for x in g["targets"]}):
            row = inter.targets[inter.classes.tolist().index(c)].tolist()
            assert needed <= set(row), (spec, needed, row)

    # graph: JSON + PNG + HTML for a class, an image and a class pair (auto), readable back
    from captum_gig.graph import ConceptGraph

    index = json.loads((out / "graphs" / "index.json").read_text())
    kinds = sorted(g["spec"].split(":")[0] for g in index)
    assert kinds == ["class", "image", "pair"]
    for g in index:
        graph = ConceptGraph.from_json(str(out / g["json"]))
        assert {layer for layer in LAYERS} <= {n["layer"] for n in graph.to_dict()["nodes"]}
        assert (out / g["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<html" in (out / g["html"]).read_text().lower()

    # evaluate: curves over fractions 0..1 for GIG, the baselines and random, whose AUC is their trapezoid
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["methods"] == ["gig", "endpoint", "magnitude"]
    for name in ("c_deletion", "c_insertion", "interlayer_deletion|block2->block3"):
        cv = metrics["curves"][name]
        assert cv["fractions"][0] == 0.0 and cv["fractions"][-1] == 1.0
        assert set(cv["methods"]) == {"gig", "endpoint", "magnitude", "random"}
        for e in cv["methods"].values():
            assert e["auc"] == pytest.approx(float(np.trapezoid(e["scores"], cv["fractions"])), abs=1e-5)
    assert set(metrics["spearman_vs_ablation"]) >= {"block3->class|gig", "block2->block3|endpoint"}
    assert (out / "evaluation" / "curves.png").exists()

    manifest = _manifest(out)
    assert manifest["world_size"] == 1 and manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["stages"]) == {"extract", "fit", "decompose", "attribute", "graph", "evaluate"}
    assert all(s["seconds"] >= 0 for s in manifest["stages"].values())

    # `run` on the same folder resumes every stage: nothing is rewritten
    before = _mtimes(out)
    assert main(["run", "--out", str(out), "--quiet"]) == 0  # the settings come from config.json
    assert {s["status"] for s in _manifest(out)["this_invocation"].values()} == {"resumed"}
    assert _mtimes(out) == before
    assert (out / "index.html").exists()

    # a changed drawing setting recomputes the graphs only
    assert main(["run", "--out", str(out), "--quiet", "--atlas-top", "3"]) == 0
    status = {k: v["status"] for k, v in _manifest(out)["this_invocation"].items()}
    assert status == {"extract": "resumed", "fit": "resumed", "decompose": "resumed", "attribute": "resumed",
                      "graph": "computed", "evaluate": "resumed"}


def test_run_on_a_fresh_folder_does_all_stages_and_summarises(workspace, capsys):
    out = workspace / "fresh"
    args = [a for a in common(workspace, "fresh") if a != "--quiet"]
    assert main(["run"] + args + ["--graph", "class:bricks", "--class-layers", "all"]) == 0
    printed = capsys.readouterr()
    assert "skipping unreadable image" in printed.err and "broken.png" in printed.err
    assert f"artifacts in {out}" in printed.out and "index.html" in printed.out
    assert "skipped 1 unreadable image" in printed.out
    index = json.loads((out / "graphs" / "index.json").read_text())
    assert [g["spec"] for g in index] == ["class:bricks"]
    for layer in LAYERS:  # --class-layers all: GIG to classes of every layer
        assert (out / "attribution" / "class" / f"{layer}.safetensors").exists()
    html = (out / "index.html").read_text()
    assert "graphs/class_1.html" in html and "evaluation/curves.png" in html


def test_errors_name_the_problem_and_exit_non_zero(workspace, tmp_path, capsys):
    ws = workspace

    def fails(argv, *needles, status=2):
        assert main(argv) == status
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err)

    base = ["--model", f"module:{ws / 'model.py'}:build", "--quiet", "--device", "cpu", "--out", str(tmp_path / "o")]
    fails(["extract", *base, "--data", str(ws / "images"), "--layers", "block1", "blok2"], "blok2", "did you mean", "'block2'")
    fails(["extract", *base, "--data", str(tmp_path / "nowhere"), "--layers", "block1"], "no such folder")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    fails(["extract", *base, "--data", str(empty), "--layers", "block1"], "no readable images")
    (empty / "a" / "x.jpg").write_bytes(b"nope")
    fails(["extract", *base, "--data", str(empty), "--layers", "block1"], "skipping unreadable image", "no readable images", "1 unreadable")
    fails(["extract", *base, "--data", str(ws / "images")], "--layers is required")
    fails(["extract", "--model", "torchvision:resnet5O", "--data", "photos", "--layers", "x", "--out", str(tmp_path / "p")],
          "did you mean", "resnet50")
    fails(["extract", "--model", "module:nofile.py:build", "--layers", "x", "--out", str(tmp_path / "p")], "no such file")
    fails(["graph", *base, "--data", str(ws / "images"), "--layers", "block1", "--graph", "pear:1"], "expected class:")


def test_list_layers_and_python_dash_m(workspace):
    cmd = [sys.executable, "-m", "captum_gig", "extract", "--model", f"module:{workspace / 'model.py'}:build",
           "--image-size", "16", "--list-layers"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert "8x8x8" in lines["block2"] and "Sequential" in lines["block2"]  # 16 px, pooled once
    assert "6x16x16" in lines["block1.0"] and "3" in lines["head"]
