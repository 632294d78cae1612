"""MNIST idx files, raw and gzipped: header parsing, keys, labels, padding, bad headers."""
import gzip

import numpy as np
import pytest

from disentangle.data import detect_format, open_dataset
from disentangle.data.mnist import read_idx
from disentangle.errors import RetrievalError


def idx_bytes(array):
    """The canonical idx encoding of a uint8 array: magic 0x08 0x<ndim>, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def make_mnist(root, gz_train=True, gz_test=False, n_train=7, n_test=3):
    """Seeded idx files: train gzipped and test raw by default; returns (images, labels) per split."""
    rng = np.random.default_rng(0)
    data = {}
    for split, prefix, n, gz in (("train", "train", n_train, gz_train), ("test", "t10k", n_test, gz_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(array)
            if gz:
                (root / (stem + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (root / stem).write_bytes(raw)
        data[split] = images, labels
    return data


@pytest.mark.parametrize("gz_train, gz_test", [(True, False), (False, True)])
def test_mnist_keys_labels_and_padded_pixels(tmp_path, gz_train, gz_test):
    data = make_mnist(tmp_path, gz_train, gz_test)
    assert detect_format(tmp_path) == "mnist"
    ds = open_dataset(tmp_path, size=32)
    assert ds.format == "mnist" and ds.attribute_names == ["digit"] and len(ds) == 10
    keys = [f"train_{k:05d}" for k in range(7)] + [f"test_{k:05d}" for k in range(3)]
    assert [r.key for r in ds.records] == keys
    assert [r.split for r in ds.records] == ["train"] * 7 + ["test"] * 3
    assert ds.records[0].path == "train-images-idx3-ubyte" + (".gz" if gz_train else "")
    images = np.concatenate([data["train"][0], data["test"][0]])
    labels = np.concatenate([data["train"][1], data["test"][1]])
    assert [r.attributes for r in ds.records] == [{"digit": int(d)} for d in labels]
    for i in range(len(ds)):
        x = ds.image(i)
        assert x.shape == (32, 32, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[2:30, 2:30], np.repeat(images[i][..., None], 3, axis=2))
        assert x.sum() == 3 * images[i].astype(int).sum()  # black border


def test_mnist_native_size_and_splits(tmp_path):
    data = make_mnist(tmp_path)
    test = open_dataset(tmp_path, size=28, split="test")
    assert [r.key for r in test.records] == ["test_00000", "test_00001", "test_00002"]
    np.testing.assert_array_equal(test.image(2)[..., 1], data["test"][0][2])
    assert open_dataset(tmp_path, size=64, split="train").image(0).shape == (64, 64, 3)
    with pytest.raises(RetrievalError, match="no val split"):
        open_dataset(tmp_path, size=28, split="val")


def test_mnist_bad_header_names_the_file(tmp_path):
    make_mnist(tmp_path, gz_test=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + path.read_bytes()[4:])  # a labels magic on images
    with pytest.raises(RetrievalError, match="t10k-images-idx3-ubyte is not a 3-d uint8 idx file"):
        open_dataset(tmp_path, size=28)
    with pytest.raises(RetrievalError, match="not a 1-d"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz", 1)


def test_mnist_short_data_and_missing_labels(tmp_path):
    make_mnist(tmp_path, gz_test=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(RetrievalError, match=r"t10k-images-idx3-ubyte holds .* re-download"):
        open_dataset(tmp_path, size=28)
    path.unlink()
    assert len(open_dataset(tmp_path, size=28)) == 7  # only the train half is present
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(RetrievalError, match=r"no train-labels-idx1-ubyte\[.gz\]"):
        open_dataset(tmp_path, size=28)
