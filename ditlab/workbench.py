"""Session-level logic of the app that is not layout: recipe table edits, recipe JSON import/export, request limits,
the per-session cache of quantized models, QDIR zip export/import, and the data behind the analysis views.

Pure functions over ditlab objects returning data (DataFrames, Recipes, plotly figures, paths); nothing here imports
gradio, so every piece is testable without a browser. Every user mistake raises a ``DitlabError`` (usually a
``ConfigError`` naming the field) with a one-line message that the app shows next to the control.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from .atomic import write_atomic
from .config import METHOD_NAMES, PRESETS, Recipe, check_field, get_preset, load_recipe
from .errors import ConfigError, DitlabError, ModelLoadError
from .models import LAYER_KINDS, Pipeline, list_linears
from .plan_table import frame_to_recipe, plan_to_frame
from .public import Limits, RateLimiter, allowed_dirs, check_request, check_server_path, check_source, client_address, limits, real_number, safe_name, whole_number  # noqa: F401 - policy lives in ditlab.public
from .sampling import DEFAULT_SCHEDULER

TABLE_COLUMNS = ("name", "kind", "shape", "method", "w_bits", "a_bits", "w_group_size", "a_granularity")
EDITABLE = ("method", "w_bits", "a_bits", "w_group_size", "a_granularity")
MODEL_KINDS = ("shipped", "local folder", "hub id")
BULK_TARGETS = ("all", "qkv", "out", "fc1", "fc2", "adaLN", "block 0")
_SETTING_HELP = "tokens like 'W8', 'W4A8', 'A16', 'FP', a method name (rtn, hadanorm, viditq, …), 'g64', 'per-channel', 'per-tensor'"


# ---------------------------------------------------------------- models
def model_source(kind: str, text: str | None) -> str:
    """The source string for ``api.load`` from the Model tab's choice (shipped / local folder / hub id)."""
    text = (text or "").strip()
    if kind == "shipped":
        return "shipped"
    if kind not in MODEL_KINDS:
        raise ConfigError.invalid("model source", kind, ", ".join(MODEL_KINDS))
    if not text:
        raise ConfigError.invalid(kind, text, "a folder path" if kind == "local folder" else "a hub id such as facebook/DiT-XL-2-256")
    if kind == "local folder":
        checked = check_source(text, field=kind)  # public mode: only folders under the allowlist
        folder = Path(checked).expanduser().resolve()
        if not folder.is_dir():
            raise ModelLoadError(f"local folder = {text!r} does not exist or is not a folder")
        return str(folder)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?", text):  # the Hub's repo id form
        raise ConfigError.invalid(kind, text, "a hub id such as facebook/DiT-XL-2-256 (letters, digits, '-', '_', '.'; at most 96 per part)")
    return check_source(text, field=kind)  # public mode: only allowlisted hub ids


def model_markdown(info: dict) -> str:
    """A short description of a model (from ``api.model_info``)."""
    labels = ", ".join(info["labels"].values()) or "text prompts"
    return (f"**{info['transformer']}** from `{info['source']}` · {info['num_layers']} blocks, hidden {info['hidden_size']}, "
            f"{info['sample_size']}×{info['sample_size']}×{info['in_channels']} {'latents' if info['has_vae'] else 'pixels'}, "
            f"patch {info['patch_size']} · {info['params'] / 1e6:.2f} M parameters, {info['num_linears']} linear layers · classes: {labels}")


def memory_frame(pipe: Pipeline, recipe: Recipe) -> pd.DataFrame:
    """Weight memory of the linear layers: FP32 as loaded, FP16, and this recipe's ideal size (bits × weights)."""
    infos = list_linears(pipe.transformer)
    plan = recipe.resolve(infos)
    n = sum(i.out_features * i.in_features for i in infos)
    ideal = sum(i.out_features * i.in_features * (16 if plan[i.name] is None or plan[i.name].is_fp else plan[i.name].w_bits) / 8 for i in infos)
    quantized = sum(1 for i in infos if plan[i.name] is not None and not plan[i.name].is_fp)
    rows = [("FP32 (as loaded)", 4 * n), ("FP16", 2 * n), (f"recipe {recipe.name} (ideal: bits × weights, no scales)", int(ideal))]
    df = pd.DataFrame([{"weights": k, "MB": round(b / 1e6, 3), "vs FP16": f"{b / (2 * n):.2f}×"} for k, b in rows])
    df.attrs["quantized_layers"] = quantized
    return df


def layers_frame(pipe: Pipeline, recipe: Recipe) -> pd.DataFrame:
    """The Model tab's table: name, kind, shape, parameters and the setting ``recipe`` gives each linear layer."""
    infos = list_linears(pipe.transformer)
    plan = recipe.resolve(infos)
    rows = [{"name": i.name, "kind": i.kind, "shape": f"{i.out_features}×{i.in_features}", "parameters": i.params,
             "setting": "fp (skipped)" if plan[i.name] is None else plan[i.name].short()} for i in infos]
    return pd.DataFrame(rows, columns=["name", "kind", "shape", "parameters", "setting"])


# ---------------------------------------------------------------- recipe table
def recipe_table(pipe: Pipeline, recipe: Recipe) -> pd.DataFrame:
    """The editable per-layer table of ``recipe`` on ``pipe`` (skipped layers show as fp)."""
    infos = list_linears(pipe.transformer)
    full = plan_to_frame(recipe.resolve(infos), infos)
    table = full[list(TABLE_COLUMNS)].copy()
    table["w_group_size"] = ["per-channel" if g is None or (isinstance(g, float) and math.isnan(g)) else str(int(g)) for g in full["w_group_size"]]
    table["w_bits"] = full["w_bits"].astype(int)
    table["a_bits"] = full["a_bits"].astype(int)
    return table


def _as_frame(table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, dict) and "headers" in table and "data" in table:
        return pd.DataFrame(table["data"], columns=table["headers"])
    raise ConfigError.invalid("table", type(table).__name__, "the per-layer table (columns " + ", ".join(TABLE_COLUMNS) + ")")


def table_recipe(pipe: Pipeline, table, base: Recipe) -> Recipe:
    """The Recipe of an edited table: ``base`` plus one exact-name override per changed row (validated on ``pipe``)."""
    table = _as_frame(table)
    infos = list_linears(pipe.transformer)
    missing = [c for c in ("name",) + EDITABLE if c not in table.columns]
    if missing:
        raise ConfigError.invalid("table column", missing[0], "the columns " + ", ".join(TABLE_COLUMNS))
    if [str(n) for n in table["name"]] != [i.name for i in infos]:
        raise ConfigError.invalid("table rows", f"{len(table)} rows", f"the {len(infos)} layers of the model in order (reload the preset)")
    for name, method, gran in zip(table["name"], table["method"], table["a_granularity"]):  # also on fp rows, which
        check_field("method", str(method).strip(), layer=str(name))  # frame_to_recipe reads as FP whatever the text
        check_field("a_granularity", str(gran).strip(), layer=str(name))
    full = plan_to_frame(base.resolve(infos), infos).astype({c: object for c in EDITABLE})
    for col in EDITABLE:
        full[col] = list(table[col])
    recipe = frame_to_recipe(full, base)
    if recipe.overrides == base.overrides and recipe.skip == base.skip:
        return base
    recipe.resolve(infos)
    return recipe


def same_table(table, shown: pd.DataFrame) -> bool:
    """Whether the table as the user has it reads cell for cell (as trimmed text) like ``shown``, the table of the
    recipe it gives; False when a row was normalised, e.g. method fp typed on a W4A8 row shows 16/16 bits."""
    table = _as_frame(table)
    if list(table.columns) != list(shown.columns) or len(table) != len(shown):
        return False
    def text(v) -> str:
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()

    return all(text(a) == str(b) for col in shown.columns for a, b in zip(table[col], shown[col]))


def parse_setting(text: str) -> dict:
    """'W4A8', 'fp', 'hadanorm W4 A4 g64', 'W8' … → LayerConfig fields (each checked, so 'A3' names a_bits)."""
    fields: dict = {}
    tokens = [t for t in re.split(r"[\s,]+", (text or "").strip()) if t]
    if not tokens:
        raise ConfigError.invalid("setting", text, _SETTING_HELP)
    set_by: dict = {}  # field → the token that set it
    for tok in tokens:
        low = tok.lower()
        if low in METHOD_NAMES:
            update = {"method": low}
        elif m := re.fullmatch(r"w(\d+)(?:a(\d+))?", low):
            update = {"w_bits": int(m.group(1)), **({"a_bits": int(m.group(2))} if m.group(2) else {})}
        elif m := re.fullmatch(r"a(\d+)", low):
            update = {"a_bits": int(m.group(1))}
        elif m := re.fullmatch(r"g(\d+)", low):
            update = {"w_group_size": int(m.group(1))}
        elif low == "per-channel":
            update = {"w_group_size": None}
        elif low in ("per-token", "per-tensor"):
            update = {"a_granularity": low}
        else:
            raise ConfigError.invalid("setting", tok, _SETTING_HELP)
        for k in update:
            if k in set_by:  # 'W4 W8' is a contradiction, not "the last one wins"
                raise ConfigError.invalid("setting", text, f"each field set once ({set_by[k]!r} and {tok!r} both set {k})")
            set_by[k] = tok
        fields.update(update)
    if fields.get("method") == "fp" and len(fields) > 1:
        raise ConfigError.invalid("setting", text, "FP alone (full precision has no bits, groups or granularity to set)")
    for k, v in fields.items():
        check_field(k, v)
    return fields


def target_names(layer_names: list[str], kinds: dict[str, str], target: str) -> list[str]:
    """Layer names selected by a bulk-edit target: a kind, 'block N', 'all' (every non-embedder/final layer) or a glob."""
    t = (target or "").strip()
    if t == "all":
        names = [n for n in layer_names if kinds[n] not in ("embedder", "final", "other")]
    elif t in LAYER_KINDS:
        names = [n for n in layer_names if kinds[n] == t]
    elif m := re.fullmatch(r"block\s*(\d+)", t):
        names = [n for n in layer_names if n.startswith(f"transformer_blocks.{m.group(1)}.")]
    else:
        names = [n for n in layer_names if t and fnmatch.fnmatchcase(n, t)]
    if not names:
        raise ConfigError.invalid("layer pattern", target, "a kind (qkv, out, fc1, fc2, adaLN), 'block N', 'all', or a glob matching a layer name "
                                  "such as 'transformer_blocks.0.*'")
    return names


def bulk_edit(pipe: Pipeline, table, base: Recipe, target: str, setting: str) -> Recipe:
    """Applies ``setting`` to every layer ``target`` selects ("fc2" + "W8", "block 0" + "FP") on top of the table's edits."""
    current = table_recipe(pipe, table, base)
    fields = parse_setting(setting)
    frame = recipe_table(pipe, current)
    kinds = dict(zip(frame["name"], frame["kind"]))
    names = set(target_names(list(frame["name"]), kinds, target))
    fallback = current.default.method if not current.default.is_fp else "rtn"
    for idx in frame.index[frame["name"].isin(names)]:
        row = frame.loc[idx]
        if fields.get("method") == "fp" or (fields.get("w_bits") == 16 and fields.get("a_bits", row["a_bits"]) == 16 and "method" not in fields):
            frame.loc[idx, ["method", "w_bits", "a_bits", "w_group_size"]] = ["fp", 16, 16, "per-channel"]
            continue
        method = fields.get("method", fallback if row["method"] == "fp" else row["method"])
        w_bits = fields.get("w_bits", 8 if int(row["w_bits"]) == 16 else int(row["w_bits"]))
        group = fields.get("w_group_size", None if row["w_group_size"] == "per-channel" else int(row["w_group_size"]))
        frame.loc[idx, ["method", "w_bits", "a_bits", "w_group_size"]] = [method, w_bits, fields.get("a_bits", int(row["a_bits"])),
                                                                           "per-channel" if group is None else str(group)]
        if "a_granularity" in fields:
            frame.loc[idx, "a_granularity"] = fields["a_granularity"]
    return table_recipe(pipe, frame, current)


def table_help() -> str:
    """One Markdown line per editable column of the recipe table: what it accepts (from the recipe validator)."""
    from .config import allowed_values

    notes = {"w_group_size": "per-channel, or an integer ≥ 2 dividing the layer's in_features"}
    cols = ("method", "w_bits", "a_bits", "w_group_size", "a_granularity")
    return "\n".join(f"- **{c}**: {notes.get(c) or allowed_values(c)}" for c in cols)


# ---------------------------------------------------------------- recipe JSON
def parse_recipe(text, pipe: Pipeline | None = None) -> Recipe:
    """A Recipe from JSON text/bytes (or a preset name), size-limited, validated on ``pipe`` when given."""
    lim = limits()
    if isinstance(text, (bytes, bytearray)):
        if len(text) > lim.max_recipe_bytes:
            raise ConfigError.invalid("recipe JSON", f"{len(text)} bytes", f"at most {lim.max_recipe_bytes} bytes")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError.invalid("recipe JSON", "non-UTF-8 bytes", "UTF-8 text") from None
    text = str(text or "").strip()
    if not text:
        raise ConfigError.invalid("recipe JSON", "", "a recipe JSON object or a preset name")
    if len(text.encode("utf-8", "replace")) > lim.max_recipe_bytes:
        raise ConfigError.invalid("recipe JSON", f"{len(text)} characters", f"at most {lim.max_recipe_bytes} bytes")
    if not text.startswith(("{", "[")):
        recipe = get_preset(text)  # a preset name (the error lists them)
    else:
        try:
            recipe = Recipe.from_json(text)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
            raise ConfigError.invalid("recipe JSON", type(exc).__name__, "a recipe object {version, name, default, overrides, skip} as exported") from None
    if pipe is not None:
        recipe.resolve(list_linears(pipe.transformer))
    return recipe


def write_recipe(recipe: Recipe, folder: str | os.PathLike) -> Path:
    """Writes ``recipe`` as ``<folder>/<name>.recipe.json`` for download; returns the path."""
    path = Path(folder) / f"{safe_name(recipe.name)}.recipe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(path, lambda tmp: Path(tmp).write_text(recipe.to_json() + "\n"))



# ---------------------------------------------------------------- per-session quantized models
class QuantCache:
    """Quantized copies keyed by (session, model source, recipe JSON): an LRU of ``max_entries`` in total (bounded
    memory), never in session state. Concurrent requests for the same key quantize once."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict = {}

    @staticmethod
    def key(session: str | None, pipe: Pipeline, recipe: Recipe) -> tuple:
        return (session or "local", pipe.source, recipe.to_json(indent=None))

    def get(self, session: str | None, pipe: Pipeline, recipe: Recipe, quantize) -> object:
        """The cached quantized copy, or ``quantize(pipe, recipe)`` stored under the key."""
        key = self.key(session, pipe, recipe)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = quantize(pipe, recipe)
            self.put(session, pipe, recipe, value)
        with self._lock:
            self._key_locks.pop(key, None)
        return value

    def put(self, session: str | None, pipe: Pipeline, recipe: Recipe, value) -> None:
        """Stores a quantized copy (e.g. one loaded from an exported folder), evicting the least recently used."""
        with self._lock:
            self._items[self.key(session, pipe, recipe)] = value
            self._items.move_to_end(self.key(session, pipe, recipe))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def drop_session(self, session: str | None) -> None:
        """Forgets every entry of one session (call when it ends)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == (session or "local")]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)



# ---------------------------------------------------------------- cancellation of long jobs
class Cancelled(DitlabError):
    """A job stopped because its user pressed Cancel (raised at the job's next module forward)."""


_job = threading.local()


def _stop_if_cancelled(module, args) -> None:
    event = getattr(_job, "cancel", None)
    if event is not None and event.is_set():
        raise Cancelled("cancelled: the job stopped at your request")


class Jobs:
    """Cancel tokens of the running jobs of each session. A job runs inside ``run(session)``; ``cancel(session)`` makes
    it raise ``Cancelled`` at its next ``nn.Module`` forward (a global forward pre-hook checks a thread-local token),
    so the worker thread is free again within one layer's time instead of finishing the job."""

    def __init__(self):
        self._events: dict[str, set] = {}
        self._changed = threading.Condition()  # guards _events; notified whenever a job ends
        self._hook = None

    @contextmanager
    def run(self, session: str | None, name: str = "job"):
        import torch

        with self._changed:
            if self._hook is None:
                self._hook = torch.nn.modules.module.register_module_forward_pre_hook(_stop_if_cancelled)
            event = threading.Event()
            event.job_name = name
            self._events.setdefault(session or "local", set()).add(event)
        _job.cancel = event
        try:
            yield event
        finally:
            _job.cancel = None
            with self._changed:
                self._events.get(session or "local", set()).discard(event)
                self._changed.notify_all()

    def names(self, session: str | None) -> list[str]:
        """The names of ``session``'s running jobs (sorted)."""
        with self._changed:
            return sorted(getattr(e, "job_name", "job") for e in self._events.get(session or "local", ()))

    def sessions_running(self) -> set[str]:
        """The sessions with at least one running job."""
        with self._changed:
            return {session for session, events in self._events.items() if events}

    def cancel(self, session: str | None, wait: float = 0.0) -> tuple[int, int]:
        """Signals every running job of ``session`` and waits up to ``wait`` seconds for them to end.
        Returns (jobs signalled, jobs of those still running): (1, 0) = one job stopped, the worker is free."""
        with self._changed:
            events = set(self._events.get(session or "local", ()))
            for event in events:
                event.set()
            self._changed.wait_for(lambda: not events & self._events.get(session or "local", set()), timeout=wait)
            return len(events), len(events & self._events.get(session or "local", set()))

# ---------------------------------------------------------------- compare views
def compare_metrics(metrics: dict) -> pd.DataFrame:
    """The metrics table of a Comparison: one (metric, value, meaning) row each."""
    spec = [("psnr", "PSNR (dB)", "{:.2f}", "pixel fidelity to the FP image, higher is better (∞ = identical)"),
            ("ssim", "SSIM", "{:.4f}", "structural similarity to the FP image, 1 = identical"),
            ("class_agreement", "class agreement", "{:.0%}", "images the classifier labels as it labels the FP image"),
            ("class_acc_fp", "class accuracy FP", "{:.0%}", "FP images recognised as their intended class"),
            ("class_acc", "class accuracy quantized", "{:.0%}", "quantized images recognised as their intended class"),
            ("weight_bytes", "weight bytes quantized", "{:,}", "stored bytes of the quantizable linears (codes + scales)"),
            ("weight_bytes_fp16", "weight bytes FP16", "{:,}", "the same layers in FP16"),
            ("seconds_fp", "seconds FP", "{:.2f}", "sampling time of the FP model (measured)"),
            ("seconds_quantized", "seconds quantized", "{:.2f}", "sampling time of the quantized model (measured)"),
            ("seconds_quantize", "seconds to quantize", "{:.2f}", "calibration excluded (cached per recipe)")]
    rows = [{"metric": label, "value": fmt.format(metrics[k]) if isinstance(metrics[k], (int, float)) and math.isfinite(metrics[k]) else str(metrics[k]),
             "meaning": meaning} for k, label, fmt, meaning in spec if k in metrics]
    return pd.DataFrame(rows, columns=["metric", "value", "meaning"])


def divergence_figure(divergence: list[float], timesteps: list[int]) -> go.Figure:
    """Per-step ‖x_q − x_fp‖ / ‖x_fp‖ of the latents (how the quantized trajectory drifts from the FP one)."""
    fig = go.Figure(go.Scatter(x=list(range(len(divergence))), y=divergence, mode="lines+markers", customdata=timesteps,
                               hovertemplate="step %{x} (t=%{customdata})<br>relative divergence %{y:.3g}<extra></extra>"))
    fig.update_layout(title="Latent divergence from the FP trajectory, per sampling step", xaxis_title="sampling step (high noise first)",
                      yaxis_title="‖x_q − x_fp‖ / ‖x_fp‖", height=320, margin={"t": 50, "b": 40, "l": 60, "r": 20})
    return fig


def default_backend() -> str:
    """The execution path Compare starts on: the compiled Triton kernels on a CUDA GPU, else the CPU integer path
    (the Triton interpreter and the reference path are exact but slow: opt-in)."""
    from . import backends

    return "triton" if "triton" in backends.available() else "cpu-int"


BACKEND_NAMES = {"cpu-int": "CPU integer path (torch._int_mm int8×int8→int32)", "reference": "reference path (float64 accumulators, slow)",
                 "triton": "Triton kernels (CUDA GPU)", "triton-interpret": "Triton kernels under the interpreter (exact, slow)"}


# ---------------------------------------------------------------- export / import of QDIRs
def _write_atomic(target: Path, write) -> Path:
    """Calls ``write(tmp)`` on a temporary file beside ``target`` (same name ending) and renames it onto ``target``: a
    crash or a full disk never leaves a partial ``target``. A disk error becomes one line naming ``target``."""
    from .qdir import WriteError

    try:
        write_atomic(target, write, suffix=target.suffix)
    except OSError as exc:
        if not isinstance(exc, DitlabError):
            raise WriteError.of(target, exc) from exc
        raise
    return target


def export_zip(qdir: str | os.PathLike) -> Path:
    """Zips a QDIR folder as ``<qdir>.zip`` (files at the archive root, written atomically); returns the zip path."""
    folder = Path(qdir)
    return _write_atomic(folder.parent / f"{folder.name}.zip",
                         lambda tmp: shutil.make_archive(tmp.removesuffix(".zip"), "zip", root_dir=folder))


def _safe_extract(archive: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        total = 0
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
                raise ModelLoadError(f"{archive.name}: unsafe path {info.filename!r} in the zip; refused")
            total += info.file_size
            if total > max_bytes:
                raise ModelLoadError(f"{archive.name}: uncompressed size exceeds {max_bytes} bytes; refused")
        zf.extractall(dest)


def unpack_qdir(path: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """The QDIR folder of an exported zip (extracted safely under ``workdir``) or of a folder path."""
    from .qdir import is_qdir

    src = Path(path).expanduser()
    if not src.exists():
        raise ModelLoadError(f"export = {str(path)!r} does not exist; allowed: a QDIR folder or a .zip exported by ditlab")
    if src.is_dir():
        if limits().public:
            raise ConfigError.invalid("export folder", str(path), "an uploaded .zip (public mode loads no server folders)")
        folder = src
    else:
        if not zipfile.is_zipfile(src):
            raise ModelLoadError(f"{src.name}: not a zip file; allowed: a .zip exported by ditlab")
        folder = Path(tempfile.mkdtemp(prefix="qdir-", dir=workdir))
        _safe_extract(src, folder, limits().max_upload_bytes)
    if not is_qdir(folder):
        if src.is_dir():  # a server folder must be the QDIR itself (never a scan of, say, /tmp's subfolders)
            raise ModelLoadError(f"{str(path)!r}: no ditlab_qdir.json in this folder; allowed: a QDIR folder written by Export or `ditlab quantize`")
        subs = [p for p in folder.iterdir() if p.is_dir() and is_qdir(p)]
        if len(subs) != 1:
            raise ModelLoadError(f"{src.name}: no ditlab_qdir.json inside; allowed: a folder or zip written by Export")
        folder = subs[0]
    return folder


# ---------------------------------------------------------------- analysis views (Outliers, Sensitivity & allocation)
APP_CALIBRATION = {"n_samples": 8, "steps": 10}  # the app's calibration run (cached on disk by model and settings)
SENSITIVITY_SETTINGS = {"n_images": 4, "steps": 8, "n_groups": 4, "unit": "layer"}  # cost controls of the app's runs
ALLOCATION_CANDIDATES = ("w8a8-rtn", "w4a8-rtn")  # per-layer choices the budget slider picks between
BRANCHES = ("cond", "uncond", "all")


def _timestep_value(timestep, allowed: list[int]) -> int | None:
    """A picker's timestep (an int, or its text as API clients send it) → int; None/"" → None (the first one)."""
    if timestep is None or (isinstance(timestep, str) and not timestep.strip()):
        return None
    try:
        value = float(timestep)
        if value != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError.invalid("timestep", timestep, f"a timestep of the app's calibration schedule: {', '.join(map(str, allowed))}") from None


def outlier_views(pipe: Pipeline, calib, layer: str, timestep, branch: str) -> tuple:
    """(OutlierResult, overview figure, errors table, model-wide map figure) of one layer input."""
    from . import outliers, plots

    if branch not in BRANCHES:
        raise ConfigError.invalid("CFG branch", branch, ", ".join(BRANCHES))
    res = outliers.outlier_view(pipe, calib, layer, _timestep_value(timestep, calibration_timesteps(pipe)), branch)
    table = res.table().round(4)
    table["transform"] = [plots.LABELS.get(t, t) for t in table["transform"]]
    omap = outliers.outlier_map(calib, "cond" if branch == "all" else branch)
    return res, plots.outlier_figure(res), table, plots.outlier_map_figure(omap)


def sensitivity_settings():
    """The SensitivitySettings the app uses (small, so a first run takes about a minute on 2 cores)."""
    from .sensitivity import SensitivitySettings

    return SensitivitySettings(**SENSITIVITY_SETTINGS)


def sensitivity_run(pipe: Pipeline, setting: str, calibrate, progress: bool = True):
    """Sensitivity cells of ``setting`` (a preset) with the app's settings; ``calibrate(pipe)`` when it needs stats."""
    from .api import needs_calibration
    from .sensitivity import run_sensitivity as run

    recipe = load_recipe(setting)
    calib = calibrate(pipe) if needs_calibration(pipe, recipe) else None
    return run(pipe, recipe, settings=sensitivity_settings(), calib=calib, progress=progress)


def _heat_colour(v: float, lo: float, hi: float) -> str:
    if not math.isfinite(v) or hi <= lo:
        return ""
    f = min(max((v - lo) / (hi - lo), 0.0), 1.0)  # 0 = most sensitive (red) … 1 = robust (green)
    r, g = (220, int(60 + 160 * 2 * f)) if f < 0.5 else (int(220 - 160 * (2 * f - 1)), 200)
    return f"background-color: rgb({r},{g},80); color: black"


def sensitivity_table(res, metric: str = "sqnr_db"):
    """(clickable units × timestep-groups frame, Styler with a red→green colouring: red = sensitive)."""
    pivot = res.pivot(metric)
    steps = list(dict.fromkeys(res.frame["steps"]))
    frame = pivot.round(3).reset_index()
    frame.columns = ["unit"] + [f"g{g} (steps {s})" for g, s in zip(pivot.columns, steps)]
    values = pivot.to_numpy(dtype=float)
    finite = values[[[math.isfinite(x) for x in row] for row in values]]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    styler = frame.style.format(precision=3).apply(lambda col: [_heat_colour(float(v), lo, hi) if col.name != "unit" else "" for v in col], axis=0)
    return frame, styler


def cell_target(pipe: Pipeline, res, calib, row: int, col: int) -> tuple[str, int]:
    """(layer, timestep) to open in Outliers for a clicked cell: the unit's first layer, the calibrated timestep closest
    to the start of the cell's timestep group."""
    from .outliers import schedule

    units = list(dict.fromkeys(res.frame["unit"]))
    if not 0 <= int(row) < len(units):
        raise ConfigError.invalid("cell", (row, col), f"a row from 0 to {len(units) - 1}")
    group = max(int(col) - 1, 0) % len(res.groups)
    layer = str(res.frame.loc[res.frame["unit"] == units[int(row)], "layers"].iloc[0]).split(",")[0]
    sens_ts = schedule(pipe, {"steps": res.settings["steps"], "scheduler": res.settings["scheduler"]})
    t = sens_ts[res.groups[group][0]]
    return layer, min(calib.timesteps, key=lambda c: abs(c - t))


def allocation_views(pipe: Pipeline, budget_bits: float, progress: bool = True) -> tuple:
    """(Allocation, allocation figure, Pareto figure) from the candidates' sensitivity at ``budget_bits`` average bits."""
    from . import allocation, plots

    results = [sensitivity_run(pipe, s, calibrate=None, progress=progress) for s in ALLOCATION_CANDIDATES]
    alloc = allocation.solve(results, float(budget_bits))
    par = allocation.pareto(results, [4.0 + 0.5 * i for i in range(9)])
    return alloc, plots.allocation_figure(alloc), plots.pareto_figure(par)


def calibration_timesteps(pipe: Pipeline) -> list[int]:
    """The diffusion timesteps of the app's calibration run (the Outliers timestep picker)."""
    from .outliers import schedule

    return schedule(pipe, {"steps": APP_CALIBRATION["steps"], "scheduler": DEFAULT_SCHEDULER})


def load_qdir(folder: str | os.PathLike) -> tuple:
    """(Quantized, FP source) of an exported QDIR folder: the quantized copy is used as is, never re-quantized."""
    from .api import Quantized, qdir_source
    from .qdir import load_quantized

    qpipe, recipe = load_quantized(folder)
    return Quantized(pipe=qpipe, recipe=recipe, report=None, seconds_quantize=0.0), qdir_source(folder)


def grid_rows(n_labels: int, n_per_label: int) -> int:
    """Rows of a comparison grid: one per class when each class has ≥ 4 images, else rows of 4."""
    return n_labels if n_per_label >= 4 else max(1, -(-n_labels * n_per_label // 4))
