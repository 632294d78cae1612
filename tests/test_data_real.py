"""The loaders on the real data in shared/data (MNIST idx files, Sprites sheets and one .mat file).

The data folder is ../shared/data next to the repository, or $RETRIEVAL_SHARED_DATA; these tests
fail, rather than skip, when it is missing.
"""
import gzip
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from disentangle.data import detect_format, open_dataset
from disentangle.data.sprites import mat_frames, sheet_frames
from disentangle.errors import RetrievalError

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def shared():
    root = Path(os.environ.get("RETRIEVAL_SHARED_DATA", DEFAULT))
    if not (root / "mnist").is_dir() or not (root / "sprites").is_dir():
        pytest.fail(f"no mnist/ and sprites/ in {root}: set RETRIEVAL_SHARED_DATA to the shared data folder")
    return root


def test_real_mnist(shared):
    root = shared / "mnist"
    assert detect_format(root) == "mnist"
    ds = open_dataset(root, size=32)
    splits = [r.split for r in ds.records]
    assert splits.count("train") == 60000 and splits.count("test") == 10000
    assert [r.attributes["digit"] for r in ds.records[:5]] == [5, 0, 4, 1, 9]
    assert [r.attributes["digit"] for r in ds.records[60000:60005]] == [7, 2, 1, 0, 4]
    with gzip.open(root / "train-images-idx3-ubyte.gz") as fh:
        first = np.frombuffer(fh.read(16 + 784)[16:], np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(ds.image(0)[2:30, 2:30], np.repeat(first[..., None], 3, axis=2))


def test_real_sprites_sheet_equals_the_original_mat_file(shared, tmp_path):
    root = shared / "sprites"
    sheet = sheet_frames(root / "sheets" / "sprite_000.png")
    np.testing.assert_array_equal(sheet, mat_frames(root / "mat" / "sprites_0.mat"))
    assert sheet.shape == (178, 60, 60, 3) and sheet.any()
    # the same character through open_dataset in both layouts, with line 0 of the label file
    line0 = [int(v) for v in (root / "sprite_large_labels.txt").read_text().splitlines()[0].split(",")]
    with h5py.File(root / "mat" / "sprites_0.mat", "r") as f:
        assert f["labels"][()].ravel().tolist() == line0
    (tmp_path / "a" / "sheets").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "sheets" / "sprite_000.png").symlink_to(root / "sheets" / "sprite_000.png")
    (tmp_path / "b" / "sprites_0.mat").symlink_to(root / "mat" / "sprites_0.mat")
    for layout in ("a", "b"):
        (tmp_path / layout / "sprite_large_labels.txt").symlink_to(root / "sprite_large_labels.txt")
    a, b = open_dataset(tmp_path / "a", size=64), open_dataset(tmp_path / "b", size=64)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.pixels[:, 2:62, 2:62], sheet)
    names = ["body", "skin", "vest", "hair", "arm", "leg", "weapon"]
    assert a.records[0].attributes == {**dict(zip(names, line0)), "pose": 0}
    assert [r.key for r in a.records] == [r.key for r in b.records]


def test_real_sprites_val_split(shared):
    root = shared / "sprites"
    assert detect_format(root) == "sprites"
    ds = open_dataset(root, size=64, split="val")
    assert len(ds) == 72 * 178 and ds.pixels.shape == (72 * 178, 64, 64, 3)
    assert {r.split for r in ds.records} == {"val"} and len({r.key for r in ds.records}) == len(ds)
    val = json.loads((root / "metadata.json").read_text())["splits_0_based"]["val"]
    assert sorted({int(r.key[7:10]) for r in ds.records}) == sorted(val)
    assert sorted({r.attributes["pose"] for r in ds.records}) == list(range(178))


def test_real_sprites_test_split_is_held_out(shared):
    with pytest.raises(RetrievalError) as err:
        open_dataset(shared / "sprites", size=64, split="test")
    message = str(err.value)
    assert "split 'test' needs 100 characters" in message and "only train and val are present" in message
