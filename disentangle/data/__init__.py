"""Datasets: detect a folder's format and open it as square RGB images with keys, splits, labels.

`open_dataset(spec, size=...)` is the one entry point; docs/datasets.md describes the formats.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import RetrievalError
from .base import IMAGE_SUFFIXES, SPLITS, ImageDataset, Record
from .celeba import IMAGE_DIR, open_celeba
from .folder import iter_image_files, open_folder
from .mnist import open_mnist
from .shapes import DEFAULT_COUNT, open_shapes
from .sprites import find_characters, open_sprites

__all__ = ["FORMATS", "ImageDataset", "Record", "detect_format", "open_dataset"]

FORMATS = ("celeba", "sprites", "mnist", "folder", "shapes")
_OPENERS = {"celeba": open_celeba, "sprites": open_sprites, "mnist": open_mnist,
            "folder": open_folder}
_SHAPES_SPEC = re.compile(r"shapes(?::(\d+))?")


def detect_format(root: str | Path) -> str:
    """The format of a dataset folder, judged from its layout."""
    root = _existing_folder(root)
    if (root / IMAGE_DIR).is_dir():
        return "celeba"
    if find_characters(root):
        return "sprites"
    if any(name.endswith(("-idx3-ubyte", "-idx3-ubyte.gz")) for name in os.listdir(root)):
        return "mnist"
    if next(iter_image_files(root), None) is not None:
        return "folder"
    raise RetrievalError(
        f"no dataset found in {root}: looked for {IMAGE_DIR}/, sheets/sprite_*.png, sprites_*.mat, "
        f"*-idx3-ubyte[.gz], or image files ({', '.join(IMAGE_SUFFIXES)}); "
        "point at a dataset folder or pass --format")


def open_dataset(spec: str | Path, *, size: int, format: str | None = None,
                 split: str | None = None, skip_bad: bool = False,
                 progress: bool = False) -> ImageDataset:
    """Open a dataset folder, or the built-in `shapes` / `shapes:N`, as images of size x size."""
    if format is not None and format not in FORMATS:
        raise RetrievalError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise RetrievalError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    shapes = _SHAPES_SPEC.fullmatch(str(spec)) if format in (None, "shapes") else None
    if shapes:
        return open_shapes(int(shapes.group(1) or DEFAULT_COUNT), size=size, split=split)
    if format == "shapes":
        raise RetrievalError(f"format shapes takes 'shapes' or 'shapes:N', not {spec!r}")
    root = _existing_folder(spec)
    fmt = format or detect_format(root)
    dataset = _OPENERS[fmt](root, size=size, split=split, skip_bad=skip_bad, progress=progress)
    if len(dataset) == 0:
        raise RetrievalError(f"no usable {fmt} images in {root}; check the folder and --format")
    return dataset


def _existing_folder(path: str | Path) -> Path:
    """The path as an existing folder, or a RetrievalError saying what is wrong."""
    root = Path(path).expanduser().absolute()  # the index records where the images live
    if not root.exists():
        raise RetrievalError(f"dataset folder {root} does not exist; pass an existing folder "
                             "or shapes[:N]")
    if not root.is_dir():
        raise RetrievalError(f"{root} is a file, not a dataset folder; pass the folder holding it")
    return root
