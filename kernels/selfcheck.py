"""Self-test of the kernels on the machine at hand: every kernel against its torch twin, plus AOT compilation.

``run_checks()`` returns one row per (kernel, shape, variant): the kernel runs under the Triton interpreter (in a
``TRITON_INTERPRET=1`` subprocess unless this process already interprets the kernels) on shapes that are and are not
multiples of its block sizes; integer outputs (accumulators, codes, scales) and the bit-exact twins (act_quant,
hadamard) must be equal, float outputs within the rounding of their dtype. The AOT columns say whether the kernel
compiled to cubin for sm_80 / sm_90 (``kernels.aot``, in its own process). ``python -m kernels.selfcheck`` prints
the table and exits 1 on any failure (the lead exposes it as ``python -m ditlab kernels --check``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# (kernel, shape, variant kwargs for example_inputs, block overrides). Shapes are small: the interpreter pays
# ~2 ms per program per k-step (more on a busy machine). "ragged" shapes are not multiples of the blocks.
CHECKS: list[tuple[str, tuple, dict, dict]] = [
    ("w8a8_gemm", (64, 64, 128), {}, {}),
    ("w8a8_gemm", (50, 70, 200), {"samples": 2}, {"block_m": 32, "block_n": 32, "block_k": 64}),
    ("w8a8_gemm", (40, 48, 192), {"group_size": 64, "out_dtype": "bfloat16", "samples": None}, {"block_m": 32}),
    ("w8a8_gemm_int32", (50, 70, 200), {}, {"block_m": 32, "block_n": 32, "block_k": 64}),
    ("w8a8_gemm_int32", (40, 48, 192), {"group_size": 32}, {}),
    ("w4a8_gemm", (64, 64, 128), {}, {}),
    ("w4a8_gemm", (50, 70, 200), {"out_dtype": "float16"}, {"block_m": 32, "block_n": 32, "block_k": 64}),
    ("w4a8_gemm", (40, 48, 192), {"group_size": 64, "zero": False}, {"block_m": 32}),
    ("w4a8_gemm_int32", (50, 70, 200), {}, {"block_m": 32, "block_n": 32, "block_k": 64}),
    ("w4a8_gemm_int32", (40, 48, 192), {"group_size": 32}, {}),
    ("w4a16_gemm", (64, 64, 128), {}, {}),
    ("w4a16_gemm", (50, 70, 200), {"dtype": "bfloat16"}, {"block_m": 32, "block_n": 32, "block_k": 64}),
    ("w4a16_gemm", (40, 48, 192), {"group_size": 64, "dtype": "float16"}, {}),
    ("vq_gemm", (64, 64, 128), {"d": 4}, {}),
    ("vq_gemm", (50, 70, 200), {"d": 8, "dtype": "bfloat16"}, {"block_m": 32, "block_n": 32, "block_k": 64}),
    ("vq_gemm", (40, 48, 192), {"d": 2, "codes": 64, "dtype": "float16", "codebook_dtype": "float32", "index_bits": 6}, {}),
    ("act_quant", (64, 1152), {"fused": True, "hadamard_block": 128}, {}),
    ("act_quant", (37, 200), {"bits": 4, "fused": True, "dtype": "bfloat16"}, {"block_m": 16, "block_k": 64}),
    ("act_quant", (30, 96), {"static": True}, {}),
    ("hadamard", (64, 1152), {"block": 128, "dtype": "bfloat16"}, {}),
    ("hadamard", (37, 96), {"block": 32}, {"block_m": 16, "block_k": 32}),
]

EXACT = {"w8a8_gemm_int32", "w4a8_gemm_int32", "act_quant", "hadamard"}  # twins reproduce every bit
RTOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}  # relative to max |ref|


def _dtype_kwargs(kw: dict) -> dict:
    import torch

    return {k: getattr(torch, v) if k in ("dtype", "out_dtype", "codebook_dtype") else v for k, v in kw.items()}


def _label(shape: tuple, blocks: dict) -> str:
    if not blocks:
        return "x".join(map(str, shape))
    return "x".join(map(str, shape)) + " / blocks " + "x".join(str(v) for v in blocks.values())


def check_one(kernel: str, shape: tuple, variant: dict, blocks: dict) -> dict:
    """Run one kernel and its twin on the same inputs; the row of the table (ok, max error, exact)."""
    import torch

    from . import KERNELS

    entry = KERNELS[kernel]
    row = {"kernel": kernel, "shape": _label(shape, blocks), "variant": ", ".join(f"{k}={v}" for k, v in variant.items()),
           "ok": False, "exact": None, "max_error": None, "seconds": 0.0, "error": ""}
    t0 = time.perf_counter()
    try:
        kw = entry.example_inputs(shape, seed=0, **_dtype_kwargs(variant))
        got, want = entry.wrapper(**kw, **blocks), entry.ref(**kw)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        exact = all(g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want))
        err = max(float((g.double() - w.double()).abs().max()) if g.numel() else 0.0 for g, w in zip(got, want))
        row.update(exact=exact, max_error=err)
        if kernel in EXACT or not got[0].is_floating_point():
            row["ok"] = exact
        else:
            scale = max(float(w.double().abs().max()) for w in want) or 1.0
            row["ok"] = got[0].shape == want[0].shape and err <= RTOL[str(got[0].dtype).replace("torch.", "")] * scale
    except Exception as e:  # a failing kernel is a row, not a crash
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def interpreted_rows() -> list[dict]:
    """Every CHECKS row under the interpreter: in this process if it interprets the kernels, else in a subprocess."""
    from . import interpreted

    if interpreted():
        return [check_one(*c) for c in CHECKS]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "kernels.selfcheck", "--interpret-only", "--json"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    if not proc.stdout.strip():
        raise RuntimeError(f"the interpreter subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_checks(aot: bool = True) -> list[dict]:
    """Rows (kernel, shape, variant, ok, exact, max_error, sm_80, sm_90, …); sm_* are None when ``aot`` is False."""
    rows = interpreted_rows()
    compiled: dict[tuple[str, str], bool] = {}
    if aot:
        from .aot import run_aot

        for r in run_aot():
            key = (r["kernel"], r["arch"])
            compiled[key] = compiled.get(key, True) and r["ok"]
    for row in rows:
        for arch in ("sm_80", "sm_90"):
            row[arch] = compiled.get((row["kernel"], arch)) if aot else None
    return rows


def failed(rows: list[dict]) -> list[dict]:
    """Rows whose numerics or compilation failed."""
    return [r for r in rows if not r["ok"] or r.get("sm_80") is False or r.get("sm_90") is False]


def format_table(rows: list[dict]) -> str:
    """Plain-text table: kernel, shape, variant, max error (or 'exact'), compiled for sm_80/sm_90."""
    def yn(v):
        return "-" if v is None else ("yes" if v else "NO")

    head = f"{'kernel':<16} {'shape':<32} {'variant':<44} {'result':<16} {'sm_80':<6} {'sm_90':<6} {'s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            result = "ERROR"
        elif r["exact"]:
            result = "exact"
        else:
            result = f"err {r['max_error']:.2e}"
        result = result if r["ok"] else f"FAIL {result}"
        lines.append(f"{r['kernel']:<16} {r['shape']:<32} {r['variant'][:44]:<44} {result:<16} "
                     f"{yn(r.get('sm_80')):<6} {yn(r.get('sm_90')):<6} {r['seconds']:6.2f}")
        if r["error"]:
            lines.append(f"    {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-aot", action="store_true", help="skip the sm_80/sm_90 compilation")
    parser.add_argument("--interpret-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess's job
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    args = parser.parse_args(argv)
    rows = interpreted_rows() if args.interpret_only else run_checks(aot=not args.no_aot)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
