"""GPTQ weight rounding (Frantar et al. 2023): quantize columns in order, pushing each column's error onto the
columns not yet quantized through the Cholesky factor of H⁻¹ (H = 2XᵀX from calibration rows, 1 % damping).

Works on per-channel or per-group grids, symmetric or asymmetric, and composes after any input transform: quantize
the transformed weight W' with the transformed Hessian H' = Tᵀ H T (``transforms.transform_hessian``).
Codes follow ``primitives``: signed-shifted int8 (N, K), scales (N, G) float32, zero points (N, G) int32 or None.
"""

from __future__ import annotations

import logging

import torch

from .. import primitives
from ..errors import ConfigError

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
