"""An uploaded query image: checked for size, type, dimensions, bombs and truncation, then decoded,
all before the model lock (only the encoder needs it)."""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from werkzeug.datastructures import FileStorage
from werkzeug.utils import secure_filename

from disentangle.data.base import check_image
from disentangle.errors import RetrievalError
from retrieval.index import Index

from .errors import ApiError

ACCEPTED = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


def fit_upload(index: Index, upload: FileStorage, max_pixels: int, max_side: int) -> tuple[np.ndarray, str]:
    """The upload fitted to the model's input, and its sanitised file name; a bad upload is a 4xx ApiError."""
    data = upload.read()
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError:
        raise ApiError(400, "the upload is a decompression bomb (far more pixels than its size "
                            "suggests); upload an ordinary photo", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ApiError(415, "the upload is not an image; upload a JPEG, PNG or WebP file") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ApiError(400, "the upload's image header is damaged; upload a whole JPEG, PNG or WebP file") from None
    if fmt not in ACCEPTED:
        raise ApiError(415, f"{fmt} images are not accepted; upload a JPEG, PNG or WebP file")
    if width * height > max_pixels:
        raise ApiError(400, f"the upload has {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}; "
                            "upload a smaller image", "too_many_pixels")
    # a 1 x 40,000,000 strip is under the pixel limit but takes seconds to decode, row by row
    if max(width, height) > max_side:
        raise ApiError(400, f"the upload is {width}x{height} pixels; each side may be at most {max_side:,}: "
                            "upload a smaller image", "too_many_pixels")
    name = secure_filename(upload.filename or "")[:100] or "upload"
    with tempfile.TemporaryDirectory(prefix="retrieval-upload-") as tmp:
        path = Path(tmp) / f"upload{ACCEPTED[fmt]}"
        path.write_bytes(data)
        reason = check_image(path)
        if reason:
            raise ApiError(400, f"the upload is {reason}; upload a whole JPEG, PNG or WebP file")
        try:
            return index.fit_file(path), name
        except RetrievalError as e:
            raise ApiError(400, str(e).replace(str(path), "the upload")) from None
