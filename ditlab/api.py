"""The entry points that the app, the CLI and users call: load, generate, calibrate, quantize, evaluate, save.

Everything here returns plain data (tensors, dicts, dataclasses); nothing imports gradio. The loaded FP pipeline
is shared read-only: quantization always works on a deep copy.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import backends, evaluation, public
from .config import PRESETS, Recipe, load_recipe  # noqa: F401 - PRESETS: the app reaches it through api
from .errors import ConfigError
from .evaluation import SampleSettings, content_metrics, eval_labels, load_classifier, real_features  # noqa: F401 - re-exported
from .models import LayerInfo, Pipeline, list_linears, load_pipeline
from .sampling import DEFAULT_SCHEDULER, MAX_SEED, SCHEDULERS, SampleResult, check_guidance, check_scheduler as _check_scheduler, image_grid, sample

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 25


def load(source: str | None = None) -> Pipeline:
    """Loads (and caches per process) a pipeline — a diffusers folder, a hub id, "shipped", or a QDIR written by
    ``save``. Treat the result as read-only. In public mode only allowlisted sources load (``public.check_source``).

    The cache is keyed by what the source *is*, not how it is written: a folder by its absolute path and the
    modification stamps of its model files (a folder saved over, or re-exported, loads again; "q" in two working
    directories are two models); the shipped model's aliases ("shipped", None, its folder) share one entry."""
    return _load(*_source_key(public.check_source(source)))


def _source_key(source) -> tuple[str, tuple]:
    """(what the source is: "shipped", an absolute folder path, or the text as given — a hub id, or a path that is
    not a folder, which loading then refuses by name; the stamps (name, mtime_ns, size) of a folder's model files)."""
    from .models import SHIPPED_ALIASES, SHIPPED_MODEL

    text = "" if source is None else str(source).strip()
    if text in SHIPPED_ALIASES:
        return "shipped", ()
    try:
        folder = Path(text).expanduser().resolve()
        if not folder.is_dir():
            return text, ()
    except (OSError, RuntimeError, ValueError):
        return text, ()
    if folder == SHIPPED_MODEL.resolve():
        return "shipped", ()
    files = [*sorted(folder.glob("*.json")), *sorted(folder.glob("*/*.json")), *sorted(folder.glob("*/*.safetensors"))]  # model_index.json too
    stamps = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        stamps.append((f.name if f.parent == folder else f"{f.parent.name}/{f.name}", st.st_mtime_ns, st.st_size))
    return str(folder), tuple(stamps)


@functools.lru_cache(maxsize=4)
def _load(source: str | None, stamps: tuple = ()) -> Pipeline:
    """The loaded pipeline of ``source`` ("shipped", an absolute folder or a hub id); ``stamps`` is part of the cache
    key only."""
    from . import qdir

    if source and qdir.is_qdir(Path(str(source)).expanduser()):
        return qdir.load_quantized(source)[0]
    return load_pipeline(source)


def layers(pipe: Pipeline) -> list[LayerInfo]:
    """The quantizable linear layers of the pipeline's transformer, in module order."""
    return list_linears(pipe.transformer)


def model_info(pipe: Pipeline) -> dict:
    """A JSON-ready summary: family, config, parameter counts, labels and the linear layers.

    ``params`` counts the model's weights as the FP model has them, also for a quantized pipeline (whose packed codes
    are buffers, or uint8 parameters, of other sizes): the linears' N·K (+ N) plus every other parameter."""
    cfg = pipe.transformer.config
    linears = layers(pipe)
    names = {layer.name for layer in linears}
    linear_params = sum(layer.params for layer in linears)
    others = sum(p.numel() for n, p in pipe.transformer.named_parameters() if not any(n.startswith(f"{m}.") for m in names))
    return {
        "source": pipe.source,
        "family": pipe.family,
        "transformer": type(pipe.transformer).__name__,
        "quantized": is_quantized(pipe),
        "params": others + linear_params,
        "linear_params": linear_params,
        "num_linears": len(linears),
        "sample_size": int(cfg.sample_size),
        "in_channels": int(cfg.in_channels),
        "patch_size": int(cfg.patch_size),
        "num_layers": int(cfg.num_layers),
        "hidden_size": int(cfg.num_attention_heads * cfg.attention_head_dim),
        "has_vae": pipe.vae is not None,
        "num_classes": pipe.num_classes,
        "labels": {str(k): v for k, v in sorted(pipe.labels.items())},
        "layers": [{"name": l.name, "kind": l.kind, "shape": list(l.shape), "params": l.params, "block": l.block} for l in linears],
    }


def generate(
    pipe: Pipeline,
    labels: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    scheduler: str = DEFAULT_SCHEDULER,
    transformer: torch.nn.Module | None = None,
    progress: bool = True,
    **kwargs,
) -> SampleResult:
    """Samples one image per label with the pipeline's (or the given) transformer."""
    return sample(pipe, labels, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed, transformer=transformer, progress=progress, **kwargs)


# ---------------------------------------------------------------- quantization


@dataclass
class Quantized:
    """A quantized copy of a pipeline (sharing every non-transformer component) and how it was made."""

    pipe: Pipeline
    recipe: Recipe
    report: object  # quantize.QuantReport
    seconds_quantize: float
    seconds_calibrate: float = 0.0


def calibrate(pipe: Pipeline, *, n_samples: int = 8, steps: int = 10, progress: bool = True, **kwargs):
    """Calibration statistics of every linear (cached on disk by model and settings); see ``calibration.calibrate``."""
    from .calibration import calibrate as _calibrate

    public.check_calibration(n_samples, steps)  # public mode bounds the cost
    return _calibrate(pipe, n_samples=n_samples, steps=steps, progress=progress, **kwargs)


def needs_calibration(pipe: Pipeline, recipe: Recipe | str) -> bool:
    """True if some planned layer's method needs calibration statistics."""
    from .quantize import layers_needing_stats

    return bool(layers_needing_stats(pipe.transformer, recipe))


def quantize(pipe: Pipeline, recipe: Recipe | str, *, calib=None, progress: bool = True, calib_settings: dict | None = None) -> Quantized:
    """Quantizes a deep copy of ``pipe``'s transformer with ``recipe`` (preset name, JSON path, dict or Recipe).

    Calibrates first (cached) when a planned method needs statistics and ``calib`` is not given; VQ4DiT layers get
    their zero-data block-wise calibration after the swap. ``progress``: True (tqdm bars), False (none), or a callable
    ``(done, total, what)`` called after each layer (``what`` = its name) and, for VQ4DiT, after each of its
    calibration steps (a second count, ``what`` = "VQ4DiT calibration step i/n"); no bar is drawn then.
    """
    from .methods import vq4dit
    from .quantize import quantize_pipeline

    recipe = load_recipe(recipe)
    public.check_quantize_cost(pipe.transformer, recipe)  # public mode bounds VQ4DiT's calibration
    t_cal = 0.0
    if calib is None and needs_calibration(pipe, recipe):
        t0 = time.perf_counter()
        calib = calibrate(pipe, progress=bool(progress) and not callable(progress), **(calib_settings or {}))
        t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    if vq4dit.settings_for(pipe.transformer, recipe) is not None:
        model, report = vq4dit.quantize_vq4dit(pipe, recipe, progress=progress)
        qpipe = dataclasses.replace(pipe, transformer=model)
    else:
        qpipe, report = quantize_pipeline(pipe, recipe, calib, progress)
    qpipe.transformer.ditlab_recipe = recipe
    return Quantized(pipe=qpipe, recipe=recipe, report=report, seconds_quantize=time.perf_counter() - t0, seconds_calibrate=t_cal)


def save(quantized: Quantized, source: Pipeline, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Writes ``quantized`` as a standalone QDIR (atomic); ``load(out_dir)`` reads it back bit-identically."""
    from . import qdir

    totals = getattr(quantized.report, "totals", None)
    extra = {"report": totals() if callable(totals) else None, "seconds_quantize": quantized.seconds_quantize}
    return qdir.save_quantized(quantized.pipe.transformer, quantized.recipe, source, out_dir, overwrite=overwrite, extra=extra)


def qdir_source(folder: str | Path) -> str:
    """The FP model a QDIR was quantized from, loadable from any working directory (see ``qdir.fp_source``)."""
    from . import qdir

    return qdir.fp_source(folder)


def check_fp_and_quantized(pipe, quantized) -> None:
    """ConfigError naming ``pipe`` if it is not a full-precision pipeline (the reference images), or ``quantized`` if
    it is not a ``Quantized`` (``quantize``'s result, or ``load_qdir(folder)[0]``); ``quantized`` None is allowed."""
    if not isinstance(pipe, Pipeline) or is_quantized(pipe):
        raise ConfigError.invalid("pipe", getattr(pipe, "source", type(pipe).__name__), "a full-precision pipeline, the reference the images "
                                  "are scored against; to score a QDIR pass quantized=load_qdir(folder)[0] and pipe=load(qdir_source(folder))")
    if quantized is not None and not isinstance(quantized, Quantized):
        raise ConfigError.invalid("quantized", type(quantized).__name__, "a Quantized: quantize(pipe, recipe), or load_qdir(folder)[0] "
                                  "(load_qdir returns (Quantized, FP source))")


def is_quantized(pipe: Pipeline) -> bool:
    """True if some linear of ``pipe``'s transformer is quantized (a QDIR or a ``quantize`` result)."""
    from .quantize import has_quantized_layers

    return has_quantized_layers(pipe.transformer)


def weight_bytes(pipe: Pipeline) -> tuple[int, int]:
    """(packed bytes, fp16 bytes) of the quantizable linears (those not skipped by default) of ``pipe``."""
    from .models import default_skip_kinds
    from .quantize import weight_bytes as module_bytes

    packed = fp16 = 0
    skip = set(default_skip_kinds())
    for info in list_linears(pipe.transformer):
        if info.kind in skip:
            continue
        module = pipe.transformer.get_submodule(info.name)
        fp16 += 2 * info.out_features * info.in_features
        packed += module_bytes(module) if getattr(module, "is_quantized_linear", False) else 2 * info.out_features * info.in_features
    return packed, fp16


# ---------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=8)
def _fp_run(pipe: Pipeline, settings: SampleSettings) -> tuple[torch.Tensor, dict, float]:
    """FP images, content metrics and seconds for ``settings`` (cached: the FP model is read-only)."""
    labels = eval_labels(pipe.num_classes, settings.n_per_label)
    result = generate(pipe, labels, steps=settings.steps, guidance=settings.guidance, seed=settings.seed, scheduler=settings.scheduler, progress=False)
    return result.images, content_metrics(result.images, labels), result.seconds


def evaluate(pipe: Pipeline, recipe: Recipe | str | None = None, *, settings: SampleSettings = SampleSettings(), progress: bool = True,
             quantized: Quantized | None = None) -> dict:
    """Scores ``recipe`` on ``pipe`` (an FP pipeline) against the FP model on the same labels and seeds.

    Returns one JSON-ready dict: psnr, ssim (final images vs FP), class_acc, class_acc_fp, fd, fd_fp,
    class_agreement, weight_bytes, weight_bytes_fp16, backend, seconds_calibrate, seconds_quantize, seconds_sample,
    seconds_sample_fp, n_images, plus the settings. ``quantized`` scores an existing quantized copy of ``pipe``
    (e.g. ``load_qdir(folder)[0]``, with ``pipe = load(qdir_source(folder))``); ``recipe`` is then its recipe.
    """
    check_fp_and_quantized(pipe, quantized)
    if quantized is not None:
        given = None if recipe is None else load_recipe(recipe)
        if given is not None and given != quantized.recipe:
            raise ConfigError.invalid("recipe", given.name, f"omitted with quantized= (the quantized copy's recipe {quantized.recipe.name!r} is used)")
        recipe = quantized.recipe
    else:
        recipe = load_recipe("fp" if recipe is None else recipe)
    plan = recipe.resolve(list_linears(pipe.transformer))  # a bad recipe fails now, not after minutes of FP sampling
    quantizes = any(cfg is not None and not cfg.is_fp for cfg in plan.values())
    evaluation.check_scorable(pipe)
    labels = eval_labels(pipe.num_classes, settings.n_per_label)
    fp_images, fp_content, fp_seconds = _fp_run(pipe, settings)
    q = quantized or (quantize(pipe, recipe, progress=progress) if quantizes else None)
    if q is None:
        images, content, seconds = fp_images, fp_content, fp_seconds
        packed, fp16 = weight_bytes(pipe)
    else:
        result = generate(q.pipe, labels, steps=settings.steps, guidance=settings.guidance, seed=settings.seed, scheduler=settings.scheduler, progress=progress)
        images, seconds = result.images, result.seconds
        content = content_metrics(images, labels)
        packed, fp16 = weight_bytes(q.pipe)
    _, real_acc = real_features()
    return {
        "model": pipe.source,
        "recipe": recipe.name,
        **evaluation.fidelity(fp_images, images, fp_content["pred"], content["pred"]),
        "class_acc": content["class_acc"],
        "class_acc_fp": fp_content["class_acc"],
        "fd": content["fd"],
        "fd_fp": fp_content["fd"],
        "class_acc_real": real_acc,
        "weight_bytes": packed,
        "weight_bytes_fp16": fp16,
        "backend": backends.current(),
        "seconds_calibrate": q.seconds_calibrate if q else 0.0,
        "seconds_quantize": q.seconds_quantize if q else 0.0,
        "seconds_sample": seconds,
        "seconds_sample_fp": fp_seconds,
        "n_images": len(labels),
        **dataclasses.asdict(settings),
    }


# ---------------------------------------------------------------- small helpers for the UI and the CLI


def save_grid(images: torch.Tensor, path: str | Path, rows: int, scale: int = 2) -> Path:
    """Writes an image grid of uint8 images (B, 3, H, W) with ``rows`` rows, atomically (the format follows the
    suffix, e.g. .png); returns the path."""
    from PIL import Image

    from .atomic import file_in_the_way, write_atomic

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ConfigError.invalid("path", str(path), "a file name ending in an image suffix such as .png, .jpg or .webp")
    if path.is_dir():
        raise ConfigError.invalid("path", str(path), "a file name, not a folder")
    if (in_the_way := file_in_the_way(path)) is not None:
        raise ConfigError.invalid("path", str(path), f"a file in a folder ({in_the_way} is a file)")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ConfigError.invalid("images", getattr(images, "shape", type(images).__name__), "a uint8 tensor (B, 3, H, W)")
    rows = public.whole_number(rows, "rows", 1, max(1, images.shape[0]))
    scale = public.whole_number(scale, "scale", 1, 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(image_grid(images, rows, scale=scale))
    write_atomic(path, lambda tmp: grid.save(tmp, format=fmt), suffix=path.suffix)
    return path


def label_choices(pipe: Pipeline) -> list[tuple[str, str]]:
    """(display name, class id as text) pairs for pickers.

    The values are strings because that is what Gradio's API description (``Client.view_api``) advertises for a
    CheckboxGroup; ``class_ids`` turns them (or ints) back into class ids.
    """
    return [(f"{i}: {pipe.label_name(i)}", str(i)) for i in range(pipe.num_classes)]


SCHEDULER_NAMES = {"dpm++": "DPM-Solver++(2M)", "ddim": "DDIM"}  # display names of the samplers (sampling.SCHEDULERS)


def scheduler_choices() -> list[tuple[str, str]]:
    """(display name, sampler id) pairs for pickers, the default first."""
    return [(SCHEDULER_NAMES[s], s) for s in sorted(SCHEDULERS, key=lambda s: s != DEFAULT_SCHEDULER)]


def check_scheduler(scheduler) -> None:
    """ConfigError naming ``sampler`` (the app's label) unless ``scheduler`` is one of ``sampling.SCHEDULERS``."""
    _check_scheduler(scheduler, field="sampler")


def class_ids(labels, num_classes: int) -> tuple[int, ...]:
    """Class ids from a picker's values (ints or their text, e.g. ``["0", "3"]``); ConfigError naming ``labels`` if
    one is not a whole number in 0 … num_classes − 1, or none is given."""
    from .errors import ConfigError

    allowed = f"class ids 0 to {num_classes - 1} (as numbers or text)"
    if isinstance(labels, (str, int)) or labels is None:
        labels = [] if labels is None else [labels]
    ids = []
    for y in labels:
        text = str(y).strip()
        if isinstance(y, bool) or not text.lstrip("-").isdigit() or not 0 <= int(text) < num_classes:
            raise ConfigError.invalid("labels", y, allowed)
        ids.append(int(text))
    if not ids:
        raise ConfigError.invalid("labels", list(labels), "pick at least one class")
    return tuple(ids)


def generate_grid(pipe: Pipeline, labels: Sequence[int], n_per_label: int, *, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                  seed: int = 0, scheduler: str = DEFAULT_SCHEDULER, scale: int = 3, progress: bool = True) -> tuple["object", dict]:
    """One row per label of ``n_per_label`` images → (uint8 grid array (H, W, 3), info dict with seconds and seed).

    Results for the shared FP model are cached (sampling is deterministic), so a page load costs one sampling run.
    """
    labels = class_ids(labels, pipe.num_classes)
    n_per_label = public.whole_number(n_per_label, "n_per_label", 1, 16)  # 2.0 from a UI slider is 2; 1.7 is refused
    steps, seed, scale = public.whole_number(steps, "steps", 1, 1000), public.whole_number(seed, "seed", 0, MAX_SEED), public.whole_number(scale, "scale", 1, 16)
    guidance = check_guidance(guidance)
    key = (pipe, labels, n_per_label, steps, guidance, seed, scheduler, scale)

    def cached():
        with _GRIDS_LOCK:
            if key in _GRIDS:
                _GRIDS.move_to_end(key)
                grid, info = _GRIDS[key]
                return grid, {**info, "cached": True}
            return None

    if (hit := cached()) is not None:  # a cached grid never waits for anyone's sampling
        return hit
    with _GRIDS_LOCK:
        key_lock = _GRID_KEY_LOCKS.setdefault(key, threading.Lock())
    try:
        with key_lock:  # the same grid asked for twice at once (two first page loads) is sampled once
            if (hit := cached()) is not None:
                return hit
            batch = [y for y in labels for _ in range(n_per_label)]
            result = generate(pipe, batch, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler, progress=progress)
            info = {"seconds": round(result.seconds, 2), "seed": seed, "n_images": len(batch), "path": "fp32 (torch, CPU)"}
            grid = image_grid(result.images, rows=len(labels), scale=scale)
            grid.setflags(write=False)  # shared between callers
            with _GRIDS_LOCK:
                _GRIDS[key] = (grid, info)
                while len(_GRIDS) > 16:
                    _GRIDS.popitem(last=False)
            return grid, info
    finally:
        with _GRIDS_LOCK:
            if not key_lock.locked():
                _GRID_KEY_LOCKS.pop(key, None)


# FP grids by (pipe, labels, n_per_label, steps, guidance, seed, scheduler, scale): sampling is deterministic, so a
# page load costs one run. ``progress`` is not part of the key (the app's warm-up samples without a tqdm bar).
_GRIDS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_GRIDS_LOCK = threading.Lock()  # guards _GRIDS and _GRID_KEY_LOCKS (held for lookups only, never while sampling)
_GRID_KEY_LOCKS: dict[tuple, threading.Lock] = {}  # one per grid being sampled


# ---------------------------------------------------------------- side-by-side comparison (the app's Compare tab)


@dataclass
class Comparison:
    """FP and quantized images for the same labels and seed, their difference, metrics and per-step divergence."""

    fp_images: torch.Tensor  # uint8 (B, 3, H, W)
    q_images: torch.Tensor  # uint8 (B, 3, H, W)
    diff: torch.Tensor  # uint8 (B, 3, H, W): |fp − q| mean over channels, ×4, as a heat colour map
    metrics: dict
    divergence: list[float]  # per step: ‖x_q − x_fp‖ / ‖x_fp‖ of the latents after that step
    timesteps: list[int]
    backend: str


def heat(diff: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """|difference| (B, H, W) float in [0, 255] → uint8 (B, 3, H, W) black→red→yellow→white heat map."""
    v = (diff * gain / 255.0).clamp(0, 1)
    r = (v * 3).clamp(0, 1)
    g = (v * 3 - 1).clamp(0, 1)
    b = (v * 3 - 2).clamp(0, 1)
    return (torch.stack([r, g, b], 1) * 255).round().to(torch.uint8)


def compare(pipe: Pipeline, quantized: Quantized, labels: Sequence[int], *, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
            seed: int = 0, scheduler: str = DEFAULT_SCHEDULER, backend: str | None = None, progress: bool = True) -> Comparison:
    """Samples ``labels`` with the FP pipeline and the quantized one (same seeds), on ``backend`` (default: current)."""
    check_fp_and_quantized(pipe, quantized)
    if quantized is None:
        raise ConfigError.invalid("quantized", None, "a Quantized: quantize(pipe, recipe), or load_qdir(folder)[0]")
    kwargs = dict(steps=steps, guidance=guidance, seed=seed, scheduler=scheduler, record_trajectory=True, progress=progress)
    fp = generate(pipe, labels, **kwargs)
    with backends.use_backend(backend or backends.requested()):
        used = backends.current()
        q = generate(quantized.pipe, labels, **kwargs)
    divergence = [float((b - a).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(fp.trajectory, q.trajectory)]
    packed, fp16 = weight_bytes(quantized.pipe)
    metrics = {**evaluation.fidelity(fp.images, q.images), "weight_bytes": packed, "weight_bytes_fp16": fp16,
               "seconds_fp": fp.seconds, "seconds_quantized": q.seconds, "seconds_quantize": quantized.seconds_quantize}
    scorable = True
    try:
        evaluation.check_scorable(pipe)
    except ConfigError:  # models other than Shapes-10 have no classifier metrics
        scorable = False
    if scorable:  # the Fréchet distance is not shown here (a few images say little about a distribution)
        fp_c, q_c = content_metrics(fp.images, labels, with_fd=False), content_metrics(q.images, labels, with_fd=False)
        metrics.update(class_acc_fp=fp_c["class_acc"], class_acc=q_c["class_acc"], class_agreement=float((fp_c["pred"] == q_c["pred"]).double().mean()))
    from .sampling import make_scheduler

    sched = make_scheduler(pipe.scheduler_config, scheduler)
    sched.set_timesteps(steps)
    diff = heat((fp.images.float() - q.images.float()).abs().mean(1))
    return Comparison(fp.images, q.images, diff, metrics, divergence, [int(t) for t in sched.timesteps], used)


# the app's session logic (no gradio in these modules), reached through ``api`` by app.py
from .exports import SessionFolders, app_workdir, export_zip, load_qdir, unpack_qdir  # noqa: E402,F401
from .jobs import Cancelled, Jobs, QuantCache, SessionNotes  # noqa: E402,F401
from .public import RateLimiter, check_request, check_server_path, client_address, limits, real_number, safe_name, whole_number  # noqa: E402,F401
from .recipe_editing import BULK_TARGETS, as_frame, bulk_edit, parse_recipe, recipe_table, same_table, table_help, table_recipe, write_recipe  # noqa: E402,F401
from .workbench import (APP_CALIBRATION, BACKEND_NAMES, BRANCHES, MODEL_KINDS, allocation_views, calibration_timesteps, cell_target,  # noqa: E402,F401
                        compare_metrics, default_backend, divergence_figure, grid_rows, layers_frame, memory_frame, model_markdown,
                        model_source, outlier_views, sensitivity_run, sensitivity_table)
