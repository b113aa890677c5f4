"""Every kernel compiles ahead of time to PTX and cubin for sm_80 (A100) and sm_90 (H100) on this GPU-less machine.

``python -m kernels.aot --json`` runs in its own process (compiled kernels, TRITON_INTERPRET unset), so this pytest
process never imports triton or the kernels (other test files may need them interpreted). The compiled signatures
are those the wrappers launch on DiT-XL/2 layer shapes (see kernels/aot.py). Triton caches cubins by source hash:
a cold run compiles 28 kernel variants (~25 s of CPU), a warm one only specialises and looks them up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_NAMES = {"w8a8_gemm", "w8a8_gemm_int32", "w4a8_gemm", "w4a8_gemm_int32", "w4a16_gemm", "vq_gemm", "act_quant",
                "hadamard"}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=850)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = [f"{r['kernel']} [{r['variant']}] {r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failures, "\n".join(failures)
    assert proc.returncode == 0
    compiled = {(r["kernel"], r["arch"]) for r in rows if r["ok"] and r["cubin_bytes"] > 0 and r["ptx_bytes"] > 0}
    assert compiled == {(k, a) for k in KERNEL_NAMES for a in ("sm_80", "sm_90")}
