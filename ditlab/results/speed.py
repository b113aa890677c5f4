"""Part 3: speed and memory on this machine — DiT-XL/2 (random weights) quantization time per method, one forward on
the CPU integer path vs fp32 and bf16, peak memory (``benchmarks/bench_dit_xl.py``), GEMM throughputs
(``benchmarks/bench_kernels.py``), and a GPU section filled on a CUDA machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import REPO, Part, ResultsSettings, Say, caption, md_table, repo_script

XL_SCRIPT = "benchmarks/bench_dit_xl.py"


def run_xl(settings: ResultsSettings, say: Say) -> dict:
    """Runs the DiT-XL/2 benchmark in its own process (its peak memory is then its own) and keeps its markdown."""
    path = REPO / XL_SCRIPT
    if not path.is_file():
        say(f"[speed] {XL_SCRIPT} is not in this checkout: DiT-XL/2 rows left as TODO")
        return {"status": "missing", "script": XL_SCRIPT}
    cmd = [sys.executable, str(path), *settings.xl_args]
    say(f"[speed] DiT-XL/2: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    out = {"status": "ok" if proc.returncode == 0 else "failed", "script": XL_SCRIPT, "args": list(settings.xl_args),
           "command": " ".join(["python", XL_SCRIPT, *settings.xl_args]), "returncode": proc.returncode,
           "seconds": time.perf_counter() - t0, "markdown": proc.stdout.strip()}
    if proc.returncode:
        out["stderr_tail"] = proc.stderr.strip().splitlines()[-15:]
        say(f"[speed] DiT-XL/2 benchmark failed (exit {proc.returncode}); its stderr is kept in the document")
    return out


BLOCK_PRESETS = ("w8a8-rtn", "w8a8-rtn-static", "w8a8-smoothquant", "w8a8-viditq", "w4a8-rtn", "w4a8-hadamard", "w4a8-hadanorm",
                 "w4a8-viditq", "w4a16-gptq", "w4a4-svd", "bnb-int8", "bnb-nf4", "w2-kmeans", "w3-kmeans")


def method_times(presets=BLOCK_PRESETS, say: Say = print) -> dict:
    """Quantize time per preset for ONE DiT-XL/2 block (hidden 1152, random weights, seed 0): its 7 linears
    (q, k, v, out, fc1, fc2, adaLN). Statistics (for the methods that need them) from one FP forward of the CFG pair
    (``calibrate(n_samples=1, steps=1)``, timed apart). ×28 extrapolates to the 28 blocks of DiT-XL/2 (what
    ``bench_dit_xl.py`` measures in full for w8a8-rtn and w4a8-hadanorm). ``w2-vq4dit`` = ``w2-kmeans`` + its
    zero-data calibration (sampling with the model), which is not timed here."""
    from diffusers import DiTTransformer2DModel

    from ..calibration import calibrate
    from ..models import Pipeline
    from ..quantize import layers_needing_stats, quantize_
    from ..testing import dit_xl_2_config

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**dit_xl_2_config(), "num_layers": 1}).eval().requires_grad_(False)
    sched = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "clip_sample": False}
    pipe = Pipeline(transformer=model, scheduler_config=sched, family="dit", source="DiT-XL/2 one block (random weights)")
    t0 = time.perf_counter()
    calib = calibrate(pipe, labels=[207], n_samples=1, steps=1, progress=False, use_cache=False)
    t_cal = time.perf_counter() - t0
    rows = []
    for name in presets:
        t0 = time.perf_counter()
        _, report = quantize_(model, name, calib if layers_needing_stats(model, name) else None, progress=False)
        sec = time.perf_counter() - t0
        block = [r for r in report.layers if r.name.startswith("transformer_blocks.0.")]
        rows.append({"recipe": name, "block linears": len(block), "seconds (1 block)": sec, "× 28 blocks (s)": 28 * sec,
                     "packed / fp16": report.ratio})
        say(f"[speed] DiT-XL/2 block, {name}: {sec:.2f} s")
    return {"rows": rows, "calibration_s": t_cal, "params": sum(p.numel() for p in model.parameters())}


def run(settings: ResultsSettings, results_dir: Path, say: Say) -> dict:
    part = Part("speed", settings, results_dir)
    kernels = repo_script("benchmarks/bench_kernels.py")
    part.data["dit_xl"] = {"status": "pending" if settings.xl else "skipped", "script": XL_SCRIPT}
    if kernels is None:  # cheapest first, each saved, so an interrupted run keeps what finished
        part.data["kernels_cpu"] = None
    else:
        say(f"[speed] GEMM throughput on DiT-XL/2 layer shapes (M = {settings.kernel_m}, {settings.kernel_repeats} repeats)")
        part.data["kernels_cpu"] = kernels.bench_cpu(settings.kernel_m, settings.kernel_repeats)
    part.save()
    if settings.xl:  # --no-xl skips both DiT-XL/2 measurements
        part.data["block_times"] = method_times(say=say)
        part.save()
        part.data["dit_xl"] = run_xl(settings, say)
        part.save()
    part.data["cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available() and kernels is not None:
        say("[speed] CUDA: Triton kernels vs torch")
        part.data["kernels_cuda"] = kernels.bench_cuda(settings.kernel_m)
        part.data["gpu"] = torch.cuda.get_device_name(0)
    part.complete = True
    part.save()
    return part.doc()


def _rows_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return md_table(keys, [[fmt(r[k]) for k in keys] for r in rows], "ll" + "r" * (len(keys) - 2))


def render(doc: dict | None) -> str:
    head = "## 3. Speed and memory\n\n"
    if not doc:
        return head + "Not run yet: `python -m ditlab bench speed`.\n"
    d = doc["data"]
    parts = [head + caption(doc) + "\n\nTimes are medians of one run; compare ratios within a table (the machine may be shared).\n"]
    xl = d.get("dit_xl") or {}
    parts.append("### DiT-XL/2 (random weights): quantization time per method, one forward (cpu-int vs fp32 / bf16), peak memory\n")
    if xl.get("status") == "ok":
        parts.append(f"`{xl['command']}`, run by the command above as a child process ({xl['seconds']:.0f} s); its output:\n\n{xl['markdown']}\n")
    elif xl.get("status") == "failed":
        tail = "\n".join(xl.get("stderr_tail", []))
        parts.append(f"**Failed** (`{xl['command']}`, exit {xl['returncode']}); last lines of its stderr:\n\n```\n{tail}\n```\n")
    elif xl.get("status") == "pending":
        parts.append(f"Not finished: the run was interrupted before `{XL_SCRIPT}` completed (rerun `python -m ditlab bench speed`).\n")
    elif xl.get("status") == "skipped":
        parts.append(f"Not run (`--no-xl`); `python -m ditlab bench speed` runs `{XL_SCRIPT}`.\n")
    else:
        parts.append(md_table(["row", "status"], [["DiT-XL/2 quantize time per method, forward cpu-int vs fp32/bf16, peak memory",
                                                  f"**TODO**: `{XL_SCRIPT}` was not in the checkout when this ran; `python -m ditlab bench speed` fills it when present"]], "ll") + "\n")
    bt = d.get("block_times")
    if bt:
        parts.append("### Quantization time per method, one DiT-XL/2 block (random weights)\n")
        parts.append("`ditlab.results.speed.method_times`: `quantize_` of the 7 linears of one block (hidden 1152, MLP 4608, adaLN 6912; "
                     f"statistics from one FP forward, {bt['calibration_s']:.1f} s, not counted). The last column ×28 estimates all "
                     "blocks; the full-model rows above are measured.\n\n" + _rows_table(bt["rows"]) + "\n")
    parts.append(f"### GEMM throughput on DiT-XL/2 layer shapes, CPU (GOP/s; ratios = speed-up of the integer path)\n")
    if d.get("kernels_cpu"):
        parts.append(f"Measured by `benchmarks/bench_kernels.py` (`bench_cpu(m={doc['settings']['kernel_m']}, repeats={doc['settings']['kernel_repeats']})`),"
                     " the same numbers as `python -m ditlab bench kernels`.\n\n" + _rows_table(d["kernels_cpu"]) + "\n")
    else:
        parts.append("Not run: benchmarks/bench_kernels.py is missing.\n")
    parts.append("### GPU\n")
    if d.get("kernels_cuda"):
        parts.append(f"{d.get('gpu')}: Triton kernels vs torch (TOP/s; ratios vs torch bf16), `bench_cuda(m={doc['settings']['kernel_m']})`.\n\n"
                     + _rows_table(d["kernels_cuda"]) + "\n")
    else:
        parts.append("Not run: no CUDA device on this machine. The same command fills this section on a CUDA machine "
                     "(Triton W8A8 / W4A8 / W4A16 / VQ kernels vs torch fp16 / bf16).\n")
    return "\n".join(parts)
