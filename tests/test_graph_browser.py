"""The interactive page in a real browser: headless Chromium driven over the DevTools protocol.

Checks that the graph renders (nodes and edges in the DOM), that there are no
console errors, that a real mouse click on a node shows its atlas and edges,
and that the edge-strength filter hides exactly the weaker edges. Set
CAPTUM_GIG_SCREENSHOT=/some/file.png to keep the screenshot.
"""

import os

import numpy as np
import pytest
import torch

from browser import CHROMIUM, chromium, problems
from captum_gig.atlas import ConceptAtlas
from captum_gig.graph import ConceptGraph
from conftest import require, require_path


def make_graph_and_atlases():
    g = torch.Generator().manual_seed(0)
    K = [10, 9, 8]
    inter = [torch.randn(K[0], K[1], generator=g), torch.randn(K[1], K[2], generator=g)]
    cls_attr = torch.randn(2, K[2], generator=g).abs()
    graph = ConceptGraph.from_attributions(["conv1", "conv2", "conv3"], cls_attr, inter, target=[1, 4], top_k=2,
                                           n_shared=1, class_names=[f"class{i}" for i in range(6)])
    rng = np.random.default_rng(0)
    atlases = {}
    for layer in ("conv2", "conv3"):  # conv1 has no atlas: its nodes are drawn as labels
        concepts = graph.concepts(layer)
        entries = {c: [{"pfv": i, "image": i, "position": 0, "cosine": 0.9 - 0.1 * i, "label": 1, "class_name": "class1",
                        "rf_box": [0, 0, 8, 8], "box": [1, 1, 5, 5], "crop_box": [0, 0, 6, 6]} for i in range(3)]
                   for c in concepts}
        crops = {c: rng.integers(0, 255, size=(3, 16, 16, 3), dtype=np.uint8) for c in concepts}
        atlases[layer] = ConceptAtlas(layer, entries, crops, {"top_k": 3})
    return graph, atlases


@pytest.fixture()
def browser():
    require_path(CHROMIUM)
    require("websocket")
    with chromium() as dev:
        yield dev


def test_page_renders_and_a_click_shows_the_atlas(browser, tmp_path):
    graph, atlases = make_graph_and_atlases()
    page = tmp_path / "graph.html"
    html = graph.to_html(str(page), atlases=atlases)
    assert "<script src" not in html and "<link" not in html
    dev = browser
    for domain in ("Page", "Runtime", "Log", "Network"):
        dev.call(f"{domain}.enable")
    dev.call("Page.navigate", url=page.as_uri())
    dev.wait_for("Page.loadEventFired")

    assert dev.js("document.querySelectorAll('#nodes g.node').length") == len(graph.nodes)
    assert dev.js("document.querySelectorAll('#edges line.edge').length") == len(graph.edges)
    assert dev.js("document.querySelectorAll('#nodes g.node image').length") == sum(
        len(a.concepts) for a in atlases.values())

    # a real mouse click on a conv3 concept node
    target = f"conv3:{graph.concepts('conv3')[0]}"
    rect = dev.js(f"(function(){{var r=document.querySelector('g.node[data-id=\"{target}\"]').getBoundingClientRect();"
                  "return [r.left + r.width / 2, r.top + r.height / 2];})()")
    dev.click(*rect)
    assert dev.js("document.querySelectorAll('#panel img.atlas-crop').length") == 3
    assert dev.js(f"document.querySelector('g.node[data-id=\"{target}\"]').classList.contains('selected')")
    panel = dev.js("document.getElementById('panel').innerText")
    assert "Strongest incoming edges" in panel and "Strongest outgoing edges" in panel and "class1" in panel
    strongest_in = max((e for e in graph.edges if e["target"] == target), key=lambda e: e["weight"])
    assert graph.nodes[[n["id"] for n in graph.nodes].index(strongest_in["source"])]["name"] in panel

    # the edge-strength filter
    dev.js("(function(){var s=document.getElementById('min-weight'); s.value='0.5';"
           "s.dispatchEvent(new Event('input'));})()")
    shown = dev.js("Array.from(document.querySelectorAll('#edges line.edge')).filter(l => l.style.display !== 'none').length")
    assert shown == sum(1 for e in graph.edges if e["weight"] >= 0.5)

    # self-contained: the page itself and data: URIs are all that was loaded
    urls = [e["params"]["request"]["url"] for e in dev.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls

    shot = dev.call("Page.captureScreenshot", format="png")["data"]
    keep = os.environ.get("CAPTUM_GIG_SCREENSHOT")
    if keep:
        import base64

        with open(keep, "wb") as f:
            f.write(base64.b64decode(shot))
    errors = problems(dev.events)
    assert not errors, errors
