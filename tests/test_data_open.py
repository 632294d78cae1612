"""open_dataset and detect_format: spec parsing, format detection, and the user-facing errors."""
import numpy as np
import pytest
from PIL import Image

from disentangle.data import FORMATS, detect_format, open_dataset
from disentangle.errors import RetrievalError


def test_formats_are_the_documented_ones():
    assert FORMATS == ("celeba", "sprites", "mnist", "folder", "shapes")


def test_unknown_layout_names_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / ".hidden.png").write_bytes(b"")
    with pytest.raises(RetrievalError) as err:
        detect_format(tmp_path)
    message = str(err.value)
    for wanted in ("img_align_celeba/", "sheets/sprite_*.png", "sprites_*.mat", "*-idx3-ubyte[.gz]",
                   "image files"):
        assert wanted in message
    with pytest.raises(RetrievalError, match="no dataset found"):
        open_dataset(tmp_path, size=32)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(RetrievalError, match="does not exist"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(RetrievalError, match="does not exist"):
        open_dataset(tmp_path / "nowhere", size=32)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(RetrievalError, match="is a file, not a dataset folder"):
        open_dataset(tmp_path / "file.png", size=32)


def test_detection_prefers_specific_layouts_over_plain_images(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cover.png")
    assert detect_format(tmp_path) == "folder"
    (tmp_path / "sprites_splits.mat").write_bytes(b"")  # not a character file
    assert detect_format(tmp_path) == "folder"
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert detect_format(tmp_path) == "mnist"
    (tmp_path / "sprites_12.mat").write_bytes(b"")
    assert detect_format(tmp_path) == "sprites"
    (tmp_path / "img_align_celeba").mkdir()
    assert detect_format(tmp_path) == "celeba"


def test_format_override_and_bad_options(tmp_path):
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / f"{k}.png")
    assert open_dataset(str(tmp_path), size=8, format="folder").format == "folder"
    with pytest.raises(RetrievalError, match="no img_align_celeba/ folder"):
        open_dataset(tmp_path, size=8, format="celeba")
    with pytest.raises(RetrievalError, match="unknown format 'png'"):
        open_dataset(tmp_path, size=8, format="png")
    with pytest.raises(RetrievalError, match="unknown split 'training'"):
        open_dataset(tmp_path, size=8, split="training")


def test_shapes_specs():
    assert len(open_dataset("shapes:12", size=16)) == 12
    assert len(open_dataset("shapes", size=16, format="shapes", split="test")) == 2000
    with pytest.raises(RetrievalError, match="shapes:0 holds no images"):
        open_dataset("shapes:0", size=16)
    with pytest.raises(RetrievalError, match="format shapes takes"):
        open_dataset("data/x", size=16, format="shapes")
    with pytest.raises(RetrievalError, match="does not exist"):
        open_dataset("shapes:many", size=16)
