"""ConceptGraph: edges are the GIG values they claim, selection follows its rule, exact JSON round trip."""

import json

import pytest
import torch

from captum_gig import GeneralizedIntegratedGradients
from captum_gig.graph import ConceptGraph
from conftest import require
from helpers import SmallCNN, make_decomposer, randomize_bn

LAYERS = ["block1", "block2", "block3"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread start-up dominates on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN(channels=(4, 6, 8))).eval()
    images = torch.randn(10, 3, 12, 12)
    decs = [make_decomposer(model, name, images, k_factor=2, offset=getattr(model, name)[1]) for name in LAYERS]
    return model, images[:3], decs


@pytest.fixture(scope="module")
def pair_graph(setup):
    model, x, decs = setup
    return ConceptGraph.build(model, LAYERS, decs, x, target=(0, 3), top_k=3, n_shared=2, n_steps=16, progress=False)


def _mean_gig(model, a, dec_a, b, dec_b, x, target):
    gig = GeneralizedIntegratedGradients(model, a, dec_a, b, dec_b)
    return gig.attribute(x, target=target, n_steps=16).mean(0).double()


def test_edges_equal_gig_recomputed_with_attribute(setup, pair_graph):
    model, x, decs = setup
    g = pair_graph
    # class edges: last layer -> class, eq. 7, averaged over the images
    for c in g.targets:
        ref = _mean_gig(model, "block3", decs[2], None, None, x, c)
        for q in g.concepts("block3"):
            e = g.edge(("block3", q), ("class", c))
            assert e["gig"] == pytest.approx(float(ref[q]), rel=1e-4, abs=1e-6 * float(ref.abs().max()))
    # concept edges between layer pairs, eq. 5
    for i in (0, 1):
        a, b = LAYERS[i], LAYERS[i + 1]
        for t in g.concepts(b)[:2]:
            ref = _mean_gig(model, a, decs[i], b, decs[i + 1], x, t)
            for q in g.concepts(a):
                e = g.edge((a, q), (b, t))
                assert e["gig"] == pytest.approx(float(ref[q]), rel=1e-4, abs=1e-6 * float(ref.abs().max()))


def test_weights_are_abs_gig_normalised_per_layer_pair(pair_graph):
    g = pair_graph
    layer_of = {n["id"]: n["layer"] for n in g.nodes}
    pairs = {}
    for e in g.edges:
        pairs.setdefault((layer_of[e["source"]], layer_of[e["target"]]), []).append(e)
    assert set(pairs) == {("block1", "block2"), ("block2", "block3"), ("block3", "class")}
    for edges in pairs.values():
        m = max(abs(e["gig"]) for e in edges)
        for e in edges:
            assert 0.0 <= e["weight"] <= 1.0
            assert e["weight"] == pytest.approx(abs(e["gig"]) / m)
        assert max(e["weight"] for e in edges) == 1.0
    # complete bipartite between chosen concepts of neighbouring layers
    assert len(pairs[("block1", "block2")]) == len(g.concepts("block1")) * len(g.concepts("block2"))


def test_shared_concepts_are_in_every_class_top_list(setup, pair_graph):
    model, x, decs = setup
    g = pair_graph
    refs = {c: _mean_gig(model, "block3", decs[2], None, None, x, c) for c in g.targets}
    order = {c: torch.argsort(-refs[c], stable=True).tolist() for c in g.targets}
    shared = [n["concept"] for n in g.nodes if n["layer"] == "block3" and n["shared"]]
    m = g.meta["shared_pool"]["block3"]
    assert len(shared) == 2
    for c in g.targets:
        assert set(shared) <= set(order[c][:m])  # in both classes' top-m ...
        assert all(refs[c][q] > 0 for q in shared)
    # ... and no smaller m holds two positive concepts common to both top lists
    common = set(order[0][: m - 1]) & set(order[3][: m - 1])
    assert len([q for q in common if refs[0][q] > 0 and refs[3][q] > 0]) < 2
    # each class adds its own top-3 among the rest
    for c in g.targets:
        own = [q for q in order[c] if q not in shared][:3]
        nodes_c = {n["concept"] for n in g.nodes if n["layer"] == "block3" and c in n["classes"]}
        assert nodes_c == set(own) | set(shared)


def test_build_reuses_forwards_through_attribute_matrix(setup, monkeypatch):
    model, x, decs = setup
    calls = []
    original = GeneralizedIntegratedGradients.attribute_matrix

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["targets"]))
        return original(self, *args, **kwargs)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("build must not run GIG per node pair")

    monkeypatch.setattr(GeneralizedIntegratedGradients, "attribute_matrix", counting)
    monkeypatch.setattr(GeneralizedIntegratedGradients, "attribute", forbidden)
    g = ConceptGraph.build(model, LAYERS, decs, x[0], target=2, top_k=2, n_steps=8, progress=False)
    assert len(calls) == len(LAYERS)  # one call per layer pair (and the class), all targets at once
    assert calls[0] == 1 and calls[1] == len(g.concepts("block3")) and calls[2] == len(g.concepts("block2"))
    assert g.meta["n_inputs"] == 1 and all(len(g.concepts(layer)) == 2 for layer in LAYERS)


def test_from_attributions_follows_relevance_flow_on_planted_paths():
    torch.manual_seed(1)
    K = [12, 10, 9]
    inter = [torch.randn(K[0], K[1]) * 0.01, torch.randn(K[1], K[2]) * 0.01]
    cls_attr = torch.randn(2, K[2]) * 0.01
    cls_attr[0, 4], cls_attr[1, 4] = 5.0, 4.0  # concept 4 of the last layer: both classes
    cls_attr[0, 1], cls_attr[1, 7] = 6.0, 6.0  # 1: class 0 only, 7: class 1 only
    inter[1][3, 4], inter[1][6, 1], inter[1][2, 7] = 3.0, 3.0, 3.0
    inter[0][11, 3] = 2.0  # feeds the shared path
    g = ConceptGraph.from_attributions(
        ["l0", "l1", "l2"], cls_attr, inter, target=[5, 9], top_k=1, n_shared=1, class_names=[f"c{i}" for i in range(10)]
    )
    assert g.node("l2", 4)["shared"] and g.node("l2", 1)["classes"] == [5] and g.node("l2", 7)["classes"] == [9]
    assert g.node("l1", 3)["shared"] and {6, 2} <= set(g.concepts("l1"))
    assert g.node("l0", 11)["shared"]
    assert g.node("class", 5)["name"] == "c5"
    assert g.edge(("l1", 3), ("l2", 4))["gig"] == pytest.approx(3.0) and g.edge(("l1", 3), ("l2", 4))["weight"] == 1.0
    # flow rule on a layer, checked by hand: R(q) = sum_t share(q, t) R(t)
    share = inter[1].double() / inter[1].double().abs().sum(0)
    r = sum(share[:, t] * float(cls_attr[0, t]) for t in g.concepts("l2") if 5 in g.node("l2", t)["classes"])
    assert g.node("l1", 6)["scores"]["5"] == pytest.approx(float(r[6]))


def test_from_attributions_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="interlayer\\[0\\]"):
        ConceptGraph.from_attributions(["a", "b"], torch.zeros(4), [torch.zeros(3, 5)], target=0)
    with pytest.raises(ValueError, match="class_attribution"):
        ConceptGraph.from_attributions(["a"], torch.zeros(2, 4), [], target=0)
    with pytest.raises(ValueError, match="target"):
        ConceptGraph.from_attributions(["a"], torch.zeros(4), [], target="cat")


def test_json_round_trip_is_exact(pair_graph, tmp_path):
    path = str(tmp_path / "graph.json")
    text = pair_graph.to_json(path)
    back = ConceptGraph.from_json(path)
    assert back == pair_graph
    assert back.to_json() == text
    assert [e["gig"] for e in back.edges] == [e["gig"] for e in pair_graph.edges]  # bit-exact floats
    assert ConceptGraph.from_json(text) == pair_graph
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "PFVSet"}))
    with pytest.raises(ValueError, match="ConceptGraph"):
        ConceptGraph.from_json(str(bad))


def test_to_networkx(pair_graph):
    nx = require("networkx")
    g = pair_graph.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert g.number_of_nodes() == len(pair_graph.nodes) and g.number_of_edges() == len(pair_graph.edges)
    e = pair_graph.edges[0]
    src = next(n for n in pair_graph.nodes if n["id"] == e["source"])
    dst = next(n for n in pair_graph.nodes if n["id"] == e["target"])
    data = g.edges[(src["layer"], src["concept"]), (dst["layer"], dst["concept"])]
    assert data["gig"] == e["gig"] and data["weight"] == e["weight"]
    assert nx.is_directed_acyclic_graph(g)
    assert {("class", 0), ("class", 3)} <= set(g.nodes)


def test_plot_draws_one_line_per_shown_edge_and_writes_a_png(tmp_path):
    require("matplotlib")
    torch.manual_seed(0)
    g = ConceptGraph.from_attributions(["a", "b"], torch.rand(6), [torch.randn(5, 6)], target=2, top_k=3)
    path = str(tmp_path / "g.png")
    fig = g.plot(path, min_weight=0.3)
    ax = fig.axes[0]
    assert len(ax.lines) == sum(1 for e in g.edges if e["weight"] >= 0.3)
    widths = sorted(line.get_linewidth() for line in ax.lines)
    assert widths[-1] == pytest.approx(0.3 + 4.0)  # the strongest edge of its pair has weight 1
    from PIL import Image

    assert Image.open(path).size[0] > 500


def test_build_over_a_loader_averages_like_one_batch(setup):
    model, x, decs = setup
    a = ConceptGraph.build(model, LAYERS, decs, x, target=1, top_k=2, n_steps=8, progress=False)
    loader = [(x[:2], torch.tensor([1, 1])), (x[2:], torch.tensor([1]))]  # uneven batches, with labels
    b = ConceptGraph.build(model, LAYERS, decs, loader, target=1, top_k=2, n_steps=8, progress=False)
    assert [n["id"] for n in a.nodes] == [n["id"] for n in b.nodes] and b.meta["n_inputs"] == 3
    scale = max(abs(e["gig"]) for e in a.edges)  # float32 Lasso: batch composition moves the last digits
    assert [e["gig"] for e in b.edges] == pytest.approx([e["gig"] for e in a.edges], rel=1e-4, abs=1e-5 * scale)


def test_selection_driven_step_by_step_equals_from_attributions():
    from captum_gig import ConceptGraph

    g = torch.Generator().manual_seed(5)
    layers = ["l0", "l1", "l2"]
    ca = torch.randn(2, 9, generator=g)
    inter = [torch.randn(7, 8, generator=g), torch.randn(8, 9, generator=g)]
    want = ConceptGraph.from_attributions(layers, ca, inter, target=(0, 1), top_k=3, n_shared=2)
    steps = ConceptGraph.selection(layers, ca, target=(0, 1), top_k=3, n_shared=2)
    asked = []
    request = next(steps)
    try:
        while True:
            i, cols = request
            asked.append((i, cols))
            request = steps.send(inter[i][:, cols])  # only the columns the graph keeps
    except StopIteration as done:
        got = done.value
    assert got == want
    assert [i for i, _ in asked] == [1, 0]  # from the top layer down
    assert asked[0][1] == want.concepts("l2") and asked[1][1] == want.concepts("l1")
