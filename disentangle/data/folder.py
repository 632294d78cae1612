"""Any tree of JPEG/PNG/WebP files, with optional labels in `attributes.csv`.

The csv has a header `file,<attr>,...` (paths relative to the root, `/`-separated) and an
optional `split` column; values that parse as integers become ints, empty cells are left out.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

from ..errors import RetrievalError
from .base import (IMAGE_SUFFIXES, SPLITS, FileDataset, Record, check_files,
                   missing_files_error, require_split)

ATTR_CSV = "attributes.csv"


def iter_image_files(root: Path):
    """Yield image files under root as posix relative paths, skipping hidden files and folders."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .ipynb_checkpoints, ...
        for name in sorted(names):
            # '._x.jpg' files are macOS metadata, not images
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield Path(folder, name).relative_to(root).as_posix()


def _value(text: str) -> int | str:
    """An int when the cell reads as one, else the text itself."""
    try:
        return int(text)
    except ValueError:
        return text


def _read_csv(path: Path) -> tuple[list[str], dict[str, tuple[str | None, dict]]]:
    """Parse attributes.csv into the attribute names and file -> (split, attributes)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a BOM
        reader = csv.reader(fh)
        header = [name.strip() for name in next(reader, [])]
        if "file" not in header:
            raise RetrievalError(f"{path} has no 'file' column in its header; "
                                 "make the first line 'file,<attr>,...'")
        names = [name for name in header if name not in ("file", "split")]
        rows: dict[str, tuple[str | None, dict]] = {}
        for number, cells in enumerate(reader, start=2):
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise RetrievalError(f"{path} line {number} has {len(cells)} cells for "
                                     f"{len(header)} columns; fix that line")
            row = {name: cell.strip() for name, cell in zip(header, cells)}
            split = row.get("split") or None
            if split is not None and split not in SPLITS:
                raise RetrievalError(f"{path} line {number} has split {split!r}; "
                                     "use train, val, test or leave it empty")
            # accept ./a.jpg and Windows separators
            file = PurePosixPath(row["file"].replace("\\", "/")).as_posix()
            if file in rows:
                raise RetrievalError(f"{path} lists {file} twice (line {number}); "
                                     "keep one row per file")
            rows[file] = (split, {n: _value(row[n]) for n in names if row[n]})
    return names, rows


def open_folder(root: Path, *, size: int, split: str | None = None, skip_bad: bool = False,
                progress: bool = False) -> FileDataset:
    """Open a folder of images; every image is checked up front, decoded lazily per item."""
    files = sorted(iter_image_files(root))  # one global order, whatever the walk order
    csv_path = root / ATTR_CSV
    names, rows = _read_csv(csv_path) if csv_path.is_file() else ([], {})
    present = set(files)
    missing = [name for name in rows if name not in present]
    if missing:
        raise missing_files_error(ATTR_CSV, missing, root)
    if split is not None and not any(s for s, _ in rows.values()):
        raise RetrievalError(f"split {split!r} needs a 'split' column in {csv_path}; "
                             "add one or omit --split")
    records = []
    for rel in files:
        file_split, attributes = rows.get(rel, (None, {}))
        records.append(Record(key=rel, path=rel, split=file_split, attributes=attributes))
    records = require_split(records, split, root)
    records, skipped = check_files(root, records, skip_bad, progress)
    return FileDataset(format="folder", root=root, size=size, records=records,
                       attribute_names=names, skipped=skipped)
