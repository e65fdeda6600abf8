"""An edge client's own data: a folder of class folders of images, shaped and labelled like a dataset.

    DIR/<class>/<image>      <class> = a class index ('0', '1', ...) or the dataset's class name

Forgiving where a real folder is messy: hidden entries (``.ipynb_checkpoints``,
``.DS_Store``) are ignored, empty class folders are fine, and a file that cannot
be read as an image (truncated, zero bytes, not an image) is skipped with a
warning that names it. Grayscale, RGB, RGBA, palette, 16-bit and CMYK images
all become the dataset's channels and size. Strict where a mistake would train
on wrong labels: a class folder the dataset does not know, or no usable image at
all, is an error naming the folder.
"""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common import log
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, resize

from common.config import ConfigError
from common.data import SHAPES_AND_CLASSES, Dataset, standardize


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as 8-bit grayscale (``channels`` 1) or RGB (3).

    16-bit and 32-bit integer images are scaled by their type's range (not
    clipped at 255); transparent pixels are composed onto white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        top = 65535.0 if image.mode.startswith("I;16") else max(float(np.asarray(image).max()), 1.0)
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / top * 255.0).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert("L" if channels == 1 else "RGB")


def _read(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor | None:
    """The image at ``path`` as a (C, H, W) float tensor in [0, 1], or None if unreadable."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            pixels = pil_to_tensor(to_mode(image, channels))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        log(WARNING, "fl-distill: skipping %s: not a readable image (%s)", path, err)
        return None
    return resize(pixels, list(size), antialias=True).float() / 255.0


def read_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor | None:
    """One image preprocessed exactly as for training: (C, H, W) standardized, or None (warned) if unreadable."""
    pixels = _read(path, channels, size)
    return None if pixels is None else standardize(pixels)


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and every visible file under the folders named, in sorted order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            found.append(path)
    return found


def load_image_folder(data_dir: str, dataset: str) -> Dataset:
    """This client's images under ``data_dir``, shaped and labelled like ``dataset``.

    Returns the usable images only (``len`` is the client's ``num-examples``).
    Raises ConfigError naming the folder when it is missing, has a class folder
    the dataset does not know, or holds no usable image.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"node config 'data-dir' = {data_dir!r} is not a folder")
    (channels, height, width), class_names = SHAPES_AND_CLASSES[dataset]
    label_of = {name: i for i, name in enumerate(class_names)} | {str(i): i for i in range(len(class_names))}
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    unknown = [p.name for p in class_dirs if p.name not in label_of]
    if unknown:
        raise ConfigError(
            f"data-dir {data_dir!r} has class folder(s) {unknown} that dataset '{dataset}' does not know; "
            f"name folders 0..{len(class_names) - 1} or {list(class_names)}"
        )
    images, labels = [], []
    for class_dir in class_dirs:
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and _visible(p)
                           and all(_visible(part) for part in p.relative_to(class_dir).parents if part.name)):
            if (pixels := _read(path, channels, (height, width))) is not None:
                images.append(pixels)
                labels.append(label_of[class_dir.name])
    if not images:
        raise ConfigError(
            f"data-dir {data_dir!r} holds no usable image: expected DIR/<class>/<image> with <class> one of "
            f"0..{len(class_names) - 1} or {list(class_names)}"
        )
    return Dataset(dataset, standardize(torch.stack(images)), torch.tensor(labels, dtype=torch.long), class_names)
