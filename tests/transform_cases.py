"""Test inputs for the transform methods: DiT-like activations with outlier channels, LayerStats-like objects built
from them, and an independent dense Hadamard reference (scipy) to check the fast rotation against.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from scipy.linalg import hadamard as scipy_hadamard


def outlier_acts(b: int = 4, t: int = 64, k: int = 192, n_outliers: int = 6, seed: int = 0, offsets: bool = True) -> torch.Tensor:
    """(B, T, K) float32 activations shaped like a DiT layer input (measured on the shipped model: the per-sample
    channel means carry 20–70 % of the energy): unit-spread channels, ``n_outliers // 2`` channels with a spread
    20–100× larger, and (if ``offsets``) per-sample per-channel means, with ``n_outliers - n_outliers // 2``
    "massive" channels whose mean is 20–100× larger (adaLN shifts make such constant channels)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(k, generator=g)[:n_outliers]
    wide, massive = idx[: n_outliers // 2], idx[n_outliers // 2 :]
    spread = torch.ones(k)
    spread[wide] = 20 + 80 * torch.rand(len(wide), generator=g)
    x = torch.randn(b, t, k, generator=g) * spread
    if offsets:
        shared = torch.randn(1, 1, k, generator=g)
        mean = shared + 0.5 * torch.randn(b, 1, k, generator=g)  # shared + per-sample part
        big = (20 + 80 * torch.rand(len(massive), generator=g)) * torch.sign(shared[..., massive])
        mean[..., massive] = big * (1 + 0.1 * torch.randn(b, 1, len(massive), generator=g))  # ±10 % per sample
        x = x + mean
    return x


def stats_from_acts(x: torch.Tensor) -> SimpleNamespace:
    """A LayerStats-like record with the fields of the calibration contract, computed directly from X (B, T, K) or
    (B, K) (one token per sample, as adaLN inputs): population std, per-sample token-mean centring; the per-sample
    means (B, K) of token inputs ((0, K) for one token per sample)."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 3 else x.reshape(-1, 1, x.shape[-1])
    flat = x3.reshape(-1, x3.shape[-1]).float()
    centered = (x3 - x3.mean(1, keepdim=True)).reshape(-1, x3.shape[-1])
    return SimpleNamespace(
        absmax=flat.abs().amax(0), minimum=flat.amin(0), maximum=flat.amax(0), mean=flat.mean(0),
        std=flat.std(0, unbiased=False), centered_std=centered.std(0, unbiased=False), centered_absmax=centered.abs().amax(0),
        xtx=flat.double().t() @ flat.double(), n_rows=flat.shape[0], rows=flat[:512].clone(), per_timestep={},
        sample_means=x3.mean(1).float() if x3.shape[1] > 1 else torch.zeros(0, x3.shape[-1]),
    )


def make_linear(n: int = 96, k: int = 192, seed: int = 0, bias: bool = True) -> torch.nn.Linear:
    """A float nn.Linear (N, K) with trained-like weights: small Gaussian entries plus a few larger columns."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        w = torch.randn(n, k, generator=g) * 0.05
        w[:, torch.randperm(k, generator=g)[:3]] *= 4
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin.requires_grad_(False)


def rel_err(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """‖approx − ref‖_F / ‖ref‖_F in float64."""
    return float((approx.double() - ref.double()).norm() / ref.double().norm())


def dense_hadamard(k: int, block: int, signs: torch.Tensor, signs_first: bool = False) -> torch.Tensor:
    """Q (K, K) float64 = block-diagonal normalised Hadamard (Sylvester order) with random signs.

    ``signs_first``: Q = diag(signs)·blockdiag(H)/√b (signs applied to X before the transform); else
    Q = blockdiag(H)/√b·diag(signs).
    """
    h = torch.from_numpy(scipy_hadamard(block).astype(np.float64)) / np.sqrt(block)
    q = torch.block_diag(*([h] * (k // block)))
    d = torch.diag(signs.double())
    return d @ q if signs_first else q @ d
