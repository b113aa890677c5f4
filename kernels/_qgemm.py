"""Host-side helpers shared by the integer GEMM wrappers (w8a8, w4a8) and their torch twins (no kernels here).

Weight quantization groups: scales (N, G) and zero points (N, G) with G = K / group_size (G = 1: per channel).
A kernel k-step never straddles two groups (BLOCK_K divides group_size when G > 1), so each group's int32 dot
is complete before it is scaled — the same per-group accumulation as the CPU integer path.
"""

from __future__ import annotations

import torch

from ._launch import next_pow2

FLOAT_OUT = (torch.float32, torch.bfloat16, torch.float16)


def groups_of(k: int, num_groups: int) -> int:
    """group_size for G groups along K, checking that G divides K."""
    if num_groups < 1 or k % num_groups:
        raise ValueError(f"{num_groups} weight groups do not divide in_features K={k}")
    return k // num_groups


def gemm_blocks(m: int, n: int, k: int, group_size: int, interpreted: bool, block_m: int | None,
                block_n: int | None, block_k: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for an int8 GEMM.

    GPU: 128×128×64 tiles (IMMA/wgmma-friendly), shrunk to the problem for small M/N (tl.dot needs ≥ 16).
    Interpreter: 128×256×256 tiles — it pays a fixed Python cost per program and k-step, whatever the tile.
    BLOCK_K is capped by the largest power of two dividing the group size so a k-step stays within one group.
    """
    bm = block_m or min(128, max(16, next_pow2(m)))
    bn = block_n or min(256 if interpreted else 128, max(16, next_pow2(n)))
    bk = block_k or (256 if interpreted else 64)
    if group_size < k:  # per-group: a k-step must not straddle groups
        bk = min(bk, group_size & -group_size)
    for name, b in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two ≥ 16 (tl.dot); for per-group weights the "
                             f"group size ({group_size}) must be a multiple of 16")
    if group_size < k and group_size % bk:
        raise ValueError(f"block_k={bk} must divide the group size {group_size}")
    return bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4


def check_epilogue(m: int, n: int, num_groups: int, a_scale, w_scale, w_zero, bias, mean_corr, tokens_per_sample,
                   device: torch.device):
    """Validate and normalise the epilogue operands → (a_scale (M,), w_scale (N, G), w_zero (N, G) | None, bias, mean_corr)."""
    def on(t, what):
        if t.device != device:
            raise ValueError(f"{what} is on {t.device}, the activations on {device}")
        return t
    if a_scale is not None:
        if a_scale.numel() not in (1, m):
            raise ValueError(f"a_scale must be ({m}, 1) per token or (1, 1) per tensor, got {tuple(a_scale.shape)}")
        a_scale = on(a_scale, "a_scale").to(torch.float32).reshape(-1).expand(m).contiguous()
    if w_scale is not None:
        if tuple(w_scale.shape) != (n, num_groups):
            raise ValueError(f"w_scale must be ({n}, {num_groups}), got {tuple(w_scale.shape)}")
        w_scale = on(w_scale, "w_scale").to(torch.float32).contiguous()
    if w_zero is not None:
        if tuple(w_zero.shape) != (n, num_groups):
            raise ValueError(f"w_zero must be ({n}, {num_groups}) like w_scale, got {tuple(w_zero.shape)}")
        if w_zero.is_floating_point():
            raise TypeError(f"w_zero holds signed-shifted integer zero points, got {w_zero.dtype}")
        w_zero = on(w_zero, "w_zero").to(torch.int32).contiguous()
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
        bias = on(bias, "bias").reshape(n).contiguous()
    if mean_corr is not None:
        if mean_corr.dim() != 2 or mean_corr.shape[1] != n:
            raise ValueError(f"mean_corr must be (B, {n}), got {tuple(mean_corr.shape)}")
        if tokens_per_sample is None or tokens_per_sample * mean_corr.shape[0] != m:
            raise ValueError(f"tokens_per_sample ({tokens_per_sample}) × samples ({mean_corr.shape[0]}) must equal "
                             f"the number of tokens M={m}")
        mean_corr = on(mean_corr, "mean_corr").to(torch.float32)
    return a_scale, w_scale, w_zero, bias, mean_corr


def int_gemm_ref(a: torch.Tensor, w: torch.Tensor, w_zero: torch.Tensor | None, num_groups: int) -> torch.Tensor:
    """Per-group exact accumulators (M, G, N) int32: Σ_{k in g} a[m,k]·(w[n,k] − z[n,g]), int64 math then cast."""
    m, k = a.shape
    n = w.shape[0]
    g = groups_of(k, num_groups)
    a64 = a.to(torch.int64).reshape(m, num_groups, g)  # (M, G, g)
    w64 = w.to(torch.int64).reshape(n, num_groups, g)  # (N, G, g)
    acc = torch.einsum("mgk,ngk->mgn", a64, w64)  # (M, G, N)
    if w_zero is not None:
        acc = acc - a64.sum(-1)[:, :, None] * w_zero.to(torch.int64).t()[None, :, :]
    return acc.to(torch.int32)


def epilogue_ref(acc: torch.Tensor, a_scale, w_scale, bias, mean_corr, tokens_per_sample, out_dtype) -> torch.Tensor:
    """The kernels' float epilogue in their order: y = Σ_g acc_g·s_g (sequential over g), ·a_scale, + bias, + corr.

    (The order of ``ditlab.backends.cpu_int_linear`` followed by QuantLinear's mean correction.)
    """
    m, num_groups, n = acc.shape
    w_scale = w_scale.to(torch.float32)
    y = torch.zeros(m, n, dtype=torch.float32, device=acc.device)
    for g in range(num_groups):
        y = y + acc[:, g, :].to(torch.float32) * w_scale[None, :, g]
    y = y * a_scale.to(torch.float32).reshape(-1, 1)
    if bias is not None:
        y = y + bias.reshape(1, n).to(torch.float32)
    if mean_corr is not None:
        y = y + mean_corr.to(torch.float32).repeat_interleave(tokens_per_sample, dim=0)
    return y.to(out_dtype)
