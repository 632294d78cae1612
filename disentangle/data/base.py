"""What every dataset format shares: records, the dataset classes, fitting to size, file checks.

Images are fitted to a square `size` by one rule (docs/datasets.md): a square image at most
`PAD_LIMIT` px smaller than `size` is padded centred with black, anything else is centre-cropped
to a square (or cut with a format's own crop box) and resized with PIL's BICUBIC filter.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import RetrievalError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PAD_LIMIT = 8  # Sprites 60 -> 64 and MNIST 28 -> 32 pad instead of blurring through a resize
RESAMPLE = Image.Resampling.BICUBIC  # antialiased when shrinking; cheaper than LANCZOS per item

# (width, height) -> crop box (left, top, right, bottom) in pixels, possibly fractional
BoxFn = Callable[[int, int], tuple[float, float, float, float]]

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, fixed CRC
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Record:
    """One image: its stable key, file (relative to the root), split and labelled attributes."""
    key: str
    path: str
    split: str | None
    attributes: dict = field(default_factory=dict)


class ImageDataset(torch.utils.data.Dataset):
    """A list of records whose images come out as (size, size, 3) uint8 RGB, fitted to size."""

    def __init__(self, format: str, root: Path | None, size: int, records: list[Record],
                 attribute_names: list[str], skipped: int = 0):
        self.format = format
        self.root = root
        self.size = size
        self.records = records
        self.attribute_names = attribute_names
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> np.ndarray:
        """The i-th image as (size, size, 3) uint8 RGB."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> torch.Tensor:
        """The i-th image as (3, size, size) float32 in [-1, 1], the decoder's tanh range."""
        chw = np.ascontiguousarray(self.image(i).transpose(2, 0, 1))
        return torch.from_numpy(chw).float() / 127.5 - 1

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(format={self.format!r}, root={self.root}, "
                f"size={self.size}, n={len(self)})")


class ArrayDataset(ImageDataset):
    """Images held in memory as one (N, size, size, C) uint8 array; C = 1 (grey) is replicated."""

    def __init__(self, pixels: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        if len(pixels) != len(self.records):
            raise ValueError(f"{len(pixels)} images for {len(self.records)} records")
        self.pixels = pixels

    def image(self, i: int) -> np.ndarray:
        """The i-th image as (size, size, 3) uint8 RGB."""
        x = self.pixels[i]
        return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


class FileDataset(ImageDataset):
    """Images decoded lazily from files under root, one per item (workers decode in parallel)."""

    def __init__(self, box: BoxFn | None = None, **kwargs):
        super().__init__(**kwargs)
        self.box = box  # a module-level function, so the dataset stays picklable

    def image(self, i: int) -> np.ndarray:
        """The i-th image as (size, size, 3) uint8 RGB."""
        return load_image(self.root / self.records[i].path, self.size, self.box)


def _pad_margin(width: int, height: int, size: int) -> int | None:
    """Total padding that fits a small square image to size, or None when it must be resized."""
    if width == height and 0 <= size - width <= PAD_LIMIT:
        return size - width
    return None


def center_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square box."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _pad(frames: np.ndarray, margin: int) -> np.ndarray:
    """Pad (N, h, w, C) frames with black on all sides, the odd pixel going right and bottom."""
    lo = margin // 2
    return np.pad(frames, ((0, 0), (lo, margin - lo), (lo, margin - lo), (0, 0)))


def fit_to_size(img: Image.Image, size: int, box: BoxFn | None = None) -> np.ndarray:
    """Fit an image to (size, size) by the pad-or-resize rule, or resize `box`; keeps the mode."""
    margin = None if box is not None else _pad_margin(*img.size, size)
    if margin is not None:
        arr = np.asarray(img)
        grey = arr.ndim == 2
        out = _pad((arr[..., None] if grey else arr)[None], margin)[0]
        return out[..., 0] if grey else out
    crop = (box or center_square)(*img.size)
    return np.asarray(img.resize((size, size), RESAMPLE, box=crop))


def fit_frames(frames: np.ndarray, size: int, progress: bool = False) -> np.ndarray:
    """Fit (N, h, w, C) uint8 frames (C = 1 or 3) to (N, size, size, C) by the same rule."""
    n, h, w, c = frames.shape
    margin = _pad_margin(w, h, size)
    if margin is not None:
        return _pad(frames, margin)
    out = np.empty((n, size, size, c), np.uint8)
    for k in tqdm(range(n), desc="resizing", unit="img", disable=not progress):
        frame = np.ascontiguousarray(frames[k, ..., 0] if c == 1 else frames[k])
        out[k] = fit_to_size(Image.fromarray(frame), size).reshape(size, size, c)
    return out


def load_image(path: Path, size: int, box: BoxFn | None = None) -> np.ndarray:
    """Decode an image file to (size, size, 3) uint8 RGB; a decoding failure is a RetrievalError."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and (box is not None or _pad_margin(*img.size, size) is None):
                # decode at 1/2, 1/4 or 1/8 scale when the crop box stays at least `size` wide
                left, top, right, bottom = (box or center_square)(*img.size)
                img.draft(None, (math.ceil(img.width * size / (right - left)),
                                 math.ceil(img.height * size / (bottom - top))))
            return fit_to_size(img.convert("RGB"), size, box)
    except _DECODE_ERRORS as e:
        reason = " ".join(str(e).split())  # the message must stay on one line
        raise RetrievalError(f"cannot decode {path} ({reason}); fix or remove the file") from None


def check_image(path: Path) -> str | None:
    """Why an image file is unusable ('not an image', 'truncated'), or None when it looks whole."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            fh.seek(0, os.SEEK_END)
            length = fh.tell()
            fh.seek(max(0, length - 16))
            tail = fh.read()
            fh.seek(0)
            # PIL identifies an image from its header alone; a cut-off download shows at the end
            if _truncated(head, tail, length):
                return "truncated"
            try:
                Image.open(fh).close()
            except _DECODE_ERRORS:  # UnidentifiedImageError is an OSError
                return "not an image"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    return None


def _truncated(head: bytes, tail: bytes, length: int) -> bool:
    """Whether a JPEG, PNG or WebP file lacks its end: EOI marker, IEND chunk, RIFF length."""
    if head.startswith(b"\xff\xd8"):
        return not tail.rstrip(b"\x00").endswith(b"\xff\xd9")  # some writers pad with zeros
    if head.startswith(b"\x89PNG"):
        return not tail.endswith(_PNG_END)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return length < int.from_bytes(head[4:8], "little") + 8
    return False


def check_files(root: Path, records: list[Record], skip_bad: bool,
                progress: bool) -> tuple[list[Record], int]:
    """Check every record's file; drop bad ones with skip_bad, else raise naming the first."""
    bad: list[tuple[Record, str]] = []
    for rec in tqdm(records, desc="checking images", unit="img", disable=not progress):
        reason = check_image(root / rec.path)
        if reason is not None:
            bad.append((rec, reason))
    if not bad:
        return records, 0
    first, reason = bad[0]
    summary = f"{len(bad)} unreadable images in {root}, first: {first.path} ({reason})"
    if not skip_bad:
        raise RetrievalError(f"{summary}; fix or remove them, or pass --skip-bad")
    log.warning("skipping %s", summary)
    dropped = {rec.key for rec, _ in bad}
    return [rec for rec in records if rec.key not in dropped], len(bad)


def missing_files_error(listing: str, missing: list[str], where: Path) -> RetrievalError:
    """The error for label rows that name files which do not exist."""
    return RetrievalError(
        f"{listing} names {len(missing)} images missing from {where}, first: {missing[0]}; "
        "restore the images or remove their rows")


def require_split(records: list[Record], split: str | None, where: Path | str) -> list[Record]:
    """The records of one split (all for None); an empty requested split is a RetrievalError."""
    if split is None:
        return records
    chosen = [rec for rec in records if rec.split == split]
    if not chosen:
        present = sorted({rec.split for rec in records if rec.split is not None}, key=SPLITS.index)
        have = ", ".join(present) if present else "no split labels"
        raise RetrievalError(f"split {split!r} has no images in {where} (it has {have}); "
                             "pick another split or omit --split")
    return chosen
