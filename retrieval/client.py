"""A Python client of the HTTP API (docs/api.md) for notebooks: the server's JSON as plain dicts,
the hit ids and distances as numpy arrays, images as PIL images, and every error answer raised as
ServerError with the server's own message.

    from retrieval.client import Client
    c = Client("http://127.0.0.1:5000")
    hits = c.search("shape_000005", chunks=[2, 4], k=20, where={"shape": 1})
    hits["ids"]                                    # int64 array of the hit ids
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import numpy as np
import requests
from PIL import Image

from disentangle.errors import RetrievalError

ImageRef = str | int                                    # a key or an id of an indexed image
Upload = str | Path | bytes | BinaryIO | Image.Image    # what search(file=...) sends


class ServerError(RetrievalError):
    """A non-2xx answer: .status (HTTP), .error (the body's error code, e.g. 'not_found') and
    .message (the server's message, which says what to change)."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message = status, error, message

    @classmethod
    def of(cls, response: requests.Response) -> ServerError:
        """The error a response carries; a body that is not the API's JSON error (say, a proxy's
        HTML page) keeps its first 300 characters as the message."""
        try:
            body = response.json()["error"]
            return cls(response.status_code, body["code"], body["message"])
        except (ValueError, TypeError, KeyError):
            return cls(response.status_code, response.reason or "error", response.text[:300])


class Unreachable(RetrievalError, ConnectionError):
    """Nothing answers at the client's URL (refused, unknown host, connection dropped)."""


class Client:
    """The API at `url`, on one keep-alive session; `token` is sent only to name chunks."""

    def __init__(self, url: str = "http://127.0.0.1:5000", timeout: float = 30, token: str | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token
        self.session = requests.Session()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()

    def health(self) -> dict:
        """GET /health: the index's size, chunks and preset."""
        return self._request("GET", "/health").json()

    def search(self, image: ImageRef | None = None, file: Upload | None = None, *,
               chunks: str | int | Sequence[int | str], k: int = 10, offset: int = 0,
               weights: Sequence[float] | None = None, where: Mapping[str, Any] | Sequence[str] | str | None = None
               ) -> dict:
        """The nearest images to an indexed image (image=key or id, GET /search) or to an outside one
        (file=a path, bytes, a binary file object or a PIL image, POST /search): the server's JSON
        with 'ids' (int64) and 'distances' (float64) arrays of the hits added."""
        if (image is None) == (file is None):
            raise ValueError("search needs exactly one query: image= (a key or id of an indexed image) "
                             "or file= (a path, bytes, a file object or a PIL image)")
        fields = {"chunks": _chunks(chunks), "k": k, "offset": offset,
                  "weights": None if weights is None else ",".join(repr(float(w)) for w in weights),
                  "where": _where(where)}
        if file is None:
            result = self._request("GET", "/search", params={"image": image, **fields}).json()
        else:
            result = self._request("POST", "/search", data=fields, files={"file": _upload(file)}).json()
        result["ids"] = np.array([hit["id"] for hit in result["results"]], dtype=np.int64)
        result["distances"] = np.array([hit["distance"] for hit in result["results"]], dtype=np.float64)
        return result

    def transfer(self, base: ImageRef, donor: ImageRef, chunks: str | int | Sequence[int | str]) -> Image.Image:
        """GET /transfer: the base image decoded with the chosen chunks taken from the donor's."""
        return _image(self._request("GET", "/transfer", params={"base": base, "donor": donor,
                                                                  "chunks": _chunks(chunks)}))

    def image(self, ref: ImageRef) -> Image.Image:
        """GET /images/{ref}: the indexed image (keys that contain '/' are reached by id)."""
        return _image(self._request("GET", f"/images/{quote(str(ref), safe='')}"))

    def chunks(self) -> dict:
        """GET /chunks: {'n_chunks', 'chunk_dim', 'chunks': [{'index', 'name', 'strip'}]}."""
        return self._request("GET", "/chunks").json()

    def name_chunk(self, i: int, name: str | None) -> dict:
        """PUT /chunks/{i}: name chunk i (None or '' clears it); the chunk list after it."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return self._request("PUT", f"/chunks/{int(i)}", json={"name": name}, headers=headers).json()

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as e:
            raise Unreachable(f"nothing answers at {self.url} ({method} {path}): start the server with "
                              "`retrieval serve INDEX` or check the URL and port") from e
        if not 200 <= response.status_code < 300:
            raise ServerError.of(response)
        return response


def _chunks(chunks: str | int | Sequence[int | str]) -> str:
    """'2,4' as it is; 3, [2, 4] or ['hair colour', 5] joined by commas."""
    if isinstance(chunks, (str, int, np.integer)):
        return str(chunks)
    return ",".join(map(str, chunks))


def _where(where: Mapping[str, Any] | Sequence[str] | str | None) -> list[str]:
    """{'Male': 1} or ['Male=1'] (or one 'Male=1') as the repeated where=ATTRIBUTE=VALUE clauses."""
    if where is None:
        return []
    if isinstance(where, str):
        return [where]
    if isinstance(where, Mapping):
        return [f"{attribute}={value}" for attribute, value in where.items()]
    return list(where)


def _upload(file: Upload) -> tuple[str, bytes]:
    """(file name, bytes) for the multipart field 'file'; a part without a file name would reach the
    server as a form field, not as a file."""
    if isinstance(file, Image.Image):
        out = io.BytesIO()
        file.save(out, format="PNG")
        return "upload.png", out.getvalue()
    if isinstance(file, (bytes, bytearray, memoryview)):
        return "upload", bytes(file)
    if hasattr(file, "read"):
        name = getattr(file, "name", None)
        return Path(name).name if isinstance(name, str) else "upload", file.read()
    path = Path(file)
    return path.name, path.read_bytes()


def _image(response: requests.Response) -> Image.Image:
    img = Image.open(io.BytesIO(response.content))
    img.load()  # decode now: a damaged body fails here, not at first use
    return img
