"""Built-in procedural shapes with known factors: the embedded dataset of the demo and the tests.

Image i depends only on (seed, i): its seven factors come from a counter-based hash, so
`shapes:100` is the first 100 images of `shapes:20000`. Images are rendered on access directly
at the requested size (4x supersampled, then box-filtered), which costs tens of microseconds.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..errors import RetrievalError
from .base import SPLITS, ImageDataset, Record, require_split

DEFAULT_COUNT = 20000
RENDERING = 2  # bumped whenever the same factors draw other pixels; models of another one are stale
SUPERSAMPLE = 4  # antialiased edges without a resampling filter
SHAPES = ("square", "triangle", "ellipse", "cross")  # none has a period under 90 degrees
COLOURS = ((230, 40, 40), (40, 200, 40), (50, 90, 240), (240, 220, 40), (220, 50, 220),
           (40, 220, 220))
BACKGROUNDS = ((0, 0, 0), (70, 70, 70), (20, 20, 80), (80, 50, 20))  # darker than every colour
# Objects cover 5 to 24 % of the image and sit on a 4 x 4 grid 3.6 pixels apart at 32 x 32: with
# smaller objects on a finer grid (up to commit ee81d0b) colour and position changed too few
# pixels for a CPU-sized model to give them chunks of their own (docs/results.md)
SCALES = (0.18, 0.23, 0.28, 0.33)  # circumradius / image side
ROTATIONS = tuple(range(0, 90, 15))  # degrees; all six steps look different for every shape
POSITIONS = tuple(np.linspace(0.33, 0.67, 4))  # centre / image side: the largest shape stays inside
FACTORS = {"shape": len(SHAPES), "colour": len(COLOURS), "background": len(BACKGROUNDS),
           "scale": len(SCALES), "rotation": len(ROTATIONS), "x": len(POSITIONS),
           "y": len(POSITIONS)}

_ARM = 0.3  # half-width of the cross's arms
_OUTLINES = {  # unit outlines (circumradius about 1), y pointing down
    "square": [(math.cos(a), math.sin(a)) for a in np.radians([45, 135, 225, 315])],
    "triangle": [(math.cos(a), -math.sin(a)) for a in np.radians([90, 210, 330])],
    "ellipse": [(math.cos(a), 0.5 * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 48, endpoint=False)],
    "cross": [(x / math.hypot(1, _ARM), y / math.hypot(1, _ARM)) for x, y in (
        (-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
        (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM))],
}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a uint64 -> uint64 hash with well spread bits."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def factor_table(n: int, seed: int = 0) -> np.ndarray:
    """The (n, 7) int factor levels of images 0..n-1, columns in FACTORS order."""
    ids = np.arange(n, dtype=np.uint64) * np.uint64(len(FACTORS))
    base = _mix(np.full(n, seed, np.uint64))  # different seeds start from unrelated streams
    columns = [_mix(base ^ (ids + np.uint64(j))) % np.uint64(k)
               for j, k in enumerate(FACTORS.values())]
    return np.stack(columns, axis=1).astype(np.int64)


def render(factors: dict[str, int], size: int) -> np.ndarray:
    """Draw one image from its factor levels as (size, size, 3) uint8 RGB."""
    side = size * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[factors["background"]])
    angle = math.radians(ROTATIONS[factors["rotation"]])
    cos, sin = math.cos(angle), math.sin(angle)
    radius = SCALES[factors["scale"]] * side
    cx, cy = POSITIONS[factors["x"]] * side, POSITIONS[factors["y"]] * side
    points = [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos))
              for x, y in _OUTLINES[SHAPES[factors["shape"]]]]
    ImageDraw.Draw(img).polygon(points, fill=COLOURS[factors["colour"]])
    return np.asarray(img.reduce(SUPERSAMPLE))


class ShapesDataset(ImageDataset):
    """Procedural images rendered on access from their records' factors."""

    def image(self, i: int) -> np.ndarray:
        """The i-th image as (size, size, 3) uint8 RGB."""
        return render(self.records[i].attributes, self.size)


def _split_of(i: int) -> str:
    """A deterministic 80/10/10 split by index."""
    return SPLITS[max(0, i % 10 - 7)]


def open_shapes(n: int = DEFAULT_COUNT, *, size: int, split: str | None = None,
                seed: int = 0) -> ShapesDataset:
    """The first n procedural images of `seed`, optionally one split of them."""
    if n < 1:
        raise RetrievalError(f"shapes:{n} holds no images; write shapes or shapes:N with N >= 1")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")  # the hash works on uint64
    table = factor_table(n, seed)
    records = [Record(key=f"shape_{i:06d}", path="", split=_split_of(i),
                      attributes=dict(zip(FACTORS, map(int, row)))) for i, row in enumerate(table)]
    records = require_split(records, split, f"shapes:{n}")
    return ShapesDataset(format="shapes", root=None, size=size, records=records,
                         attribute_names=list(FACTORS), skipped=0)
