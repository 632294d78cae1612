"""MNIST (LeCun et al.) from its four idx files, gzipped or raw.

The idx header is big-endian: magic (0x0803 images, 0x0801 labels), the counts, rows, cols;
then uint8 data. Images are grey, held as one channel and replicated to RGB on access.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import RetrievalError
from .base import ArrayDataset, Record, fit_frames

# split -> (images stem, labels stem); the test files carry the 't10k' prefix
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # ndim -> magic of a uint8 idx file


def find_idx(root: Path, stem: str) -> Path | None:
    """The raw file when present (no decompression), else the .gz, else None."""
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a uint8 idx file with `ndim` dimensions, checking its magic number and length."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise RetrievalError(f"cannot read {path} ({e}); re-download it") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= header else None
    if magic != _MAGIC[ndim]:
        raise RetrievalError(f"{path} is not a {ndim}-d uint8 idx file (bad header); "
                             "re-download it")
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise RetrievalError(f"{path} holds {len(data) - header} bytes of data, its header "
                             f"announces {shape}; re-download it")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def open_mnist(root: Path, *, size: int, split: str | None = None, skip_bad: bool = False,
               progress: bool = False) -> ArrayDataset:
    """Open the MNIST idx files in root: train (60,000) and test (10,000), attribute `digit`."""
    if split == "val":
        raise RetrievalError("MNIST has no val split; use --split train or --split test")
    wanted = [split] if split else list(FILES)
    paths = {s: [find_idx(root, stem) for stem in FILES[s]] for s in wanted}
    if split is None:  # use whichever halves are present, but never images without labels
        paths = {s: p for s, p in paths.items() if p[0] is not None}
    for s, (images, labels) in paths.items():
        for stem, found in zip(FILES[s], (images, labels)):
            if found is None:
                raise RetrievalError(f"no {stem}[.gz] in {root}; "
                                     "put the four MNIST idx files there")
    frames, records = [], []
    for s, (images_path, labels_path) in paths.items():
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise RetrievalError(f"{images_path.name} has {len(images)} images but "
                                 f"{labels_path.name} {len(labels)} labels; re-download them")
        frames.append(images)
        records += [Record(key=f"{s}_{k:05d}", path=images_path.name, split=s,
                           attributes={"digit": int(d)}) for k, d in enumerate(labels)]
    if not records:
        raise RetrievalError(f"no MNIST images in {root}; put the four idx files there")
    pixels = fit_frames(np.concatenate(frames)[..., None], size, progress)  # (N, size, size, 1)
    return ArrayDataset(pixels=pixels, format="mnist", root=root, size=size, records=records,
                        attribute_names=["digit"], skipped=0)
