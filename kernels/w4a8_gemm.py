"""W4A8 GEMM: int8 activations × int4 weights (packed two per byte) → exact int32 accumulators → float output.

Computes exactly what ``kernels.w8a8_gemm`` computes, with the weight codes unpacked from nibbles in registers:

    acc[m, g, n] = Σ_{k in g} a[m, k] · (w[n, k] − z[n, g])          exact int32, one accumulator per group
    y[m, n]      = (Σ_g acc[m, g, n] · w_scale[n, g]) · a_scale[m]  + bias[n] + mean_corr[m // T, n]

Per group (G > 1) each group's int32 dot is completed, scaled in float32 and summed over groups in order — the
same per-group accumulation as the CPU integer path (unpack to int8, one integer GEMM per group).

Inputs (the layout ``QuantLinear`` stores):
  a          (M, K) int8     activation codes;  a_scale (M, 1) float32 per-token scales ((1, 1): per tensor)
  w_packed   (N, K/2) uint8  ``ditlab.primitives.pack_int4``: byte j of row n holds k = 2j in the low nibble and
                             k = 2j + 1 in the high nibble, 4-bit two's complement in [−8, 7] (K even)
  w_scale    (N, G) float32, w_zero (N, G) int32 signed-shifted zero points in [−8, 7] (None: symmetric)
  bias (N,), mean_corr (B, N) float32 with tokens_per_sample T, as in ``w8a8_gemm``.
Output (M, N) float32/bfloat16/float16; ``w4a8_gemm_int32`` returns the accumulators (M, G, N) int32.

Unpacking: the byte reinterpreted as int8 and shifted right arithmetically sign-extends the high nibble; shifting
left by 4 first does the same for the low one; ``tl.interleave`` puts them back in k order. ``tl.dot`` needs both
operands int8 (uint8 × int8 is rejected), which the bitcast gives.
Why int32: as in ``w8a8_gemm`` (|a·(w − z)| ≤ 2^7·2^4 per product, so any realistic K is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._qgemm import (IntGemm, example_kwargs, example_kwargs_int32, gemm_ref, int_gemm, int_gemm_int32,
                     int_gemm_ref)
from ._tiles import bf16_rne

# Configs: as w8a8 (see _qgemm); the packed weight tile is half as many bytes.


@triton.jit
def _w4a8_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, w_zero_ptr, a_sum_ptr, bias_ptr, corr_ptr,
    M, N, K, GROUP_SIZE, NUM_GROUPS, tokens_per_sample,
    stride_am, stride_ak, stride_wn, stride_wj,
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
    offs_j = tl.arange(0, BLOCK_K // 2)  # packed bytes of a k-step
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_j[None, :] * stride_wj  # (BN, BK/2) packed

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_left = K  # even; codes beyond K are masked to 0
    for g in range(0, NUM_GROUPS):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for _ in range(0, GROUP_SIZE, BLOCK_K):  # BLOCK_K divides GROUP_SIZE unless there is a single group
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)  # (BM, BK) int8
            p = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_j[None, :] < k_left // 2), other=0)  # (BN, BK/2) u8
            lo = (p << 4).to(tl.int8, bitcast=True) >> 4  # even k: low nibble, sign-extended
            hi = p.to(tl.int8, bitcast=True) >> 4  # odd k: high nibble, sign-extended
            w = tl.interleave(lo, hi)  # (BN, BK) int8 in k order
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += (BLOCK_K // 2) * stride_wj
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


def _check_codes(a: torch.Tensor, w_packed: torch.Tensor) -> tuple[int, int, int]:
    if a.dtype != torch.int8 or w_packed.dtype != torch.uint8:
        raise TypeError(f"a must be int8 codes and w_packed uint8 (two int4 per byte), got {a.dtype}, {w_packed.dtype}")
    if a.dim() != 2 or w_packed.dim() != 2 or a.shape[1] != 2 * w_packed.shape[1]:
        raise ValueError(f"a (M, K) and w_packed (N, K/2) disagree: {tuple(a.shape)} and {tuple(w_packed.shape)}")
    if a.device != w_packed.device:
        raise ValueError(f"a is on {a.device}, w_packed on {w_packed.device}")
    return a.shape[0], w_packed.shape[0], a.shape[1]


_GEMM = IntGemm(_w4a8_kernel, _check_codes, "stride_wj")


def w4a8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
              w_zero: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              mean_corr: torch.Tensor | None = None, tokens_per_sample: int | None = None, *,
              out_dtype: torch.dtype = torch.float32, block_m: int | None = None, block_n: int | None = None,
              block_k: int | None = None) -> torch.Tensor:
    """y (M, N) = dequantized GEMM of int8 a (M, K) with packed int4 w (N, K/2), epilogue as in the docstring."""
    return int_gemm(_GEMM, a, a_scale, w_packed, w_scale, w_zero, bias, mean_corr, tokens_per_sample, out_dtype,
                    (block_m, block_n, block_k))


def w4a8_gemm_int32(a: torch.Tensor, w_packed: torch.Tensor, w_zero: torch.Tensor | None = None, *,
                    num_groups: int = 1, block_m: int | None = None, block_n: int | None = None,
                    block_k: int | None = None) -> torch.Tensor:
    """Exact accumulators acc[m, g, n] = Σ_{k in g} a·(w − z): (M, G, N) int32 (G = 1 for per-channel weights)."""
    return int_gemm_int32(_GEMM, a, w_packed, w_zero, num_groups, (block_m, block_n, block_k))


# ---------------------------------------------------------------------------------------------- torch twins


def unpack_int4_ref(p: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) → int8 (N, K): low nibble → k = 2j, high nibble → k = 2j + 1, two's complement."""
    lo = (p.to(torch.int16) & 0xF)
    hi = (p.to(torch.int16) >> 4) & 0xF
    q = torch.stack([lo, hi], dim=-1).reshape(p.shape[0], 2 * p.shape[1])
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def w4a8_gemm_ref(a, a_scale, w_packed, w_scale, w_zero=None, bias=None, mean_corr=None, tokens_per_sample=None, *,
                  out_dtype=torch.float32):
    """Twin of ``w4a8_gemm``: unpack, int64 accumulation per group, the kernel's float32 epilogue in its order."""
    return gemm_ref(a, a_scale, unpack_int4_ref(w_packed), w_scale, w_zero, bias, mean_corr, tokens_per_sample, out_dtype)


def w4a8_gemm_int32_ref(a, w_packed, w_zero=None, *, num_groups=1):
    """Twin of ``w4a8_gemm_int32``."""
    return int_gemm_ref(a, unpack_int4_ref(w_packed), w_zero, num_groups)


def example_inputs(shape: tuple[int, int, int], *, seed: int = 0, device: str = "cpu", group_size: int | None = None,
                   zero: bool = True, bias: bool = True, samples: int | None = 2,
                   out_dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of ``w4a8_gemm`` / ``w4a8_gemm_ref`` for (M, N, K): random bytes cover every nibble."""
    return example_kwargs(shape, w_name="w_packed", make_w=lambda g, n, k: torch.randint(0, 256, (n, k // 2), generator=g,
                                                                                         dtype=torch.uint8),
                          w_scale_affine=(0.1, 1e-3), zero_range=(-8, 8), seed=seed, device=device,
                          group_size=group_size, zero=zero, bias=bias, samples=samples, out_dtype=out_dtype)


def example_inputs_int32(shape: tuple[int, int, int], *, seed: int = 0, device: str = "cpu",
                         group_size: int | None = None, zero: bool = True) -> dict:
    """Keyword arguments of the ``*_int32`` wrapper / twin for (M, N, K)."""
    kw = example_inputs(shape, seed=seed, device=device, group_size=group_size, zero=zero, samples=None)
    return example_kwargs_int32(kw, "w_packed")
