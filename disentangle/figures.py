"""Attribute-transfer figures in the form of the paper's Figures 2, 3 and 5: one panel per chunk,
that chunk taken from the image atop each column, the rest from the image left of each row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .model import MixingAutoencoder, mix


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def transfer_panel(model: MixingAutoencoder, bases: torch.Tensor, donors: torch.Tensor,
                   chunks: list[int]) -> torch.Tensor:
    """(rows, cols, 3, H, W): cell (i, j) = bases[i] with `chunks` taken from donors[j]."""
    fb, fd = model.encode(bases), model.encode(donors)  # (R, chunks, dim), (C, chunks, dim)
    rows, cols = len(bases), len(donors)
    mask = torch.zeros(fb.shape[1], dtype=torch.bool, device=fb.device)
    mask[chunks] = True
    mixed = mix(fd[None].expand(rows, -1, -1, -1).flatten(0, 1),
                fb[:, None].expand(-1, cols, -1, -1).flatten(0, 1), mask)
    return model.decode(mixed).view(rows, cols, *bases.shape[1:])


def _panel_image(cells: np.ndarray, bases: np.ndarray, donors: np.ndarray, pad: int) -> np.ndarray:
    """Lay out one panel: donors along the top, bases down the left, transfers in the grid."""
    rows, cols, h, w, _ = cells.shape
    out = np.full(((rows + 1) * (h + pad) + pad, (cols + 1) * (w + pad) + pad, 3), 255, np.uint8)
    def put(r: int, c: int, img: np.ndarray) -> None:
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = img
    for j in range(cols):
        put(0, j + 1, donors[j])
    for i in range(rows):
        put(i + 1, 0, bases[i])
        for j in range(cols):
            put(i + 1, j + 1, cells[i, j])
    return out


@torch.no_grad()
def transfer_figure(model: MixingAutoencoder, bases: torch.Tensor, donors: torch.Tensor,
                    chunks: list[int] | None = None, per_row: int = 4) -> np.ndarray:
    """All panels (one per chunk, or only `chunks`) tiled `per_row` across; an RGB uint8 image."""
    was_training = model.training
    model.eval()
    try:
        n_chunks = model.encoder.n_chunks
        chunks = list(range(n_chunks)) if chunks is None else chunks
        b8, d8 = to_uint8(bases), to_uint8(donors)
        pad = max(2, bases.shape[-1] // 16)
        panels = []
        for c in chunks:
            cells = transfer_panel(model, bases, donors, [c])
            flat = to_uint8(cells.flatten(0, 1)).reshape(*cells.shape[:2], *b8.shape[1:])
            panels.append(_panel_image(flat, b8, d8, pad))
    finally:
        model.train(was_training)
    ph, pw, _ = panels[0].shape
    per_row = min(per_row, len(panels))
    n_rows = -(-len(panels) // per_row)
    gap = 4 * pad
    sheet = np.full((n_rows * (ph + gap) - gap, per_row * (pw + gap) - gap, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, per_row)
        sheet[r * (ph + gap):r * (ph + gap) + ph, c * (pw + gap):c * (pw + gap) + pw] = panel
    return sheet


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write an RGB uint8 array as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
