"""DiT-XL/2 at scale, random weights (no download): quantization time, one CFG forward, peak memory. Printed tables.

    python benchmarks/bench_dit_xl.py [--repeats 3] [--threads 2] [--profile] [--work DIR]

1. Quantization time (parent process): build DiT-XL/2 (``ditlab.testing.dit_xl_2_config``, 675 M parameters,
   float32, seed 0), then ``quantize_`` every quantizable linear (196 of the 254: DEFAULT_SKIP keeps the
   timestep/class embedders and the final layer in FP) with ``w8a8-rtn`` (goal ≤ 60 s) and with ``w4a8-hadanorm``
   (goal ≤ 120 s, "without calibration": its statistics come from one FP forward of the CFG pair through
   ``calibration.calibrate(n_samples=1, steps=1)``, timed apart and not counted). The W8A8 model is saved as a QDIR.
2. One forward (one child process per variant, so that each one's memory is its own): the CFG pair of one 256×256
   image — latent (2, 4, 32, 32), classes (207, 1000 = null), timestep 500 — for the float32 model, the bfloat16
   model and the W8A8 model on the CPU integer path (loaded from the QDIR: built on the meta device, so the process
   never holds the float32 weights). Median and min of ``--repeats`` forwards after one warm-up.
3. Memory per child, from /proc/self/status: ``VmRSS`` right after the model is ready ("resident"), then the peak
   (``VmHWM``) is reset (``/proc/self/clear_refs`` ← 5) and read again after the forwards ("peak in forward" =
   resident weights + activations + temporaries). The bf16 child builds float32 first and converts; the float32
   pages are returned with ``malloc_trim`` before "resident" is read, and the peak is reset after that.
``--profile`` adds a torch.profiler breakdown of one W8A8 forward (top ops by self CPU time).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VARIANTS = ("fp32", "bf16", "w8a8 cpu-int")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def build_xl(dtype=torch.float32):
    """DiT-XL/2 with random weights (seed 0), eval mode, no grad."""
    from diffusers import DiTTransformer2DModel

    from ditlab.testing import dit_xl_2_config

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**dit_xl_2_config()).eval().requires_grad_(False)
    return model if dtype == torch.float32 else model.to(dtype)


def cfg_inputs(dtype=torch.float32) -> dict:
    """The CFG pair of one 256×256 image: latent (2, 4, 32, 32), classes (207, null=1000), t = 500."""
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, 32, 32, generator=g).to(dtype), timestep=torch.tensor([500, 500]),
                class_labels=torch.tensor([207, 1000]), return_dict=False)


def _pipe(model):
    from ditlab.models import Pipeline

    sched = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "clip_sample": False}
    return Pipeline(transformer=model, scheduler_config=sched, family="dit", source="DiT-XL/2 (random weights)")


# ---- parent: quantization times ------------------------------------------------------------------------------------
def quantize_times(work: Path) -> tuple[list[dict], Path]:
    from ditlab import qdir
    from ditlab.calibration import calibrate
    from ditlab.config import get_preset
    from ditlab.quantize import quantize_

    t0 = time.perf_counter()
    model = build_xl()
    t_build = time.perf_counter() - t0
    pipe = _pipe(model)
    rows = []
    t0 = time.perf_counter()  # wall time of the whole call: deep copy of the rest of the model included
    q8, rep8 = quantize_(model, "w8a8-rtn", progress=False)
    t8 = time.perf_counter() - t0
    rows.append({"recipe": "w8a8-rtn", "layers": len(rep8.layers), "seconds": t8, "goal s": 60, "goal": "met" if t8 <= 60 else "missed",
                 "packed / fp16": sum(r.bytes_packed for r in rep8.layers) / sum(r.bytes_fp16 for r in rep8.layers), "note": ""})
    t0 = time.perf_counter()
    out = qdir.save_quantized(q8, "w8a8-rtn", pipe, work / "xl-w8a8", overwrite=True)
    t_save = time.perf_counter() - t0
    del q8
    _trim()
    preset = get_preset("w4a8-hadanorm")
    # XᵀX only when the preset rounds with GPTQ: for all 254 linears it is ~7 GB of float64 (28 × 4608² for fc2 alone)
    gptq = preset.default.weight_rounding == "gptq"
    t0 = time.perf_counter()
    calib = calibrate(pipe, labels=[207], n_samples=1, steps=1, progress=False, use_cache=False, collect_xtx=gptq)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    q4, rep4 = quantize_(model, preset, calib, progress=False)
    t4 = time.perf_counter() - t0
    rounding = preset.default.weight_rounding
    rows.append({"recipe": "w4a8-hadanorm", "layers": len(rep4.layers), "seconds": t4, "goal s": 120, "goal": "met" if t4 <= 120 else "missed",
                 "packed / fp16": sum(r.bytes_packed for r in rep4.layers) / sum(r.bytes_fp16 for r in rep4.layers),
                 "note": f"weight rounding {rounding}; statistics from 1 FP forward ({t_cal:.1f} s, not counted)"})
    del q4, calib
    print(f"(built DiT-XL/2 in {t_build:.1f} s; saved the W8A8 QDIR in {t_save:.1f} s)", file=sys.stderr)
    return rows, out


# ---- children: one forward + memory --------------------------------------------------------------------------------
def child(variant: str, qdir_path: str, repeats: int, profile: bool) -> dict:
    from ditlab import backends

    t0 = time.perf_counter()
    if variant == "fp32":
        model, dtype = build_xl(), torch.float32
    elif variant == "bf16":
        model, dtype = build_xl(torch.bfloat16), torch.bfloat16
    else:
        from ditlab.qdir import load_quantized_transformer

        model, dtype = load_quantized_transformer(qdir_path), torch.float32
    t_load = time.perf_counter() - t0
    _trim()
    resident = _status_kb("VmRSS")
    _reset_peak()
    kwargs = cfg_inputs(dtype)
    ctx = backends.use_backend("cpu-int")
    times = []
    with ctx, torch.inference_mode():
        out = model(**kwargs)[0]  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**kwargs)
            times.append(time.perf_counter() - t0)
        peak = _status_kb("VmHWM")
        prof_rows = []
        if profile and variant.startswith("w8a8"):
            from torch.profiler import ProfilerActivity, profile as tprofile

            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                model(**kwargs)
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:14]:
                prof_rows.append({"op": e.key, "calls": e.count, "self ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total})
    return {"variant": variant, "load s": t_load, "median s": statistics.median(times), "min s": min(times),
            "resident MB": resident / 1024, "peak in forward MB": peak / 1024, "finite": bool(torch.isfinite(out.float()).all()),
            "profile": prof_rows}


def _md(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(keys) + " |\n|" + "|".join("---:" if isinstance(rows[0][k], (int, float)) else "---" for k in keys) + "|\n"
    return head + "".join("| " + " | ".join(fmt(r[k]) for k in keys) + " |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one W8A8 forward")
    ap.add_argument("--work", default=None, help="folder for the W8A8 QDIR (default: a temporary folder)")
    ap.add_argument("--skip-quantize", action="store_true", help="reuse WORK/xl-w8a8 (needs --work)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--qdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.qdir, args.repeats, args.profile)))
        return

    from ditlab.bench import machine

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_dit_xl_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.skip_quantize:
        qrows, qpath = [], work / "xl-w8a8"
    else:
        qrows, qpath = quantize_times(work)
        _trim()
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--qdir", str(qpath), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        if args.profile:
            cmd.append("--profile")
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode:
            sys.exit(f"child {variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    bf16 = next(r for r in results if r["variant"] == "bf16")
    fp32 = next(r for r in results if r["variant"] == "fp32")
    for r in results:
        r["vs fp32"] = fp32["median s"] / r["median s"]
        r["vs bf16"] = bf16["median s"] / r["median s"]
        r["peak vs fp32"] = r["peak in forward MB"] / fp32["peak in forward MB"]
    cmd = "python benchmarks/bench_dit_xl.py " + " ".join(a for a in sys.argv[1:])
    print(f"Command: `{cmd.strip()}` — {machine()} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    if qrows:
        print("Quantization time, DiT-XL/2 (random weights), every quantizable linear:\n")
        print(_md(qrows, ["recipe", "layers", "seconds", "goal s", "goal", "packed / fp16", "note"]))
    print("One forward, CFG pair of one 256×256 image (latent 2×4×32×32), speed-up = fp32 or bf16 seconds / this row's:\n")
    print(_md(results, ["variant", "median s", "min s", "vs fp32", "vs bf16", "resident MB", "peak in forward MB", "peak vs fp32", "load s"]))
    prof = next((r["profile"] for r in results if r["profile"]), None)
    if prof:
        print("W8A8 cpu-int forward, top ops by self CPU time (torch.profiler):\n")
        print(_md(prof, ["op", "calls", "self ms", "share"]))


if __name__ == "__main__":
    main()
