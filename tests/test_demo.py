"""``captum-gig demo --quick``: both parts into one report; a missing dataset is one note, not a failure."""

import re

import pytest

from captum_gig import zoo
from captum_gig.cli import main
from conftest import require_path

pytestmark = pytest.mark.slow


def _sections(html):
    return [re.sub("<[^>]+>", "", h) for h in re.findall(r"<h[23]>(.*?)</h[23]>", html)]


def test_quick_demo_shows_both_parts_in_one_report(tmp_path, capsys):
    require_path(zoo.FASHION_MNIST_ROOT)
    require_path(zoo.OPENCV_SAMPLES)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    html = (out / "index.html").read_text()
    heads = _sections(html)
    assert heads.count("Concepts and decomposition") == 2 and heads.count("Evaluation") == 2
    assert "Part 1: Fashion-MNIST, the whole dataset" in heads and "Part 2: an ImageNet model on real photos" in heads
    assert "Which concepts the classes use" in heads and "Pairs of similar classes" in heads
    # every class of Fashion-MNIST has its graph; the pair of confusable classes too
    assert len(re.findall(r"fashion-mnist/graphs/class_\d\.png", html)) == 10
    assert "fashion-mnist/graphs/pair_6_0.png" in html
    for part in ("fashion-mnist", "photos"):
        assert (out / part / "index.html").exists() and (out / part / "evaluation" / "metrics.json").exists()
    # the photos part counts distinct photos, not augmented copies of one photo
    import json

    diag = json.loads((out / "photos" / "diagnostics.json").read_text())
    photos = json.loads((out / "photos" / "data.json").read_text())["sources"]
    assert max(photos) + 1 < len(photos)  # augmented: several images per photo
    assert all(d["median_distinct_images"] <= max(photos) + 1 for d in diag.values())


def test_demo_without_fashion_mnist_says_so_once_and_runs_the_photos(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(zoo, "fashion_mnist_available", lambda *a, **k: False)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("Fashion-MNIST is not installed") == 1
    html = (out / "index.html").read_text()
    assert "Part 2: an ImageNet model on real photos" in _sections(html)
    assert "Part 1" not in " ".join(_sections(html)) and "Fashion-MNIST is not installed" in html
    assert not (out / "fashion-mnist").exists()
