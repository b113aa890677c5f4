"""Pure tensor functions of the (block-diagonal, randomised, normalised) Hadamard rotation.

Convention shared by the weight side (folded offline) and the activation side (applied online):

    Q = blockdiag(H_b, …, H_b) · diag(signs),   H_b = Sylvester Hadamard of size b, normalised by 1/√b

``rotate(x, signs, block)`` returns ``x · Q`` for rows x (…, K): a fast Walsh–Hadamard transform over each block
of ``b`` consecutive channels (O(K log b) per row), then a sign flip per channel. Q is orthogonal (H_b is symmetric
and H_bᵀ H_b = I), so folding ``W' = W Q`` (the same row operation on the rows of W) gives ``(X Q)(W Q)ᵀ = X Wᵀ``.
The block size is the largest power of two dividing K (1152 = 9·128 → b = 128; 192 → 64; 768 → 256).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError


def block_size(k: int) -> int:
    """Largest power of two dividing ``k`` (the Hadamard block of a K-channel rotation)."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError.invalid("in_features", k, "a positive integer")
    return k & -k  # lowest set bit


def hadamard_matrix(n: int, normalised: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sylvester Hadamard matrix (n, n) for n a power of two; entries ±1, or ±1/√n when ``normalised``."""
    if n < 1 or n & (n - 1):
        raise ConfigError.invalid("hadamard block", n, "a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if normalised:
        h = h / math.sqrt(n)
    return h.to(dtype)


def random_signs(k: int, seed: int) -> torch.Tensor:
    """(K,) int8 vector of ±1 drawn from a private generator seeded with ``seed`` (reproducible across runs)."""
    gen = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (int(k),), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)


def fwht(x: torch.Tensor, block: int, normalised: bool = True) -> torch.Tensor:
    """x · blockdiag(H_b) over the last dim (…, K) in blocks of ``block`` channels; returns float32 (…, K).

    Butterfly in log2(b) stages; each stage only adds and subtracts, so the unnormalised transform of an integer
    tensor is exact. The 1/√b normalisation is one multiply at the end (exact when log2 b is even).
    """
    k = x.shape[-1]
    if block < 1 or block & (block - 1) or k % block:
        raise ConfigError.invalid("hadamard block", block, f"a power of two dividing in_features={k}")
    lead = x.shape[:-1]
    y = x.float().reshape(-1, k // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + c, a - c], dim=-2)
        h *= 2
    y = y.reshape(*lead, k)
    return y * (1.0 / math.sqrt(block)) if normalised else y


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Rows times Q: ``x · blockdiag(H_b) · diag(signs)`` for x (…, K), signs (K,) ±1; float32 (…, K)."""
    return fwht(x, block) * signs.to(torch.float32)


def rotate_inverse(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Rows times Qᵀ = diag(signs) · blockdiag(H_b) (H_b symmetric): undoes ``rotate``."""
    return fwht(x.float() * signs.to(torch.float32), block)


def q_matrix(k: int, seed: int, block: int | None = None) -> torch.Tensor:
    """The dense Q (K, K) float64 that ``rotate`` multiplies by (for tests and plots, not for inference)."""
    b = block_size(k) if block is None else block
    h = hadamard_matrix(b, dtype=torch.float64)
    dense = torch.block_diag(*([h] * (k // b)))
    return dense * random_signs(k, seed).to(torch.float64)[None, :]


def make_rotation(k: int, seed: int, block: int | None = None):
    """A ``(…, K) → (…, K)`` callable computing rows · Q (the ``rotate`` argument of ditlab.transforms)."""
    b = block_size(k) if block is None else block
    signs = random_signs(k, seed)
    return lambda t: rotate(t, signs, b)
