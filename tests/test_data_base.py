"""The shared dataset machinery: fitting to size, file checks, tensors, pickling for workers."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from disentangle.data import open_dataset
from disentangle.data.base import check_image, fit_frames, fit_to_size, load_image
from disentangle.errors import RetrievalError


def random_rgb(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(arr, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


@pytest.mark.parametrize("side, size", [(60, 64), (28, 32), (57, 64), (64, 64)])
def test_small_square_is_padded_centred_with_black(side, size):
    img = random_rgb(np.random.default_rng(0), side, side)
    out = fit_to_size(Image.fromarray(img), size)
    lo = (size - side) // 2
    expected = np.zeros((size, size, 3), np.uint8)
    expected[lo:lo + side, lo:lo + side] = img
    np.testing.assert_array_equal(out, expected)


def test_grey_frames_pad_and_resize_keep_one_channel():
    frames = np.random.default_rng(1).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    padded = fit_frames(frames, 32)
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], frames)
    assert padded.sum() == frames.sum()
    resized = fit_frames(frames, 64)
    assert resized.shape == (5, 64, 64, 1)
    expected = np.asarray(Image.fromarray(frames[3, ..., 0]).resize((64, 64), Image.BICUBIC))
    np.testing.assert_array_equal(resized[3, ..., 0], expected)


def test_non_square_is_centre_cropped_then_resized():
    # 80 wide x 120 tall: the centred square is rows 20..100, which are all green
    img = np.zeros((120, 80, 3), np.uint8)
    img[:20] = (255, 0, 0)
    img[20:100] = (0, 255, 0)
    img[100:] = (0, 0, 255)
    out = fit_to_size(Image.fromarray(img), 16)
    assert out.shape == (16, 16, 3)
    # BICUBIC reads a few source pixels past the box at its edges; the inside is pure green
    np.testing.assert_array_equal(out[2:-2], np.broadcast_to((0, 255, 0), (12, 16, 3)))


def test_large_square_and_tiny_square_are_resized():
    rng = np.random.default_rng(2)
    big = Image.fromarray(random_rgb(rng, 100, 100))
    np.testing.assert_array_equal(fit_to_size(big, 32), np.asarray(big.resize((32, 32), Image.BICUBIC)))
    tiny = Image.fromarray(random_rgb(rng, 20, 20))  # 44 px short of 64: too far to pad
    np.testing.assert_array_equal(fit_to_size(tiny, 64), np.asarray(tiny.resize((64, 64), Image.BICUBIC)))


def test_jpeg_draft_decoding_stays_close_to_a_full_decode(tmp_path):
    # smooth content, as in photos: the reduced-scale DCT decode must not change the picture
    y, x = np.mgrid[0:512, 0:512]
    img = np.stack([x / 2, y / 2, (x + y) / 4], axis=2).astype(np.uint8)
    path = save(img, tmp_path / "big.jpg", quality=95)
    out = load_image(path, 32)
    reference = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BICUBIC))
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - reference).mean() < 2


@pytest.mark.parametrize("suffix, kwargs", [(".jpg", {"quality": 90}), (".png", {}),
                                            (".webp", {"lossless": True})])
def test_check_image_accepts_whole_files_and_flags_truncated_ones(tmp_path, suffix, kwargs):
    path = save(random_rgb(np.random.default_rng(3), 40, 40), tmp_path / f"a{suffix}", **kwargs)
    assert check_image(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    assert check_image(path) == "truncated"


def test_check_image_flags_non_images(tmp_path):
    (tmp_path / "text.jpg").write_text("not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    assert check_image(tmp_path / "text.jpg") == "not an image"
    assert check_image(tmp_path / "empty.png") == "not an image"


def test_decode_failure_is_a_retrieval_error_naming_the_file(tmp_path):
    path = save(random_rgb(np.random.default_rng(4), 64, 64), tmp_path / "a.jpg")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(RetrievalError, match="a.jpg"):
        load_image(path, 32)


def test_palette_grey_and_rgba_files_come_out_rgb(tmp_path):
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    save(rgba, tmp_path / "rgba.png")
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    save(grey, tmp_path / "grey.png")
    Image.fromarray(rgba[..., :3]).quantize(16).save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", 32), rgba[..., :3])
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png", 32), np.repeat(grey[..., None], 3, 2))
    palette = Image.open(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png", 32),
                                  np.asarray(palette.convert("RGB")))


def test_getitem_is_the_image_scaled_to_minus_one_one():
    ds = open_dataset("shapes:20", size=32)
    for i in range(len(ds)):
        x = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        expected = torch.from_numpy(np.array(ds.image(i))).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
        assert -1 <= x.min() and x.max() <= 1


def test_datasets_pickle_and_load_in_forked_workers(tmp_path):
    rng = np.random.default_rng(6)
    for k in range(6):
        save(random_rgb(rng, 40, 40), tmp_path / f"img_{k}.png")
    for ds in (open_dataset(tmp_path, size=40), open_dataset("shapes:6", size=40)):
        clone = pickle.loads(pickle.dumps(ds))
        np.testing.assert_array_equal(clone.image(3), ds.image(3))
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2,
                                             multiprocessing_context="fork")
        batch = torch.cat(list(loader))
        torch.testing.assert_close(batch, torch.stack([ds[i] for i in range(len(ds))]))
