"""Sprites in both layouts: sheets of tiles and Reed et al.'s HDF5 .mat files, labels, splits."""
import json

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from disentangle.data import detect_format, open_dataset
from disentangle.data.sprites import FRAMES_PER_ROW, cells, mat_frames, sheet_frames
from disentangle.errors import RetrievalError

LABELS = [(0, 1, 2, 3, 0, 1, 0), (1, 0, 1, 5, 1, 0, 1), (0, 3, 0, 4, 1, 1, 0), (1, 2, 2, 2, 0, 0, 1)]
# 16 colours after black: a palette PNG holds the frames losslessly, as in the real sheets
PALETTE = np.vstack([[0, 0, 0], np.random.default_rng(42).integers(1, 256, (16, 3))]).astype(np.uint8)


def character(seed):
    """178 frames of 60x60 as palette indices 1..16 (index 0 is the sheets' empty black)."""
    return np.random.default_rng(seed).integers(1, 17, (178, 60, 60), dtype=np.uint8)


def write_sheet(path, index, palette):
    """A 21 x 13 sheet of 60px tiles, empty cells black and transparent, as palette or RGBA PNG."""
    sheet = np.zeros((21 * 60, 13 * 60), np.uint8)
    for pose, (row, col) in enumerate(cells(FRAMES_PER_ROW)):
        sheet[row * 60:(row + 1) * 60, col * 60:(col + 1) * 60] = index[pose]
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        img = Image.fromarray(sheet, "P")
        img.putpalette(PALETTE.ravel().tolist())
        img.save(path, transparency=0)
    else:
        Image.fromarray(np.dstack([PALETTE[sheet], np.where(sheet > 0, 255, 0).astype(np.uint8)])).save(path)


def write_mat(path, frames):
    """Reed et al.'s format: f['sprites'][a, 0] references an (n, 10800) float64 array in [0, 1]."""
    with h5py.File(path, "w") as f:
        refs = f.create_dataset("sprites", (21, 1), dtype=h5py.ref_dtype)
        start = 0
        for a, n in enumerate(FRAMES_PER_ROW):
            rows = np.stack([frame.reshape(-1, order="F") for frame in frames[start:start + n]]) / 255
            refs[a, 0] = f.create_dataset(f"#refs#/{a}", data=rows).ref
            start += n


def write_labels_and_splits(root, splits=True):
    (root / "sprite_large_labels.txt").write_text("".join(",".join(map(str, r)) + "\n" for r in LABELS))
    if splits:  # 1-based ids as in the original file; character 3 (test) is never present
        scipy.io.savemat(root / "sprites_splits.mat", {"trainidx": np.array([[1, 2]], np.uint16),
                                                       "validx": np.array([[3]], np.uint16),
                                                       "testidx": np.array([[4]], np.uint16)})


@pytest.fixture(scope="module")
def indices():
    return [character(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def frames(indices):
    return [PALETTE[index] for index in indices]


@pytest.fixture(scope="module")
def sheets(tmp_path_factory, indices):
    root = tmp_path_factory.mktemp("sheets")
    for i, index in enumerate(indices):
        write_sheet(root / "sheets" / f"sprite_{i:03d}.png", index, palette=i == 1)
    write_labels_and_splits(root)
    return root


@pytest.fixture(scope="module")
def mats(tmp_path_factory, frames):
    root = tmp_path_factory.mktemp("mats")
    for i, chars in enumerate(frames):
        write_mat(root / f"sprites_{i}.mat", chars)
    write_labels_and_splits(root)
    return root


def test_sheet_and_mat_readers_agree_with_the_frames(sheets, mats, frames):
    for i in range(3):
        np.testing.assert_array_equal(sheet_frames(sheets / "sheets" / f"sprite_{i:03d}.png"), frames[i])
        np.testing.assert_array_equal(mat_frames(mats / f"sprites_{i}.mat"), frames[i])


@pytest.mark.parametrize("layout", ["sheets", "mats"])
def test_sprites_keys_attributes_and_padded_pixels(request, frames, layout):
    root = request.getfixturevalue(layout)
    assert detect_format(root) == "sprites"
    ds = open_dataset(root, size=64)
    assert ds.format == "sprites" and len(ds) == 3 * 178
    assert ds.attribute_names == ["body", "skin", "vest", "hair", "arm", "leg", "weapon", "pose"]
    used = cells(FRAMES_PER_ROW)
    assert [r.key for r in ds.records[:178]] == [f"sprite_000_r{r:02d}_c{c:02d}" for r, c in used]
    assert ds.records[178 + 9].key == "sprite_001_r01_c02"
    assert ds.records[0].path == ("sheets/sprite_000.png" if layout == "sheets" else "sprites_0.mat")
    assert [r.split for r in ds.records[::178]] == ["train", "train", "val"]
    for i, rec in enumerate(ds.records):
        character, pose = divmod(i, 178)
        names = ds.attribute_names[:7]
        assert rec.attributes == {**dict(zip(names, LABELS[character])), "pose": pose}
    for i in (0, 177, 178 + 100, 2 * 178 + 150):
        x = ds.image(i)
        np.testing.assert_array_equal(x[2:62, 2:62], frames[i // 178][i % 178])
        assert x.sum() == frames[i // 178][i % 178].astype(int).sum()  # black border


def test_sprites_layouts_give_identical_datasets(sheets, mats):
    a, b = open_dataset(sheets, size=32, split="train"), open_dataset(mats, size=32, split="train")
    assert [r.key for r in a.records] == [r.key for r in b.records] and len(a) == 2 * 178
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.image(5).shape == (32, 32, 3)


def test_sprites_missing_split_is_an_error(sheets, mats):
    assert [r.key for r in open_dataset(sheets, size=64, split="val").records[:1]] == ["sprite_002_r00_c00"]
    for root, where in ((sheets, "sheets"), (mats, mats.name)):
        with pytest.raises(RetrievalError) as err:
            open_dataset(root, size=64, split="test")
        message = str(err.value)
        assert message.startswith("split 'test' needs 1 characters whose files are missing from")
        assert f"{where}: only train and val are present" in message


def test_sprites_metadata_frames_per_row(tmp_path, indices, frames):
    write_sheet(tmp_path / "sheets" / "sprite_000.png", indices[0], palette=False)
    write_labels_and_splits(tmp_path, splits=False)
    (tmp_path / "metadata.json").write_text(json.dumps({"frames_per_row": list(FRAMES_PER_ROW)}))
    ds = open_dataset(tmp_path, size=60)
    np.testing.assert_array_equal(ds.pixels, frames[0])
    assert all(r.split is None for r in ds.records)
    (tmp_path / "metadata.json").write_text(json.dumps({"frames_per_row": [7] * 20}))
    with pytest.raises(RetrievalError, match="metadata.json has no valid 'frames_per_row'"):
        open_dataset(tmp_path, size=60)


def test_sprites_missing_labels_or_splits_file(tmp_path, frames):
    write_mat(tmp_path / "sprites_0.mat", frames[0])
    with pytest.raises(RetrievalError, match="no sprite_large_labels.txt"):
        open_dataset(tmp_path, size=64)
    write_labels_and_splits(tmp_path, splits=False)
    assert len(open_dataset(tmp_path, size=64)) == 178
    with pytest.raises(RetrievalError, match="split 'train' needs sprites_splits.mat"):
        open_dataset(tmp_path, size=64, split="train")


def test_sprites_mat_with_wrong_animation_length(tmp_path, frames):
    write_mat(tmp_path / "sprites_0.mat", frames[0])
    with h5py.File(tmp_path / "sprites_0.mat", "a") as f:
        del f["#refs#/3"]
        f["sprites"][3, 0] = f.create_dataset("#refs#/short", data=np.zeros((2, 10800))).ref
    write_labels_and_splits(tmp_path)
    expected = r"sprites_0.mat animation 3 is \(2, 10800\), expected \(7, 10800\)"
    with pytest.raises(RetrievalError, match=expected):
        open_dataset(tmp_path, size=64)


def test_sprites_unlabelled_character_and_damaged_sheet(tmp_path, indices):
    write_sheet(tmp_path / "sheets" / "sprite_000.png", indices[0], palette=True)
    write_sheet(tmp_path / "sheets" / "sprite_007.png", indices[1], palette=True)
    write_labels_and_splits(tmp_path)  # 4 label lines: character 7 has none
    with pytest.raises(RetrievalError, match="sheets/sprite_007.png has no line in sprite_large_labels.txt"):
        open_dataset(tmp_path, size=64)
    (tmp_path / "sheets" / "sprite_007.png").unlink()
    (tmp_path / "sheets" / "sprite_000.png").write_bytes(b"garbage")
    with pytest.raises(RetrievalError, match="cannot read .*sprite_000.png"):
        open_dataset(tmp_path, size=64)
