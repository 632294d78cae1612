"""`retrieval index DATA --ray ADDRESS`: the encoding step on Ray Data (docs/scale.md).

The images' positions go to Ray Data in blocks; map_batches runs a pool of encoders, each opening
the dataset and loading the checkpoint once in its worker (on a GPU when the cluster has them),
and the features come back in the order asked (preserve_order), so indexer/build.py writes them
exactly as it writes its own encoder's. Every node must see DATA and the checkpoint at the same
paths (a shared filesystem), as it must see the index to serve its shards.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from disentangle.errors import RetrievalError


def connect(address: str) -> None:
    """Join the Ray cluster at address, or ('auto') start a Ray of this machine alone, on loopback."""
    if address == "auto" and "ray" not in sys.modules:
        # read once, when Ray is first imported: without it Ray puts the machine's network address
        # in place of 127.0.0.1 and listens on every interface
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise RetrievalError("--ray needs Ray: pip install 'chunk-retrieval[cluster]'") from None
    if ray.is_initialized():
        return
    if address == "auto":
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    else:
        ray.init(address=address, logging_level="WARNING")


class Encoder:
    """map_batches' callable class: one opened dataset and one model per Ray worker."""

    def __init__(self, model_path: str, data: str, fmt: str, split: str | None, skip_bad: bool, bf16: bool):
        from disentangle import checkpoint
        from disentangle.data import open_dataset

        from .encode import pick_device

        self.device = pick_device("auto")  # the GPU Ray assigned this worker, if it has one
        self.model, cfg, _ = checkpoint.load_model(model_path, self.device)
        self.dataset = open_dataset(data, size=cfg.image_size, format=fmt, split=split, skip_bad=skip_bad)
        self.bf16 = bf16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .encode import encode_batches

        positions = batch["data"]
        (features,) = encode_batches(self.model, self.dataset, positions.tolist(), batch_size=len(positions),
                                     device=self.device, bf16=self.bf16)
        return {"data": positions, "features": features}  # (B,), (B, n_chunks, chunk_dim)


def encode_on_ray(address: str, model_path: str, data: str, positions: Sequence[int], *, fmt: str,
                  split: str | None = None, skip_bad: bool = False, batch_size: int = 256,
                  bf16: bool = False, encoders: int | None = None) -> Iterator[np.ndarray]:
    """Features (b, n_chunks, chunk_dim) float32 of the dataset's images at positions, in order."""
    connect(address)
    import ray

    if not len(positions):
        return
    gpus = int(ray.cluster_resources().get("GPU", 0))
    encoders = encoders or gpus or len([n for n in ray.nodes() if n["Alive"]])  # one per GPU, else per node
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    blocks = np.array_split(np.asarray(positions, np.int64), -(-len(positions) // batch_size))
    features = ray.data.from_numpy(blocks).map_batches(  # a block per batch: column "data"
        Encoder, fn_constructor_kwargs=dict(model_path=str(model_path), data=str(data), fmt=fmt, split=split,
                                            skip_bad=skip_bad, bf16=bf16),
        batch_size=batch_size, batch_format="numpy", concurrency=encoders,
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    done = 0
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        expect = np.asarray(positions[done:done + len(batch["data"])])
        if not np.array_equal(batch["data"], expect):  # preserve_order is what makes this hold
            raise RetrievalError("Ray Data returned the images out of order; the index was not written")
        done += len(expect)
        yield batch["features"]
