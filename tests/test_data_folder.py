"""Folder layout: a tree of images, attributes.csv, exact pixel round trips, bad rows and files."""
import numpy as np
import pytest
from PIL import Image

from disentangle.data import detect_format, open_dataset
from disentangle.errors import RetrievalError


def make_tree(root):
    """Four images in a tree (PNG, JPEG, WebP), a hidden one and a text file; returns the PNG pixels."""
    rng = np.random.default_rng(0)
    pixels = {}
    for rel, side in (("a.png", 32), ("sub/B.PNG", 28), ("sub/c.jpg", 50), ("sub/deep/d.webp", 40),
                      (".cache/hidden.png", 32)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels[rel] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels[rel]).save(root / rel)
    (root / "sub" / "notes.txt").write_text("not an image")
    return pixels


def write_csv(root, text):
    (root / "attributes.csv").write_text(text)


def test_folder_keys_attributes_and_splits(tmp_path):
    make_tree(tmp_path)
    write_csv(tmp_path, "file,colour,count,split\n"
                        "a.png,red,3,train\n"
                        "./sub/c.jpg,blue,-2,val\n"
                        "sub/deep/d.webp,,7,\n")
    assert detect_format(tmp_path) == "folder"
    ds = open_dataset(tmp_path, size=32)
    assert ds.format == "folder" and ds.attribute_names == ["colour", "count"]
    assert [r.key for r in ds.records] == ["a.png", "sub/B.PNG", "sub/c.jpg", "sub/deep/d.webp"]
    assert [r.path for r in ds.records] == [r.key for r in ds.records]
    by_key = {r.key: r for r in ds.records}
    assert by_key["a.png"].attributes == {"colour": "red", "count": 3}
    assert by_key["sub/c.jpg"].attributes == {"colour": "blue", "count": -2}
    assert by_key["sub/deep/d.webp"].attributes == {"count": 7}  # empty cells are left out
    assert by_key["sub/B.PNG"].attributes == {} and by_key["sub/B.PNG"].split is None
    assert [r.split for r in ds.records] == ["train", None, "val", None]
    assert [r.key for r in open_dataset(tmp_path, size=32, split="val").records] == ["sub/c.jpg"]
    with pytest.raises(RetrievalError, match="split 'test' has no images"):
        open_dataset(tmp_path, size=32, split="test")


def test_folder_png_pixels_round_trip(tmp_path):
    pixels = make_tree(tmp_path)
    ds = open_dataset(tmp_path, size=32)
    np.testing.assert_array_equal(ds.image(0), pixels["a.png"])
    padded = ds.image(1)  # 28 x 28 -> 32 x 32 by black padding
    np.testing.assert_array_equal(padded[2:30, 2:30], pixels["sub/B.PNG"])
    assert padded.sum() == pixels["sub/B.PNG"].sum()
    assert all(ds.image(i).shape == (32, 32, 3) for i in range(len(ds)))


@pytest.mark.parametrize("text, message", [
    ("file,x\nmissing.png,1\nsub/gone.jpg,2\n", r"attributes.csv names 2 images .* first: missing.png"),
    ("name,x\na.png,1\n", "no 'file' column"),
    ("file,split\na.png,training\n", "line 2 has split 'training'"),
    ("file,x\na.png,1\na.png,2\n", "lists a.png twice"),
    ("file,x\na.png,1,2\n", "line 2 has 3 cells"),
])
def test_folder_bad_csv_is_an_error(tmp_path, text, message):
    make_tree(tmp_path)
    write_csv(tmp_path, text)
    with pytest.raises(RetrievalError, match=message):
        open_dataset(tmp_path, size=32)


def test_folder_split_without_split_column_is_an_error(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(RetrievalError, match="needs a 'split' column"):
        open_dataset(tmp_path, size=32, split="train")


def test_folder_non_image_and_truncated_files(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "sub" / "fake.jpg").write_text("plain text")
    data = (tmp_path / "sub" / "deep" / "d.webp").read_bytes()
    (tmp_path / "sub" / "deep" / "d.webp").write_bytes(data[:-100])
    with pytest.raises(RetrievalError, match=r"2 unreadable images .* first: sub/deep/d.webp \(truncated\)"):
        open_dataset(tmp_path, size=32)
    ds = open_dataset(tmp_path, size=32, skip_bad=True)
    assert ds.skipped == 2 and [r.key for r in ds.records] == ["a.png", "sub/B.PNG", "sub/c.jpg"]
