"""HadaNorm (Federici et al., ES-FoMo 2025): mean-centre, normalise per channel, rotate — then quantize.

For a layer input X (B, T, K): μ = per-sample per-channel mean over tokens (online), σ (K,) a static per-channel scale
from calibration (``cfg.sigma``: "std" = std of the mean-centred input, default; "absmax" = its absmax), Q the block
Hadamard. ``X̃ = ((X − μ) / σ) Q`` is quantized; ``W̃ = W·diag(σ)·Q`` is folded offline and quantized;
``out = Q_a(X̃) Q_w(W̃)ᵀ + T(μ) Q_w(W̃)ᵀ + b`` where T(μ) = (μ/σ) Q and the mean term runs in float (QuantLinear's
mean correction), so no float copy of W is kept.

The contract stores no float copy of W, so QuantLinear's mean term uses the *quantized* W̃: it adds
T(μ)·(Ŵ − W̃)ᵀ to the output, which is large where a channel's mean is large compared with its σ (μ_j/σ_j ≫ 1: the
massive constant channels that adaLN shifts create) and W̃ is 4-bit. The handler therefore folds the expected part
of that error into the bias: ``b' = b + T(μ̄)·(W̃ − Ŵ)ᵀ`` with μ̄ the calibration mean, so the mean term is exact
for the average input and only the per-sample deviation μ − μ̄ sees the weight error (bias correction, as in
Nagel et al. 2019). ``cfg.params["mean_bias_correction"] = False`` turns it off.

Single-token layers (adaLN modulation and embedders see (B, K): one token per sample) have nothing to centre —
per-sample centring would leave a zero input and put the whole activation in the float mean term, i.e. no
activation quantization at all. There HadaNorm is run without centring and σ is the channel RMS
(√(std² + mean²)) or absmax, so the layer really quantizes its input.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import transforms
from ..nn import InputTransform, QuantLinear
from . import register, require_stats
from .gptq import quantize_folded
from .hadamard import hadamard_signs

log = logging.getLogger(__name__)


def single_token(stats) -> bool:
    """True when calibration saw one token per sample (centred statistics are identically zero)."""
    return float(stats.centered_absmax.max()) == 0.0 and float(stats.absmax.max()) > 0.0


def hadanorm_sigma(stats, kind: str = "std") -> tuple[torch.Tensor, bool]:
    """(σ (K,) float32, centre?) for a layer from its LayerStats; see the module docstring for single-token layers."""
    if single_token(stats):
        raw = (stats.std.float().square() + stats.mean.float().square()).sqrt() if kind == "std" else stats.absmax.float()
        return transforms.floor_scale(raw), False
    return transforms.floor_scale(stats.centered_std if kind == "std" else stats.centered_absmax), True


def hadanorm_transform(linear: nn.Linear, cfg, stats, layer: str | None = None) -> InputTransform:
    """The online part: ``− μ → / σ → · Q``."""
    sigma, center = hadanorm_sigma(stats, cfg.sigma)
    if not center:
        log.info("hadanorm %s: single-token input, no centring (σ = channel %s)", layer or "layer", "RMS" if cfg.sigma == "std" else "absmax")
    k = linear.in_features
    return InputTransform(k, center=center, sigma=sigma, hadamard_signs=hadamard_signs(k, cfg.hadamard_seed))


def mean_bias_correction(q: QuantLinear, linear: nn.Linear, mean: torch.Tensor) -> torch.Tensor:
    """(N,) float32 ``T(μ̄)·(W̃ − Ŵ)ᵀ``: the mean term's weight-quantization error at the calibration mean μ̄ (K,)."""
    t = q.transform
    t_mu = t.rotate(mean.float().reshape(1, -1) / t.sigma)  # (1, K): μ̄ through / σ and · Q (no smoothing in HadaNorm)
    w_t = t.fold_weight(linear.weight)  # W̃ (N, K) in float
    w_hat = q.dequantized_weight()
    if q.lr_down is not None:
        w_hat = w_hat + q.lr_up.float() @ q.lr_down.float()
    return (t_mu.double() @ (w_t - w_hat).double().t()).reshape(-1).float()


@register("hadanorm")
def quantize_hadanorm(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """HadaNorm handler: needs calibration statistics (σ, and μ̄ for the bias correction of the mean term)."""
    require_stats(cfg, stats)
    with torch.no_grad():
        q = quantize_folded(linear, cfg, stats, hadanorm_transform(linear, cfg, stats))
        if q.transform.center and cfg.params.get("mean_bias_correction", True):
            corr = mean_bias_correction(q, linear, stats.mean)
            if q.bias is None:
                q.register_buffer("bias", corr)
            else:
                q.bias += corr
        return q
