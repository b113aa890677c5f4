"""Layer × timestep-group sensitivity, metric-decoupled (ViDiT-Q §3.3, MixDQ §3.3), cached and incremental.

A *cell* (unit u, timestep group g) quantizes only u — one linear, or one group of a block: its attention, its
feed-forward or its adaLN — at the chosen setting, and only during the denoising steps of g, then compares with the
FP model on the same seeds and labels:

* quality: ``sqnr_db`` = 10·log10(Σ_s ‖ε_s‖² / Σ_s ‖ε̂_s − ε_s‖²) over the steps s of g (ε = the guided model output);
* content: ``agreement`` = fraction of images whose classifier prediction equals the FP image's, ``ssim`` and
  ``psnr`` of the final images vs FP (and ``class_acc`` against the intended labels).

How a cell is run (exact, and cheap): one FP sampling run records the raw transformer output of every step. For a cell
the sampler runs again over a private deep copy of the transformer in which u's linears are replaced by a switch
between the FP and the quantized module; for the steps before g the copy *replays* the recorded FP outputs instead of
computing (the sampler and scheduler then reproduce the FP latents bit for bit), during g the switch selects the
quantized module, after g the FP one. A cell therefore costs only the steps from g's start to the end.

Cells are cached on disk as JSON (``<cache>/sensitivity/<key>.json``, key = model fingerprint + per-layer setting +
sampling settings; written atomically after every unit), so a second run only computes the missing cells.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .atomic import write_atomic
from .calibration import model_fingerprint, timestep_groups
from .config import LayerConfig, Recipe, load_recipe
from .errors import ConfigError
from .methods import get_handler
from .models import Pipeline, list_linears
from .quantize import weight_bytes
from .sampling import DEFAULT_SCHEDULER, SCHEDULERS, sample
from .step_switch import PerGroup, Replay, Switch, set_module

log = logging.getLogger(__name__)

SENS_VERSION = 1
UNIT_MODES = ("layer", "group")
TABLE_METRICS = ("sqnr_db", "ssim", "psnr", "agreement", "class_acc")  # the per-cell scores a table can show
_FAMILY = {"qkv": "attn", "out": "attn", "fc1": "ff", "fc2": "ff", "adaLN": "adaLN"}
Progress = Callable[[int, int, str], None]  # (done, total, unit name)


@dataclass(frozen=True)
class SensitivitySettings:
    """Cost controls and sampling settings of a sensitivity run (part of the cache key)."""

    n_images: int = 10  # labels cycle over the classes (0, 1, …) unless ``labels`` is given
    steps: int = 10
    n_groups: int = 4
    guidance: float = 4.0
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER
    unit: str = "layer"  # "layer" or "group" (attention / feed-forward / adaLN of a block)
    labels: tuple | None = None

    def __post_init__(self):
        checks = [("n_images", self.n_images, 1, 1024), ("steps", self.steps, 1, 1000), ("n_groups", self.n_groups, 1, 1000)]
        for name, v, lo, hi in checks:
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError.invalid(name, v, f"an integer from {lo} to {hi}")
        if self.n_groups > self.steps:
            raise ConfigError.invalid("n_groups", self.n_groups, f"at most steps ({self.steps}): each timestep group needs at least one step")
        if self.unit not in UNIT_MODES:
            raise ConfigError.invalid("unit", self.unit, ", ".join(UNIT_MODES))
        if self.scheduler not in SCHEDULERS:
            raise ConfigError.invalid("scheduler", self.scheduler, ", ".join(SCHEDULERS))

    def label_list(self, num_classes: int) -> list[int]:
        base = list(self.labels) if self.labels else list(range(max(num_classes, 1)))
        return [int(base[i % len(base)]) for i in range(self.n_images)]


@dataclass(frozen=True)
class Unit:
    """What one cell quantizes: a layer, or a block's attention / feed-forward / adaLN linears."""

    name: str
    kind: str  # a LayerInfo kind (layer mode) or attn / ff / adaLN (group mode)
    block: int | None
    layers: tuple[str, ...]
    params: int  # weight parameters (Σ out·in)


@dataclass
class SensitivityResult:
    """Cells as a DataFrame (one row per unit × group) plus what produced them."""

    frame: pd.DataFrame  # unit, kind, block, layers, params, group, steps, w_bits, a_bits, method, config, bytes, sqnr_db, ssim, psnr, agreement, class_acc, seconds
    setting: str
    settings: dict
    groups: list[list[int]]  # step indices of each timestep group
    n_computed: int = 0
    n_cached: int = 0
    seconds: float = 0.0
    key: str = ""

    def pivot(self, metric: str = "sqnr_db") -> pd.DataFrame:
        """units × timestep groups table of one metric (rows in model order)."""
        if metric not in self.frame.columns:
            raise ConfigError.invalid("metric", metric, ", ".join(TABLE_METRICS))
        table = self.frame.pivot(index="unit", columns="group", values=metric)
        return table.loc[list(dict.fromkeys(self.frame["unit"]))]


def units_for(pipe: Pipeline, plan: dict[str, LayerConfig | None], mode: str = "layer", layers: Sequence[str] | None = None) -> list[Unit]:
    """The units of the quantized (non-FP, non-skipped) layers of ``plan``, optionally restricted to ``layers``."""
    infos = [i for i in list_linears(pipe.transformer) if plan.get(i.name) is not None and not plan[i.name].is_fp]
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {i.name for i in infos}
        if unknown and mode == "layer":
            raise ConfigError.invalid("layers", sorted(unknown)[0], "names of layers the setting quantizes (see `python -m ditlab info`)")
        infos = [i for i in infos if i.name in wanted or f"transformer_blocks.{i.block}.{_FAMILY.get(i.kind, i.kind)}" in wanted]
    if mode == "layer":
        return [Unit(i.name, i.kind, i.block, (i.name,), i.in_features * i.out_features) for i in infos]
    grouped: dict[str, list] = {}
    for i in infos:
        family = _FAMILY.get(i.kind, i.kind)
        name = f"transformer_blocks.{i.block}.{family}" if i.block is not None else i.name
        grouped.setdefault(name, []).append(i)
    return [Unit(n, _FAMILY.get(g[0].kind, g[0].kind), g[0].block, tuple(i.name for i in g), sum(i.in_features * i.out_features for i in g))
            for n, g in grouped.items()]


def setting_recipe(setting: "str | LayerConfig | Recipe") -> Recipe:
    """A Recipe for a LayerConfig (default skips kept), a preset name, a recipe JSON path, or a Recipe."""
    if isinstance(setting, LayerConfig):
        return Recipe(default=setting, name=setting.short().replace(" ", "-"))
    return load_recipe(setting)


def pooled_sqnr(ref: Sequence[torch.Tensor], approx: Sequence[torch.Tensor]) -> float:
    """10·log10(Σ‖y‖² / Σ‖ŷ − y‖²) over several tensors (inf if identical)."""
    return metrics.sqnr(torch.cat([r.reshape(-1) for r in ref]), torch.cat([a.reshape(-1) for a in approx]))


def default_classifier(images: torch.Tensor) -> torch.Tensor:
    """Predicted classes (B,) of uint8 images by the shipped Shapes-10 classifier."""
    from .api import load_classifier
    from .classifier import classify

    return classify(load_classifier(), images)[0]


# ---- cache -------------------------------------------------------------------------------------------------------
def _cache_path(cache_dir, key: str) -> Path:
    from .calib_cache import default_cache_dir

    return Path(default_cache_dir() if cache_dir is None else cache_dir) / "sensitivity" / f"{key}.json"


def _load_cells(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("cells", {})
    except (OSError, ValueError):
        return {}  # missing or torn file: a miss (writes are atomic, so torn means edited by hand)


def _save_cells(path: Path, cells: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps({"meta": meta, "cells": cells})))


# ---- the run -----------------------------------------------------------------------------------------------------
def run_sensitivity(pipe: Pipeline, setting: "str | LayerConfig | Recipe" = "w4a8-rtn", *, settings: SensitivitySettings | None = None,
                    layers: Sequence[str] | None = None, calib=None, classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    cache_dir: str | os.PathLike | None = None, use_cache: bool = True, progress: bool | Progress = True) -> SensitivityResult:
    """Sensitivity of every unit (layer or block group) the setting quantizes × every timestep group.

    setting: a LayerConfig, a preset name, a recipe JSON path or a Recipe (each layer at its own config). settings:
    cost controls (images, steps, groups, unit mode). layers: restrict to these layer / unit names. calib: CalibStats,
    needed for methods that use statistics. progress: True → tqdm, False → silent, callable → (done, total, unit).
    """
    st = settings or SensitivitySettings()
    recipe = setting_recipe(setting)
    plan = recipe.resolve(list_linears(pipe.transformer))
    units = units_for(pipe, plan, st.unit, layers)
    if not units:
        raise ConfigError.invalid("setting", recipe.name, "a setting that quantizes at least one layer (not 'fp')")
    for u in units:
        for name in u.layers:
            if plan[name].needs_stats and (calib is None or name not in calib):
                raise ConfigError.invalid("calib", None, f"calibration statistics covering {name!r}: {plan[name].short()} needs them", layer=name)
    labels = st.label_list(pipe.num_classes)
    groups = timestep_groups(st.steps, st.n_groups)
    key_data = {"version": SENS_VERSION, "model": model_fingerprint(pipe.transformer), "settings": asdict(st),
                "plan": {n: plan[n].to_dict() for u in units for n in u.layers},
                "calib": (calib.settings.get("cache_key") if calib is not None and any(plan[n].needs_stats for u in units for n in u.layers) else None)}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = _cache_path(cache_dir, key)
    cells = _load_cells(path) if use_cache else {}
    todo = [(u, g) for u in units for g in range(len(groups)) if f"{u.name}|{g}" not in cells]
    n_cached = len(units) * len(groups) - len(todo)
    t0 = time.perf_counter()
    if todo:
        _compute(pipe, st, labels, groups, plan, calib, todo, cells, classifier or default_classifier, progress,
                 (lambda: _save_cells(path, cells, {"setting": recipe.name, "settings": asdict(st)})) if use_cache else (lambda: None))
    rows = []
    for u in units:
        cfg = plan[u.layers[0]]
        for g, steps in enumerate(groups):
            c = cells[f"{u.name}|{g}"]
            rows.append({"unit": u.name, "kind": u.kind, "block": u.block, "layers": ",".join(u.layers), "params": u.params, "group": g,
                         "steps": f"{steps[0]}–{steps[-1]}", "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "method": cfg.method,
                         "config": json.dumps(cfg.to_dict(), sort_keys=True), **c})
    seconds = time.perf_counter() - t0
    log.info("sensitivity %s: %d cells computed, %d cached, %.1fs", recipe.name, len(todo), n_cached, seconds)
    return SensitivityResult(pd.DataFrame(rows), recipe.name, asdict(st), groups, len(todo), n_cached, seconds, key)


def _compute(pipe, st, labels, groups, plan, calib, todo, cells, classify_fn, progress, save) -> None:
    """Fills ``cells`` for the (unit, group) pairs in ``todo``; calls ``save()`` after every unit."""
    wrapper = Replay(copy.deepcopy(pipe.transformer))  # private copy: the shared FP model is never touched
    run = dict(guidance=st.guidance, steps=st.steps, scheduler=st.scheduler, seed=st.seed, progress=False)
    fp_eps = wrapper.watch([], [], record=True)
    fp = sample(pipe, labels, transformer=wrapper, hooks=[wrapper], **run)
    fp_pred = classify_fn(fp.images)
    target = torch.as_tensor(labels)
    callback = progress if callable(progress) else None
    bar = tqdm(total=len(todo), desc="sensitivity", disable=progress is False or callback is not None, leave=False)
    by_unit: dict = {}
    for u, g in todo:
        by_unit.setdefault(u, []).append(g)
    done = 0
    for unit, gs in by_unit.items():
        switches, originals = [], {}
        nbytes = 0
        try:
            for name in unit.layers:
                linear = wrapper.model.get_submodule(name)
                stats = calib[name] if plan[name].needs_stats else None
                with torch.no_grad():
                    qmod = get_handler(plan[name].method, layer=name)(linear, plan[name], stats)
                nbytes += weight_bytes(qmod)
                originals[name] = linear
                switches.append(Switch(linear, qmod))
                set_module(wrapper.model, name, switches[-1])
            for g in gs:
                t_cell = time.perf_counter()
                eps = wrapper.watch(switches, groups[g])
                out = sample(pipe, labels, transformer=wrapper, hooks=[wrapper], **run)
                pred = classify_fn(out.images)
                cells[f"{unit.name}|{g}"] = {
                    "sqnr_db": pooled_sqnr([fp_eps[s] for s in groups[g]], [eps[s] for s in groups[g]]),
                    "ssim": metrics.ssim(fp.images, out.images), "psnr": metrics.psnr(fp.images, out.images),
                    "agreement": metrics.accuracy(pred, fp_pred), "class_acc": metrics.accuracy(pred, target),
                    "bytes": nbytes, "seconds": time.perf_counter() - t_cell}
                done += 1
                bar.update(1)
                if callback is not None:
                    callback(done, len(todo), unit.name)
        finally:
            wrapper.watch([], [])
            for name, linear in originals.items():
                set_module(wrapper.model, name, linear)
        save()
    bar.close()


# ---- measured check of a recipe (or of one recipe per timestep group) --------------------------------------------
def measure(pipe: Pipeline, recipe: "str | Recipe | Sequence[Recipe]", *, settings: SensitivitySettings | None = None, calib=None,
            classifier: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Quantizes with ``recipe`` (or one recipe per timestep group of ``settings``), samples, compares with FP.

    Returns psnr, ssim (final images vs FP, same seeds/labels), class_acc, class_acc_fp, agreement, bytes_packed,
    bytes_fp16 (of the quantized layers; per-group: the mean over groups) and seconds.
    """
    from .quantize import quantize_

    st = settings or SensitivitySettings()
    classify_fn = classifier or default_classifier
    labels = st.label_list(pipe.num_classes)
    run = dict(guidance=st.guidance, steps=st.steps, scheduler=st.scheduler, seed=st.seed, progress=False)
    t0 = time.perf_counter()
    recipes = [recipe] if isinstance(recipe, (str, Recipe)) else list(recipe)
    groups = timestep_groups(st.steps, len(recipes))
    if len(groups) != len(recipes):
        raise ConfigError.invalid("recipes", len(recipes), f"one recipe, or one per timestep group (at most {st.steps})")
    quantized = [quantize_(pipe.transformer, r, calib, progress=False) for r in recipes]
    model = quantized[0][0] if len(recipes) == 1 else PerGroup([q for q, _ in quantized], groups)
    hooks = [] if len(recipes) == 1 else [model]
    out = sample(pipe, labels, transformer=model, hooks=hooks, **run)
    fp = sample(pipe, labels, **run)
    pred, fp_pred = classify_fn(out.images), classify_fn(fp.images)
    target = torch.as_tensor(labels)
    reports = [rep for _, rep in quantized]
    return {"recipe": recipes[0].name if len(recipes) == 1 else "+".join(r.name for r in recipes),
            "psnr": metrics.psnr(fp.images, out.images), "ssim": metrics.ssim(fp.images, out.images),
            "class_acc": metrics.accuracy(pred, target), "class_acc_fp": metrics.accuracy(fp_pred, target),
            "agreement": metrics.accuracy(pred, fp_pred), "bytes_packed": sum(r.bytes_packed for r in reports) // len(reports),
            "bytes_fp16": sum(r.bytes_fp16 for r in reports) // len(reports), "n_images": len(labels), "seconds": time.perf_counter() - t0}


def _refuse_quantized(pipe) -> None:
    """ConfigError naming the model when it is already quantized (a QDIR): sensitivity measures what quantizing each
    layer of an FP model does."""
    if getattr(pipe.transformer, "ditlab_recipe", None) is not None:
        raise ConfigError.invalid("model", pipe.source, "a full-precision model, not a QDIR (already quantized); pass the FP model "
                                  "it was quantized from and the quantization as the setting")


def cli_sensitivity(model: str = "shipped", setting: str = "w4a8-rtn", *, n_images: int = 10, steps: int = 10, groups: int = 4,
                    unit: str = "layer", layers: Sequence[str] | None = None, metric: str = "sqnr_db", as_json: bool = False,
                    cache_dir: str | None = None, progress: bool = True) -> str:
    """``python -m ditlab sensitivity``: the units × groups table of ``metric`` (text), or every cell as JSON
    (``{"setting", "settings", "groups", "seconds", "cells": [...]}``). Calibrates first (cached) if the setting needs it."""
    from . import api

    if not as_json and metric not in TABLE_METRICS:  # before minutes of measurements
        raise ConfigError.invalid("metric", metric, ", ".join(TABLE_METRICS))
    pipe = api.load(model)
    _refuse_quantized(pipe)
    st = SensitivitySettings(n_images=n_images, steps=steps, n_groups=groups, unit=unit)
    calib = api.calibrate(pipe, progress=progress) if api.needs_calibration(pipe, setting_recipe(setting)) else None
    res = run_sensitivity(pipe, setting, settings=st, layers=layers, calib=calib, cache_dir=cache_dir, progress=progress)
    if as_json:
        cells = res.frame.drop(columns=["config"]).to_dict(orient="records")
        return json.dumps({"setting": res.setting, "settings": res.settings, "groups": res.groups, "seconds": res.seconds,
                           "n_computed": res.n_computed, "n_cached": res.n_cached, "cells": cells}, default=str)
    table = res.pivot(metric)
    table.columns = [f"g{g} ({s})" for g, s in zip(table.columns, dict.fromkeys(res.frame["steps"]))]
    return (f"{metric} per unit × timestep group at {res.setting} ({res.n_computed} cells computed, {res.n_cached} cached, "
            f"{res.seconds:.1f}s)\n" + table.to_string(float_format=lambda v: f"{v:.4g}"))
