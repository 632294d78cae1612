"""CelebA layout: label files with runs of spaces, the face crop box, bad files, missing rows."""
import numpy as np
import pytest
from PIL import Image

from disentangle.data import detect_format, open_dataset
from disentangle.errors import RetrievalError

NAMES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male"] + [f"Attr_{k}" for k in range(37)]


def make_celeba(root, n=6, labels=True, partition=True, width=178, height=218):
    """A tiny CelebA folder: n seeded JPEGs and the two label files, formatted as the real ones."""
    rng = np.random.default_rng(0)
    (root / "img_align_celeba").mkdir(parents=True)
    values = rng.choice([-1, 1], (n, len(NAMES)))
    for k in range(n):
        img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "img_align_celeba" / f"{k + 1:06d}.jpg", quality=90)
    if labels:
        # the real file right-aligns values in 3-wide columns and ends names and rows with spaces
        rows = [f"{k + 1:06d}.jpg" + "".join(f"{v:3d}" for v in values[k]) + " " for k in range(n)]
        text = f"{n}\n" + " ".join(NAMES) + " \n" + "\n".join(rows) + "\n"
        (root / "list_attr_celeba.txt").write_text(text)
    if partition:
        (root / "list_eval_partition.txt").write_text(
            "".join(f"{k + 1:06d}.jpg {min(k // 2, 2)}\n" for k in range(n)))
    return values


def test_celeba_keys_splits_and_attributes(tmp_path):
    values = make_celeba(tmp_path)
    assert detect_format(tmp_path) == "celeba"
    ds = open_dataset(tmp_path, size=32)
    assert ds.format == "celeba" and ds.root == tmp_path and ds.skipped == 0
    assert ds.attribute_names == NAMES
    assert [r.key for r in ds.records] == [f"{k:06d}.jpg" for k in range(1, 7)]
    assert [r.path for r in ds.records] == [f"img_align_celeba/{k:06d}.jpg" for k in range(1, 7)]
    assert [r.split for r in ds.records] == ["train", "train", "val", "val", "test", "test"]
    for rec, row in zip(ds.records, values):
        assert rec.attributes == {name: int(v == 1) for name, v in zip(NAMES, row)}  # -1 -> 0
    x = ds.image(0)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    val = open_dataset(tmp_path, size=32, split="val")
    assert [r.key for r in val.records] == ["000003.jpg", "000004.jpg"]


def test_celeba_crop_is_the_face_box(tmp_path):
    make_celeba(tmp_path, n=1, labels=False, partition=False)
    img = np.zeros((218, 178, 3), np.uint8)
    img[:, :] = (200, 30, 30)
    img[40:188, 15:163] = (30, 200, 30)  # the 148 x 148 box at (15, 40)
    Image.fromarray(img).save(tmp_path / "img_align_celeba" / "000001.jpg", quality=95)
    out = open_dataset(tmp_path, size=32).image(0).astype(int)
    # allow for JPEG ringing and the filter reading past the box at the very edge
    assert np.abs(out[1:-1, 1:-1] - (30, 200, 30)).max() < 25


def test_celeba_box_scales_with_the_image(tmp_path):
    # a 2x image (356 x 436): the box becomes 296 x 296 at (30, 80); smooth ramps show any shift
    y, x = np.mgrid[0:436, 0:356]
    big = np.stack([x * 255 // 355, y * 255 // 435, np.full_like(x, 90)], axis=2).astype(np.uint8)
    make_celeba(tmp_path, n=1, labels=False, partition=False)
    Image.fromarray(big).save(tmp_path / "img_align_celeba" / "000001.jpg", quality=95)
    reference = Image.fromarray(big).resize((64, 64), Image.BICUBIC, box=(30, 80, 326, 376))
    out = open_dataset(tmp_path, size=64).image(0)
    assert np.abs(out.astype(int) - np.asarray(reference)).mean() < 2


def test_celeba_without_label_files_has_no_attributes_or_splits(tmp_path):
    make_celeba(tmp_path, labels=False, partition=False)
    ds = open_dataset(tmp_path, size=16)
    assert len(ds) == 6 and ds.attribute_names == []
    assert all(r.attributes == {} and r.split is None for r in ds.records)
    with pytest.raises(RetrievalError, match="list_eval_partition.txt"):
        open_dataset(tmp_path, size=16, split="train")


def test_celeba_label_rows_without_images_are_an_error(tmp_path):
    make_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000002.jpg").unlink()
    (tmp_path / "img_align_celeba" / "000005.jpg").unlink()
    with pytest.raises(RetrievalError, match=r"list_attr_celeba.txt names 2 images .* first: 000002.jpg"):
        open_dataset(tmp_path, size=16)


def test_celeba_malformed_attribute_row_is_an_error(tmp_path):
    make_celeba(tmp_path, partition=False)
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(path.read_text().replace("000003.jpg", "000003.jpg 7", 1))
    with pytest.raises(RetrievalError, match="line 5"):
        open_dataset(tmp_path, size=16)


def test_celeba_bad_files_fail_or_are_skipped(tmp_path, caplog):
    make_celeba(tmp_path)
    folder = tmp_path / "img_align_celeba"
    data = (folder / "000004.jpg").read_bytes()
    (folder / "000004.jpg").write_bytes(data[:len(data) // 2])
    (folder / "000006.jpg").write_text("<html>not found</html>")
    with pytest.raises(RetrievalError) as err:
        open_dataset(tmp_path, size=16)
    message = str(err.value)
    assert "2 unreadable images" in message and "img_align_celeba/000004.jpg (truncated)" in message
    assert "--skip-bad" in message and "\n" not in message
    ds = open_dataset(tmp_path, size=16, skip_bad=True)
    assert ds.skipped == 2 and "skipping 2 unreadable images" in caplog.text
    assert [r.key for r in ds.records] == ["000001.jpg", "000002.jpg", "000003.jpg", "000005.jpg"]
    assert open_dataset(tmp_path, size=16, split="test", skip_bad=True).skipped == 1
