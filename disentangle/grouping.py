"""Chunks that hold one factor between them, found after training and searched as one chunk.

Not in the paper. With more chunks than factors (sprites-cpu: 32 of 8) a factor with many values
can spread over several chunks (Sprites' pose over four to seven, docs/results.md), and no single
chunk retrieves it. Chunks that carry parts of one factor depend on each other, while chunks of
independent factors do not; so the dependence between chunks, measured on training images alone
(no label), tells which chunks to search together.

Dependence is CKA with a Gaussian kernel (Gretton et al. 2005, Kornblith et al. 2019) between two
chunks' values over the same images: 0 for independent chunks in the limit, 1 for chunks that
are functions of each other. Chunks are joined by average linkage while a group's mean dependence
is at least `ratio` times the median over all pairs, so the rule adapts to how much any two chunks
share on a dataset. A group is searched by plain L2 over its members' numbers together, exactly
as a multi-chunk query over them (no rescaling).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import nn
from torch.utils.data import Dataset

from .architecture import SpatialBroadcast
from .config import ModelConfig
from .errors import RetrievalError
from .model import AffineWarp, MixingAutoencoder

log = logging.getLogger(__name__)
SAMPLE = 1000  # images the dependence is measured on: ~4 MB of kernel per chunk


def _centred_kernel(x: np.ndarray) -> np.ndarray | None:
    """H K H for the Gaussian kernel of rows x (N, d), bandwidth the median squared distance;
    None for a chunk that does not vary over these images."""
    x = x - x.mean(0)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    positive = d2[d2 > 0]
    if positive.size == 0:
        return None
    k = np.exp(-d2 / np.median(positive))
    k -= k.mean(0)
    k -= k.mean(1)[:, None]
    return k.astype(np.float32)


def dependence(features: np.ndarray) -> np.ndarray:
    """(C, C) kernel CKA between the chunks of features (N, C, d); 1 on the diagonal, 0 between a
    chunk that does not vary and any other."""
    f = np.asarray(features, np.float64)
    kernels = [_centred_kernel(f[:, c]) for c in range(f.shape[1])]
    norms = [0.0 if k is None else float(np.sqrt((k.astype(np.float64) ** 2).sum())) for k in kernels]
    n = len(kernels)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            if kernels[i] is not None and kernels[j] is not None and norms[i] > 0 and norms[j] > 0:
                inner = float(np.dot(kernels[i].ravel().astype(np.float64), kernels[j].ravel()))
                out[i, j] = out[j, i] = inner / (norms[i] * norms[j])
    return out


def find_groups(dep: np.ndarray, ratio: float) -> list[list[int]]:
    """Average-linkage groups of chunks whose mean dependence is >= ratio x the median over all
    pairs; every chunk in exactly one group, groups ordered by their lowest chunk."""
    n = len(dep)
    if n < 3:
        return [[c] for c in range(n)]
    off = dep[~np.eye(n, dtype=bool)]
    threshold = ratio * float(np.median(off))
    distance = 1.0 - (dep + dep.T) / 2
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(np.clip(distance, 0.0, None), checks=False), "average")
    labels = fcluster(tree, t=1.0 - threshold, criterion="distance")
    groups = [sorted(np.flatnonzero(labels == g).tolist()) for g in np.unique(labels)]
    return sorted(groups, key=lambda g: g[0])


def encode_features(model, images: torch.Tensor, batch: int = 250) -> np.ndarray:
    """(N, C, d) features of images (N, 3, H, W) in [-1, 1], in eval mode, no gradients."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model.encode(images[s:s + batch].to(device)).float().cpu()
                              for s in range(0, len(images), batch)]).numpy()
    finally:
        model.train(was_training)


def grouped_config(cfg: ModelConfig, groups: list[list[int]]) -> ModelConfig:
    """The config of the same networks read as one chunk per group: each chunk as wide as the
    largest group, a narrower group's numbers first and zeros after (ModelConfig.chunk_widths)."""
    widest = max(len(g) for g in groups)
    widths = tuple(len(g) * cfg.chunk_dim for g in groups)
    return replace(cfg, n_chunks=len(groups), chunk_dim=widest * cfg.chunk_dim,
                   chunk_widths=widths if widest > min(len(g) for g in groups) else (),
                   chunk_groups=tuple(tuple(g) for g in groups), group_ratio=0.0)


def _layout(cfg: ModelConfig, groups: list[list[int]]) -> torch.Tensor:
    """For each learned feature number (chunk c, position k), its place in the grouped feature."""
    width = max(len(g) for g in groups) * cfg.chunk_dim
    place = torch.empty(cfg.n_chunks * cfg.chunk_dim, dtype=torch.long)
    for g, members in enumerate(groups):
        for slot, c in enumerate(members):
            for k in range(cfg.chunk_dim):
                place[c * cfg.chunk_dim + k] = g * width + slot * cfg.chunk_dim + k
    return place


def _parametric(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]


def _inputs_moved(w: torch.Tensor, place: torch.Tensor, size: int) -> torch.Tensor:
    """A layer's weight (out, in, ...) whose first len(place) inputs are the feature's numbers,
    with those inputs moved to `place` in a feature of `size` numbers (padding inputs 0) and any
    inputs after them (a broadcast's coordinates and templates) kept last, in order."""
    learned = len(place)
    out = w.new_zeros((w.shape[0], size + w.shape[1] - learned, *w.shape[2:]))
    out[:, place] = w[:, :learned]
    out[:, size:] = w[:, learned:]
    return out


def regroup(model, cfg: ModelConfig, groups: list[list[int]]):
    """The same encoder and decoder with the feature laid out one chunk per group: the encoder's
    last layer's outputs and the decoder's first layer's inputs are moved (padding rows and
    columns are 0), so decode(encode(x)) is unchanged and mixing a chunk mixes its whole group.
    Returns (model, grouped config) in eval mode, without the classifier (search needs none)."""
    if sorted(c for g in groups for c in g) != list(range(cfg.n_chunks)):
        raise RetrievalError(f"chunk groups {groups} must hold each of the {cfg.n_chunks} chunks once")
    new_cfg = grouped_config(cfg, groups)
    opening = model.decoder.net[0]
    templates = opening.dense if isinstance(opening, SpatialBroadcast) else None
    last = _parametric(model.encoder.net)[-1]
    first = next(m for m in _parametric(model.decoder.net) if m is not templates)
    # a broadcast decoder's first convolution reads the feature's channels, then two coordinates
    # (then the template channels, whose dense layer reads the feature too)
    broadcast = isinstance(opening, SpatialBroadcast) and isinstance(first, nn.Conv2d)
    if not isinstance(last, nn.Linear) or not (broadcast or isinstance(first, (nn.Linear, nn.ConvTranspose2d))):
        raise RetrievalError(f"{cfg.name}: grouping chunks needs an encoder that ends and a decoder that "
                             "starts with a fully connected layer (or a 1x1 deconvolution, or a broadcast)")
    place = _layout(cfg, groups)
    grouped = MixingAutoencoder(new_cfg, tuple(sorted(model.losses - {"c"})))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    names = {id(p): n for n, p in model.named_parameters()}
    size = new_cfg.feature_dim
    enc_w = last.weight.new_zeros((size, last.weight.shape[1]))
    enc_w[place] = last.weight.detach()
    state[names[id(last.weight)]] = enc_w
    if last.bias is not None:
        enc_b = last.bias.new_zeros(size)
        enc_b[place] = last.bias.detach()
        state[names[id(last.bias)]] = enc_b
    if isinstance(first, nn.Linear) or broadcast:                     # (out, in [+ 2 + t], kH, kW)
        dec_w = _inputs_moved(first.weight.detach(), place, size)
        if templates is not None:                                     # (t * n * n, in)
            state[names[id(templates.weight)]] = _inputs_moved(templates.weight.detach(), place, size)
    else:                                                             # (in, out, kH, kW)
        dec_w = first.weight.new_zeros((size, *first.weight.shape[1:]))
        dec_w[place] = first.weight.detach()
    state[names[id(first.weight)]] = dec_w
    warp = model.decoder.warp
    if isinstance(warp, AffineWarp):                                  # its head reads the feature too
        state[names[id(warp.head[0].weight)]] = _inputs_moved(warp.head[0].weight.detach(), place, size)
    elif warp is not None:                                            # its heads read chunks 0 to 3
        state["decoder.warp.reads"] = place[warp.reads]
        state["decoder.warp.layers_read"] = warp.layers_read.new_zeros(size).index_copy(0, place, warp.layers_read)
    grouped.load_state_dict(state)
    return grouped.to(next(model.parameters()).device).eval(), new_cfg


def groups_on(model, images: Dataset, ratio: float, seed: int = 0) -> list[list[int]]:
    """The groups of the model's chunks, found on SAMPLE images drawn from a (training) dataset."""
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:SAMPLE]
    features = encode_features(model, torch.stack([images[int(i)] for i in pick]))
    groups = find_groups(dependence(features), ratio)
    log.info("%d learned chunks -> %d search chunks; searched together: %s", features.shape[1], len(groups),
             ", ".join("+".join(map(str, g)) for g in groups if len(g) > 1) or "none")
    return groups
