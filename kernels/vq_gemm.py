"""VQ GEMM: float activations × weights decoded from a vector-quantization codebook inside the kernel (VQ4DiT).

Weights are stored as one codeword index per sub-vector of d consecutive input channels:

    W[n, j·d + t] = C[A[n, j], t]          (t < d)
    y (M, N)      = x (M, K) · round_to_x_dtype(W)ᵀ + bias        float32 accumulation

Inputs:
  x            (M, K) float32 / bfloat16 / float16, any strides
  assignments  codeword indices, uint8, in one of two layouts (``index_bits``):
                 8: (N, K/d), one byte per index (k ≤ 256 codewords; VQ4DiT 2-bit: k = 256, d = 4)
                 6: (N, 3·⌈(K/d)/4⌉), four indices in three bytes (k ≤ 64; VQ4DiT 3-bit: k = 64, d = 2): indices
                    4g … 4g+3 of a row form the word w = a0 | a1 << 6 | a2 << 12 | a3 << 18, stored little-endian
                    in bytes 3g, 3g+1, 3g+2 (``ditlab.vq.pack_index6``; twin here: ``unpack_index6_ref``)
  codebook     (k, d) float16 / float32 / bfloat16, d ∈ {1, 2, 4, 8}
  bias         (N,) any float dtype
Output: (M, N) in ``out_dtype`` (default x.dtype).

Decoding: for a k-step the kernel computes the (BN, BK) tile of indices A[n, k // d] — 8-bit: one byte load; 6-bit:
the three bytes of the index's group, assembled into the 24-bit word in int32 and shifted by 6·(j mod 4) — (each
index is read d times, from cache) and gathers C[index, k % d]; the codebook (≤ 256 × 8 values) stays in L1/L2.
Indices ≥ k read as 0 (masked, never out of bounds). As in ``w4a16_gemm`` the decoded weight is rounded once to the activation dtype so
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
    D: tl.constexpr, INDEX_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
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
    row_ptrs = assign_ptr + offs_n[:, None] * stride_an  # (BN, 1)
    c_offs = (offs_k % D)[None, :] * stride_cd  # (1, BK): position t inside the codeword

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        mask_a = mask_n[:, None] & mask_k[None, :]  # (BN, BK)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
        j = ((k0 + offs_k) // D)[None, :]  # (1, BK) index position along the row
        if INDEX_BITS == 6:  # bytes 3g … 3g+2 of group g = j // 4 hold four 6-bit indices, little-endian
            b_ptrs = row_ptrs + ((j // 4) * 3) * stride_aj  # (BN, BK)
            b0 = tl.load(b_ptrs, mask=mask_a, other=0).to(tl.int32)
            b1 = tl.load(b_ptrs + stride_aj, mask=mask_a, other=0).to(tl.int32)
            b2 = tl.load(b_ptrs + 2 * stride_aj, mask=mask_a, other=0).to(tl.int32)
            idx = ((b0 | (b1 << 8) | (b2 << 16)) >> ((j % 4) * 6)) & 63  # (BN, BK) int32
        else:
            idx = tl.load(row_ptrs + j * stride_aj, mask=mask_a, other=0).to(tl.int32)  # (BN, BK): A[n, k // d]
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

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = bf16_rne(acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def packed_columns(j: int, index_bits: int) -> int:
    """Bytes per row of J indices: 3·⌈J/4⌉ at 6 bits, J at 8 bits."""
    return 3 * (-(-j // 4)) if index_bits == 6 else j


def _check(x, assignments, codebook, bias, index_bits):
    if x.dtype not in FLOAT_IN or codebook.dtype not in FLOAT_IN:
        raise TypeError(f"x and codebook must be float ({FLOAT_IN}), got {x.dtype}, {codebook.dtype}")
    if assignments.dtype != torch.uint8 or assignments.dim() != 2:
        raise TypeError(f"assignments must be uint8 (N, K/d) or packed (N, 3·⌈K/4d⌉), got {assignments.dtype} "
                        f"{tuple(assignments.shape)}")
    if index_bits not in (6, 8):
        raise ValueError(f"index_bits must be 8 (one byte per index) or 6 (four indices in three bytes), got {index_bits}")
    max_codes = 64 if index_bits == 6 else 256
    if codebook.dim() != 2 or codebook.shape[1] not in SUBVECTOR_LENGTHS or not 1 <= codebook.shape[0] <= max_codes:
        raise ValueError(f"codebook must be (k ≤ {max_codes}, d in {SUBVECTOR_LENGTHS}) for {index_bits}-bit indices, "
                         f"got {tuple(codebook.shape)}")
    d = codebook.shape[1]
    if x.dim() != 2 or x.shape[1] % d or assignments.shape[1] != packed_columns(x.shape[1] // d, index_bits):
        raise ValueError(f"x (M, K) and {index_bits}-bit assignments for sub-vectors of {d} disagree: "
                         f"{tuple(x.shape)}, {tuple(assignments.shape)}")
    n = assignments.shape[0]
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    for name, t in (("assignments", assignments), ("codebook", codebook), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return x.shape[0], n, x.shape[1], d


def vq_gemm(x: torch.Tensor, assignments: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None = None, *,
            index_bits: int = 8, out_dtype: torch.dtype | None = None, block_m: int | None = None,
            block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · Wᵀ + bias with W[n, j·d:(j+1)·d] = codebook[A[n, j]] decoded in the kernel; A is
    ``assignments`` (N, K/d) uint8 (index_bits=8) or its 6-bit packing (N, 3·⌈K/4d⌉) uint8 (index_bits=6)."""
    m, n, k, d = _check(x, assignments, codebook, bias, index_bits)
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
        D=d, INDEX_BITS=index_bits, HAS_BIAS=bias is not None, DOT_F32=interp or x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
    )
    launch(_vq_kernel, (cdiv(m, bm) * cdiv(n, bn),), params, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


# ---------------------------------------------------------------------------------------------- torch twin


def unpack_index6_ref(p: torch.Tensor, j: int) -> torch.Tensor:
    """6-bit packed indices (N, 3·⌈J/4⌉) uint8 → (N, J) int64: word = b0 | b1 << 8 | b2 << 16, index t = bits 6t…6t+5."""
    b = p.to(torch.int64).reshape(p.shape[0], -1, 3)  # (N, G, 3)
    word = b[..., 0] + b[..., 1] * 256 + b[..., 2] * 65536  # (N, G)
    return torch.stack([(word // 64**t) % 64 for t in range(4)], dim=-1).reshape(p.shape[0], -1)[:, :j]


def vq_gemm_ref(x, assignments, codebook, bias=None, *, index_bits=8, out_dtype=None):
    """Twin of ``vq_gemm``: W = C[A] (float32), rounded to x's dtype, float32 matmul, + bias."""
    m, n, k, d = _check(x, assignments, codebook, bias, index_bits)
    a = unpack_index6_ref(assignments, k // d) if index_bits == 6 else assignments.long()  # (N, K/d)
    w = codebook.float()[a].reshape(n, k).to(x.dtype).float()  # (N, K)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def example_inputs(shape: tuple[int, int, int], *, seed: int = 0, device: str = "cpu", d: int = 4,
                   codes: int = 256, bias: bool = True, dtype: torch.dtype = torch.float32,
                   codebook_dtype: torch.dtype = torch.float16, index_bits: int = 8) -> dict:
    """Keyword arguments of ``vq_gemm`` / ``vq_gemm_ref`` for (M, N, K); index_bits=6 gives random packed bytes
    (every 6-bit index value; needs codes = 64)."""
    g = torch.Generator().manual_seed(seed)
    m, n, k = shape
    cols = packed_columns(k // d, index_bits)
    kw = {
        "x": torch.randn(m, k, generator=g).to(dtype),
        "assignments": (torch.randint(0, 256, (n, cols), generator=g, dtype=torch.uint8) if index_bits == 6
                        else torch.randint(0, codes, (n, cols), generator=g, dtype=torch.uint8)),
        "index_bits": index_bits,
        "codebook": (torch.randn(codes, d, generator=g) * 0.05).to(codebook_dtype),
        "bias": torch.randn(n, generator=g) if bias else None,
    }
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
