"""SVD low-rank branch: the split is exact, the residual is the Eckart–Young tail, smoothing composes."""

from __future__ import annotations

import pytest
import torch

from ditlab import transforms
from ditlab.errors import ConfigError
from transform_cases import outlier_acts, stats_from_acts


def _w(n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a few strong directions on top of noise, as trained weights (and smoothed weights) have
    return torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g) + 0.05 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_svd_split_is_exact_and_residual_is_the_tail(rank):
    w = _w()
    l1, l2, r = transforms.svd_split(w, rank)
    assert l1.shape == (48, rank) and l2.shape == (rank, 64) and r.shape == w.shape
    assert torch.allclose(l1 @ l2 + r, w, atol=1e-5)
    s = torch.linalg.svdvals(w.double())
    tail = s[rank:].pow(2).sum()
    assert abs(r.double().pow(2).sum() / tail - 1) < 1e-4  # Eckart–Young: ‖R‖² = Σ_{i>r} σ_i²
    assert torch.allclose(torch.linalg.svdvals(r.double())[: 48 - rank], s[rank:], rtol=1e-4, atol=1e-6)


def test_svd_residual_is_easier_to_quantize():
    """Removing the strong directions shrinks the weight range: RTN error of R is far below that of W."""
    from ditlab import primitives

    w = _w(seed=1)
    _, _, r = transforms.svd_split(w, 4)
    err_w = (primitives.fake_quantize_weight(w, 4) - w).norm()
    err_r = (primitives.fake_quantize_weight(r, 4) - r).norm()
    assert err_r < 0.3 * err_w


def test_svd_after_smoothing_reconstructs_the_layer():
    x = outlier_acts(b=2, t=32, k=64, seed=2)
    w = _w(seed=2)
    smooth = transforms.smoothquant_scales(stats_from_acts(x).absmax, w, 0.5)
    l1, l2, r = transforms.svd_split(transforms.fold_weight(w, smooth), 8)
    xs, _ = transforms.transform_input(x, smooth)
    y = xs @ r.t() + (xs @ l2.t()) @ l1.t()
    ref = x @ w.t()
    assert ((y - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("rank", [0, 49, 2.5, True])
def test_svd_rank_validation(rank):
    with pytest.raises(ConfigError, match="rank"):
        transforms.svd_split(_w(), rank)
