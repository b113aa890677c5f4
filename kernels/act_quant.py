"""Per-token dynamic activation quantization, optionally fused with HadaNorm's centring/scaling and a Hadamard rotation.

For each token (row) m of X (M, K) the kernel computes, in float32 and in this order,

    y   = x[m]                                  (loaded and widened to float32)
    y   = y − mean[m // T]                      optional: per-sample channel means (B, K), T = tokens_per_sample
    y   = y / sigma                             optional: per-channel scale (K,), a true (IEEE) division
    y   = (FWHT(y) / √d) ⊙ signs                optional: block Hadamard y·Q, Q = blockdiag(H_d/√d)·diag(signs) as in
                                                ``kernels.hadamard`` and ``ditlab.hadamard_ops.rotate`` (d ≤ the tile)
    Δ_m = max_k |y_k| / (2^(b−1) − 1)           (Δ = 1 for an all-zero row)  — or a given static scale
    q   = clamp(round_half_even(y / Δ_m), −2^(b−1), 2^(b−1) − 1)        int8 codes (b = 2…8; 4-bit codes in int8)

which is ``ditlab.primitives.quantize_per_token`` applied to the transformed rows, bit for bit: every step is one
IEEE float32 operation in the same order as the torch twin ``act_quant_ref`` (divisions are ``div_rn``, never a
reciprocal multiply; rounding is the 1.5·2^23 trick, exact for |y/Δ| ≤ 2^7), and the Hadamard butterflies are those
of ``kernels.hadamard.fwht_ref``.

Inputs: x (…, K) float32/bfloat16/float16 (leading dims flattened to M rows, any row stride); mean (B, K) float32
with B·T = M; sigma (K,) float; signs (K,) ±1; scale (1, 1) or (M, 1) float32 for static quantization.
Outputs: codes (M, K) int8 and scales (M, 1) float32.
Layout of the work: one program owns BLOCK_M rows. If a row fits in one tile (K ≤ BLOCK_K) it is loaded and
transformed once; otherwise pass 1 computes the row absmax tile by tile and pass 2 recomputes the transform and
quantizes. Accumulation is a float32 max (exact: max never rounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, is_interpreted, launch, next_pow2
from ._tiles import fwht
from .hadamard import MAX_BLOCK, fwht_ref, hadamard_scale

# Configs: a row fits in one tile up to MAX_TILE_K columns; programs hold about TILE_ELEMENTS float32 values
# (GPU: ~32 per thread with 4 warps; the interpreter pays per program, so it takes bigger ones).
MAX_TILE_K = {"gpu": 4096, "interpret": 8192}
TILE_ELEMENTS = {"gpu": 4096, "interpret": 65536}
NUM_WARPS = 4


@triton.jit
def _transformed(x_ptr, mean_ptr, sigma_ptr, signs_ptr, offs_m, offs_k, mask_m, K, tokens_per_sample, had_scale,
                 stride_xm, stride_xk, stride_mb, stride_mk,
                 HAS_MEAN: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_SIGNS: tl.constexpr, LOG2_HAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float32 tile y (BM, BK) of the module docstring for columns offs_k (zeros outside the matrix)."""
    mask_k = offs_k < K
    mask = mask_m[:, None] & mask_k[None, :]
    y = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    y = y.to(tl.float32)
    if HAS_MEAN:
        b = offs_m // tokens_per_sample  # the sample of each token
        y = y - tl.load(mean_ptr + b[:, None] * stride_mb + offs_k[None, :] * stride_mk, mask=mask, other=0.0)
    if HAS_SIGMA:
        y = tl.math.div_rn(y, tl.load(sigma_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)[None, :])
    if LOG2_HAD >= 0:
        y = fwht(y, BLOCK_M, BLOCK_K, LOG2_HAD) * had_scale
        if HAS_SIGNS:  # Q = H·diag(s): signs on the transformed columns (exact)
            y = y * tl.load(signs_ptr + offs_k, mask=mask_k, other=0).to(tl.float32)[None, :]
    return y


@triton.jit
def _act_quant_kernel(
    x_ptr, mean_ptr, sigma_ptr, signs_ptr, static_scale_ptr, q_ptr, scale_ptr,
    M, K, tokens_per_sample, had_scale,
    stride_xm, stride_xk, stride_mb, stride_mk, stride_qm, stride_qk,
    QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_SIGNS: tl.constexpr, LOG2_HAD: tl.constexpr,
    STATIC: tl.constexpr, SINGLE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M

    if SINGLE_TILE:  # the whole row is one tile: transform once
        y = _transformed(x_ptr, mean_ptr, sigma_ptr, signs_ptr, offs_m, offs_k, mask_m, K, tokens_per_sample,
                         had_scale, stride_xm, stride_xk, stride_mb, stride_mk,
                         HAS_MEAN, HAS_SIGMA, HAS_SIGNS, LOG2_HAD, BLOCK_M, BLOCK_K)
    if STATIC:
        s = tl.load(static_scale_ptr + offs_m, mask=mask_m, other=1.0)  # (BM,) given scales
    else:
        if SINGLE_TILE:
            amax = tl.max(tl.abs(y), axis=1)
        else:  # pass 1: row absmax over all tiles
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                t = _transformed(x_ptr, mean_ptr, sigma_ptr, signs_ptr, offs_m, k0 + offs_k, mask_m, K,
                                 tokens_per_sample, had_scale, stride_xm, stride_xk, stride_mb, stride_mk,
                                 HAS_MEAN, HAS_SIGMA, HAS_SIGNS, LOG2_HAD, BLOCK_M, BLOCK_K)
                amax = tl.maximum(amax, tl.max(tl.abs(t), axis=1))
        s = tl.math.div_rn(amax, QMAX * 1.0)
        s = tl.where(s > 0.0, s, 1.0)  # an all-zero row gets Δ = 1
        tl.store(scale_ptr + offs_m, s, mask=mask_m)

    for k0 in range(0, K, BLOCK_K):  # pass 2 (a single step for a single tile)
        if not SINGLE_TILE:
            y = _transformed(x_ptr, mean_ptr, sigma_ptr, signs_ptr, offs_m, k0 + offs_k, mask_m, K,
                             tokens_per_sample, had_scale, stride_xm, stride_xk, stride_mb, stride_mk,
                             HAS_MEAN, HAS_SIGMA, HAS_SIGNS, LOG2_HAD, BLOCK_M, BLOCK_K)
        v = tl.math.div_rn(y, s[:, None])
        v = (v + 12582912.0) - 12582912.0  # round half to even: 1.5·2^23 pushes the fraction out of the mantissa
        v = tl.minimum(tl.maximum(v, QMIN * 1.0), QMAX * 1.0)
        cols = k0 + offs_k
        tl.store(q_ptr + offs_m[:, None] * stride_qm + cols[None, :] * stride_qk, v.to(tl.int8),
                 mask=mask_m[:, None] & (cols[None, :] < K))


def _check(x, bits, scale, mean, tokens_per_sample, sigma, hadamard_block, signs):
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32/bfloat16/float16, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} must be 2 to 8")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K), a view when possible
    m = x2.shape[0]
    if mean is not None:
        if tokens_per_sample is None and x.dim() == 3:
            tokens_per_sample = x.shape[1]
        if mean.dim() != 2 or mean.shape[1] != k or tokens_per_sample is None or mean.shape[0] * tokens_per_sample != m:
            raise ValueError(f"mean must be (B, {k}) with B × tokens_per_sample ({tokens_per_sample}) = M = {m}, "
                             f"got {tuple(mean.shape)}")
    if sigma is not None and sigma.numel() != k:
        raise ValueError(f"sigma must be ({k},), got {tuple(sigma.shape)}")
    if signs is not None and (hadamard_block is None or signs.numel() != k):
        raise ValueError(f"signs ({tuple(signs.shape)}) need a hadamard_block and one sign per channel ({k})")
    if hadamard_block is not None:
        hb = int(hadamard_block)
        if hb < 1 or hb & (hb - 1) or hb > MAX_BLOCK or k % hb:
            raise ValueError(f"hadamard_block={hb} must be a power of two ≤ {MAX_BLOCK} dividing K={k}")
    if scale is not None and scale.numel() not in (1, m):
        raise ValueError(f"a static scale must be (1, 1) or ({m}, 1), got {tuple(scale.shape)}")
    for name, t in (("mean", mean), ("sigma", sigma), ("signs", signs), ("scale", scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return x2, m, k, tokens_per_sample


def act_quant(x: torch.Tensor, bits: int = 8, *, scale: torch.Tensor | None = None, mean: torch.Tensor | None = None,
              tokens_per_sample: int | None = None, sigma: torch.Tensor | None = None,
              hadamard_block: int | None = None, signs: torch.Tensor | None = None,
              block_m: int | None = None, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (M, K) int8 and scales (M, 1) float32 of the (optionally transformed) rows of x (…, K); see docstring."""
    x2, m, k, tokens_per_sample = _check(x, bits, scale, mean, tokens_per_sample, sigma, hadamard_block, signs)
    where = "interpret" if is_interpreted(_act_quant_kernel) else "gpu"
    hb = int(hadamard_block or 1)
    bk = block_k or max(hb, next_pow2(k) if next_pow2(k) <= MAX_TILE_K[where] else 1024)
    if bk & (bk - 1) or bk % hb:
        raise ValueError(f"block_k={bk} must be a power of two and a multiple of hadamard_block={hb}")
    bm = block_m or max(1, min(next_pow2(m), TILE_ELEMENTS[where] // bk))
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    static = None if scale is None else scale.to(torch.float32).reshape(-1).expand(m).contiguous()
    if static is not None:
        scales.copy_(static[:, None])
    params = dict(
        x_ptr=x2, mean_ptr=None if mean is None else mean.to(torch.float32),
        sigma_ptr=None if sigma is None else sigma.reshape(k).contiguous(),
        signs_ptr=None if signs is None else signs.reshape(k).contiguous(),
        static_scale_ptr=static, q_ptr=codes, scale_ptr=scales,
        M=m, K=k, tokens_per_sample=tokens_per_sample or 1,
        had_scale=hadamard_scale(hb) if hadamard_block else 1.0,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_mb=0 if mean is None else mean.stride(0), stride_mk=0 if mean is None else mean.stride(1),
        stride_qm=codes.stride(0), stride_qk=codes.stride(1),
        QMIN=-(2 ** (bits - 1)), QMAX=2 ** (bits - 1) - 1,
        HAS_MEAN=mean is not None, HAS_SIGMA=sigma is not None, HAS_SIGNS=signs is not None,
        LOG2_HAD=hb.bit_length() - 1 if hadamard_block else -1,
        STATIC=static is not None, SINGLE_TILE=bk >= k, BLOCK_M=bm, BLOCK_K=bk,
    )
    launch(_act_quant_kernel, (cdiv(m, bm),), params, num_warps=NUM_WARPS, num_stages=1)
    return codes, scales


# ---------------------------------------------------------------------------------------------- torch twin


def act_quant_ref(x, bits=8, *, scale=None, mean=None, tokens_per_sample=None, sigma=None, hadamard_block=None,
                  signs=None):
    """Twin of ``act_quant``: the same float32 operations in the same order (bit-identical codes and scales)."""
    x2, m, k, tokens_per_sample = _check(x, bits, scale, mean, tokens_per_sample, sigma, hadamard_block, signs)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    y = x2.float()
    if mean is not None:
        y = y - mean.float().repeat_interleave(tokens_per_sample, dim=0)
    if sigma is not None:
        y = y / sigma.float().reshape(1, k)
    if hadamard_block is not None:
        y = fwht_ref(y, int(hadamard_block), signs)
    if scale is None:
        s = y.abs().amax(-1, keepdim=True) / qmax  # (M, 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = scale.float().reshape(-1, 1).expand(m, 1).contiguous()
    return torch.round(y / s).clamp(qmin, qmax).to(torch.int8), s


def example_inputs(shape: tuple[int, int], *, seed: int = 0, device: str = "cpu", bits: int = 8, fused: bool = False,
                   hadamard_block: int | None = None, samples: int = 2, dtype: torch.dtype = torch.float32,
                   static: bool = False) -> dict:
    """Keyword arguments of ``act_quant`` / ``act_quant_ref`` for X (M, K); ``fused`` adds mean, sigma (and signs
    when ``hadamard_block`` is set). Rows have outlier channels and one all-zero row, as DiT activations do."""
    g = torch.Generator().manual_seed(seed)
    m, k = shape
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(k, generator=g))  # channel outliers
    x[m // 2] = 0.0  # an all-zero token (Δ = 1)
    kw: dict = {"x": x.to(dtype), "bits": bits}
    if fused:
        samples = samples if m % samples == 0 else 1  # tokens split evenly between samples
        kw["mean"] = torch.randn(samples, k, generator=g)
        kw["tokens_per_sample"] = m // samples
        kw["sigma"] = torch.rand(k, generator=g) * 2 + 0.1
    if hadamard_block:
        kw["hadamard_block"] = hadamard_block
        kw["signs"] = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.int8)
    if static:
        kw["scale"] = torch.tensor([[0.05]])
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
