"""W4A16 GEMM: float activations × int4 weights (packed two per byte), dequantized in registers, float32 accumulator.

Computes y (M, N) = x (M, K) · Ŵᵀ + bias with the weight dequantized tile by tile inside the k-loop:

    Ŵ[n, k] = round_to_x_dtype( (q[n, k] − z[n, g(k)]) · scale[n, g(k)] )      (float32 math, g(k) = k // group_size)

The dequantized value is rounded once to the activation dtype (a no-op for float32 activations) so that on a GPU
the product runs on bf16/fp16 tensor cores; products of two 16-bit floats are exact in float32 and the sum is
accumulated in float32 (never in 16 bits, which would lose ~3 digits over K = 4608 terms). With float32
activations the dot runs in IEEE float32 (``input_precision="ieee"``, no TF32). Under the interpreter every dot runs
in float32 (its bf16 dot is wrong) on the same rounded values — the same products, summed in another order.

Inputs:
  x          (M, K) float32 / bfloat16 / float16, any strides
  w_packed   (N, K/2) uint8  ``ditlab.primitives.pack_int4`` layout: byte j of row n holds k = 2j (low nibble) and
                             k = 2j + 1 (high nibble), 4-bit two's complement
  w_scale    (N, G) float32 (G = 1: per channel); w_zero (N, G) int32 signed-shifted zero points, None = symmetric
  bias       (N,) any float dtype
Output: (M, N) in ``out_dtype`` (default x.dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, is_interpreted, launch, next_pow2
from ._tiles import bf16_rne

# Configs: 64×128×64 tiles on GPU (a float activation tile is 2–4× the bytes of an int8 one); the interpreter
# gets 256×256 weight tiles (it pays a fixed cost per program and step). BLOCK_K divides the group size, so one
# scale column serves a whole k-step.
BLOCK_M_MAX, BLOCK_N, BLOCK_K = 64, 128, 64
BLOCK_N_INTERPRET, BLOCK_K_INTERPRET = 256, 256
GROUP_M = 8
NUM_WARPS, NUM_STAGES = 4, 3
FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, w_zero_ptr, bias_ptr,
    M, N, K, GROUP_SIZE, NUM_GROUPS,
    stride_xm, stride_xk, stride_wn, stride_wj, stride_om, stride_on,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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
    offs_j = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_j[None, :] * stride_wj  # (BN, BK/2) packed
    s_ptrs = w_scale_ptr + offs_n * NUM_GROUPS  # (BN,) column g of the contiguous (N, G) scales (and zeros)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE, so one group per step
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)  # (BM, BK)
        p = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_j[None, :] < (K - k0) // 2), other=0)  # (BN, BK/2) u8
        lo = (p << 4).to(tl.int8, bitcast=True) >> 4  # even k, sign-extended low nibble
        hi = p.to(tl.int8, bitcast=True) >> 4  # odd k, sign-extended high nibble
        w = tl.interleave(lo, hi).to(tl.float32)  # (BN, BK) codes
        if HAS_ZERO:
            w = w - tl.load(w_zero_ptr + offs_n * NUM_GROUPS + g, mask=mask_n, other=0).to(tl.float32)[:, None]
        w = w * tl.load(s_ptrs + g, mask=mask_n, other=0.0)[:, None]  # (BN, BK) dequantized, float32
        if DOT_F32:  # float32 dot on the values a 16-bit dot would see
            if x_ptr.dtype.element_ty == tl.bfloat16:
                bits = w.to(tl.uint32, bitcast=True)  # round to bf16, ties to even (inline: no helper call in a loop)
                w = ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)
            elif x_ptr.dtype.element_ty == tl.float16:
                w = w.to(tl.float16).to(tl.float32)
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wj

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = bf16_rne(acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _check(x, w_packed, w_scale, w_zero, bias):
    if x.dtype not in FLOAT_IN:
        raise TypeError(f"x must be one of {FLOAT_IN}, got {x.dtype}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or x.dim() != 2 or x.shape[1] != 2 * w_packed.shape[1]:
        raise ValueError(f"x (M, K) and w_packed (N, K/2) uint8 disagree: {tuple(x.shape)}, {tuple(w_packed.shape)} "
                         f"{w_packed.dtype}")
    m, k = x.shape
    n = w_packed.shape[0]
    num_groups = w_scale.shape[-1] if w_scale.dim() == 2 else 1
    if w_scale.numel() != n * num_groups or k % num_groups:
        raise ValueError(f"w_scale must be ({n}, G) with G dividing K={k}, got {tuple(w_scale.shape)}")
    if w_zero is not None and (tuple(w_zero.shape) != (n, num_groups) or w_zero.is_floating_point()):
        raise ValueError(f"w_zero must be integer ({n}, {num_groups}), got {tuple(w_zero.shape)} {w_zero.dtype}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    for name, t in (("w_packed", w_packed), ("w_scale", w_scale), ("w_zero", w_zero), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return m, n, k, num_groups


def w4a16_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
               block_m: int | None = None, block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · Ŵᵀ + bias with Ŵ dequantized from packed int4 inside the kernel."""
    m, n, k, num_groups = _check(x, w_packed, w_scale, w_zero, bias)
    group_size = k // num_groups
    interp = is_interpreted(_w4a16_kernel)
    bm = block_m or min(BLOCK_M_MAX, max(16, next_pow2(m)))
    bn = block_n or min(BLOCK_N_INTERPRET if interp else BLOCK_N, max(16, next_pow2(n)))
    bk = block_k or (BLOCK_K_INTERPRET if interp else BLOCK_K)
    if num_groups > 1:
        bk = min(bk, group_size & -group_size)
    if min(bm, bn, bk) < 16 or any(b & (b - 1) for b in (bm, bn, bk)) or (num_groups > 1 and group_size % bk):
        raise ValueError(f"blocks ({bm}, {bn}, {bk}) must be powers of two ≥ 16 with block_k dividing the group size "
                         f"{group_size}")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    params = dict(
        x_ptr=x, w_ptr=w_packed, out_ptr=out, w_scale_ptr=w_scale.reshape(n, num_groups).to(torch.float32).contiguous(),
        w_zero_ptr=None if w_zero is None else w_zero.to(torch.int32).contiguous(),
        bias_ptr=None if bias is None else bias.reshape(n).contiguous(),
        M=m, N=n, K=k, GROUP_SIZE=group_size, NUM_GROUPS=num_groups,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=w_packed.stride(0), stride_wj=w_packed.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, DOT_F32=interp or x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
    )
    launch(_w4a16_kernel, (cdiv(m, bm) * cdiv(n, bn),), params, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


# ---------------------------------------------------------------------------------------------- torch twin


def w4a16_gemm_ref(x, w_packed, w_scale, w_zero=None, bias=None, *, out_dtype=None):
    """Twin of ``w4a16_gemm``: dequantize (q − z)·s in float32, round to x's dtype, float32 matmul, + bias."""
    m, n, k, num_groups = _check(x, w_packed, w_scale, w_zero, bias)
    lo = w_packed.to(torch.int16) & 0xF
    hi = (w_packed.to(torch.int16) >> 4) & 0xF
    q = torch.stack([lo, hi], dim=-1).reshape(n, k)
    q = torch.where(q >= 8, q - 16, q).float().reshape(n, num_groups, k // num_groups)  # (N, G, g) codes
    if w_zero is not None:
        q = q - w_zero.float()[:, :, None]
    w = (q * w_scale.reshape(n, num_groups, 1).float()).reshape(n, k).to(x.dtype).float()
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def example_inputs(shape: tuple[int, int, int], *, seed: int = 0, device: str = "cpu", group_size: int | None = None,
                   zero: bool = True, bias: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of ``w4a16_gemm`` / ``w4a16_gemm_ref`` for (M, N, K)."""
    g = torch.Generator().manual_seed(seed)
    m, n, k = shape
    groups = 1 if group_size is None else k // group_size
    kw = {
        "x": torch.randn(m, k, generator=g).to(dtype),
        "w_packed": torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8),
        "w_scale": torch.rand(n, groups, generator=g) * 0.1 + 1e-3,
        "w_zero": torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int32) if zero else None,
        "bias": torch.randn(n, generator=g) if bias else None,
    }
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
