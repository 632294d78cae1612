"""Attribute-transfer pictures for the API (paper §3, Figure 5): one base image with some chunks
taken from a donor, and per-chunk strips that show what a chunk changes."""
from __future__ import annotations

import numpy as np
import torch

from disentangle.figures import to_uint8, transfer_figure, transfer_panel
from disentangle.model import MixingAutoencoder


def _tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 images -> (B, 3, H, W) in [-1, 1], the encoder's input range."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


def transfer(model: MixingAutoencoder, base: np.ndarray, donor: np.ndarray, chunks: list[int]) -> np.ndarray:
    """The base image decoded with `chunks` taken from the donor, (H, W, 3) uint8."""
    cells = transfer_panel(model, _tensor([base]), _tensor([donor]), chunks)  # (1, 1, 3, H, W)
    return to_uint8(cells[0])[0]


def strip(model: MixingAutoencoder, base: np.ndarray, donors: list[np.ndarray], chunk: int) -> np.ndarray:
    """Donors along the top, the base at the left, and below each donor the base with its chunk."""
    return transfer_figure(model, _tensor([base]), _tensor(donors), [chunk])


def strip_ids(ids: np.ndarray, n: int) -> list[int]:
    """n + 1 ids spread over the index, the same ones on every call: the base, then the donors."""
    pick = np.random.default_rng(0).choice(len(ids), size=min(n + 1, len(ids)), replace=False)
    return [int(ids[i]) for i in pick]
