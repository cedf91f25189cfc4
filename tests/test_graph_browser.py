"""The interactive page in a real browser: headless Chromium driven over the DevTools protocol.

Checks that the graph renders (nodes and edges in the DOM), that there are no
console errors, that a real mouse click on a node shows its atlas and edges,
and that the edge-strength filter hides exactly the weaker edges. Set
CAPTUM_GIG_SCREENSHOT=/some/file.png to keep the screenshot.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import torch

from captum_gig.atlas import ConceptAtlas
from captum_gig.graph import ConceptGraph
from conftest import require, require_path

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
    "--remote-debugging-port=0", "--window-size=1400,900", "--remote-allow-origins=*",
]


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


class DevTools:
    """A minimal DevTools-protocol client over one websocket."""

    def __init__(self, url):
        websocket = require("websocket")
        self.ws = websocket.create_connection(url, timeout=20)
        self.next_id = 0
        self.events = []

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            if any(e.get("method") == event for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)

    def js(self, expression):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def click(self, x, y):
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


@pytest.fixture()
def browser():
    require_path(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        end = time.time() + 30
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > end or proc.poll() is not None:
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        dev = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield dev
        dev.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


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
    errors = [e for e in dev.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
