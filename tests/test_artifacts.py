"""Artifacts are safetensors + JSON only: no unpickling, clear errors for damaged or foreign files,
atomic writes."""

import json
import os
import pickle

import pytest
import torch

from captum_gig import ConceptBasis, GeneralizedIntegratedGradients, PFVDecomposer, PFVSet
from captum_gig import _io
from helpers import SmallCNN


def basis_file(tmp_path):
    basis = ConceptBasis(torch.randn(6, 4), torch.randn(4), layer="block1", method="given")
    path = str(tmp_path / "basis.safetensors")
    basis.save(path)
    return basis, path


def rewrite_header(path, edit):
    """Rewrite the JSON header of a safetensors file (the way a tamperer would)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    open(path, "wb").write(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def test_loading_never_unpickles(tmp_path, monkeypatch):
    basis, path = basis_file(tmp_path)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("unpickling"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load unpickles"))
    loaded = ConceptBasis.load(path)
    assert torch.equal(loaded.vectors, basis.vectors) and loaded.layer == "block1"


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    _, path = basis_file(tmp_path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["captum_gig"])
        assert set(f.keys()) == {"vectors", "offset"}
    assert meta["kind"] == "ConceptBasis" and meta["n_channels"] == 4 and "captum_gig_version" in meta


def test_truncated_file(tmp_path):
    _, path = basis_file(tmp_path)
    data = open(path, "rb").read()
    for cut in (4, len(data) // 2, len(data) - 1):
        open(path, "wb").write(data[:cut])
        with pytest.raises(ValueError, match="corrupt or truncated"):
            ConceptBasis.load(path)


def test_tampered_shapes_are_detected(tmp_path):
    _, path = basis_file(tmp_path)

    def lie(header):
        meta = json.loads(header["__metadata__"]["captum_gig"])
        meta["n_channels"] = 5
        header["__metadata__"]["captum_gig"] = json.dumps(meta)

    rewrite_header(path, lie)
    with pytest.raises(ValueError, match="do not match its metadata"):
        ConceptBasis.load(path)


def test_garbage_metadata(tmp_path):
    _, path = basis_file(tmp_path)
    rewrite_header(path, lambda h: h["__metadata__"].update(captum_gig="{not json"))
    with pytest.raises(ValueError, match="unreadable captum_gig metadata"):
        ConceptBasis.load(path)


def test_foreign_safetensors_and_wrong_kind(tmp_path):
    from safetensors.torch import save_file

    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"vectors": torch.randn(2, 2)}, foreign)
    with pytest.raises(ValueError, match="without captum_gig metadata"):
        ConceptBasis.load(foreign)
    _, path = basis_file(tmp_path)
    with pytest.raises(ValueError, match="holds a 'ConceptBasis', not a 'PFVSet'"):
        PFVSet.load(path)
    with pytest.raises(FileNotFoundError):
        ConceptBasis.load(str(tmp_path / "missing.safetensors"))


def test_other_version_warns(tmp_path):
    _, path = basis_file(tmp_path)

    def older(header):
        meta = json.loads(header["__metadata__"]["captum_gig"])
        meta["captum_gig_version"] = "0.0.1"
        header["__metadata__"]["captum_gig"] = json.dumps(meta)

    rewrite_header(path, older)
    with pytest.warns(UserWarning, match="written by captum_gig 0.0.1"):
        ConceptBasis.load(path)


def test_basis_from_another_layer_is_flagged():
    model = SmallCNN().eval()
    dec = PFVDecomposer(ConceptBasis(torch.randn(16, 8), layer="block3"))
    with pytest.warns(UserWarning, match="fitted on layer 'block3', not on 'block1'"):
        GeneralizedIntegratedGradients(model, "block1", dec)


def test_interrupted_write_leaves_no_artifact(tmp_path, monkeypatch):
    path = str(tmp_path / "basis.safetensors")
    real_save = _io.save_file

    def dies_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(_io, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ConceptBasis(torch.randn(3, 2)).save(path)
    assert os.listdir(tmp_path) == []  # neither the artifact nor a temporary file


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    basis, path = basis_file(tmp_path)
    monkeypatch.setattr(_io, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ConceptBasis(torch.randn(9, 9)).save(path)
    assert torch.equal(ConceptBasis.load(path).vectors, basis.vectors)  # the old artifact is intact
    assert os.listdir(tmp_path) == ["basis.safetensors"]


def test_artifacts_get_ordinary_file_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the process's umask gives a new file
    _, path = basis_file(tmp_path)
    _io.atomic_write_text(str(tmp_path / "graph.json"), "{}")
    expected = os.stat(plain).st_mode & 0o777
    assert os.stat(path).st_mode & 0o777 == expected
    assert os.stat(tmp_path / "graph.json").st_mode & 0o777 == expected
