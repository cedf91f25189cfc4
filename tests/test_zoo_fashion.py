"""Fashion-MNIST loader (idx files of Debian's dataset-fashion-mnist) and the committed CNN."""

import gzip
import os

import numpy as np
import pytest
import torch

from captum_gig import zoo
from conftest import require_path


@pytest.fixture(scope="module")
def root():
    return require_path(zoo.FASHION_MNIST_ROOT)


def raw(root, name, offset):
    with gzip.open(os.path.join(root, name), "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)[offset:]


def test_loader_matches_the_raw_idx_bytes(root):
    x, y = zoo.fashion_mnist("test", limit=300, root=root)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    pixels = raw(root, "t10k-images-idx3-ubyte.gz", 16)[: 300 * 784].reshape(300, 28, 28)
    labels = raw(root, "t10k-labels-idx1-ubyte.gz", 8)[:300]
    np.testing.assert_array_equal((x[:, 0] * 255).round().numpy().astype(np.uint8), pixels)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the well-known first test labels


def test_split_sizes_and_classes(root):
    _, y = zoo.fashion_mnist("test", root=root)
    assert y.shape == (10000,) and torch.bincount(y).tolist() == [1000] * 10
    assert len(zoo.FASHION_MNIST_CLASSES) == 10 and zoo.FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_missing_data_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        zoo.fashion_mnist("train", root=str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        zoo.fashion_mnist("valid")


def test_committed_cnn_accuracy_and_blocks(root):
    path = zoo.fashion_mnist_weights_path()
    assert os.path.getsize(path) < 1024 * 1024
    model = zoo.fashion_mnist_cnn()
    assert not model.training
    x, y = zoo.fashion_mnist("test", limit=2000, root=root)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.87, acc
    # every documented block is hookable and ends in BatchNorm (the paper's offset applies)
    shapes = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: shapes.__setitem__(n, out.shape))
               for n in zoo.FASHION_MNIST_LAYERS]
    try:
        with torch.no_grad():
            model(x[:2])
    finally:
        for h in handles:
            h.remove()
    assert [tuple(shapes[n][1:]) for n in zoo.FASHION_MNIST_LAYERS] == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]
    for n in zoo.FASHION_MNIST_LAYERS:
        assert isinstance(model.get_submodule(n)[-1], torch.nn.BatchNorm2d)


def test_untrained_model_differs():
    torch.manual_seed(0)
    a = zoo.fashion_mnist_cnn(pretrained=False)
    b = zoo.fashion_mnist_cnn()
    assert not torch.equal(a.head[-1].weight, b.head[-1].weight)
