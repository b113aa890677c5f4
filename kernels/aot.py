"""Ahead-of-time compilation of every kernel for sm_80 (A100) and sm_90 (H100) on a machine without a GPU.

Each case calls a kernel wrapper on tiny CPU tensors shaped like a DiT-XL/2 layer inside ``_launch.recording()``;
the wrapper validates its inputs, picks its configuration and records the launch instead of running it. The
recorded parameters are specialised exactly as Triton's JIT would (pointer/int alignment to 16, ints equal to 1 and
None become constexprs) and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` to
PTX and a cubin (ptxas is bundled with Triton). So a GPU user runs the very signatures compiled here.

Compilation needs compiled (not interpreted) kernels, hence a process without ``TRITON_INTERPRET``: ``run_aot()``
starts one (``python -m kernels.aot --json``); ``python -m kernels.aot`` prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ARCHS = (80, 90)
REPO_ROOT = Path(__file__).resolve().parent.parent


def _cases() -> list[tuple[str, str, Callable[[], object]]]:
    """(kernel, variant, thunk): wrapper calls covering every constexpr path a DiT layer uses."""
    import importlib

    import torch

    # the package re-exports functions under the module names, so import the modules by path
    aq, had, vq, w4a8, w4a16, w8a8 = (importlib.import_module(f"{__package__}.{m}") for m in (
        "act_quant", "hadamard", "vq_gemm", "w4a8_gemm", "w4a16_gemm", "w8a8_gemm"))

    tok, k, n = 512, 1152, 1152  # 2 samples × 256 tokens of DiT-XL/2, hidden 1152
    return [
        ("w8a8_gemm", "per-channel asym, bias, mean-corr, bf16 out",
         lambda: w8a8.w8a8_gemm(**w8a8.example_inputs((tok, n, k), out_dtype=torch.bfloat16))),
        ("w8a8_gemm", "group 128 sym, fp16 out, small M",
         lambda: w8a8.w8a8_gemm(**w8a8.example_inputs((2, n, k), group_size=128, zero=False, bias=False,
                                                      samples=None, out_dtype=torch.float16))),
        ("w8a8_gemm_int32", "group 128 asym",
         lambda: w8a8.w8a8_gemm_int32(**w8a8.example_inputs_int32((tok, n, k), group_size=128))),
        ("w4a8_gemm", "per-channel asym, bias, mean-corr, bf16 out",
         lambda: w4a8.w4a8_gemm(**w4a8.example_inputs((tok, n, k), out_dtype=torch.bfloat16))),
        ("w4a8_gemm", "group 64 sym, fp32 out",
         lambda: w4a8.w4a8_gemm(**w4a8.example_inputs((tok, 4 * n, k), group_size=64, zero=False, samples=None))),
        ("w4a8_gemm_int32", "group 128 asym",
         lambda: w4a8.w4a8_gemm_int32(**w4a8.example_inputs_int32((tok, n, k), group_size=128))),
        ("w4a16_gemm", "bf16 x, group 128 asym, bias",
         lambda: w4a16.w4a16_gemm(**w4a16.example_inputs((tok, n, k), group_size=128, dtype=torch.bfloat16))),
        ("w4a16_gemm", "fp32 x (IEEE dot), per-channel sym",
         lambda: w4a16.w4a16_gemm(**w4a16.example_inputs((tok, n, k), zero=False))),
        ("vq_gemm", "bf16 x, d=4, 256 codes, bias",
         lambda: vq.vq_gemm(**vq.example_inputs((tok, n, k), d=4, dtype=torch.bfloat16))),
        ("vq_gemm", "fp16 x, d=2, 64 codes (6-bit packed indices), fp32 codebook",
         lambda: vq.vq_gemm(**vq.example_inputs((tok, n, k), d=2, codes=64, dtype=torch.float16,
                                                codebook_dtype=torch.float32, index_bits=6))),
        ("act_quant", "8-bit, mean + sigma + Hadamard 128 + signs, one tile",
         lambda: aq.act_quant(**aq.example_inputs((tok, k), fused=True, hadamard_block=128))),
        ("act_quant", "4-bit bf16 x, K=4608 in tiles (two passes)",
         lambda: aq.act_quant(**aq.example_inputs((tok, 4 * k), bits=4, dtype=torch.bfloat16))),
        ("act_quant", "8-bit static scale",
         lambda: aq.act_quant(**aq.example_inputs((tok, k), static=True))),
        ("hadamard", "bf16, block 128, signs",
         lambda: had.hadamard_transform(**had.example_inputs((tok, k), block=128, dtype=torch.bfloat16))),
    ]


def _specialise(launch) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes of a recorded launch, as Triton's JIT would derive them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = launch.params[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[param.name] = ty
        if ty == "constexpr":  # an int equal to 1, or None
            constexprs[param.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def compile_all(archs: tuple[int, ...] = ARCHS) -> list[dict]:
    """Compile every case for every arch in this process (kernels must not be interpreted); one row per pair."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._launch import is_interpreted, recording

    rows = []
    for kernel, variant, thunk in _cases():
        with recording() as launches:
            thunk()
        (launch,) = launches
        if is_interpreted(launch.kernel):
            raise RuntimeError("kernels.aot needs compiled kernels: run it in a process without TRITON_INTERPRET=1")
        signature, constexprs, attrs = _specialise(launch)
        for cc in archs:
            row = {"kernel": kernel, "variant": variant, "arch": f"sm_{cc}", "ok": False, "ptx_bytes": 0,
                   "cubin_bytes": 0, "seconds": 0.0, "error": ""}
            t0 = time.perf_counter()
            try:
                src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(launch.options))
                row.update(ok=bool(compiled.asm.get("cubin")), ptx_bytes=len(compiled.asm["ptx"]),
                           cubin_bytes=len(compiled.asm["cubin"]))
            except Exception as e:  # report, do not stop: the table shows every failure
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
    return rows


def run_aot(archs: tuple[int, ...] = ARCHS, timeout: float = 900.0) -> list[dict]:
    """``compile_all`` in a fresh process with TRITON_INTERPRET unset (works from an interpreted process too)."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "kernels.aot", "--json", "--archs", ",".join(map(str, archs))]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"kernels.aot failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    """A plain-text table of ``compile_all`` rows."""
    head = f"{'kernel':<16} {'variant':<52} {'arch':<6} {'ok':<4} {'PTX kB':>7} {'cubin kB':>8} {'s':>6}  error"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kernel']:<16} {r['variant'][:52]:<52} {r['arch']:<6} {'yes' if r['ok'] else 'NO':<4} "
                     f"{r['ptx_bytes'] / 1024:7.1f} {r['cubin_bytes'] / 1024:8.1f} {r['seconds']:6.2f}  {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(",") if a)
    rows = compile_all(archs) if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else run_aot(archs)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
