"""VQ GEMM: float activations × weights decoded from a vector-quantization codebook inside the kernel (VQ4DiT).

Weights are stored as one codeword index per sub-vector of d consecutive input channels:

    W[n, j·d + t] = C[A[n, j], t]          (t < d)
    y (M, N)      = x (M, K) · round_to_x_dtype(W)ᵀ + bias        float32 accumulation

Inputs:
  x            (M, K) float32 / bfloat16 / float16, any strides
  assignments  (N, K/d) uint8 codeword indices (k ≤ 256 codewords)
  codebook     (k, d) float16 / float32 / bfloat16, d ∈ {1, 2, 4, 8}
  bias         (N,) any float dtype
Output: (M, N) in ``out_dtype`` (default x.dtype).

Decoding: for a k-step the kernel loads the (BN, BK) tile of indices A[n, k // d] (each index is read d times,
from cache) and gathers C[index, k % d] — the codebook (≤ 256 × 8 values) stays in L1/L2. Indices ≥ k read as 0
(masked, never out of bounds). As in ``w4a16_gemm`` the decoded weight is rounded once to the activation dtype so
a GPU dot runs on 16-bit tensor cores, products are exact in float32, and the accumulator is float32 (the
interpreter computes float32 dots on the same rounded values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, is_interpreted, launch, next_pow2
from ._tiles import bf16_rne

# Configs: 64×128×64 tiles on GPU; the interpreter gets 256×256 weight tiles (it pays a fixed cost per program
# and k-step, whatever the tile).
BLOCK_M_MAX, BLOCK_N, BLOCK_K = 64, 128, 64
BLOCK_N_INTERPRET, BLOCK_K_INTERPRET = 256, 256
GROUP_M = 8
NUM_WARPS, NUM_STAGES = 4, 3
FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16)
SUBVECTOR_LENGTHS = (1, 2, 4, 8)


@triton.jit
def _vq_kernel(
    x_ptr, assign_ptr, codebook_ptr, out_ptr, bias_ptr,
    M, N, K, NUM_CODES,
    stride_xm, stride_xk, stride_an, stride_aj, stride_cc, stride_cd, stride_om, stride_on,
    D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
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
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    a_ptrs = assign_ptr + offs_n[:, None] * stride_an + (offs_k // D)[None, :] * stride_aj  # (BN, BK): A[n, k // d]
    c_offs = (offs_k % D)[None, :] * stride_cd  # (1, BK): position t inside the codeword

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
        idx = tl.load(a_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)  # (BN, BK)
        w = tl.load(codebook_ptr + idx * stride_cc + c_offs, mask=idx < NUM_CODES, other=0.0).to(tl.float32)
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
        a_ptrs += (BLOCK_K // D) * stride_aj

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = bf16_rne(acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _check(x, assignments, codebook, bias):
    if x.dtype not in FLOAT_IN or codebook.dtype not in FLOAT_IN:
        raise TypeError(f"x and codebook must be float ({FLOAT_IN}), got {x.dtype}, {codebook.dtype}")
    if assignments.dtype != torch.uint8 or assignments.dim() != 2:
        raise TypeError(f"assignments must be uint8 (N, K/d), got {assignments.dtype} {tuple(assignments.shape)}")
    if codebook.dim() != 2 or codebook.shape[1] not in SUBVECTOR_LENGTHS or not 1 <= codebook.shape[0] <= 256:
        raise ValueError(f"codebook must be (k ≤ 256, d in {SUBVECTOR_LENGTHS}), got {tuple(codebook.shape)}")
    d = codebook.shape[1]
    if x.dim() != 2 or x.shape[1] != d * assignments.shape[1]:
        raise ValueError(f"x (M, K) and assignments (N, K/{d}) disagree: {tuple(x.shape)}, {tuple(assignments.shape)}")
    n = assignments.shape[0]
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    for name, t in (("assignments", assignments), ("codebook", codebook), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return x.shape[0], n, x.shape[1], d


def vq_gemm(x: torch.Tensor, assignments: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None = None, *,
            out_dtype: torch.dtype | None = None, block_m: int | None = None, block_n: int | None = None,
            block_k: int | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · Wᵀ + bias with W[n, j·d:(j+1)·d] = codebook[assignments[n, j]] decoded in the kernel."""
    m, n, k, d = _check(x, assignments, codebook, bias)
    interp = is_interpreted(_vq_kernel)
    bm = block_m or min(BLOCK_M_MAX, max(16, next_pow2(m)))
    bn = block_n or min(BLOCK_N_INTERPRET if interp else BLOCK_N, max(16, next_pow2(n)))
    bk = block_k or (BLOCK_K_INTERPRET if interp else BLOCK_K)
    if min(bm, bn, bk) < 16 or any(b & (b - 1) for b in (bm, bn, bk)):
        raise ValueError(f"blocks ({bm}, {bn}, {bk}) must be powers of two ≥ 16")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    params = dict(
        x_ptr=x, assign_ptr=assignments, codebook_ptr=codebook, out_ptr=out,
        bias_ptr=None if bias is None else bias.reshape(n).contiguous(),
        M=m, N=n, K=k, NUM_CODES=codebook.shape[0],
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_an=assignments.stride(0), stride_aj=assignments.stride(1),
        stride_cc=codebook.stride(0), stride_cd=codebook.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
        D=d, HAS_BIAS=bias is not None, DOT_F32=interp or x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
    )
    launch(_vq_kernel, (cdiv(m, bm) * cdiv(n, bn),), params, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


# ---------------------------------------------------------------------------------------------- torch twin


def vq_gemm_ref(x, assignments, codebook, bias=None, *, out_dtype=None):
    """Twin of ``vq_gemm``: W = C[A] (float32), rounded to x's dtype, float32 matmul, + bias."""
    m, n, k, d = _check(x, assignments, codebook, bias)
    w = codebook.float()[assignments.long()].reshape(n, k).to(x.dtype).float()  # (N, K)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def example_inputs(shape: tuple[int, int, int], *, seed: int = 0, device: str = "cpu", d: int = 4,
                   codes: int = 256, bias: bool = True, dtype: torch.dtype = torch.float32,
                   codebook_dtype: torch.dtype = torch.float16) -> dict:
    """Keyword arguments of ``vq_gemm`` / ``vq_gemm_ref`` for (M, N, K)."""
    g = torch.Generator().manual_seed(seed)
    m, n, k = shape
    kw = {
        "x": torch.randn(m, k, generator=g).to(dtype),
        "assignments": torch.randint(0, codes, (n, k // d), generator=g, dtype=torch.uint8),
        "codebook": (torch.randn(codes, d, generator=g) * 0.05).to(codebook_dtype),
        "bias": torch.randn(n, generator=g) if bias else None,
    }
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
