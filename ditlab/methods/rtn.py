"""RTN (round-to-nearest): min–max weight quantization, optional clipping search; the "fp" passthrough.

Weights: per-channel or per-group min–max (symmetric or asymmetric), static. Optional clipping: for every row /
group pick the ratio r in CLIP_RATIOS (0.70 … 1.00) that minimises ‖W − Q_r(W)‖² (r = 1 is plain min–max, so the
search never does worse than no clipping). Activations: per-token dynamic, or per-tensor static with
``Δ = max_j absmax_j / (2^(b−1) − 1)`` from calibration (``LayerStats.absmax``).

``weight_rounding = "gptq"`` keeps RTN's grid family (per-channel / per-group min–max) but picks the codes with GPTQ
(``gptq.quantize_folded`` with the identity transform, H = 2XᵀX from calibration): the result is exactly what the
"gptq" method produces for the same LayerConfig fields. GPTQ fixes its own grid from the error-updated weights, so
``clip_search`` does not apply then.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .. import primitives
from ..nn import InputTransform, QuantLinear, bos_tokens
from . import register, require_stats

log = logging.getLogger(__name__)

CLIP_RATIOS = tuple(round(0.70 + 0.02 * i, 2) for i in range(16))  # 0.70, 0.72, …, 1.00


def clip_search(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, ratios=CLIP_RATIOS) -> torch.Tensor:
    """Best clipping ratio (N, G) float32 per row/group for W (N, K): argmin over ``ratios`` of the squared error.

    Ties go to the larger ratio (ratios are scanned from 1.0 down and only a strictly smaller error replaces).
    """
    w = w.detach().float()
    n, k = w.shape
    groups = 1 if group_size is None else k // group_size
    best_err = torch.full((n, groups), float("inf"))
    best = torch.ones(n, groups)
    for r in sorted(ratios, reverse=True):
        scale, zero = primitives.weight_qparams(w, bits, group_size, symmetric, clip=r)
        wq = primitives.dequantize_weight(primitives.quantize_weight(w, scale, zero, bits, group_size), scale, zero, group_size)
        err = (wq - w).reshape(n, groups, -1).pow(2).sum(-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def static_act_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric activation scale (1, 1) from per-channel calibration absmax (K,)."""
    qmax = 2 ** (bits - 1) - 1
    top = float(absmax.detach().float().max())
    return torch.tensor([[top / qmax if top > 0 else 1.0]], dtype=torch.float32)


def rtn_weight_grid(w: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (N, G) and zero points (N, G) or None of the RTN grid for W (N, K), with clipping if configured."""
    clip = clip_search(w, cfg.w_bits, cfg.w_group_size, cfg.w_symmetric) if cfg.clip_search else 1.0
    return primitives.weight_qparams(w.detach().float(), cfg.w_bits, cfg.w_group_size, cfg.w_symmetric, clip=clip)


@register("rtn")
def quantize_rtn(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """RTN handler: min–max (optionally clipped) weights, or GPTQ-rounded ones when ``cfg.weight_rounding == "gptq"``
    (needs calibration XᵀX); per-token or static per-tensor activations."""
    static = cfg.a_bits < 16 and cfg.a_granularity == "per-tensor"
    if cfg.weight_rounding == "gptq" or (static and bos_tokens(cfg)):  # GPTQ codes, or MixDQ's BOS-free static range
        from .gptq import quantize_folded  # gptq imports this module (rtn_weight_grid): import here, not at the top

        require_stats(cfg, stats)
        with torch.no_grad():
            return quantize_folded(linear, cfg, stats, InputTransform(linear.in_features))
    act_scale = None
    if cfg.a_bits < 16 and cfg.a_granularity == "per-tensor":
        act_scale = static_act_scale(require_stats(cfg, stats).absmax, cfg.a_bits)
    scale, zero = rtn_weight_grid(linear.weight, cfg)
    return QuantLinear.from_float(linear, cfg, scale=scale, zero=zero, act_scale=act_scale)


@register("fp")
def keep_fp(linear: nn.Linear, cfg, stats=None) -> nn.Module:
    """Full precision: an unchanged copy of the layer."""
    return copy.deepcopy(linear)
