"""The pipeline as a Python API: stages one by one, the graphs' columns against full matrices, held-out data."""

import json

import numpy as np
import pytest
import torch

from captum_gig import ConceptGraph, pipeline
from captum_gig._stages import stratified
from test_cli import MODEL_SOURCE, _write_images

LAYERS = ["block1", "block2", "block3"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    (root / "model.py").write_text(MODEL_SOURCE)
    _write_images(root / "images", np.random.default_rng(3))
    return root


def config(ws, **kw):
    settings = dict(model=f"module:{ws / 'model.py'}:build", data=str(ws / "images"), layers=LAYERS, image_size=16,
                    by="label", per_image=4, concepts=6, n_steps=8, top_k=2, atlas_top=2, eval_steps=4,
                    eval_images=6, batch_size=7, graph=["class:all", "pair:apples,bricks"])
    settings.update(kw)
    return pipeline.Config(**settings)


def test_stratified_subsets_take_turns_between_classes():
    classes = torch.tensor([0] * 50 + [1] * 5 + [2] * 20)
    idx = stratified(classes, 24, seed=0)
    counts = torch.bincount(classes[idx], minlength=3).tolist()
    assert counts == [10, 5, 9] and idx == sorted(idx) and len(set(idx)) == 24  # the small class gives its share away
    assert stratified(classes, 24, seed=0) == idx and stratified(classes, 24, seed=1) != idx  # seeded
    assert torch.bincount(classes[stratified(classes, None, 0, per_class=7)]).tolist() == [7, 5, 7]
    assert set(classes[stratified(classes, None, 0, only=[2])].tolist()) == {2}
    assert len(stratified(classes, 1000, 0)) == 75


def test_stages_from_python_resume_from_the_cli_and_give_library_objects(workspace, tmp_path):
    from captum_gig.cli import main

    pipe = pipeline.Pipeline(config(workspace), tmp_path / "out", device="cpu", quiet=True)
    pipe.extract()
    pipe.fit()
    assert pipe.timings["extract"]["status"] == "computed" and "decompose" not in pipe.timings
    pipe.run()
    assert (tmp_path / "out" / "index.html").exists()
    dec = pipe.decomposer("block2")
    assert dec.n_concepts == 6 and dec.alpha == pipe.basis("block2").meta["alpha"]
    assert pipe.pfvs("block1").layer == "block1"
    ca = pipe.class_attribution("block3")
    assert ca.classes.tolist() == [0, 1, 2]
    graphs = pipe.graphs()
    assert sorted(graphs) == ["class:0", "class:1", "class:2", "pair:apples,bricks"]  # class:all expanded
    assert isinstance(graphs["pair:apples,bricks"], ConceptGraph) and graphs["pair:apples,bricks"].targets == [0, 1]
    # the same folder format: the CLI resumes every stage the Python API computed
    assert main(["run", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {v["status"] for v in manifest["this_invocation"].values()} == {"resumed"}
    with pytest.raises(pipeline.PipelineError, match="unknown settings"):
        pipeline.Config.from_dict({"modle": "x"})
    with pytest.raises(pipeline.PipelineError, match="interlayer"):
        pipeline.Pipeline(config(workspace, interlayer="some"), tmp_path / "bad")
    with pytest.raises(pipeline.PipelineError, match="baselines"):
        pipeline.Pipeline(config(workspace, baselines=["lrp"]), tmp_path / "bad")


def test_graph_columns_give_the_graphs_of_the_full_matrices(workspace, tmp_path):
    """GIG between layers only for the graphs' concepts: the same graphs as from every concept's column."""
    graph_only = pipeline.Pipeline(config(workspace), tmp_path / "graph", device="cpu", quiet=True)
    graph_only.attribute()
    full = pipeline.Pipeline(config(workspace, interlayer="all"), tmp_path / "all", device="cpu", quiet=True)
    full.attribute()
    a, b = graph_only.graphs(), full.graphs()
    assert sorted(a) == sorted(b)
    for spec in a:
        assert [n["id"] for n in a[spec].nodes] == [n["id"] for n in b[spec].nodes], spec
        ea = {(e["source"], e["target"]): e["gig"] for e in a[spec].edges}
        eb = {(e["source"], e["target"]): e["gig"] for e in b[spec].edges}
        assert ea.keys() == eb.keys()
        for key in ea:
            assert ea[key] == pytest.approx(eb[key], rel=1e-4, abs=1e-6), (spec, key)
    # and the graph-only artifact holds fewer columns than the full one
    inter = graph_only.path("attribution", "interlayer", "block2--block3.safetensors")
    from captum_gig.pipeline import load_class_attribution

    cols = load_class_attribution(inter)
    assert cols.targets is not None and cols.mean.shape[2] < 6


def test_concepts_fitted_on_other_images_than_those_attributed(workspace, tmp_path):
    from PIL import Image

    fit = tmp_path / "fit"
    rng = np.random.default_rng(9)
    for c, name in enumerate(["apples", "bricks", "clouds"]):
        (fit / name).mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 60, size=(24, 24, 3))
            img[..., c] += 150
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(fit / name / f"{i}.png")
    pipe = pipeline.Pipeline(config(workspace, fit_data=str(fit)), tmp_path / "out", device="cpu", quiet=True)
    assert pipe.has_heldout
    pipe.decompose()
    assert len(pipe.fit_data) == 12 and len(pipe.data) == 18
    fitted, held = pipe.pfvs("block2"), pipe.pfvs("block2", heldout=True)
    assert int(fitted.image_index.max()) == 11 and int(held.image_index.max()) == 17
    summary = json.loads((tmp_path / "out" / "decomposition.json").read_text())["block2"]
    dec = pipe.decomposer("block2")
    U = dec.transform(held.vectors)
    rel = float(((held.vectors - dec.inverse_transform(U)).norm(dim=1) / held.vectors.norm(dim=1)).mean())
    assert summary["heldout"]["rel_l2"] == pytest.approx(rel, rel=1e-4) and summary["n_pfvs"] == 12 * 4
    diag = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert set(diag) == set(LAYERS) and len(diag["block2"]["distinct_images"]) == 6


def test_spearman_of_the_evaluation_agrees_with_scipy():
    from scipy.stats import spearmanr

    from captum_gig._stages import _spearman

    g = torch.Generator().manual_seed(0)
    attr = torch.randn(40, 50, generator=g).round()  # ties in the attributions, averaged as scipy does
    exact = torch.randn(40, 50, generator=g)
    exact[exact.abs() < 0.4] = 0  # absent concepts are left out
    exact[3, 2:] = 0  # fewer than 3 present: the row is skipped
    attr[7] = 1.0  # a constant order: skipped
    expected = []
    for a, e in zip(attr.double(), exact.double()):
        idx = (e != 0).nonzero().flatten()
        idx = idx[e[idx].abs().argsort(descending=True)[:32]]
        if idx.numel() >= 3 and a[idx].unique().numel() > 1:
            expected.append(spearmanr(a[idx].numpy(), e[idx].numpy()).statistic)
    got = _spearman(attr, exact, 32)
    assert len(got) == len(expected) == 38
    assert max(abs(x - y) for x, y in zip(got, expected)) < 1e-6


def test_interlayer_curves_on_a_share_of_the_evaluated_images(workspace, tmp_path):
    pipe = pipeline.Pipeline(config(workspace, eval_images=12, eval_interlayer_images=6), tmp_path / "out",
                             device="cpu", quiet=True)
    pipe.run(["evaluate"], report=False)
    metrics = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    assert metrics["n_images"] == 12 and metrics["interlayer_images"] == 6
    for curve, entry in metrics["curves"].items():
        expected = 6 if curve.startswith("interlayer") else 12
        assert {e["n_images"] for e in entry["methods"].values()} == {expected}, curve


def test_the_solver_setting_recomputes_only_the_decomposition_and_solves_the_same_lasso(workspace, tmp_path):
    out = tmp_path / "out"
    auto = pipeline.Pipeline(config(workspace), out, device="cpu", quiet=True)
    auto.run(["extract", "fit", "decompose"], report=False)
    U_auto = auto.coefficients("block2")
    fista = pipeline.Pipeline(config(workspace, solver="fista"), out, device="cpu", quiet=True)
    fista.run(["extract", "fit", "decompose"], report=False)
    assert [fista.timings[s]["status"] for s in ("extract", "fit", "decompose")] == ["resumed", "resumed", "computed"]
    dec = fista.decomposer("block2")
    assert dec.solver == "fista" and auto.decomposer("block2").solver == "auto"
    X = fista.pfvs("block2").vectors
    U_fista = fista.coefficients("block2")
    assert U_fista.shape == U_auto.shape == (len(X), 6)
    # the same Lasso solved two ways (homotopy at these 6 channels, FISTA): the same objective per PFV
    assert torch.allclose(dec.objective(X, U_fista), dec.objective(X, U_auto), rtol=1e-3, atol=1e-6)
    with pytest.raises(pipeline.PipelineError, match="solver"):
        pipeline.Pipeline(config(workspace, solver="lars"), tmp_path / "bad")
