"""Pure tensor math of the input transforms shared by SmoothQuant, Hadamard, HadaNorm, ViDiT-Q (SDCB) and SVD.

Notation: a linear computes ``Y = X Wᵀ + b`` with X (M, K) and W (N, K). Every method here applies an invertible
transform T on the input side and folds its inverse into the weight, so that ``(X T)(W T⁻ᵀ)ᵀ = X Wᵀ`` exactly in
real arithmetic. The online part (what ``QuantLinear``'s InputTransform does to X, in this order) is::

    X  →  X / smooth  →  (− μ, HadaNorm only)  →  / sigma  →  · Q          (Q orthogonal: block Hadamard)

so ``T = diag(1/smooth) · diag(1/sigma) · Q`` and the folded weight is ``W' = W · diag(smooth) · diag(sigma) · Q``
(Q orthogonal ⇒ Q⁻ᵀ = Q). Note that W' is computed by applying the *same* row operation ``rotate`` to the rows
of ``W · diag(smooth · sigma)`` that is applied online to the rows of X, so the two sides can never disagree on the
Hadamard convention (sign placement, block order).

Nothing here knows about modules or configs: inputs are tensors, outputs are tensors.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import ConfigError

Rotation = Callable[[torch.Tensor], torch.Tensor]  # (…, K) → (…, K): rows times an orthogonal Q

EPS = 1e-5  # floor for per-channel maxima: a dead channel (max = 0) must not make a scale 0 or ∞


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError.invalid("alpha", alpha, "a number from 0 to 1 (migration strength)")
    return float(alpha)


def _weight_col_absmax(w: torch.Tensor) -> torch.Tensor:
    """max_n |W[n, j]| (K,) in float32, floored at EPS."""
    return w.detach().float().abs().amax(0).clamp(min=EPS)


def smoothquant_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant per-input-channel scales s (K,) float32: ``s_j = max|X_j|^α / max|W_:j|^(1−α)``.

    act_absmax: (K,) calibration absmax of the layer input; w: (N, K). Online ``X' = X / s``, offline ``W' = W·diag(s)``.
    α = 1 moves all the difficulty to the weights, α = 0 leaves the activations alone up to the weight ranges.
    """
    alpha = _check_alpha(alpha)
    a = act_absmax.detach().float().clamp(min=EPS)
    # pow in float32: the scales only need to be positive and finite; any rounding here is folded exactly into W
    return a.pow(alpha) / _weight_col_absmax(w).pow(1.0 - alpha)


def sdcb_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ViDiT-Q static–dynamic channel balancing factor m (K,): ``m_j = max|W_:j|^α / max|X_j|^(1−α)``.

    ViDiT-Q multiplies ``X' = X·diag(m)`` and divides ``W' = W·diag(m)⁻¹``; in ditlab's InputTransform convention
    (``X / smooth``) that is ``smooth = 1 / m``. (Equivalent to SmoothQuant with migration strength 1 − α.)
    """
    alpha = _check_alpha(alpha)
    a = act_absmax.detach().float().clamp(min=EPS)
    return _weight_col_absmax(w).pow(alpha) / a.pow(1.0 - alpha)


def fold_weight(w: torch.Tensor, smooth: torch.Tensor | None = None, sigma: torch.Tensor | None = None, rotate: Rotation | None = None) -> torch.Tensor:
    """The transformed weight ``W' = rotate(W · diag(smooth) · diag(sigma))`` (N, K) float32.

    Exactly the inverse-transposed counterpart of ``transform_input``: ``transform_input(X) @ W'ᵀ == X @ Wᵀ``
    in real arithmetic (up to the HadaNorm mean term, which the layer adds back).
    """
    wt = w.detach().float()
    if smooth is not None:
        wt = wt * smooth.float()  # column j scaled by s_j
    if sigma is not None:
        wt = wt * sigma.float()
    return rotate(wt) if rotate is not None else wt.clone()


def transform_input(x: torch.Tensor, smooth: torch.Tensor | None = None, center: bool = False, sigma: torch.Tensor | None = None, rotate: Rotation | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The online transform as a plain function: X (B, T, K) or (M, K) → (X', T(μ) or None).

    Order: ``/ smooth`` → ``− μ`` (μ = per-sample per-channel mean over tokens, (B, 1, K); a 2-D input is one
    sample) → ``/ sigma`` → ``rotate``. Returns the transformed μ (B, 1, K) (for the mean correction
    ``out += T(μ)·W'ᵀ``) when ``center`` is set. Used offline on calibration rows and as the test reference of the
    module's forward.
    """
    xt = x.float()
    if smooth is not None:
        xt = xt / smooth.float()  # true division, as the module does
    mu = None
    if center:
        mu = xt.mean(-2, keepdim=True)  # (B, 1, K): mean over tokens of each sample
        xt = xt - mu
    if sigma is not None:
        xt = xt / sigma.float()
        mu = None if mu is None else mu / sigma.float()
    if rotate is not None:
        xt = rotate(xt)
        mu = None if mu is None else rotate(mu)
    return xt, mu


def transform_hessian(h: torch.Tensor, smooth: torch.Tensor | None = None, sigma: torch.Tensor | None = None, rotate: Rotation | None = None) -> torch.Tensor:
    """``H' = Tᵀ H T`` (K, K) float64 for the linear part ``T = diag(1/smooth)·diag(1/sigma)·Q`` of the transform.

    H = Σ xᵀx over calibration rows (any positive multiple). GPTQ on the transformed weight W' must see the
    second moment of the transformed inputs X' = X T, which is exactly Tᵀ H T. Computed in float64 because GPTQ
    inverts it. ``rotate`` is applied on both sides: rotate(rotate(A)ᵀ) = Qᵀ A Q for symmetric A.
    """
    hd = h.double()
    d = torch.ones(hd.shape[0], dtype=torch.float64)
    if smooth is not None:
        d = d / smooth.double()
    if sigma is not None:
        d = d / sigma.double()
    hd = hd * d[:, None] * d[None, :]  # diag(d) H diag(d)
    if rotate is not None:
        # hadamard_ops.rotate computes in float32 (relative error ~1e-7, far below GPTQ's 1 % damping; the reference
        # GPTQ code keeps H in float32 throughout); the result is promoted back to float64 for the Cholesky steps
        hd = rotate(rotate(hd).t().contiguous()).double()
        hd = 0.5 * (hd + hd.t())  # remove the asymmetry left by rounding; GPTQ's Cholesky wants exact symmetry
    return hd


def hessian_from_rows(rows: torch.Tensor) -> torch.Tensor:
    """H = Σ_m x_mᵀ x_m (K, K) float64 from rows X (M, K) (the same quantity as ``LayerStats.xtx``)."""
    x = rows.reshape(-1, rows.shape[-1]).double()
    return x.t() @ x


def svd_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD split ``W = L1 L2 + R``: L1 (N, r), L2 (r, K), residual R (N, K), all float32.

    L1 = U_r·diag(√S_r), L2 = diag(√S_r)·V_rᵀ (balanced, so both factors have similar ranges for 16-bit storage).
    The SVD runs in float64; ‖R‖_F² equals Σ_{i>r} S_i² (Eckart–Young). In a ``QuantLinear`` L2 is ``lr_down``
    and L1 is ``lr_up``: ``out += (X' L2ᵀ) L1ᵀ``.
    """
    n, k = w.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(n, k):
        raise ConfigError.invalid("rank", rank, f"an integer from 1 to min(out, in) = {min(n, k)}")
    wd = w.detach().double()
    u, s, vh = torch.linalg.svd(wd, full_matrices=False)
    root = s[:rank].sqrt()
    l1 = u[:, :rank] * root  # (N, r)
    l2 = root[:, None] * vh[:rank]  # (r, K)
    resid = wd - l1 @ l2
    return l1.float(), l2.float(), resid.float()


def floor_scale(s: torch.Tensor) -> torch.Tensor:
    """A per-channel divisor (K,) float32 made safe: entries below 1e-6 × the largest are raised to that floor.

    Used for HadaNorm's σ: a constant channel has σ = 0, but it is all-zero after centring, so any positive
    divisor gives the same product; the floor only keeps 0/0 and x/0 out of the arithmetic.
    """
    s = s.detach().float()
    floor = max(float(s.max()) * 1e-6, 1e-12) if s.numel() else 1e-12
    return s.clamp(min=floor)


def act_quant_error(x: torch.Tensor, w: torch.Tensor, bits: int, smooth: torch.Tensor | None = None, center: bool = False, sigma: torch.Tensor | None = None, rotate: Rotation | None = None) -> float:
    """Relative layer-output error caused by activation quantization alone (weights kept in float):

    ``‖X Wᵀ − (Q_a(X') + T(μ)) W'ᵀ‖_F / ‖X Wᵀ‖_F`` with X' = transform_input(X), W' = fold_weight(W), Q_a the
    per-token dynamic symmetric b-bit quantizer and T(μ) the (exact, float) HadaNorm mean term.
    Measured at the output because a transform that rescales channels (SmoothQuant, SDCB, σ) changes what an
    input-side error means; at the output every method is compared on the same quantity. x: (B, T, K), w: (N, K).
    """
    from .primitives import fake_quantize_act

    xf = x.float()
    y = xf @ w.detach().float().t()
    xt, mu = transform_input(xf, smooth, center, sigma, rotate)
    xq = fake_quantize_act(xt, bits)
    if mu is not None:
        xq = xq + mu  # the mean correction is added back in full precision
    y_hat = xq @ fold_weight(w, smooth, sigma, rotate).t()
    return float((y - y_hat).norm() / y.norm().clamp(min=1e-30))
