"""Throughput of the quantized GEMM paths on DiT-XL/2 layer shapes, as ratios from the same run.

    python benchmarks/bench_kernels.py [--repeats 5] [--m 512]

M = 2 samples × 256 tokens; (K → N) = qkv 1152→3456, out 1152→1152, fc1 1152→4608, fc2 4608→1152, adaLN 1152→6912.
GOP/s counts 2·M·N·K operations per GEMM.
* CPU (always): torch fp32 and bf16 matmul vs the CPU integer path of ``ditlab.backends`` — per-token int8
  quantization of X + ``torch._int_mm`` (weight passed column-major, the fast layout) + the float epilogue — and
  the same with int4 weights unpacked to int8 on every call (what ``cpu-int`` does for W4A8). ``int_mm only`` is the
  integer GEMM alone.
* CUDA (when a GPU is present): the Triton kernels (W8A8 and W4A8 GEMM alone and with ``act_quant`` in front,
  W4A16 and VQ with bf16 activations) vs torch fp16/bf16 matmul, timed with ``triton.testing.do_bench``.
Timings are medians; the CPU is shared with whatever else runs, so compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [("qkv", 1152, 3456), ("attn out", 1152, 1152), ("fc1", 1152, 4608), ("fc2", 4608, 1152),
          ("adaLN", 1152, 6912)]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ditlab.primitives.quantize_per_token(x, 8), inlined so the benchmark needs only torch."""
    s = x.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp(-128, 127).to(torch.int8), s


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo, hi = p.to(torch.int16) & 0xF, (p.to(torch.int16) >> 4) & 0xF
    q = torch.stack([lo, hi], -1).reshape(p.shape[0], -1)
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def bench_cpu(m: int = 512, repeats: int = 5) -> list[dict]:
    """Rows of GOP/s for fp32, bf16, int_mm alone, W8A8 and W4A8 integer paths, plus the ratios."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, k, n in SHAPES:
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) * 0.02
        bias = torch.randn(n, generator=g)
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        w_scale = w.abs().amax(1, keepdim=True) / 127  # (N, 1)
        q8 = torch.round(w / w_scale).clamp(-128, 127).to(torch.int8)  # (N, K)
        q4 = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)  # packed int4
        a8, _ = _per_token_int8(x)

        def w8a8(q=q8):
            a, s = _per_token_int8(x)
            acc = torch._int_mm(a, q.t())  # (M, N) int32, exact
            return acc.float() * s * w_scale.t() + bias

        ops = 2 * m * n * k / 1e9
        t = {
            "fp32": _median_seconds(lambda: x @ w.t(), repeats),
            "bf16": _median_seconds(lambda: xb @ wb.t(), repeats),
            "int_mm only": _median_seconds(lambda: torch._int_mm(a8, q8.t()), repeats),
            "W8A8 path": _median_seconds(w8a8, repeats),
            "W4A8 path": _median_seconds(lambda: w8a8(_unpack_int4(q4)), repeats),
        }
        row = {"layer": name, "K→N": f"{k}→{n}"}
        row.update({f"{key} GOP/s": ops / v for key, v in t.items()})
        row["W8A8 / fp32"] = t["fp32"] / t["W8A8 path"]
        row["W8A8 / bf16"] = t["bf16"] / t["W8A8 path"]
        row["W4A8 / fp32"] = t["fp32"] / t["W4A8 path"]
        rows.append(row)
    return rows


def bench_cuda(m: int = 512) -> list[dict]:
    """Rows of TOP/s for torch fp16/bf16 and the Triton kernels on the current GPU (ratios vs torch bf16)."""
    import triton.testing

    import kernels

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, k, n in SHAPES:
        x = torch.randn(m, k, device=dev, generator=g)
        xh, xb = x.half(), x.bfloat16()
        wh, wb = torch.randn(n, k, device=dev, generator=g).half(), torch.randn(n, k, device=dev, generator=g).bfloat16()
        a = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
        s_a = torch.rand(m, 1, device=dev, generator=g)
        q8 = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
        q4 = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
        s_w = torch.rand(n, 1, device=dev, generator=g)
        s_g = torch.rand(n, k // 128, device=dev, generator=g)
        assign = torch.randint(0, 256, (n, k // 4), device=dev, dtype=torch.uint8, generator=g)
        codebook = torch.randn(256, 4, device=dev, generator=g).half()
        fns = {
            "torch fp16": lambda: xh @ wh.t(),
            "torch bf16": lambda: xb @ wb.t(),
            "W8A8 gemm": lambda: kernels.w8a8_gemm(a, s_a, q8, s_w, out_dtype=torch.bfloat16),
            "W8A8 quant+gemm": lambda: kernels.w8a8_gemm(*kernels.act_quant(xb), q8, s_w, out_dtype=torch.bfloat16),
            "W4A8 gemm": lambda: kernels.w4a8_gemm(a, s_a, q4, s_w, out_dtype=torch.bfloat16),
            "W4A8 quant+gemm": lambda: kernels.w4a8_gemm(*kernels.act_quant(xb), q4, s_w, out_dtype=torch.bfloat16),
            "W4A16 g128": lambda: kernels.w4a16_gemm(xb, q4, s_g),
            "VQ d=4": lambda: kernels.vq_gemm(xb, assign, codebook),
        }
        ms = {key: triton.testing.do_bench(fn) for key, fn in fns.items()}
        ops = 2 * m * n * k / 1e12
        row = {"layer": name, "K→N": f"{k}→{n}"}
        row.update({f"{key} TOP/s": ops / (v / 1e3) for key, v in ms.items()})
        row.update({f"{key} / bf16": ms["torch bf16"] / v for key, v in ms.items() if not key.startswith("torch")})
        rows.append(row)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=512, help="tokens per GEMM (default 2 × 256)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        from ditlab.bench import machine
        where = machine()
    except Exception:  # the benchmark itself needs only torch
        where = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"Command: `python benchmarks/bench_kernels.py --m {args.m} --repeats {args.repeats}` — {where}\n")
    print(markdown(bench_cpu(args.m, args.repeats), f"CPU, M = {args.m} (GOP/s; ratios = speed-up of the integer path)"))
    if torch.cuda.is_available():
        print()
        print(markdown(bench_cuda(args.m), f"CUDA {torch.cuda.get_device_name(0)}, M = {args.m} (TOP/s; ratios vs torch bf16)"))
    else:
        print("\n(no CUDA GPU: the Triton kernels are not timed; under the interpreter they are for checking only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
