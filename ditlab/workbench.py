"""Session-level logic of the app that is not layout: the Model tab's views, the Compare tab's metrics table and
divergence plot, and the data behind the analysis views (Outliers, Sensitivity & allocation). Recipe editing lives
in ``recipe_editing``, the session cache and Cancel in ``jobs``, QDIR zips in ``exports``, request limits in
``public``.

Pure functions over ditlab objects returning data (DataFrames, plotly figures); nothing here imports gradio, so every
piece is testable without a browser. Every user mistake raises a ``DitlabError`` (usually a ``ConfigError`` naming
the field) with a one-line message that the app shows next to the control.
"""

from __future__ import annotations

import math
import re

import pandas as pd
import plotly.graph_objects as go

from .config import Recipe, get_preset
from .errors import ConfigError, ModelLoadError
from .models import Pipeline, list_linears
from .errors import _clip
from .public import check_source, checked_path
from .qdir import is_qdir
from .sampling import DEFAULT_SCHEDULER

MODEL_KINDS = ("shipped", "local folder", "hub id")


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
        folder = checked_path(str(checked), kind).resolve()
        if not folder.is_dir():
            raise ModelLoadError(f"local folder = {_clip(text)} does not exist or is not a folder")
        if is_qdir(folder):  # a quantized export: the Model tab loads FP models, whose layers the recipe then sets
            raise ConfigError.invalid(kind, text, "a full-precision pipeline folder; this one is a QDIR (already quantized): "
                                      "load it on the Export tab with Load export")
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


def sensitivity_run(pipe: Pipeline, setting: "str | Recipe", calibrate, progress: bool = True):
    """Sensitivity cells of ``setting`` (a preset name or a Recipe, never a file path: the app's users may not read
    the server's files) with the app's settings; ``calibrate(pipe)`` when it needs stats."""
    from .api import needs_calibration
    from .sensitivity import run_sensitivity as run

    recipe = setting if isinstance(setting, Recipe) else get_preset(str(setting))
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


def cell_target(pipe: Pipeline, res, calib_timesteps: list[int], row: int, col: int) -> tuple[str, int]:
    """(layer, timestep) to open in Outliers for a clicked cell: the unit's first layer, the calibrated timestep
    (one of ``calib_timesteps``) closest to the start of the cell's timestep group."""
    from .outliers import schedule

    units = list(dict.fromkeys(res.frame["unit"]))
    if not 0 <= int(row) < len(units):
        raise ConfigError.invalid("cell", (row, col), f"a row from 0 to {len(units) - 1}")
    group = max(int(col) - 1, 0) % len(res.groups)
    layer = str(res.frame.loc[res.frame["unit"] == units[int(row)], "layers"].iloc[0]).split(",")[0]
    sens_ts = schedule(pipe, {"steps": res.settings["steps"], "scheduler": res.settings["scheduler"]})
    t = sens_ts[res.groups[group][0]]
    return layer, min(calib_timesteps, key=lambda c: abs(c - t))


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



def grid_rows(n_labels: int, n_per_label: int) -> int:
    """Rows of a comparison grid: one per class when each class has ≥ 4 images, else rows of 4."""
    return n_labels if n_per_label >= 4 else max(1, -(-n_labels * n_per_label // 4))
