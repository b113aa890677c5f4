"""Block fast Walsh–Hadamard transform over the last dimension (the online rotation of QuaRot / ViDiT-Q / HadaNorm).

Definition — the convention of METHODS.md ("randomised normalised Hadamard H·diag(±1)/√d") and of
``ditlab.hadamard_ops.rotate``, so that weights rotated offline by the library match activations rotated here:
the last dimension K is split into K/d consecutive blocks of d = 2^L columns, and every block is mapped by

    x' = (FWHT(x) / √d) ⊙ s  =  x · (H_d / √d) · diag(s)       (rows times Q = blockdiag(H_d/√d) · diag(s))

i.e. the signs s (K,) ±1 (optional; the block's slice of them) are applied to the *output* of the transform.
H_d is the Sylvester Hadamard matrix, H_d[i, j] = (−1)^popcount(i & j) (symmetric, H_d H_d = d·I), so Q is
orthogonal (Q Qᵀ = H_d diag(s)² H_d / d = I), and rotating both sides, X' = X Q and W' = W Q, leaves X Wᵀ unchanged.

Inputs: x (M, K) float32/bfloat16/float16 with any strides (leading dimensions of an (…, K) input are flattened);
signs (K,) any float or integer dtype holding ±1. Output: (…, K) in x's dtype (or ``out_dtype``).
Each program owns a (BLOCK_M, BLOCK_K) tile holding whole Hadamard blocks (BLOCK_K a multiple of d), so the
transform never leaves registers: log2(d) butterfly stages of adds and subtracts.
Arithmetic is float32 whatever the input dtype: butterflies on bf16 would lose bits at every stage. The final
1/√d is a single float32 multiply and the signs an exact one, so ``fwht_ref`` (same butterflies, same order) and
``ditlab.hadamard_ops.rotate`` reproduce the kernel bit for bit; ``hadamard_ref`` is the dense block matmul of the
definition (agrees within float rounding).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import cdiv, is_interpreted, launch, next_pow2
from ._tiles import bf16_rne, fwht

MAX_BLOCK = 4096  # largest Hadamard block a tile holds; larger blocks would need a multi-tile transform

# Tile sizes: GPU tiles hold ~8K float32 values per program; the interpreter pays per program, so it gets bigger ones.
TILE_ELEMENTS = {"gpu": 8192, "interpret": 65536}
NUM_WARPS = 4


@triton.jit
def _hadamard_kernel(
    x_ptr, signs_ptr, out_ptr,
    M, K, scale,
    stride_xm, stride_xk, stride_om, stride_ok,
    HAS_SIGNS: tl.constexpr, LOG2_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)  # (BM, BK)
    # K is a multiple of the Hadamard block and BLOCK_K of K's blocks, so masked columns form whole (zero) blocks.
    x = fwht(x, BLOCK_M, BLOCK_K, LOG2_BLOCK)
    x = x * scale
    if HAS_SIGNS:  # Q = H·diag(s): the signs act on the transformed columns (exact: a multiply by ±1)
        s = tl.load(signs_ptr + offs_k, mask=offs_k < K, other=0).to(tl.float32)
        x = x * s[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        x = bf16_rne(x)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok,
             x.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, block: int, signs: torch.Tensor | None) -> int:
    if block < 1 or block & (block - 1) or block > MAX_BLOCK:
        raise ValueError(f"block={block} must be a power of two ≤ {MAX_BLOCK}")
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"the last dimension {k} is not a multiple of the Hadamard block {block}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32/bfloat16/float16, got {x.dtype}")
    if signs is not None and tuple(signs.shape) != (k,):
        raise ValueError(f"signs must have shape ({k},), got {tuple(signs.shape)}")
    return k


def hadamard_scale(block: int) -> float:
    """The normalisation 1/√d as the float32 value both the kernel and the twins multiply by."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def hadamard_transform(x: torch.Tensor, block: int, signs: torch.Tensor | None = None, *,
                       out_dtype: torch.dtype | None = None, block_m: int | None = None,
                       block_k: int | None = None) -> torch.Tensor:
    """Block Walsh–Hadamard transform of x (…, K) → (…, K): (FWHT(x)/√block) ⊙ signs, per block of ``block`` columns
    (rows times Q = blockdiag(H/√block)·diag(signs), as ``ditlab.hadamard_ops.rotate``)."""
    k = _check(x, block, signs)
    x2 = x.reshape(-1, k)  # (M, K), a view when possible
    m = x2.shape[0]
    out = torch.empty((m, k), dtype=out_dtype or x.dtype, device=x.device)
    interp = "interpret" if is_interpreted(_hadamard_kernel) else "gpu"
    bk = block_k or max(block, min(next_pow2(k), 1024))
    if bk % block or bk & (bk - 1):
        raise ValueError(f"block_k={bk} must be a power of two and a multiple of the Hadamard block {block}")
    bm = block_m or max(1, min(next_pow2(m), TILE_ELEMENTS[interp] // bk))
    params = dict(
        x_ptr=x2, signs_ptr=signs.contiguous() if signs is not None else None, out_ptr=out,
        M=m, K=k, scale=hadamard_scale(block),
        stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_om=out.stride(0), stride_ok=out.stride(1),
        HAS_SIGNS=signs is not None, LOG2_BLOCK=block.bit_length() - 1, BLOCK_M=bm, BLOCK_K=bk,
    )
    launch(_hadamard_kernel, (cdiv(m, bm), cdiv(k, bk)), params, num_warps=NUM_WARPS, num_stages=1)
    return out.reshape(*x.shape[:-1], k)


# ---------------------------------------------------------------------------------------------- torch twins


def hadamard_matrix(d: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix H_d (d × d, ±1, float32): H_d[i, j] = (−1)^popcount(i & j)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"d={d} must be a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_ref(x: torch.Tensor, block: int, signs: torch.Tensor | None = None, *,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense twin of ``hadamard_transform``: x (…, K) @ blockdiag(H_d/√d) @ diag(s), float32 math."""
    k = _check(x, block, signs)
    y = x.reshape(-1, k).float()
    q = hadamard_matrix(block).to(x.device) / math.sqrt(block)
    y = (y.reshape(-1, k // block, block) @ q).reshape(-1, k)
    if signs is not None:
        y = y * signs.float()
    return y.reshape(*x.shape[:-1], k).to(out_dtype or x.dtype)


def fwht_ref(x: torch.Tensor, block: int, signs: torch.Tensor | None = None, *,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Butterfly twin of ``hadamard_transform``: the kernel's float32 operations in the kernel's order (bit-exact)."""
    k = _check(x, block, signs)
    y = x.reshape(-1, k).float()
    m = y.shape[0]
    h = 1
    while h < block:
        v = y.reshape(m, k // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(m, k)
        h *= 2
    y = y * torch.tensor(hadamard_scale(block), dtype=torch.float32, device=y.device)
    if signs is not None:
        y = y * signs.float()
    return y.reshape(*x.shape[:-1], k).to(out_dtype or x.dtype)


def example_inputs(shape: tuple[int, int], *, seed: int = 0, device: str = "cpu", block: int = 32,
                   signs: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of ``hadamard_transform`` / its twins for x of shape (M, K)."""
    g = torch.Generator().manual_seed(seed)
    m, k = shape
    x = torch.randn(m, k, generator=g).to(dtype)
    s = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).float() if signs else None
    return {"x": x.to(device), "block": block, "signs": None if s is None else s.to(device)}
