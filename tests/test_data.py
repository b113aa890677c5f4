"""Shapes-10 generator: determinism, balance, variety."""

import numpy as np
import torch

from ditlab import data


def test_same_seed_same_images_and_slices_are_consistent():
    a, la = data.make_dataset(40, seed=7)
    b, lb = data.make_dataset(40, seed=7)
    assert torch.equal(a, b) and torch.equal(la, lb)
    tail, ltail = data.make_dataset(15, seed=7, start=25)
    assert torch.equal(tail, a[25:]) and torch.equal(ltail, la[25:])


def test_different_seeds_give_different_images():
    a, _ = data.make_dataset(20, seed=0)
    b, _ = data.make_dataset(20, seed=1)
    assert (a.float() - b.float()).abs().mean() > 10


def test_shape_dtype_range_and_balance():
    images, labels = data.make_dataset(100, seed=3)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [10] * 10


def test_every_class_draws_a_visible_shape_of_distinct_area():
    rng = np.random.default_rng(0)
    areas, masks = [], []
    for label in range(len(data.CLASSES)):
        p = data.draw_params(label, rng)
        p = data.ShapeParams(label, 0.5, 0.5, 0.35, 0.3, p.fg, p.bg, p.bg, False)
        mask = np.asarray(data.shape_mask(p, 128)) > 127
        areas.append(mask.mean())
        masks.append(mask)
        assert 0.03 < mask.mean() < 0.6, data.CLASSES[label]
    # At a fixed size and pose every pair of classes differs in at least 4 % of the canvas (a ring is not a circle).
    for i in range(len(masks)):
        for j in range(i):
            assert (masks[i] != masks[j]).mean() > 0.04, (data.CLASSES[i], data.CLASSES[j])


def test_variety_of_position_colour_and_size_within_a_class():
    rng = np.random.default_rng(1)
    params = [data.draw_params(4, rng) for _ in range(200)]
    assert np.std([p.cx for p in params]) > 0.08
    assert np.std([p.radius for p in params]) > 0.04
    assert len({p.fg for p in params}) > 150
    assert 0.1 < np.mean([p.outlined for p in params]) < 0.5


def test_model_range_round_trip():
    images, _ = data.make_dataset(8, seed=2)
    assert torch.equal(data.from_model_range(data.to_model_range(images)), images)


def _mask_halves(name: str, angle: float = 0.0) -> tuple[float, float, float, float]:
    """Foreground mass of the top, bottom, left and right halves of a centred shape of class ``name``."""
    p = data.ShapeParams(data.CLASSES.index(name), 0.5, 0.5, 0.35, angle, (255, 255, 255), (0, 0, 0), (0, 0, 0), False)
    m = np.asarray(data.shape_mask(p, 128), np.float64) / 255
    return m[:64].sum(), m[64:].sum(), m[:, :64].sum(), m[:, 64:].sum()


def test_shapes_stand_upright_with_a_bounded_tilt():
    top, bottom, _, _ = _mask_halves("triangle")
    assert bottom > 1.15 * top  # apex up: 5/9 of the area lies below the circumcentre
    top, bottom, _, _ = _mask_halves("heart")
    assert top > 1.2 * bottom  # lobes up, point down
    _, _, left, right = _mask_halves("arrow")
    assert right > 1.1 * left  # the head (right) is wider than the shaft (left)
    _, _, left, right = _mask_halves("crescent")
    assert left > 1.5 * right  # the bite is on the right
    rng = np.random.default_rng(2)
    tilts = [data.draw_params(label % 10, rng).angle for label in range(500)]
    assert max(abs(a) for a in tilts) <= data.MAX_TILT and np.std(tilts) > data.MAX_TILT / 3
