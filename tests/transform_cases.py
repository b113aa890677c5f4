"""Test inputs for the transform methods: DiT-like activations with outlier channels, LayerStats-like objects built
from them, and an independent dense Hadamard reference (scipy) to check the fast rotation against.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from scipy.linalg import hadamard as scipy_hadamard


def outlier_acts(b: int = 4, t: int = 64, k: int = 192, n_outliers: int = 6, seed: int = 0, offsets: bool = True) -> torch.Tensor:
    """(B, T, K) float32 activations as DiTs have them: a few channels 20–100× larger than the rest, and (if
    ``offsets``) per-sample per-channel means that are large compared with the spread in some channels."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.ones(k)
    idx = torch.randperm(k, generator=g)[:n_outliers]
    spread[idx] = 20 + 80 * torch.rand(n_outliers, generator=g)
    x = torch.randn(b, t, k, generator=g) * spread
    if offsets:
        mean = torch.randn(1, 1, k, generator=g) * 3 + torch.randn(b, 1, k, generator=g)  # shared + per-sample part
        mean[..., idx[: n_outliers // 2]] *= 10  # "massive" constant channels, as adaLN-modulated inputs have
        x = x + mean
    return x


def stats_from_acts(x: torch.Tensor) -> SimpleNamespace:
    """A LayerStats-like record (the fields of the calibration contract) computed directly from X (B, T, K)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    centered = (x - x.mean(-2, keepdim=True)).reshape(-1, x.shape[-1])
    return SimpleNamespace(
        absmax=flat.abs().amax(0), minimum=flat.amin(0), maximum=flat.amax(0), mean=flat.mean(0), std=flat.std(0),
        centered_std=centered.std(0), centered_absmax=centered.abs().amax(0),
        xtx=flat.double().t() @ flat.double(), n_rows=flat.shape[0], rows=flat[:512].clone(), per_timestep={},
    )


def dense_hadamard(k: int, block: int, signs: torch.Tensor, signs_first: bool = False) -> torch.Tensor:
    """Q (K, K) float64 = block-diagonal normalised Hadamard (Sylvester order) with random signs.

    ``signs_first``: Q = diag(signs)·blockdiag(H)/√b (signs applied to X before the transform); else
    Q = blockdiag(H)/√b·diag(signs).
    """
    h = torch.from_numpy(scipy_hadamard(block).astype(np.float64)) / np.sqrt(block)
    q = torch.block_diag(*([h] * (k // block)))
    d = torch.diag(signs.double())
    return d @ q if signs_first else q @ d
