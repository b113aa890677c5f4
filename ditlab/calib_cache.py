"""Disk cache of calibration statistics: one safetensors file + one JSON sidecar per entry.

Layout: ``<cache_dir>/calibration/<key>.safetensors`` and ``<key>.json``. The key is a hash of the model identity
(transformer config + weight fingerprint) and the calibration settings, so a changed model or setting never hits a
stale entry.

Crash safety: each file is written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX). The sidecar is written *last* and carries the SHA-256 of the tensor file, so an
entry is only ever read back when both files are complete and agree: a crash between the two renames leaves an
orphaned tensor file (a miss), a torn or edited file fails the checksum (a miss, logged, recomputed). Temporary
files carry the writer's pid; the next ``save`` removes those of writers that no longer run (killed mid-write).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .atomic import remove_left_by_dead_processes, save_safetensors
from .atomic import write_atomic as _atomic_write  # the name the fault tests patch

log = logging.getLogger(__name__)

SEP = "::"  # separates layer name, field and per-timestep parts in tensor keys (layer names contain dots)
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$DITLAB_CACHE`` or ``~/.cache/ditlab``."""
    return Path(os.environ.get("DITLAB_CACHE") or Path.home() / ".cache" / "ditlab")


def entry_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """(tensor file, JSON sidecar) of the entry ``key``."""
    folder = Path(cache_dir) / "calibration"
    return folder / f"{key}.safetensors", folder / f"{key}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_stale(folder: Path) -> None:
    """Deletes temporary files of writers that were killed mid-write (their pid no longer runs)."""
    remove_left_by_dead_processes(folder.glob(".*.tmp"), lambda p: p.name[: -len(".tmp")].rsplit(".", 1)[-1].split("-")[0])


def flatten(layers: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """LayerStats field dicts → (flat tensor dict for safetensors, {layer: n_rows})."""
    tensors, n_rows = {}, {}
    for name, fields in layers.items():
        n_rows[name] = int(fields["n_rows"])
        for field, value in fields.items():
            if field == "per_timestep":
                for ts, branches in value.items():
                    for branch, d in branches.items():
                        for sub, tensor in d.items():
                            tensors[SEP.join([name, "pt", str(ts), branch, sub])] = tensor.contiguous()
            elif isinstance(value, torch.Tensor):
                tensors[SEP.join([name, field])] = value.contiguous()
    return tensors, n_rows


def unflatten(tensors: dict[str, torch.Tensor], n_rows: dict[str, int]) -> dict[str, dict]:
    """Inverse of ``flatten``: {layer: field dict}; fields absent from the file (xtx when not collected) are None."""
    layers: dict[str, dict] = {name: {"n_rows": int(n), "xtx": None, "per_timestep": {}} for name, n in n_rows.items()}
    for key, tensor in tensors.items():
        parts = key.split(SEP)
        fields = layers[parts[0]]
        if len(parts) == 5 and parts[1] == "pt":
            fields["per_timestep"].setdefault(int(parts[2]), {}).setdefault(parts[3], {})[parts[4]] = tensor
        else:
            fields[parts[1]] = tensor
    return layers


def save(cache_dir: str | os.PathLike, key: str, layers: dict[str, dict], meta: dict) -> bool:
    """Writes an entry atomically; returns False (and logs) if the disk refuses (full, read-only) — never raises OSError."""
    tensor_path, json_path = entry_paths(cache_dir, key)
    try:
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(tensor_path.parent)
        tensors, n_rows = flatten(layers)
        _atomic_write(tensor_path, lambda tmp: save_safetensors(tensors, tmp))
        sidecar = {"format": CACHE_FORMAT, "key": key, "sha256": _sha256(tensor_path), "n_rows": n_rows,
                   "layer_order": list(n_rows), **meta}  # JSON dicts get sorted; the list keeps module order
        _atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1, sort_keys=True)))
        return True
    except OSError as exc:
        log.warning("calibration cache: cannot write %s (%s); continuing without caching", tensor_path, exc)
        return False


def load(cache_dir: str | os.PathLike, key: str) -> tuple[dict[str, dict], dict] | None:
    """(layers field dicts, sidecar dict) of a complete, checksum-verified entry; None on a miss or a bad entry."""
    from safetensors.torch import load_file

    tensor_path, json_path = entry_paths(cache_dir, key)
    if not json_path.is_file():
        return None
    try:
        sidecar = json.loads(json_path.read_text())
        if sidecar.get("format") != CACHE_FORMAT or sidecar.get("key") != key:
            raise ValueError("format or key mismatch")
        if _sha256(tensor_path) != sidecar["sha256"]:
            raise ValueError("checksum mismatch")
        n_rows = {name: sidecar["n_rows"][name] for name in sidecar["layer_order"]}
        layers = unflatten(load_file(str(tensor_path)), n_rows)
        return layers, sidecar
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is a miss that gets recomputed
        log.warning("calibration cache: entry %s is corrupt (%s: %s); recomputing", key, type(exc).__name__, exc)
        for path in (json_path, tensor_path):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        return None
