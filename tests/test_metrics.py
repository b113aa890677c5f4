"""Image and content metrics against independent references: the Fréchet distance against scipy's ``sqrtm`` formula."""

import numpy as np
import pytest
import torch
from scipy import linalg

from ditlab import metrics


def sqrtm_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with the matrix square root of the product (as pytorch-fid computes it)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@pytest.mark.parametrize("n, d, shift", [(200, 8, 0.0), (500, 32, 0.5), (300, 64, 2.0)])
def test_frechet_distance_equals_the_sqrtm_formula(n, d, shift):
    rng = np.random.default_rng(d)
    mix = rng.standard_normal((d, d))
    a = rng.standard_normal((n, d)) @ mix
    b = rng.standard_normal((n, d)) @ (mix + 0.3 * rng.standard_normal((d, d))) + shift
    ours = metrics.frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(sqrtm_reference(a, b), rel=1e-7, abs=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.standard_normal((100, 16)))
    assert abs(metrics.frechet_distance(a, a)) < 1e-9
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_frechet_distance_with_fewer_images_than_features_is_finite():
    """Singular covariances (2–8 images of 64-d features): finite, and close to the sqrtm formula on a pair with a tiny
    ridge added (the trace term is continuous in Σ)."""
    rng = np.random.default_rng(2)
    real = rng.standard_normal((400, 64))
    for n in (2, 3, 8):
        few = rng.standard_normal((n, 64)) + 1.0
        value = metrics.frechet_distance(torch.from_numpy(few), torch.from_numpy(real))
        assert np.isfinite(value) and value > 0
        ridge = 1e-8 * np.eye(64)
        cov_f, cov_r = np.cov(few, rowvar=False) + ridge, np.cov(real, rowvar=False) + ridge
        covmean = linalg.sqrtm(cov_f @ cov_r).real
        expected = ((few.mean(0) - real.mean(0)) ** 2).sum() + np.trace(cov_f + cov_r - 2 * covmean)
        assert value == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_needs_two_images_per_set():
    one = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="N ≥ 2"):
        metrics.frechet_distance(one, torch.randn(10, 8))
