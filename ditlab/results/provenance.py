"""Where and on what a results part was measured: the machine line, the UTC date, and the model's provenance (its
folder's last git commit and a fingerprint of its weights), so a part measured on an earlier model can be marked."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent.parent


@functools.lru_cache(maxsize=1)
def machine_info() -> dict:
    """CPU model (lscpu), cores, torch threads, GPU, torch version."""
    cpu, cores = platform.processor() or platform.machine(), os.cpu_count()
    if shutil.which("lscpu"):
        try:
            text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            cpu = fields.get("Model name", cpu)
            cores = int(fields.get("CPU(s)", cores))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__}


def machine_line(m: dict) -> str:
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    return f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {gpu}, torch {m['torch']}"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def model_provenance(source: str) -> dict:
    """Which model: the source, its last git commit (when it is a folder of this repository) and a fingerprint of its
    transformer weights (sha256 of the safetensors files, 12 hex digits; None when there are none)."""
    from ..models import SHIPPED_ALIASES, SHIPPED_MODEL

    folder = Path(SHIPPED_MODEL if source in SHIPPED_ALIASES else source)
    out = {"source": source, "commit": None, "weights": None}
    if folder.exists():
        try:
            res = subprocess.run(["git", "log", "-1", "--format=%h %ad %s", "--date=format:%Y-%m-%d %H:%M", "--", str(folder.resolve())],
                                 capture_output=True, text=True, timeout=20, cwd=REPO)
            out["commit"] = res.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
        files = sorted(folder.glob("transformer/*.safetensors"))
        if files:
            digest = hashlib.sha256()
            for f in files:
                digest.update(f.read_bytes())
            out["weights"] = digest.hexdigest()[:12]
    return out


@functools.lru_cache(maxsize=8)
def _current_provenance(source: str) -> dict:
    return model_provenance(source)


def measured_on_current_model(doc: dict) -> bool | None:
    """Whether a part document was measured on the weights its model source holds now (None: cannot tell).

    Documents written before weight fingerprints were recorded are compared by the model folder's last commit."""
    model = doc.get("model") or {}
    if not model.get("source"):
        return None
    now = _current_provenance(model["source"])
    if model.get("weights") and now.get("weights"):
        return model["weights"] == now["weights"]
    if model.get("commit") and now.get("commit"):
        return model["commit"] == now["commit"]
    return None
