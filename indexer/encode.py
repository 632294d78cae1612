"""Encode images into chunk features with a trained encoder: batched, eval mode, no grad."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from disentangle.model import MixingAutoencoder


def pick_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@torch.no_grad()
def encode_batches(model: MixingAutoencoder, dataset: Dataset, indices: Sequence[int], *,
                   batch_size: int = 256, device: torch.device = torch.device("cpu"),
                   bf16: bool = False, workers: int = 0) -> Iterator[np.ndarray]:
    """Features (b, n_chunks, chunk_dim) float32 of dataset[indices], batch by batch, in order."""
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda"
                else nullcontext())
    model.eval()
    for batch in loader:
        with autocast:
            f = model.encode(batch.to(device, non_blocking=True))
        yield f.float().cpu().numpy()
