"""Sprites (Reed et al. 2015, the paper's Table 2): 178 frames of 60x60 RGB per character.

Two layouts hold the same pixels:
- sheets: `sheets/sprite_XXX.png`, 21 animation rows x 13 columns of 60x60 tiles, empty cells
  past each row's length (the copy in shared/data);
- original: Reed et al.'s `sprites_{i}.mat` (MATLAB v7.3 = HDF5), where `f['sprites'][a, 0]`
  references an (n_frames, 10800) float64 array in [0, 1] for animation row a.
Both come with `sprite_large_labels.txt` (line i = character i: body, skin, vest, hair, arm, leg,
weapon) and optionally `sprites_splits.mat` (1-based character ids per split). The `pose`
attribute is the frame's index among the 178 used cells, in row-major order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError
from PIL import Image
from tqdm import tqdm

from ..errors import RetrievalError
from .base import SPLITS, ArrayDataset, Record, fit_frames

TILE = 60
ROWS, COLS = 21, 13
# frames per animation row (spellcast x4, thrust x4, walk x4, slash x4, shoot x4, hurt)
FRAMES_PER_ROW = (7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9, 6, 6, 6, 6, 13, 13, 13, 13, 6)
ATTRIBUTES = ("body", "skin", "vest", "hair", "arm", "leg", "weapon")
LABELS_FILE = "sprite_large_labels.txt"
SPLITS_FILE = "sprites_splits.mat"
_SHEET = re.compile(r"sprite_(\d+)\.png")
_MAT = re.compile(r"sprites_(\d+)\.mat")  # not sprites_splits.mat
_SPLIT_KEYS = {"train": "trainidx", "val": "validx", "test": "testidx"}


def frames_per_row(root: Path) -> tuple[int, ...]:
    """The animation lengths from metadata.json when present, else the published ones."""
    path = root / "metadata.json"
    if not path.is_file():
        return FRAMES_PER_ROW
    try:
        counts = tuple(json.loads(path.read_text(encoding="utf-8"))["frames_per_row"])
    except (ValueError, KeyError, TypeError):
        counts = ()
    if len(counts) != ROWS or not all(isinstance(n, int) and 0 < n <= COLS for n in counts):
        raise RetrievalError(f"{path} has no valid 'frames_per_row' ({ROWS} counts of 1..{COLS}); "
                             "fix it or remove it")
    return counts


def cells(counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """The used (row, col) sheet cells in row-major order; a cell's index is its pose."""
    return [(row, col) for row, n in enumerate(counts) for col in range(n)]


def sheet_frames(path: Path, counts: tuple[int, ...] = FRAMES_PER_ROW) -> np.ndarray:
    """A sheet's used tiles as (n_cells, 60, 60, 3) uint8, in pose order."""
    with Image.open(path) as img:
        if img.size != (COLS * TILE, ROWS * TILE):
            raise RetrievalError(f"{path} is {img.size[0]}x{img.size[1]}, not a "
                                 f"{COLS}x{ROWS} sheet of {TILE}px tiles; re-create it")
        # via RGBA: palette sheets with transparency convert faster and without a warning
        sheet = np.asarray(img.convert("RGBA"))
    # views of each animation row, (60, n*60, 4) -> (n, 60, 60, 3), copied once by concatenate
    return np.concatenate([
        sheet[r * TILE:(r + 1) * TILE, :n * TILE].reshape(TILE, n, TILE, 4).transpose(1, 0, 2, 3)
        for r, n in enumerate(counts)])[..., :3]


def mat_frames(path: Path, counts: tuple[int, ...] = FRAMES_PER_ROW) -> np.ndarray:
    """An original sprites_{i}.mat file's frames as (n_cells, 60, 60, 3) uint8, in pose order."""
    with h5py.File(path, "r") as f:
        refs = f["sprites"][()].ravel()
        if len(refs) != len(counts):
            raise RetrievalError(f"{path} holds {len(refs)} animations, expected {len(counts)}; "
                                 "re-download it")
        rows = [np.asarray(f[ref], np.float64) for ref in refs]
    for a, (row, n) in enumerate(zip(rows, counts)):
        if row.shape != (n, TILE * TILE * 3):
            raise RetrievalError(f"{path} animation {a} is {row.shape}, expected "
                                 f"({n}, {TILE * TILE * 3}); re-download it")
    x = np.rint(np.clip(np.concatenate(rows), 0, 1) * 255).astype(np.uint8)
    # MATLAB's column-major frame: flat index = y + 60 x + 3600 c
    return x.reshape(-1, 3, TILE, TILE).transpose(0, 3, 2, 1)


def find_characters(root: Path) -> dict[int, str]:
    """Character id -> file relative to root: the sheets if any, else the original .mat files."""
    for folder, pattern in ((root / "sheets", _SHEET), (root, _MAT)):
        if folder.is_dir():
            found = {int(m.group(1)): p.relative_to(root).as_posix()
                     for p in folder.iterdir() if (m := pattern.fullmatch(p.name))}
            if found:
                return dict(sorted(found.items()))
    return {}


def read_labels(root: Path) -> list[tuple[int, ...]]:
    """The label file's rows: line i = character i's 7 ints."""
    path = root / LABELS_FILE
    if not path.is_file():
        raise RetrievalError(f"no {LABELS_FILE} in {root}; "
                             "put the Sprites label file next to the images")
    labels = []
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            row = tuple(int(v) for v in line.split(","))
        except ValueError:
            row = ()
        if len(row) != len(ATTRIBUTES):
            raise RetrievalError(f"{path} line {number} is not {len(ATTRIBUTES)} comma-separated "
                                 "ints; re-download it")
        labels.append(row)
    return labels


def read_splits(root: Path) -> dict[str, list[int]]:
    """Split -> 0-based character ids, from sprites_splits.mat's 1-based ids ({} if absent)."""
    path = root / SPLITS_FILE
    if not path.is_file():
        return {}
    try:
        mat = scipy.io.loadmat(str(path))
        return {s: [int(i) - 1 for i in np.asarray(mat[k]).ravel()] for s, k in _SPLIT_KEYS.items()}
    except (OSError, ValueError, KeyError, NotImplementedError, MatReadError) as e:
        raise RetrievalError(f"cannot read {path} ({e}); re-download it") from None


def _choose(characters: dict[int, str], splits: dict[str, list[int]], split: str | None,
            root: Path) -> list[int]:
    """The character ids to load: one complete split, or every character present."""
    if split is None:
        return list(characters)
    if not splits:
        raise RetrievalError(f"split {split!r} needs {SPLITS_FILE} in {root}; "
                             "put it next to the labels or omit --split")
    missing = [i for i in splits[split] if i not in characters]
    if missing:
        complete = [s for s in SPLITS if all(i in characters for i in splits[s])]
        have = (f"only {' and '.join(complete)} {'are' if len(complete) > 1 else 'is'} present"
                if complete else "no split is complete")
        where = root / Path(characters[min(characters)]).parent  # sheets/ or the root
        raise RetrievalError(f"split {split!r} needs {len(missing)} characters whose files are "
                             f"missing from {where}: {have}; pick another split")
    return sorted(splits[split])


def open_sprites(root: Path, *, size: int, split: str | None = None, skip_bad: bool = False,
                 progress: bool = False) -> ArrayDataset:
    """Open Sprites in either layout; every frame is decoded up front into one uint8 array."""
    characters = find_characters(root)
    if not characters:
        raise RetrievalError(f"no sheets/sprite_*.png or sprites_*.mat in {root}; "
                             "point at the Sprites folder")
    labels = read_labels(root)
    unlabelled = [i for i in characters if i >= len(labels)]
    if unlabelled:
        raise RetrievalError(f"{characters[unlabelled[0]]} has no line in {LABELS_FILE} "
                             f"({len(labels)} lines); use the matching label file")
    splits = read_splits(root)
    split_of = {i: s for s in SPLITS for i in splits.get(s, [])}
    chosen = _choose(characters, splits, split, root)
    counts = frames_per_row(root)
    used = cells(counts)
    pixels = np.empty((len(chosen) * len(used), size, size, 3), np.uint8)  # ~1.1 GB for train at 64
    records = []
    for k, i in enumerate(tqdm(chosen, desc="decoding sprites", unit="char", disable=not progress)):
        path = characters[i]
        reader = mat_frames if path.endswith(".mat") else sheet_frames
        try:
            frames = reader(root / path, counts)
        except (OSError, KeyError, ValueError) as e:  # a damaged PNG or HDF5 file
            raise RetrievalError(f"cannot read {root / path} ({e}); replace the file") from None
        pixels[k * len(used):(k + 1) * len(used)] = fit_frames(frames, size)
        character = dict(zip(ATTRIBUTES, labels[i]))
        records += [Record(key=f"sprite_{i:03d}_r{row:02d}_c{col:02d}", path=path,
                           split=split_of.get(i), attributes={**character, "pose": pose})
                    for pose, (row, col) in enumerate(used)]
    return ArrayDataset(pixels=pixels, format="sprites", root=root, size=size, records=records,
                        attribute_names=[*ATTRIBUTES, "pose"], skipped=0)
