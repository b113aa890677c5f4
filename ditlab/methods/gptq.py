"""GPTQ weight rounding (Frantar et al. 2023): quantize columns in order, pushing each column's error onto the
columns not yet quantized through the Cholesky factor of H⁻¹ (H = 2XᵀX from calibration rows, 1 % damping).

Works on per-channel or per-group grids, symmetric or asymmetric, and composes after any input transform: quantize
the transformed weight W' with the transformed Hessian H' = Tᵀ H T (``transforms.transform_hessian``).
Codes follow ``primitives``: signed-shifted int8 (N, K), scales (N, G) float32, zero points (N, G) int32 or None.

``quantize_folded`` is the last step every transform method shares: fold the transform into W, optionally split
off a low-rank branch, round (nearest or GPTQ), pick the static activation scale, build the ``QuantLinear``.
The "gptq" method is that step with the identity transform.
"""

from __future__ import annotations

import logging

import torch

from torch import nn

from .. import primitives, transforms
from ..errors import ConfigError
from ..nn import InputTransform, QuantLinear, bos_tokens
from . import register, require_stats
from .rtn import rtn_weight_grid

log = logging.getLogger(__name__)


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One column w (N,) float64 on the grid (scale (N,), zero (N,) signed-shifted or None) → (codes (N,), ŵ (N,))."""
    s = scale.double()
    if zero is None:
        lo, hi = primitives.qrange(bits, True)
        q = torch.round(w / s).clamp(lo, hi)  # half-to-even, true division (primitives' convention)
        return q, q * s
    half = 2 ** (bits - 1)
    z = zero.double()
    q = (torch.round(w / s) + z + half).clamp(0, 2**bits - 1) - half
    return q, (q - z) * s


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp·mean(diag H) (K, K) float64; retries with 10× damping."""
    k = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    for attempt in range(4):
        hd = h + lam * torch.eye(k, dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u
        log.warning("GPTQ: Hessian not positive definite with damping %.3g (attempt %d); increasing", lam, attempt + 1)
        lam = lam * 10 if lam > 0 else 1e-6
    raise ConfigError.invalid("gptq_damp", damp, "a larger damping: the calibration Hessian is not positive definite")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ-round W (N, K) with Hessian h (K, K) → (codes int8 (N, K), scale (N, G) fp32, zero (N, G) int32 | None).

    Per-channel grids are fixed up front from W (min–max, as RTN); per-group grids are computed when the group's
    first column is reached, from the *error-updated* weights of that group (as in the reference GPTQ code).
    Lazy batches of ``block`` columns (rounded to a multiple of the group size so a group never straddles two
    batches): inside a batch the update is applied column by column; the rest of W gets one GEMM per batch.
    All propagation math is float64 (the inverse-Hessian factor is ill-conditioned at small damping).
    Columns whose input is always zero (H_jj = 0) get H_jj = 1: they are rounded to nearest and keep their weights.
    """
    n, k = w.shape
    if h.shape != (k, k):
        raise ConfigError.invalid("hessian", tuple(h.shape), f"a ({k}, {k}) matrix for in_features={k}")
    primitives.qrange(bits, symmetric)  # validates bits
    g = k if group_size is None else int(group_size)
    if g <= 0 or k % g:
        raise ConfigError.invalid("w_group_size", group_size, f"a positive divisor of in_features={k}")
    if not damp > 0:
        raise ConfigError.invalid("gptq_damp", damp, "a positive number (fraction of the mean Hessian diagonal, e.g. 0.01)")
    hd = h.double().clone()
    dead = torch.diagonal(hd) <= 0
    hd[dead, dead] = 1.0
    u = _inverse_cholesky(hd, damp)  # (K, K) upper: row i holds the propagation weights of column i
    wd = w.detach().double().clone()
    codes = torch.zeros(n, k, dtype=torch.float64)
    n_groups = k // g
    scale = torch.zeros(n, n_groups, dtype=torch.float32)
    zero = None if symmetric else torch.zeros(n, n_groups, dtype=torch.int32)
    if group_size is None:
        scale, zero = primitives.weight_qparams(wd.float(), bits, None, symmetric)
    blk = g * max(1, block // g) if group_size is not None else block
    for i1 in range(0, k, blk):
        i2 = min(i1 + blk, k)
        w1 = wd[:, i1:i2].clone()  # (N, B) working copy of the batch
        err = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // g
            if group_size is not None and col % g == 0:
                s_g, z_g = primitives.weight_qparams(w1[:, i : i + g].float(), bits, None, symmetric)
                scale[:, gi] = s_g[:, 0]
                if zero is not None:
                    zero[:, gi] = z_g[:, 0]
            q, wq = _quantize_column(w1[:, i], scale[:, gi], None if zero is None else zero[:, gi], bits)
            codes[:, col] = q
            e = (w1[:, i] - wq) / u1[i, i]  # (N,) scaled error of this column
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]  # propagate inside the batch
            err[:, i] = e
        wd[:, i2:] -= err @ u[i1:i2, i2:]  # lazy update of the columns after the batch
    return codes.to(torch.int8), scale.float(), zero


def hessian_from_stats(stats) -> torch.Tensor:
    """H = 2·XᵀX / n_rows (K, K) float64 from a LayerStats (its ``xtx`` sum and ``n_rows``)."""
    xtx = getattr(stats, "xtx", None)
    if xtx is None:
        raise ConfigError.invalid("weight_rounding", "gptq", "'nearest' for layers without an XᵀX calibration statistic")
    return 2.0 * xtx.double() / max(int(getattr(stats, "n_rows", 1) or 1), 1)


def transformed_hessian(stats, transform: InputTransform) -> torch.Tensor:
    """H' = Tᵀ H T (K, K) float64 for the linear part of ``transform`` (centring is not part of T: the HadaNorm mean
    term is multiplied by the same quantized W̃, so the error that matters is on the un-centred transformed X)."""
    rotate = transform.rotate if transform.had_signs is not None else None
    return transforms.transform_hessian(hessian_from_stats(stats), transform.smooth, transform.sigma, rotate)


def _rows_after_bos(stats, skip_tokens: int) -> torch.Tensor:
    """Reservoir rows (R', K) whose token index is ≥ ``skip_tokens`` (MixDQ: the range without the BOS token)."""
    rows, info = getattr(stats, "rows", None), getattr(stats, "row_info", None)
    if rows is None or info is None or rows.shape[0] == 0:
        raise ConfigError.invalid("params.bos_tokens", skip_tokens, "0 here: a BOS-free static range needs calibration reservoir rows with token indices")
    keep = info[:, 2] >= skip_tokens
    if not bool(keep.any()):
        raise ConfigError.invalid("params.bos_tokens", skip_tokens, f"fewer leading tokens: no calibration row has a token index ≥ {skip_tokens}")
    return rows[keep]


def static_act_scale(stats, transform: InputTransform, bits: int, skip_tokens: int = 0) -> torch.Tensor:
    """Per-tensor symmetric activation scale (1, 1) of the *transformed* input, from calibration statistics.

    Without a rotation the per-channel maxima transform exactly: max|X'_j| = absmax_j / smooth_j / sigma_j (the
    centred absmax when centring). A rotation mixes channels: the maximum is then taken over the calibration
    reservoir rows pushed through the transform (centred with the global calibration mean, an approximation of the
    per-sample mean), capped by the exact bound max_k |(x Q)_k| ≤ Σ_{j ∈ block(k)} max|x_j| / √b, which is also the
    fallback when no rows were kept. The reservoir (≤ 512 rows) can miss the rarest peaks: those tokens clip.

    ``skip_tokens`` = n > 0 (MixDQ's BOS-aware range; those tokens are not quantized, see ``QuantLinear``): the maximum
    over the reservoir rows of token index ≥ n only, pushed through the transform — the per-channel statistics
    include the BOS outliers and cannot be used, so this estimate is a sample maximum (it can clip the rarest peaks).
    """
    qmax = 2 ** (bits - 1) - 1
    if skip_tokens:
        xr = _rows_after_bos(stats, skip_tokens).float()  # (R', K)
        if transform.smooth is not None:
            xr = xr / transform.smooth
        if transform.center:
            xr = xr - stats.mean.float() / (1.0 if transform.smooth is None else transform.smooth)
        if transform.sigma is not None:
            xr = xr / transform.sigma
        top = float(transform.rotate(xr).abs().max())
        return torch.tensor([[top / qmax if top > 0 else 1.0]], dtype=torch.float32)
    k = stats.absmax.shape[0]
    one = torch.ones(k)
    smooth = one if transform.smooth is None else transform.smooth
    sigma = one if transform.sigma is None else transform.sigma
    chan = stats.centered_absmax if transform.center else stats.absmax
    if transform.had_signs is None:
        top = float((chan.float() / smooth / sigma).max())
    else:
        rows = getattr(stats, "rows", None)
        b = transform.hadamard_block
        # |Σ_j x_j Q_jk| ≤ Σ_{j ∈ block(k)} max|x_j| / √b: an upper bound used when no rows were kept
        bound = float(((chan.float() / smooth / sigma).reshape(-1, b).sum(-1) / b**0.5).max())
        if rows is None or rows.shape[0] == 0:
            top = bound
        else:
            xr = rows.float() / smooth
            if transform.center:
                xr = xr - stats.mean.float() / smooth
            top = min(float(transform.rotate(xr / sigma).abs().max()), bound)
    return torch.tensor([[top / qmax if top > 0 else 1.0]], dtype=torch.float32)


def quantize_folded(linear: nn.Linear, cfg, stats, transform: InputTransform, rank: int = 0, layer: str | None = None) -> QuantLinear:
    """Builds the QuantLinear of a transformed layer: W' = transform.fold_weight(W) (N, K); if ``rank`` > 0,
    W' = L1 L2 + R with L1 (N, r), L2 (r, K) stored in float16 and only R quantized (R absorbs the float16
    rounding of the factors); R (or W') rounded to nearest on the RTN grid (with clipping search if configured)
    or by GPTQ with H' = Tᵀ H T; static per-tensor activation scale of X' when configured."""
    w_t = transform.fold_weight(linear.weight)  # (N, K) float32
    lr_up = lr_down = None
    if rank:
        l1, l2, _ = transforms.svd_split(w_t, rank)
        lr_up, lr_down = l1.to(torch.float16), l2.to(torch.float16)
        w_t = w_t - lr_up.float() @ lr_down.float()  # residual against the factors as stored
    codes = None
    if cfg.weight_rounding == "gptq":
        h = transformed_hessian(require_stats(cfg, stats, layer), transform)
        codes, scale, zero = gptq_quantize(w_t, h, cfg.w_bits, cfg.w_group_size, cfg.w_symmetric, cfg.gptq_damp)
    else:
        scale, zero = rtn_weight_grid(w_t, cfg)
    act_scale = None
    if cfg.a_bits < 16 and cfg.a_granularity == "per-tensor":
        act_scale = static_act_scale(require_stats(cfg, stats, layer), transform, cfg.a_bits, skip_tokens=bos_tokens(cfg))
    return QuantLinear.from_float(linear, cfg, weight=w_t, transform=transform, scale=scale, zero=zero, codes=codes,
                                  act_scale=act_scale, lr_down=lr_down, lr_up=lr_up)


@register("gptq")
def quantize_gptq(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """GPTQ handler: GPTQ-rounded weights of the untransformed layer (needs calibration XᵀX)."""
    require_stats(cfg, stats)
    return quantize_folded(linear, cfg, stats, InputTransform(linear.in_features))
