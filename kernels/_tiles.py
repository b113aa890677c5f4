"""Device functions shared by several kernels (``@triton.jit`` helpers, not kernels).

* ``bf16_rne``: round float32 values to the nearest bfloat16 (ties to even), kept in float32. The interpreter's
  float32 → bfloat16 cast truncates; after this rounding the value is exactly representable, so the cast that
  follows is exact on every backend and the result matches ``torch.Tensor.to(torch.bfloat16)``.
* ``fwht``: the unnormalised fast Walsh–Hadamard transform of every power-of-two block of a tile's rows; see
  ``kernels.hadamard`` for the definition and ``kernels.hadamard.fwht_ref`` for its torch twin (same float ops in the
  same order, so both give identical bits).

In the interpreter every call of a ``@triton.jit`` helper costs ~20 ms (it re-patches ``triton.language``), so
kernels call these at most once per tile, never inside a k-loop; one-liners (int4 unpacking, rounding) are inline.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_rne(x):
    """float32 tile → the nearest bfloat16 values (ties to even), still float32 (NaN payloads aside)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000  # round the low 16 bits away, ties to even
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def fwht(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LOG2_BLOCK: tl.constexpr):
    """Butterflies of the Walsh–Hadamard transform over blocks of 2^LOG2_BLOCK consecutive columns of x (BM, BK).

    Stage i pairs column c with c + h (h = 2^i, c in the first half of a 2h-wide chunk): (a, b) → (a + b, a − b).
    After all stages each block holds x_block · H (Sylvester order, H_ij = (−1)^popcount(i & j)), unnormalised.
    """
    for i in tl.static_range(LOG2_BLOCK):
        x = tl.reshape(x, (BLOCK_M, BLOCK_K // (2 << i), 2, 1 << i))  # (BM, chunks, half, h)
        x = tl.permute(x, (0, 1, 3, 2))  # (BM, chunks, h, half) so that split() takes the two halves
        a, b = tl.split(x)
        x = tl.join(a + b, a - b)
        x = tl.permute(x, (0, 1, 3, 2))
        x = tl.reshape(x, (BLOCK_M, BLOCK_K))
    return x
