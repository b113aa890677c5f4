"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights with a per-channel scale.

``s_j = max|X_j|^α / max|W_:j|^(1−α)`` (calibration absmax, all timesteps); online ``X' = X / s`` (InputTransform
``smooth``), offline ``W' = W·diag(s)``, then W' is rounded (nearest or GPTQ) and X' quantized per token or
per tensor as the LayerConfig says. α = ``cfg.alpha`` (0.5 default; DiTs often prefer 0.1–0.3).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import transforms
from ..nn import InputTransform, QuantLinear
from . import register, require_stats
from .gptq import quantize_folded


def smoothquant_transform(linear: nn.Linear, cfg, stats) -> InputTransform:
    """The online part: ``X / s`` with s (K,) from the calibration absmax and the layer's weight columns."""
    s = transforms.smoothquant_scales(stats.absmax, linear.weight, cfg.alpha)  # (K,)
    return InputTransform(linear.in_features, smooth=s)


@register("smoothquant")
def quantize_smoothquant(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """SmoothQuant handler: needs calibration statistics (per-channel activation absmax)."""
    require_stats(cfg, stats)
    with torch.no_grad():
        return quantize_folded(linear, cfg, stats, smoothquant_transform(linear, cfg, stats))
