"""Where an indexed image's pixels come from: the original file under the dataset root (celeba,
folder), or the dataset reopened once from the manifest (sprites sheets, mnist, shapes).

Paths come from SQLite, never from a request, and are still checked: the file must resolve
(symlinks followed) to a place inside the resolved dataset root.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
from flask import Response, current_app
from PIL import Image

from disentangle.data import open_dataset
from disentangle.data.base import load_image
from disentangle.data.celeba import celeba_box
from disentangle.errors import RetrievalError

from .errors import ApiError

FILE_FORMATS = ("celeba", "folder")
MIMETYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode (H, W, 3) uint8 as PNG."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def png_response(data: bytes) -> Response:
    """A PNG that browsers and proxies may cache (ids, the model and the strips never change)."""
    response = Response(data, mimetype="image/png")
    response.cache_control.public = True
    response.cache_control.max_age = current_app.config["IMAGE_MAX_AGE"]
    return response


class ImageSource:
    """Original bytes and model-sized pixels of indexed images."""

    def __init__(self, manifest: dict):
        self.format = manifest["dataset_format"]
        self.size = manifest["image_size"]
        self.spec = manifest.get("dataset_spec", manifest["dataset"])
        self._dataset = None
        self._positions: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def files(self) -> bool:
        """Whether images are files under a root (else frames of a dataset reopened in memory)."""
        return self.format in FILE_FORMATS

    def file(self, record: dict) -> tuple[Path, str]:
        """The original file of a file-format image and its content type, checked to lie inside the root."""
        root = Path(self.spec)
        if not root.is_dir():
            raise ApiError(404, f"the dataset folder of this index ({root}) is not available here",
                           "image_unavailable")
        root = root.resolve()
        target = (root / record["path"]).resolve()
        if not target.is_relative_to(root):
            raise ApiError(403, f"image {record['id']} resolves outside the dataset root; it is not served")
        if not target.is_file():
            raise ApiError(404, f"the file of image {record['id']} is missing from the dataset folder",
                           "image_unavailable")
        return target, MIMETYPES.get(target.suffix.lower(), "application/octet-stream")

    def pixels(self, record: dict) -> np.ndarray:
        """(size, size, 3) uint8: what the model saw for this image."""
        if self.files:
            path, _ = self.file(record)
            try:
                return load_image(path, self.size, celeba_box if self.format == "celeba" else None)
            except RetrievalError:
                raise ApiError(404, f"the file of image {record['id']} no longer decodes",
                               "image_unavailable") from None
        dataset = self._open()
        position = self._positions.get(record["key"])
        if position is None:
            raise ApiError(404, f"image {record['key']!r} is not in the dataset any more", "image_unavailable")
        return dataset.image(position)

    def _open(self):
        """The dataset, opened on first use (sprites sheets take a few seconds)."""
        with self._lock:
            if self._dataset is None:
                try:
                    dataset = open_dataset(self.spec, size=self.size, format=self.format)
                except RetrievalError as e:
                    raise ApiError(404, f"the images of this index are not available here: {e}",
                                   "image_unavailable") from None
                self._positions = {r.key: i for i, r in enumerate(dataset.records)}
                self._dataset = dataset
        return self._dataset
