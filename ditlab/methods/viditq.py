"""ViDiT-Q (Zhao et al., ICLR 2025): dynamic per-token activations + static–dynamic channel balancing (SDCB).

SDCB: ``m_j = max|W_:j|^α / max|X_j|^(1−α)`` (activation absmax over the calibration set, all timesteps), then the
orthogonal Hadamard rotation R: ``X' = (X·diag(m)) R``, ``W' = (W·diag(m)⁻¹) R``. In ditlab's InputTransform that is
``smooth = 1/m`` followed by the block Hadamard. ViDiT-Q quantizes weights statically (per output channel,
asymmetric in the paper; the LayerConfig decides the grid, e.g. groups at W4) and activations per token, dynamic and
symmetric, so a static per-tensor activation scale is rejected. No clipping.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import transforms
from ..errors import ConfigError
from ..nn import InputTransform, QuantLinear
from . import register, require_stats
from .gptq import quantize_folded
from .hadamard import hadamard_signs


def viditq_transform(linear: nn.Linear, cfg, stats) -> InputTransform:
    """The online part: ``X · diag(m) · R`` = ``(X / (1/m)) · Q``."""
    m = transforms.sdcb_scales(stats.absmax, linear.weight, cfg.alpha)  # (K,)
    k = linear.in_features
    return InputTransform(k, smooth=1.0 / m, hadamard_signs=hadamard_signs(k, cfg.hadamard_seed))


@register("viditq")
def quantize_viditq(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """ViDiT-Q handler: needs calibration statistics (activation absmax) for the channel balancing."""
    if cfg.a_bits < 16 and cfg.a_granularity != "per-token":
        raise ConfigError.invalid("a_granularity", cfg.a_granularity, "per-token for method 'viditq' (dynamic activation quantization is the method)")
    require_stats(cfg, stats)
    with torch.no_grad():
        return quantize_folded(linear, cfg, stats, viditq_transform(linear, cfg, stats))
