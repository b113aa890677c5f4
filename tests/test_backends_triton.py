"""The Triton kernels as an execution path: under the interpreter (CPU) a quantized model's images equal the CPU
integer path's (bit for bit on W8A8/W4A8 latents; within float rounding for weight-only and VQ layers).

Triton is interpreted or compiled for a whole process, so the check runs in a child started with
DITLAB_BACKEND=triton-interpret (which sets TRITON_INTERPRET=1 before anything imports triton).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, torch
from ditlab import api, backends
out = {"available": backends.available()}
pipe = api.load("shipped")
for preset in ["w8a8-rtn", "w4a8-rtn", "w4a16-rtn", "w2-kmeans"]:
    q = api.quantize(pipe, preset, progress=False)
    with backends.use_backend("cpu-int"):
        a = api.generate(q.pipe, [6], steps=2, progress=False)
    with backends.use_backend("triton-interpret") as used:
        b = api.generate(q.pipe, [6], steps=2, progress=False)
    out[preset] = {"used": used, "latent_max_diff": float((a.latents - b.latents).abs().max()),
                   "pixel_max_diff": int((a.images.int() - b.images.int()).abs().max())}
print(json.dumps(out))
"""


def test_triton_interpreter_path_matches_the_cpu_integer_path():
    env = dict(os.environ, HF_HUB_OFFLINE="1", DITLAB_BACKEND="triton-interpret", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "triton-interpret" in result["available"]
    for preset in ("w8a8-rtn", "w4a8-rtn"):  # integer GEMMs: identical accumulators and epilogue order
        assert result[preset]["used"] == "triton-interpret"
        assert result[preset]["latent_max_diff"] == 0.0 and result[preset]["pixel_max_diff"] == 0, (preset, result[preset])
    for preset in ("w4a16-rtn", "w2-kmeans"):  # float dots: summation order differs
        assert result[preset]["latent_max_diff"] < 1e-3 and result[preset]["pixel_max_diff"] <= 1, (preset, result[preset])


def test_without_the_interpreter_the_triton_paths_are_refused_with_a_clear_message():
    from ditlab import backends
    from ditlab.errors import ConfigError

    if "triton-interpret" in backends.available():  # this process was started in interpreter mode
        return
    try:
        with backends.use_backend("triton-interpret"):
            raise AssertionError("expected a ConfigError")
    except ConfigError as exc:
        assert exc.field == "backend" and "cpu-int" in str(exc) and "DITLAB_BACKEND=triton-interpret" in str(exc)
