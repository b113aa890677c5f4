"""Pure tensor functions of uniform quantization: qparams, quantize/dequantize, int4 packing, per-token quantization.

Conventions (shared by the reference path, the CPU integer path and the Triton kernels — keep them in sync):

* Rounding is half-to-even (``torch.round``) everywhere, and ``q = round(x / Δ)`` is a true division (never a
  multiplication by a reciprocal), so every implementation produces the same integers bit for bit.
* Symmetric b-bit: ``Δ = absmax / (2^(b-1) - 1)``, ``q = clamp(round(x/Δ), -2^(b-1), 2^(b-1) - 1)``, ``z = 0``.
* Asymmetric b-bit (min–max over a range that always contains 0): ``Δ = (max - min) / (2^b - 1)``,
  ``z = round(-min/Δ)``, ``q = clamp(round(x/Δ) + z, 0, 2^b - 1)``.  **Stored shifted to signed**:
  ``q_s = q - 2^(b-1)``, ``z_s = z - 2^(b-1)``, so that ``x̂ = (q_s - z_s) Δ`` and both fit in int8 for b ≤ 8.
  An integer GEMM then computes ``Σ_k a_k (q_s,k - z_s) = Σ_k a_k q_s,k - z_s Σ_k a_k`` exactly in int32.
* A zero range (all-zero row/group/token) gets ``Δ = 1`` so that nothing divides by zero; it dequantizes to 0.
* Weight scales are stored as float16 and zero points as int8 (``QuantLinear``): ``weight_qparams`` rounds every Δ
  *up* to the next float16 value (``fp16_ceil``) before the zero point and the codes are computed, so the stored
  grid is the grid the codes were rounded on (storage is lossless) and the min–max range is still covered (Δ only
  grows, by at most 2^-10 relative for normal float16 values). Activation scales stay float32 (computed online).
* Weights ``W`` are (N, K) = (out_features, in_features). Per-channel = one (Δ, z) per row: scales (N, 1).
  Per-group with group size g: one (Δ, z) per g consecutive input channels of a row: scales (N, K/g).
* int4 packing: two codes per byte along K; byte ``j`` of row ``n`` holds ``k = 2j`` in the low nibble and
  ``k = 2j + 1`` in the high nibble, each a 4-bit two's-complement value in [-8, 7]. Codes of b < 4 bits are
  packed the same way (they fit in a nibble); b in 5..8 are stored one per int8.
* Activations ``X`` are (M, K) = (tokens, in_features); per-token dynamic scales are (M, 1), symmetric.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

_TINY = 0.0  # a range of exactly zero (not "small") is replaced by Δ = 1; see module docstring


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the *unshifted* code of a b-bit quantizer: symmetric [-2^(b-1), 2^(b-1)-1], else [0, 2^b-1]."""
    if not 2 <= bits <= 8:
        raise ConfigError.invalid("bits", bits, "2 to 8 for integer quantization")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _safe(delta: torch.Tensor) -> torch.Tensor:
    return torch.where(delta > _TINY, delta, torch.ones_like(delta))


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(N, K) → (N, G, g) view with G = K/g (g = K for per-channel)."""
    n, k = w.shape
    g = k if group_size is None else int(group_size)
    if g <= 0 or k % g:
        raise ConfigError.invalid("group_size", group_size, f"a positive divisor of in_features={k}")
    return w.reshape(n, k // g, g)


FP16_MAX = 65504.0


def fp16_ceil(delta: torch.Tensor) -> torch.Tensor:
    """float32 tensor → the smallest float16 value ≥ it (returned as float32; exact in float16).

    Values above the float16 maximum are clamped to it (the codes then saturate); a positive value below the
    smallest float16 subnormal becomes that subnormal (2^-24), never 0, so the scale stays a valid divisor.
    """
    d = delta.float().clamp(max=FP16_MAX)
    h = d.half()
    up = h.float() < d
    if bool(up.any()):
        h = torch.where(up, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def weight_qparams(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (N, G) float32 (each exactly a float16 value, see ``fp16_ceil``) and signed-shifted zero points (N, G)
    int32 in [-2^(b-1), 2^(b-1) - 1] (None if symmetric) for W (N, K).

    ``clip`` (scalar or (N, G)) shrinks the range before computing Δ (RTN's clipping search).
    """
    wg = _grouped(w.float(), group_size)
    clip_t = torch.as_tensor(clip, dtype=torch.float32)
    if clip_t.dim() == 2:
        clip_t = clip_t.unsqueeze(-1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = wg.abs().amax(-1, keepdim=True) * clip_t
        return fp16_ceil(_safe(absmax / qmax)).squeeze(-1), None
    lo = wg.amin(-1, keepdim=True).clamp(max=0) * clip_t
    hi = wg.amax(-1, keepdim=True).clamp(min=0) * clip_t
    delta = fp16_ceil(_safe((hi - lo) / (2**bits - 1)))
    zero = torch.round(-lo / delta).clamp(0, 2**bits - 1)
    return delta.squeeze(-1), (zero - 2 ** (bits - 1)).squeeze(-1).to(torch.int32)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Signed-shifted int8 codes (N, K) of W (N, K) for given scales/zero points (N, G)."""
    wg = _grouped(w.float(), group_size)
    s = scale.unsqueeze(-1)
    if zero is None:
        lo, hi = qrange(bits, True)
        q = torch.round(wg / s).clamp(lo, hi)
    else:
        half = 2 ** (bits - 1)
        q = (torch.round(wg / s) + zero.unsqueeze(-1).float() + half).clamp(0, 2**bits - 1) - half
    return q.reshape(w.shape).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None = None) -> torch.Tensor:
    """float32 (N, K) = (q_s - z_s) · Δ per row/group."""
    qg = _grouped(q.float(), group_size)
    if zero is not None:
        qg = qg - zero.unsqueeze(-1).float()
    return (qg * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Quantize-dequantize W (N, K) with min–max parameters (the reference of every weight quantizer)."""
    scale, zero = weight_qparams(w, bits, group_size, symmetric)
    return dequantize_weight(quantize_weight(w, scale, zero, bits, group_size), scale, zero, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) in [-8, 7], K even → uint8 (N, K/2); low nibble = even k, high nibble = odd k."""
    if q.shape[-1] % 2:
        raise ConfigError.invalid("in_features", q.shape[-1], "an even number for 4-bit packing")
    u = q.to(torch.int16) & 0xF  # two's-complement nibble
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) → int8 codes (N, K) in [-8, 7] (inverse of ``pack_int4``)."""
    lo = (p.to(torch.int16) & 0xF)
    hi = (p.to(torch.int16) >> 4) & 0xF
    both = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def act_scale_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token scales (M, 1) float32 for X (M, K): absmax / (2^(b-1) - 1), 1 for an all-zero row."""
    qmax = 2 ** (bits - 1) - 1
    return _safe(x.float().abs().amax(-1, keepdim=True) / qmax)


def quantize_act(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes of X (M, K) with symmetric scales (M, 1) per token or a () / (1, 1) per-tensor scale."""
    lo, hi = qrange(bits, True)
    return torch.round(x.float() / scale).clamp(lo, hi).to(torch.int8)


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization of X (M, K) → (int8 codes (M, K), scales (M, 1))."""
    scale = act_scale_per_token(x, bits)
    return quantize_act(x, scale, bits), scale


def fake_quantize_act(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize X (…, K): per-token dynamic if ``scale`` is None, else with the given static scale."""
    flat = x.reshape(-1, x.shape[-1])
    s = act_scale_per_token(flat, bits) if scale is None else scale
    return (quantize_act(flat, s, bits).float() * s).reshape(x.shape).to(x.dtype)


def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int8 × int8 → int32 GEMM: A (M, K) @ Bᵀ where ``b_t`` is B (N, K) — i.e. returns (M, N).

    Uses ``torch._int_mm`` (real integer arithmetic on CPU and CUDA); passing ``b_t.t()`` keeps B column-major,
    which is the fast layout on this CPU.
    """
    return torch._int_mm(a.contiguous(), b_t.t())


def int_matmul_ref(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Plain reference of ``int_matmul`` (int64 accumulate, then cast): for tests."""
    return (a.to(torch.int64) @ b_t.to(torch.int64).t()).to(torch.int32)

