"""Image, signal and content metrics: PSNR, SSIM, SQNR, classifier accuracy and Fréchet distance.

All image metrics take uint8 tensors (B, 3, H, W) so that what is measured is what the user sees.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 image batches (inf when identical)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004; Gaussian window, K1=0.01, K2=0.03) over images and channels.

    a, b: uint8 (B, C, H, W). Computed on the 'valid' region of the window (no padding), per channel.
    """
    x, y = a.double(), b.double()
    c = x.shape[1]
    w = _gaussian_window(window, sigma).expand(c, 1, window, window).contiguous()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖y‖² / ‖ŷ − y‖²) (inf when identical)."""
    ref = reference.double()
    noise = (approx.double() - ref).pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * np.log10(ref.pow(2).sum().item() / noise)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to labels."""
    return float((pred.cpu() == labels.cpu()).double().mean())


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Na, D) and (Nb, D), N ≥ 2 each:
    ‖μa−μb‖² + Tr(Σa) + Tr(Σb) − 2 Tr((ΣaΣb)^½).

    Tr((ΣaΣb)^½) is the sum of the square roots of the eigenvalues of ΣaΣb, which equal those of the symmetric PSD
    matrix Σa^½ Σb Σa^½; both are computed with ``eigh``. Unlike ``scipy.linalg.sqrtm`` of the product this stays
    fast and finite when a covariance is singular (fewer images than features): sqrtm took 7–19 s on 1–8 images."""
    from scipy import linalg

    for name, feats in (("first", feats_a), ("second", feats_b)):
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"Fréchet distance: the {name} feature set has shape {tuple(feats.shape)}; it needs (N ≥ 2, D)")
    a, b = feats_a.double().numpy(), feats_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    vals_a, vecs_a = linalg.eigh(cov_a)
    root_a = (vecs_a * np.sqrt(vals_a.clip(min=0.0))) @ vecs_a.T  # Σa^½
    middle = root_a @ cov_b @ root_a
    trace_covmean = np.sqrt(linalg.eigvalsh((middle + middle.T) / 2).clip(min=0.0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)
