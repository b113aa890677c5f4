"""W8A8 GEMM: int8 activations × int8 weights → exact int32 accumulators → float output with a fused epilogue.

Computes, for tokens m, output channels n and weight groups g (G = 1: per channel):

    acc[m, g, n] = Σ_{k in g} a[m, k] · (w[n, k] − z[n, g])          exact int32 (zero term via Σ_k a[m, k])
    y[m, n]      = (Σ_g acc[m, g, n] · w_scale[n, g]) · a_scale[m]  + bias[n] + mean_corr[m // T, n]

Inputs (the layout ``QuantLinear`` stores; any strides unless stated):
  a          (M, K) int8     activation codes (per-token symmetric, e.g. from ``kernels.act_quant``)
  a_scale    (M, 1) float32  per-token activation scales, or (1, 1) for a static per-tensor scale
  w          (N, K) int8     signed-shifted weight codes (``ditlab.primitives.quantize_weight``)
  w_scale    (N, G) float32  weight scales; w_zero (N, G) int32 signed-shifted zero points (None: symmetric)
  bias       (N,)            any float dtype
  mean_corr  (B, N) float32  HadaNorm's per-sample correction μ_b Wᵀ, added to the T = tokens_per_sample tokens of
                             sample b (tokens are rows b·T … b·T + T − 1)
Output: (M, N) float32 / bfloat16 / float16; ``w8a8_gemm_int32`` returns the accumulators themselves, (M, G, N) int32
(the layout of ``ditlab.backends`` accumulators), for exact comparison with the CPU integer path.

Why int32: products of int8 codes are exact integers and |Σ| ≤ 2^7·2^8·K < 2^31 for K < 65536, so an int32
accumulator (IMMA / wgmma on sm_80 / sm_90, exact ``np.matmul`` in the interpreter) is exact; the zero-point term
z·Σa is exact too (Σ_k a per token and group comes from one torch reduction over A in the wrapper, cheaper than a
reduction per k-step in the kernel). Only the epilogue rounds, once per group, in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._qgemm import (IntGemm, example_kwargs, example_kwargs_int32, gemm_ref, int_gemm, int_gemm_int32,
                     int_gemm_ref)
from ._tiles import bf16_rne

# Configs: see _qgemm (gemm_blocks: 128×128×64 tiles on GPU, shrunk for small M/N; GROUP_M = 8 tiles of M share a
# band of weight columns in L2, tutorial 03's swizzle; 3 software-pipeline stages of 16 KB each).


@triton.jit
def _w8a8_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, w_zero_ptr, a_sum_ptr, bias_ptr, corr_ptr,
    M, N, K, GROUP_SIZE, NUM_GROUPS, tokens_per_sample,
    stride_am, stride_ak, stride_wn, stride_wk,
    stride_sn, stride_sg, stride_cb, stride_cn, stride_og, stride_om, stride_on,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CORR: tl.constexpr, RAW_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped program order: GROUP_M consecutive row tiles walk the same column tiles (L2 reuse of w)
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK), advanced along K
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BK, BN), w read transposed

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_left = K  # codes beyond K are masked to 0 and add nothing
    for g in range(0, NUM_GROUPS):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for _ in range(0, GROUP_SIZE, BLOCK_K):  # BLOCK_K divides GROUP_SIZE unless there is a single group
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)  # (BM, BK) int8
            w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)  # (BK, BN) int8
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
            k_left -= BLOCK_K
        if HAS_ZERO:  # Σ_k a·(w − z) = Σ_k a·w − z·Σ_k a, exact in int32
            z = tl.load(w_zero_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0)  # (BN,) int32
            a_sum = tl.load(a_sum_ptr + offs_m * NUM_GROUPS + g, mask=mask_m, other=0)  # (BM,) int32
            acc -= a_sum[:, None] * z[None, :]
        if RAW_INT32:
            tl.store(out_ptr + g * stride_og + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
                     mask=mask_m[:, None] & mask_n[None, :])
        else:
            s = tl.load(w_scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)  # (BN,) f32
            y += acc.to(tl.float32) * s[None, :]

    if not RAW_INT32:
        sa = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)  # (BM,) f32
        y = y * sa[:, None]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_CORR:
            b = offs_m // tokens_per_sample  # the sample of each token
            y += tl.load(corr_ptr + b[:, None] * stride_cb + offs_n[None, :] * stride_cn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            y = bf16_rne(y)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check_codes(a: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int]:
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"a and w must be int8 codes, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"a (M, K) and w (N, K) must share K, got {tuple(a.shape)} and {tuple(w.shape)}")
    if a.device != w.device:
        raise ValueError(f"a is on {a.device}, w on {w.device}")
    return a.shape[0], w.shape[0], a.shape[1]


_GEMM = IntGemm(_w8a8_kernel, _check_codes, "stride_wk")


def w8a8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              w_zero: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              mean_corr: torch.Tensor | None = None, tokens_per_sample: int | None = None, *,
              out_dtype: torch.dtype = torch.float32, block_m: int | None = None, block_n: int | None = None,
              block_k: int | None = None) -> torch.Tensor:
    """y (M, N) = dequantized int8 GEMM a (M, K) × w (N, K)ᵀ with the epilogue of the module docstring."""
    return int_gemm(_GEMM, a, a_scale, w, w_scale, w_zero, bias, mean_corr, tokens_per_sample, out_dtype,
                    (block_m, block_n, block_k))


def w8a8_gemm_int32(a: torch.Tensor, w: torch.Tensor, w_zero: torch.Tensor | None = None, *,
                    num_groups: int = 1, block_m: int | None = None, block_n: int | None = None,
                    block_k: int | None = None) -> torch.Tensor:
    """Exact accumulators acc[m, g, n] = Σ_{k in g} a·(w − z): (M, G, N) int32 (G = 1 for per-channel weights)."""
    return int_gemm_int32(_GEMM, a, w, w_zero, num_groups, (block_m, block_n, block_k))


# ---------------------------------------------------------------------------------------------- torch twins


def w8a8_gemm_ref(a, a_scale, w, w_scale, w_zero=None, bias=None, mean_corr=None, tokens_per_sample=None, *,
                  out_dtype=torch.float32):
    """Twin of ``w8a8_gemm``: int64 accumulation per group, then the kernel's float32 epilogue in its order."""
    return gemm_ref(a, a_scale, w, w_scale, w_zero, bias, mean_corr, tokens_per_sample, out_dtype)


def w8a8_gemm_int32_ref(a, w, w_zero=None, *, num_groups=1):
    """Twin of ``w8a8_gemm_int32``."""
    return int_gemm_ref(a, w, w_zero, num_groups)


def example_inputs(shape: tuple[int, int, int], *, seed: int = 0, device: str = "cpu", group_size: int | None = None,
                   zero: bool = True, bias: bool = True, samples: int | None = 2,
                   out_dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of ``w8a8_gemm`` / ``w8a8_gemm_ref`` for (M, N, K): full-range random codes and scales.

    ``samples`` > 0 adds a mean-correction row per sample (one sample if M is not a multiple of it).
    """
    return example_kwargs(shape, w_name="w", make_w=lambda g, n, k: torch.randint(-128, 128, (n, k), generator=g,
                                                                                  dtype=torch.int8),
                          w_scale_affine=(0.01, 1e-4), zero_range=(-128, 128), seed=seed, device=device,
                          group_size=group_size, zero=zero, bias=bias, samples=samples, out_dtype=out_dtype)


def example_inputs_int32(shape: tuple[int, int, int], *, seed: int = 0, device: str = "cpu",
                         group_size: int | None = None, zero: bool = True) -> dict:
    """Keyword arguments of the ``*_int32`` wrapper / twin for (M, N, K)."""
    kw = example_inputs(shape, seed=seed, device=device, group_size=group_size, zero=zero, samples=None)
    return example_kwargs_int32(kw, "w")
