"""HadaNorm (Federici et al., ES-FoMo 2025): mean-centre, normalise per channel, rotate — then quantize.

For a layer input X (B, T, K): μ = per-sample per-channel mean over tokens (online), σ (K,) a static per-channel scale
from calibration (``cfg.sigma``: "std" = std of the mean-centred input, default; "absmax" = its absmax), Q the block
Hadamard. ``X̃ = ((X − μ) / σ) Q`` is quantized; ``W̃ = W·diag(σ)·Q`` is folded offline and quantized;
``out = Q_a(X̃) Q_w(W̃)ᵀ + T(μ) W̃ᵀ + b`` where T(μ) = (μ/σ) Q. METHODS.md computes the mean term with the
full-precision weight; a QuantLinear keeps no float copy of W (it would cost 4× the 4-bit codes), so the mean term
is built from what is stored, and the weight error E = W̃ − Ŵ it would carry is corrected in two parts:

* **Low-rank mean term** (``params["mean_rank"]`` = r, default ``DEFAULT_MEAN_RANK``). A sample's mean does not
  wander over all K directions: it moves with the class and the timestep, in a few directions. From the calibration
  reservoir of per-sample means (``LayerStats.sample_means``), U (r, K) = the top-r right singular vectors of the
  transformed deviations T(μ_s) − T(μ̄); the layer stores U and E·Uᵀ (N, r) in float16 and adds
  ``(T(μ) Uᵀ)(E Uᵀ)ᵀ`` — the mean term is then exact, up to float16, for every μ in that subspace. Cost: (K + N)·r
  float16 numbers per layer: (K + N)·r / (N·K) of its fp16 bytes — with the default r = 2, 2 % on a 192 × 192 layer
  of the shipped model (1 % over the whole model: W4 g64 then packs to 0.29× fp16) and 0.35 % on DiT-XL's 1152 × 1152.
  r ≥ K makes the term exact for every μ (U = I: the specification's full-precision GEMV, with the weight error
  stored in float16 — more bytes than the fp16 layer, so only for measuring what the approximation costs).
* **Bias correction** (``params["mean_bias_correction"]``, default on): the remaining error at the calibration
  mean μ̄ is folded into the bias, ``b' = b + T(μ̄) W̃ᵀ − mean_term(T(μ̄))`` (Nagel et al. 2019), so the average
  input sees no weight error in its mean term at all.

Measured on the shipped model (docs/HADANORM.md § 2, held-out inputs): the rank-2 correction lifts W4A8 layer-output
SQNR by 0.6–1.7 dB over the bias correction alone (the inputs of q/k/v and fc1 carry large per-sample channel means
that adaLN's shift creates).

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

DEFAULT_MEAN_RANK = 2


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


def transformed_mean(q: QuantLinear, mean: torch.Tensor) -> torch.Tensor:
    """T(μ) = (μ / σ)·Q for means μ (S, K) → (S, K) float32 (HadaNorm has no smoothing)."""
    t = q.transform
    return t.rotate(mean.float().reshape(-1, q.in_features) / t.sigma)


def weight_error(q: QuantLinear, w_tilde: torch.Tensor) -> torch.Tensor:
    """E = W̃ − Ŵ (N, K) float32: the folded float weight W̃ (N, K) minus what the layer stores (codes, and low-rank if any)."""
    w_hat = q.dequantized_weight()
    if q.lr_down is not None:
        w_hat = w_hat + q.lr_up.float() @ q.lr_down.float()
    return w_tilde - w_hat


def mean_lowrank(q: QuantLinear, w_tilde: torch.Tensor, stats, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U (r, K), E·Uᵀ (N, r)) float32 for the mean term's low-rank correction, or None without sample means.

    U spans the top-r directions of the calibration means' deviations T(μ_s) − T(μ̄) (S, K); r ≤ min(rank, S − 1, K).
    rank ≥ K gives U = I (K, K): the mean term is then exact for every μ, as METHODS.md's full-precision GEMV, at a
    cost of (K + N)·K float16 numbers — more than the fp16 layer, so a measurement option, not a deployment setting.
    The product is computed from U rounded to float16, the precision it is stored in."""
    if int(rank) >= q.in_features:
        down = torch.eye(q.in_features)
        return down, weight_error(q, w_tilde)
    means = getattr(stats, "sample_means", None)
    if means is None or means.shape[0] < 2:
        log.warning("hadanorm: no per-sample means in the calibration statistics; mean term without low-rank correction")
        return None
    dev = transformed_mean(q, means) - transformed_mean(q, stats.mean)  # (S, K)
    r = min(int(rank), dev.shape[0] - 1, q.in_features)
    _, _, vh = torch.linalg.svd(dev.double(), full_matrices=False)
    down = vh[:r].to(torch.float16).float()  # (r, K)
    return down, weight_error(q, w_tilde) @ down.t()


def mean_bias_correction(q: QuantLinear, w_tilde: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(N,) float32: exact mean term T(μ̄)·W̃ᵀ minus the layer's mean term at the calibration mean μ̄ (K,)."""
    t_mu = transformed_mean(q, mean)  # (1, K)
    exact = t_mu.double() @ w_tilde.double().t()
    return (exact - q.mean_correction(t_mu).double()).reshape(-1).float()


@register("hadanorm")
def quantize_hadanorm(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """HadaNorm handler: needs calibration statistics (σ; μ̄ and the per-sample means for the mean term)."""
    require_stats(cfg, stats)
    with torch.no_grad():
        q = quantize_folded(linear, cfg, stats, hadanorm_transform(linear, cfg, stats))
        if not q.transform.center:
            return q
        w_tilde = q.transform.fold_weight(linear.weight)  # W̃ (N, K) float32, shared by both corrections
        rank = cfg.params.get("mean_rank", DEFAULT_MEAN_RANK)
        if rank:
            factors = mean_lowrank(q, w_tilde, stats, rank)
            if factors is not None:
                q.set_mean_lowrank(*factors)
        if cfg.params.get("mean_bias_correction", True):
            corr = mean_bias_correction(q, w_tilde, stats.mean)
            if q.bias is None:
                q.register_buffer("bias", corr)
            else:
                q.bias += corr
        return q
