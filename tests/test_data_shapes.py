"""Built-in shapes: determinism, factor ranges, splits, and that every factor shows in the pixels."""
import numpy as np
import pytest

from disentangle.data import open_dataset
from disentangle.data.shapes import (BACKGROUNDS, COLOURS, FACTORS, POSITIONS, factor_table,
                                     open_shapes, render)


def test_shapes_are_deterministic_and_prefix_stable():
    a, b = open_dataset("shapes:300", size=32), open_dataset("shapes:300", size=32)
    small = open_dataset("shapes:50", size=32)
    assert [r.key for r in a.records[:3]] == ["shape_000000", "shape_000001", "shape_000002"]
    assert a.records == b.records and a.records[:50] == small.records
    for i in range(0, 300, 7):
        np.testing.assert_array_equal(a.image(i), b.image(i))
    np.testing.assert_array_equal(a.image(49), small.image(49))


def test_shapes_seeds_and_indices_differ():
    table, other = factor_table(2000, seed=0), factor_table(2000, seed=1)
    assert (table != other).any(axis=1).mean() > 0.95
    assert len({tuple(row) for row in table}) > 1900  # 36,864 combinations: few repeats
    one, two = open_shapes(10, size=32, seed=0), open_shapes(10, size=32, seed=1)
    assert any((one.image(i) != two.image(i)).any() for i in range(10))
    assert all((one.image(i) != one.image(i + 1)).any() for i in range(9))


def test_shapes_factor_ranges_and_attributes():
    ds = open_dataset("shapes", size=32)
    assert len(ds) == 20000 and ds.root is None and ds.format == "shapes"
    assert ds.attribute_names == ["shape", "colour", "background", "scale", "rotation", "x", "y"]
    table = np.array([[r.attributes[name] for name in ds.attribute_names] for r in ds.records])
    for column, levels in enumerate(FACTORS.values()):
        counts = np.bincount(table[:, column], minlength=levels)
        assert len(counts) == levels and counts.min() > 0.8 * 20000 / levels  # all levels, balanced
    assert all(isinstance(v, int) for v in ds.records[0].attributes.values())


def test_shapes_splits_are_80_10_10_by_index():
    ds = open_dataset("shapes:1000", size=16)
    assert [r.split for r in ds.records[:10]] == ["train"] * 8 + ["val", "test"]
    val = open_dataset("shapes:1000", size=16, split="val")
    assert len(val) == 100 and val.records[0].key == "shape_000008"
    np.testing.assert_array_equal(val.image(0), ds.image(8))


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_pixels_show_colour_background_and_position(size):
    ds = open_dataset("shapes:200", size=size)
    for i in range(0, 200, 9):
        f = ds.records[i].attributes
        x = ds.image(i)
        assert x.shape == (size, size, 3) and x.dtype == np.uint8
        cx, cy = int(POSITIONS[f["x"]] * size), int(POSITIONS[f["y"]] * size)
        np.testing.assert_array_equal(x[cy, cx], COLOURS[f["colour"]])  # the shape covers its centre
        np.testing.assert_array_equal(x[0, 0], BACKGROUNDS[f["background"]])


def test_shapes_every_rotation_and_shape_looks_different():
    base = {"colour": 0, "background": 0, "scale": 3, "x": 2, "y": 3}
    for shape in range(FACTORS["shape"]):
        images = [render({**base, "shape": shape, "rotation": r}, 64) for r in range(FACTORS["rotation"])]
        assert len({image.tobytes() for image in images}) == len(images), shape
    shapes = [render({**base, "shape": s, "rotation": 0}, 64) for s in range(FACTORS["shape"])]
    assert len({image.tobytes() for image in shapes}) == FACTORS["shape"]
