"""CelebA (Liu et al. 2015), aligned-and-cropped images with their attribute and partition files.

Layout: `img_align_celeba/*.jpg`, optional `list_attr_celeba.txt` and `list_eval_partition.txt`.
Attributes are stored as 0/1 (the file's -1 becomes 0) so that filters read `Male=1`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import RetrievalError
from .base import (IMAGE_SUFFIXES, SPLITS, FileDataset, Record, check_files,
                   missing_files_error, require_split)

IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
_ATTR_VALUES = {"1": 1, "-1": 0, "0": 0}  # some re-distributions already write 0/1


def celeba_box(width: int, height: int) -> tuple[float, float, float, float]:
    """CelebA's usual 64x64 face square: 148x148 at (15, 40) of 178x218, scaled to the image."""
    sx, sy = width / 178, height / 218
    return 15 * sx, 40 * sy, (15 + 148) * sx, (40 + 148) * sy


def _read_attributes(path: Path) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Parse list_attr_celeba.txt into the attribute names and file name -> {name: 0/1}."""
    lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [words for words in lines if words]  # a trailing blank line is common
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise RetrievalError(f"{path} does not start with a count line and a names line; "
                             "re-download it or remove it")
    names = lines[1]
    table: dict[str, dict[str, int]] = {}
    for number, words in enumerate(lines[2:], start=3):
        values = [_ATTR_VALUES.get(v) for v in words[1:]]
        if len(values) != len(names) or None in values:
            raise RetrievalError(f"{path} line {number} does not hold {len(names)} values of -1/1; "
                                 "re-download it or fix that line")
        table[words[0]] = dict(zip(names, values))
    if int(lines[0][0]) != len(table):
        raise RetrievalError(f"{path} announces {lines[0][0]} rows but holds {len(table)}; "
                             "re-download it")
    return names, table


def _read_partition(path: Path) -> dict[str, str]:
    """Parse list_eval_partition.txt into file name -> 'train' / 'val' / 'test'."""
    splits: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        if len(words) != 2 or words[1] not in ("0", "1", "2"):
            raise RetrievalError(f"{path} line {number} is not '<file> 0|1|2'; "
                                 "re-download it or fix that line")
        splits[words[0]] = SPLITS[int(words[1])]
    return splits


def open_celeba(root: Path, *, size: int, split: str | None = None, skip_bad: bool = False,
                progress: bool = False) -> FileDataset:
    """Open a CelebA folder; every listed image is checked up front, decoded lazily per item."""
    image_dir = root / IMAGE_DIR
    if not image_dir.is_dir():
        raise RetrievalError(f"no {IMAGE_DIR}/ folder in {root}; "
                             "unpack the aligned CelebA images there")
    files = sorted(p.name for p in image_dir.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    attr_path, partition_path = root / ATTR_FILE, root / PARTITION_FILE
    names, attributes = _read_attributes(attr_path) if attr_path.is_file() else ([], {})
    splits = _read_partition(partition_path) if partition_path.is_file() else {}
    present = set(files)
    for listing, listed in ((ATTR_FILE, attributes), (PARTITION_FILE, splits)):
        missing = [name for name in listed if name not in present]
        if missing:
            raise missing_files_error(listing, missing, image_dir)
    if split is not None and not splits:
        raise RetrievalError(f"split {split!r} needs {PARTITION_FILE} in {root}; "
                             "download it next to the images or omit --split")
    records = [Record(key=name, path=f"{IMAGE_DIR}/{name}", split=splits.get(name),
                      attributes=attributes.get(name, {})) for name in files]
    records = require_split(records, split, root)
    records, skipped = check_files(root, records, skip_bad, progress)
    return FileDataset(box=celeba_box, format="celeba", root=root, size=size, records=records,
                       attribute_names=names, skipped=skipped)
