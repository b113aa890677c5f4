"""SVD low-rank branch + quantized residual (SVDQuant-style, Li et al. 2025).

After SmoothQuant-style smoothing (α = ``cfg.alpha``, from calibration absmax), ``W' = W·diag(s) = L1 L2 + R`` with
L1 L2 the rank-r truncated SVD (r = ``cfg.rank``) kept in float16 and only the residual R quantized:
``Y ≈ Q_a(X') Q_w(R)ᵀ + (X' L2ᵀ) L1ᵀ + b`` with X' = X / s. Smoothing moves activation outliers into W', and the
low-rank branch absorbs the large directions of W' that the smoothing created, so both sides quantize well.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import QuantLinear
from . import register, require_stats
from .gptq import quantize_folded
from .smoothquant import smoothquant_transform


@register("svd")
def quantize_svd(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """SVD handler: smoothing (needs calibration absmax), rank-r float16 branch, quantized residual."""
    require_stats(cfg, stats)
    if cfg.rank > min(linear.in_features, linear.out_features):
        raise ConfigError.invalid("rank", cfg.rank, f"1 to min(out_features, in_features) = {min(linear.in_features, linear.out_features)}")
    with torch.no_grad():
        return quantize_folded(linear, cfg, stats, smoothquant_transform(linear, cfg, stats), rank=cfg.rank)
