"""Table 1's architecture strings (paper §3.2): parse strictly into specs, format back, build layers.

Grammar, one token per layer, joined by '-':
  c{ch}[k{k}][s{s}]   convolution (k and s omitted when 1)
  d{ch}[k{k}][s{s}]   transposed convolution
  f[{units}]          fully connected; a bare 'f' is the network's output size
  p                   max pooling, kernel 3, stride 2
  g                   global average pooling: a map -> one vector of its channels, the same
                      wherever on the map a pattern lies (translation invariant)
  r({h},{w},{c})      reshape to h x w with c channels
  u                   nearest upsampling by 2
  b{n}[t{ch}]         spatial broadcast (Watters et al. 2019): tile a vector over an n x n map and
                      append two coordinate channels in [-1, 1]; t{ch} appends ch more channels,
                      a dense layer of the vector laid out as an n x n map (position-specific)
  xy                  append the two coordinate channels to a map (CoordConv, Liu et al. 2018)
  w                   (decoders only) resample the map through an affine map that the decoder
                      predicts from the feature: a spatial transformer (Jaderberg et al. 2015)
  wc                  (decoders only) the same through a shift, scale and turn whose four numbers
                      are read from one chunk each (chunks 0 to 3), chunks the layers do not read
Sizes are never computed by hand: `build` runs a dummy tensor through each layer as it is added.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Conv:
    channels: int
    kernel: int = 1
    stride: int = 1


@dataclass(frozen=True)
class Deconv:
    channels: int
    kernel: int = 1
    stride: int = 1


@dataclass(frozen=True)
class Dense:
    units: int | None = None  # None: the network's output size


@dataclass(frozen=True)
class Pool:
    pass


@dataclass(frozen=True)
class GlobalPool:
    pass


@dataclass(frozen=True)
class Reshape:
    height: int
    width: int
    channels: int


@dataclass(frozen=True)
class Upsample:
    pass


@dataclass(frozen=True)
class Broadcast:
    size: int
    templates: int = 0  # channels of a position-specific dense map next to the tiled vector


@dataclass(frozen=True)
class Coords:
    pass


@dataclass(frozen=True)
class Warp:
    per_chunk: bool = False  # `wc`: each of the map's numbers from a chunk of its own


Spec = Conv | Deconv | Dense | Pool | GlobalPool | Reshape | Upsample | Broadcast | Coords | Warp

_CONV = re.compile(r"([cd])([1-9]\d*)(?:k([1-9]\d*))?(?:s([1-9]\d*))?")
_DENSE = re.compile(r"f([1-9]\d*)?")
_BROADCAST = re.compile(r"b([1-9]\d*)(?:t([1-9]\d*))?")
_RESHAPE = re.compile(r"r\(([1-9]\d*),([1-9]\d*),([1-9]\d*)\)")


def parse(text: str) -> tuple[Spec, ...]:
    """Parse an architecture string; every token must match exactly or ValueError names it."""
    if not text:
        raise ValueError("empty architecture string")
    specs: list[Spec] = []
    for token in text.split("-"):
        if m := _CONV.fullmatch(token):
            kind = Conv if m[1] == "c" else Deconv
            specs.append(kind(int(m[2]), int(m[3] or 1), int(m[4] or 1)))
        elif m := _DENSE.fullmatch(token):
            specs.append(Dense(int(m[1]) if m[1] else None))
        elif m := _RESHAPE.fullmatch(token):
            specs.append(Reshape(int(m[1]), int(m[2]), int(m[3])))
        elif m := _BROADCAST.fullmatch(token):
            specs.append(Broadcast(int(m[1]), int(m[2] or 0)))
        elif token == "xy":
            specs.append(Coords())
        elif token == "p":
            specs.append(Pool())
        elif token == "g":
            specs.append(GlobalPool())
        elif token in ("w", "wc"):
            specs.append(Warp(per_chunk=token == "wc"))
        elif token == "u":
            specs.append(Upsample())
        else:
            raise ValueError(f"unknown layer token {token!r} in {text!r}")
    return tuple(specs)


def _format_one(spec: Spec) -> str:
    if isinstance(spec, (Conv, Deconv)):
        letter = "c" if isinstance(spec, Conv) else "d"
        k = f"k{spec.kernel}" if spec.kernel != 1 else ""
        s = f"s{spec.stride}" if spec.stride != 1 else ""
        return f"{letter}{spec.channels}{k}{s}"
    if isinstance(spec, Dense):
        return "f" if spec.units is None else f"f{spec.units}"
    if isinstance(spec, Reshape):
        return f"r({spec.height},{spec.width},{spec.channels})"
    if isinstance(spec, Broadcast):
        return f"b{spec.size}" + (f"t{spec.templates}" if spec.templates else "")
    if isinstance(spec, Coords):
        return "xy"
    if isinstance(spec, GlobalPool):
        return "g"
    if isinstance(spec, Warp):
        return "wc" if spec.per_chunk else "w"
    return "p" if isinstance(spec, Pool) else "u"


def format(specs: tuple[Spec, ...]) -> str:  # noqa: A001 - the inverse of parse
    """The canonical string of a spec tuple; parse(format(s)) == s."""
    return "-".join(_format_one(s) for s in specs)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}")


def _activation(kind: str) -> nn.Module:
    if kind == "lrelu":
        return nn.LeakyReLU(0.2)
    if kind == "relu":
        return nn.ReLU()
    if kind == "tanh":
        return nn.Tanh()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {kind!r}")


def _coordinates(height: int, width: int) -> torch.Tensor:
    """(1, 2, height, width): the column then the row coordinate, each from -1 to 1."""
    rows, cols = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width),
                                indexing="ij")
    return torch.stack([cols, rows])[None]


class AppendCoordinates(nn.Module):
    """(B, C, H, W) -> (B, C + 2, H, W): the map, then its column and row coordinates, so the
    convolutions that follow can tell where they are (a plain convolution cannot)."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.register_buffer("coords", _coordinates(height, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)


class WarpSlot(nn.Module):
    """Where a decoder resamples its map (`w`); the affine map comes from the feature, which
    only the decoder holds (disentangle/model.py), so on its own the slot passes the map on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SpatialBroadcast(AppendCoordinates):
    """(B, C) -> (B, C + 2, n, n): the vector at every position, then the column and row
    coordinates. A position factor can then be one number the following convolutions compare
    with the coordinates, instead of a pattern the decoder must learn to draw at every place."""

    def __init__(self, size: int, in_features: int = 0, templates: int = 0):
        super().__init__(size, size)
        self.size, self.templates = size, templates
        # a tiled vector draws every place with the same weights, which learns to draw slowly
        # (docs/results.md); the dense map adds weights of each place's own, as a DCGAN decoder has
        self.dense = nn.Linear(in_features, templates * size * size) if templates else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        x = super().forward(f[:, :, None, None].expand(-1, -1, self.size, self.size))
        if self.dense is None:
            return x
        return torch.cat([x, self.dense(f).view(-1, self.templates, self.size, self.size)], 1)


def _layer(spec: Spec, x: torch.Tensor, out_units: int) -> nn.Module:
    """The bare layer for one spec, sized from the tensor that reaches it."""
    if isinstance(spec, Conv):
        # 'same'-style padding for odd kernels; even kernels shrink by k - 1 (Table 1 prints no padding)
        return nn.Conv2d(x.shape[1], spec.channels, spec.kernel, spec.stride, (spec.kernel - 1) // 2)
    if isinstance(spec, Deconv):
        # stride 1 grows by k - 1 (1x1 -> 4x4 for the first k4); stride s scales by exactly s
        pad = (spec.kernel - spec.stride) // 2 if spec.stride > 1 else 0
        return nn.ConvTranspose2d(x.shape[1], spec.channels, spec.kernel, spec.stride, pad)
    if isinstance(spec, Dense):
        linear = nn.Linear(x[0].numel(), spec.units or out_units)
        return nn.Sequential(nn.Flatten(), linear) if x.dim() > 2 else linear
    if isinstance(spec, Pool):
        return nn.MaxPool2d(3, 2, padding=1)
    if isinstance(spec, GlobalPool):
        if x.dim() != 4:
            raise ValueError(f"g pools a map, not a {tuple(x.shape[1:])} vector")
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if isinstance(spec, Broadcast):
        if x.dim() != 2:
            raise ValueError(f"b{spec.size} broadcasts a vector, not a {tuple(x.shape[1:])} map")
        return SpatialBroadcast(spec.size, x.shape[1], spec.templates)
    if isinstance(spec, Warp):
        if x.dim() != 4:
            raise ValueError(f"{_format_one(spec)} warps a map, not a {tuple(x.shape[1:])} vector")
        return WarpSlot()
    if isinstance(spec, Coords):
        if x.dim() != 4:
            raise ValueError(f"xy appends coordinates to a map, not to a {tuple(x.shape[1:])} vector")
        return AppendCoordinates(x.shape[2], x.shape[3])
    if isinstance(spec, Reshape):
        return nn.Unflatten(1, (spec.channels, spec.height, spec.width))
    return nn.Upsample(scale_factor=2, mode="nearest")


def build(specs: tuple[Spec, ...], in_shape: tuple[int, ...], out_units: int, *, norm: str,
          activation: str, final_activation: str, warp: bool = False) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Layers for `specs` on inputs of `in_shape` (no batch dim); returns them and the output shape.

    Every conv/deconv/dense layer but the last is followed by its normalization (convolutions only)
    and `activation`; the last one by `final_activation` alone. `w` only where `warp` allows it
    (a decoder, which supplies the affine map).
    """
    if not warp and any(isinstance(s, Warp) for s in specs):
        raise ValueError(f"{format(specs)!r}: w and wc warp a decoder's map; only a decoder can use them")
    weighted = [i for i, s in enumerate(specs) if isinstance(s, (Conv, Deconv, Dense))]
    if not weighted:
        raise ValueError(f"{format(specs)!r} has no weighted layer")
    layers: list[nn.Module] = []
    x = torch.zeros(1, *in_shape)
    with torch.no_grad():
        for i, spec in enumerate(specs):
            if isinstance(spec, Reshape) and x[0].numel() != spec.height * spec.width * spec.channels:
                raise ValueError(f"{_format_one(spec)} cannot reshape {x[0].numel()} values")
            block = [_layer(spec, x, out_units)]
            if i == weighted[-1]:
                block.append(_activation(final_activation))
            elif isinstance(spec, (Conv, Deconv)):
                block += [_norm(norm, spec.channels), _activation(activation)]
            elif isinstance(spec, Dense):
                block.append(_activation(activation))
            for layer in block:
                x = layer.eval()(x)  # eval: the dummy pass must not touch batch-norm statistics
                layers.append(layer.train())
    return nn.Sequential(*layers), tuple(x.shape[1:])
