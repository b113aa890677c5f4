"""Host-side code shared by the integer GEMM wrappers (w8a8, w4a8) and their torch twins (no kernels here).

Weight quantization groups: scales (N, G) and zero points (N, G) with G = K / group_size (G = 1: per channel).
A kernel k-step never straddles two groups (BLOCK_K divides group_size when G > 1), so each group's int32 dot
is complete before it is scaled — the same per-group accumulation as the CPU integer path.

The two kernels take the same parameters (only the name of w's stride along its second dimension differs: int8
codes along K, packed bytes along K/2), so one launcher serves both: ``IntGemm`` says what differs, ``int_gemm`` /
``int_gemm_int32`` check, allocate and launch, ``example_kwargs`` makes test inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._launch import cdiv, is_interpreted, launch, next_pow2

FLOAT_OUT = (torch.float32, torch.bfloat16, torch.float16)
# Configs: GROUP_M tiles of M share a band of weight columns in L2 (tutorial 03's swizzle); 3 software-pipeline stages.
GROUP_M = 8
NUM_STAGES = 3


@dataclass(frozen=True)
class IntGemm:
    """What distinguishes one integer GEMM kernel from the other: the @triton.jit kernel, the check of its (a, w)
    operands returning (M, N, K), and the kernel's name for w's stride along its second dimension."""

    kernel: Any
    check_codes: Callable[[torch.Tensor, torch.Tensor], tuple[int, int, int]]
    w_stride_k: str  # "stride_wk" (int8 codes, along K) or "stride_wj" (packed int4 bytes, along K/2)


def _run(g: IntGemm, a, w, a_scale, w_scale, w_zero, bias, mean_corr, tokens_per_sample, num_groups, out, blocks):
    """Launch ``g.kernel`` on checked operands: out (M, N) float, or (M, G, N) int32 for the raw accumulators."""
    m, n, k = g.check_codes(a, w)
    group_size = groups_of(k, num_groups)
    bm, bn, bk, warps = gemm_blocks(m, n, k, group_size, is_interpreted(g.kernel), *blocks)
    raw = out.dtype == torch.int32  # raw accumulators: out is (M, G, N)
    # Σ_k a per token and group for the zero-point term: one cheap torch pass over A
    a_sum = a.reshape(m, num_groups, group_size).sum(-1, dtype=torch.int32).contiguous() if w_zero is not None else None
    params = dict(
        a_ptr=a, w_ptr=w, out_ptr=out, a_scale_ptr=a_scale, w_scale_ptr=w_scale, w_zero_ptr=w_zero,
        a_sum_ptr=a_sum, bias_ptr=bias, corr_ptr=mean_corr,
        M=m, N=n, K=k, GROUP_SIZE=group_size, NUM_GROUPS=num_groups, tokens_per_sample=tokens_per_sample or 1,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=w.stride(0), **{g.w_stride_k: w.stride(1)},
        stride_sn=num_groups, stride_sg=1,  # w_scale / w_zero are contiguous (N, G)
        stride_cb=mean_corr.stride(0) if mean_corr is not None else 0,
        stride_cn=mean_corr.stride(1) if mean_corr is not None else 0,
        stride_og=out.stride(1) if raw else 0, stride_om=out.stride(0), stride_on=out.stride(-1),
        HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, HAS_CORR=mean_corr is not None, RAW_INT32=raw,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
    )
    launch(g.kernel, (cdiv(m, bm) * cdiv(n, bn),), params, num_warps=warps, num_stages=NUM_STAGES)


def int_gemm(g: IntGemm, a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             w_zero: torch.Tensor | None, bias: torch.Tensor | None, mean_corr: torch.Tensor | None,
             tokens_per_sample: int | None, out_dtype: torch.dtype, blocks: tuple) -> torch.Tensor:
    """The float-output wrapper: y (M, N) in ``out_dtype`` from codes a (M, K) and weights w, with the epilogue."""
    m, n, k = g.check_codes(a, w)
    if out_dtype not in FLOAT_OUT:
        raise TypeError(f"out_dtype must be one of {FLOAT_OUT}, got {out_dtype}")
    num_groups = w_scale.shape[-1] if w_scale.dim() == 2 else 1
    a_scale, w_scale, w_zero, bias, mean_corr = check_epilogue(
        m, n, num_groups, a_scale, w_scale.reshape(n, num_groups), w_zero, bias, mean_corr, tokens_per_sample,
        a.device)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    _run(g, a, w, a_scale, w_scale, w_zero, bias, mean_corr, tokens_per_sample, num_groups, out, blocks)
    return out


def int_gemm_int32(g: IntGemm, a: torch.Tensor, w: torch.Tensor, w_zero: torch.Tensor | None, num_groups: int,
                   blocks: tuple) -> torch.Tensor:
    """The accumulator wrapper: acc[m, g, n] = Σ_{k in g} a·(w − z), (M, G, N) int32."""
    m, n, k = g.check_codes(a, w)
    _, _, w_zero, _, _ = check_epilogue(m, n, num_groups, None, None, w_zero, None, None, None, a.device)
    out = torch.empty(m, num_groups, n, dtype=torch.int32, device=a.device)
    _run(g, a, w, None, None, w_zero, None, None, None, num_groups, out, blocks)
    return out


def gemm_ref(a, a_scale, w_codes, w_scale, w_zero, bias, mean_corr, tokens_per_sample, out_dtype) -> torch.Tensor:
    """Twin of ``int_gemm`` on unpacked int8 codes w_codes (N, K): int64 accumulation per group, then the kernels'
    float32 epilogue in their order."""
    n = w_codes.shape[0]
    num_groups = w_scale.shape[-1] if w_scale.dim() == 2 else 1
    acc = int_gemm_ref(a, w_codes, w_zero, num_groups)
    return epilogue_ref(acc, a_scale, w_scale.reshape(n, num_groups), bias, mean_corr, tokens_per_sample, out_dtype)


def example_kwargs(shape: tuple[int, int, int], *, w_name: str, make_w: Callable[[torch.Generator, int, int], torch.Tensor],
                   w_scale_affine: tuple[float, float], zero_range: tuple[int, int], seed: int, device: str,
                   group_size: int | None, zero: bool, bias: bool, samples: int | None, out_dtype: torch.dtype) -> dict:
    """Keyword arguments of a float-output wrapper / twin for (M, N, K): random int8 activation codes and scales,
    weights ``make_w(generator, N, K)`` under the key ``w_name``, weight scales U(0, 1)·a + b for ``w_scale_affine`` =
    (a, b), zero
    points in [zero_range) (None if not ``zero``), a bias, and (``samples`` > 0) a mean-correction row per sample
    (one sample if M is not a multiple of it)."""
    g = torch.Generator().manual_seed(seed)
    m, n, k = shape
    groups = 1 if group_size is None else k // group_size
    mul, add = w_scale_affine
    kw = {
        "a": torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8),
        "a_scale": torch.rand(m, 1, generator=g) * 0.02 + 1e-3,
        w_name: make_w(g, n, k),
        "w_scale": torch.rand(n, groups, generator=g) * mul + add,
        "w_zero": torch.randint(*zero_range, (n, groups), generator=g, dtype=torch.int32) if zero else None,
        "bias": torch.randn(n, generator=g) if bias else None,
        "out_dtype": out_dtype,
    }
    if samples:
        samples = samples if m % samples == 0 else 1  # tokens split evenly between samples
        kw["mean_corr"] = torch.randn(samples, n, generator=g)
        kw["tokens_per_sample"] = m // samples
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}


def example_kwargs_int32(kw: dict, w_name: str) -> dict:
    """The ``*_int32`` wrapper's keyword arguments drawn from a float wrapper's (``example_kwargs`` with samples=None)."""
    return {"a": kw["a"], w_name: kw[w_name], "w_zero": kw["w_zero"], "num_groups": kw["w_scale"].shape[1]}


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
