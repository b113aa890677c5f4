"""ditlab — the Gradio app. Layout and wiring only: every handler is a short call into ``ditlab.api``.

Run: ``python app.py`` (host/port from DITLAB_HOST / DITLAB_PORT, default 127.0.0.1:7860). The FP model is loaded once
and shared read-only; each session's quantized copies live in a bounded LRU keyed by (session, recipe), never in
``gr.State`` (which holds only the model source string). Named API endpoints: /load_model, /apply_preset, /compare,
/outliers, /sensitivity, /allocate, /export (see docs/APP.md).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from ditlab import api, plots  # noqa: E402
from ditlab.errors import ConfigError, DitlabError  # noqa: E402

PIPE = api.load("shipped")  # loaded once, shared read-only by every session
LABEL_CHOICES = api.label_choices(PIPE)
SCHEDULER_CHOICES = api.scheduler_choices()


def per_class_cap(n_labels: int, cap: int) -> int:
    """The most images per class a request for ``n_labels`` classes may ask for: ≤ ``cap`` (the slider's own top) and
    within the images-per-request limit (64 locally, 16 in public mode, e.g. on Spaces)."""
    return max(1, min(cap, api.limits().max_images // max(n_labels, 1)))


GENERATE_PER_CLASS, COMPARE_PER_CLASS = 16, 8  # the images-per-class sliders' tops (lower when the request limit says so)
MAX_STEPS_SHOWN = min(100, api.limits().max_steps)  # the steps sliders' top (50 in public mode)


def first_screen() -> dict:
    """The Generate tab's first settings: every class, up to 5 images each (1 each in public mode, e.g. on Spaces,
    where a request holds ≤ 16 images)."""
    return dict(labels=[v for _, v in LABEL_CHOICES], n_per_label=per_class_cap(len(LABEL_CHOICES), 5), seed=0,
                steps=api.DEFAULT_STEPS, guidance=api.DEFAULT_GUIDANCE)


FIRST_SCREEN = first_screen()


def warm_up() -> None:
    """Samples the first screen's grid (cached by ``generate_grid``), so the first visitor gets it at once. Without a
    tqdm bar: gradio, imported meanwhile, patches tqdm for its progress bars and broke a bar already running here."""
    api.generate_grid(PIPE, FIRST_SCREEN["labels"], FIRST_SCREEN["n_per_label"], steps=FIRST_SCREEN["steps"],
                      guidance=FIRST_SCREEN["guidance"], seed=FIRST_SCREEN["seed"], progress=False)


if __name__ == "__main__":  # start sampling while gradio is imported and the UI is built (~half the time to first images)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Spaces, Docker, systemd stop with SIGTERM: close as on Ctrl-C
    api.generate(PIPE, [0], steps=1, progress=False)  # lazy imports first: an import lock held by gradio would stall the thread
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from ditlab import api_inputs  # noqa: E402


api_inputs.let_the_handlers_check_inputs()

log = logging.getLogger("ditlab.app")
QUANTIZED = api.QuantCache(max_entries=6)  # bounded: at most 6 quantized copies in memory across all sessions
SENSITIVITY_METRICS = ("sqnr_db", "ssim", "psnr", "agreement")  # the metric picker's choices
# What a session remembers, by kind: "sensitivity" → (model source, setting, SensitivityResult), which the metric picker
# re-draws; "export" → (model source, recipe JSON, QDIR folder, name shown) of the export it loaded last; "table" →
# (digest of the last checked table, recipe JSON and source; when)
NOTES = api.SessionNotes()
JOBS = api.Jobs()  # cancel tokens of running jobs: Cancel stops a job at its next layer, freeing the worker
RATE = api.RateLimiter()  # public mode: heavy jobs per client address per minute
WORKDIR = api.app_workdir()  # exports, uploads and recipe files of this process (removed at exit)
FOLDERS = api.SessionFolders(WORKDIR)  # each session keeps only its newest export and loaded upload
PRESET_NAMES = list(api.PRESETS)
LAYER_NAMES = [layer.name for layer in api.layers(PIPE)]
TIMESTEPS = api.calibration_timesteps(PIPE)


# ---------------------------------------------------------------- handler helpers
def guarded(n_outputs: int):
    """Catches errors: shows a one-line message (toast + the last output, a status Markdown) and leaves every other
    output, e.g. the user's table, untouched. A DitlabError is the user's message; anything else is a bug, logged
    with its traceback on the server and summarised in one line for the user."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except DitlabError as exc:
                message = str(exc)
            except Exception as exc:  # noqa: BLE001 - never a traceback in the page
                log.exception("%s failed", fn.__name__)
                message = f"internal error in {fn.__name__} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            gr.Warning(message)
            return (*[gr.update()] * (n_outputs - 1), f"⚠️ {message}")
        return inner
    return wrap


def _shown(text, limit: int = 80) -> str:
    """User text (a recipe name, a layer pattern) as it may appear in a Markdown status: one line, at most ``limit``
    characters, Markdown and HTML characters escaped (a recipe named "# x" must not render a heading, nor a name with
    http://… a link)."""
    text = " ".join(str(text).split())  # one line: no block syntax (headings, lists) can start inside a status
    if not text:
        return "(unnamed)"
    text = text if len(text) <= limit else text[:limit] + "…"
    text = re.sub(r"([\\`*_\[\]|~])", r"\\\1", text).replace("<", "&lt;")
    return re.sub(r"(?i)(www)\.", r"\1\\.", text).replace("://", "\\://")  # no bare URL becomes a link


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _job(request: gr.Request | None, name: str):
    """Starts a heavy job of this session (``name``: what Cancel's message calls it): the public-mode rate limit
    first, then a cancellable job context."""
    RATE.check(api.client_address(request))
    return JOBS.run(_session(request), name)


def _recipe_outputs(pipe, recipe, message: str) -> tuple:
    """(recipe table, recipe JSON, model layers table, memory table, message) for a new current recipe."""
    return api.recipe_table(pipe, recipe), recipe.to_json(), api.layers_frame(pipe, recipe), api.memory_frame(pipe, recipe), message


def _quantized(source: str, recipe, request):
    """The session's quantized copy of ``recipe`` (cached). A recipe that came from Load export is re-read from its
    QDIR folder when the shared cache has dropped it, never re-quantized (an export may hold GPTQ/VQ4DiT weights or
    other calibration settings that re-quantizing would not reproduce)."""
    pipe, session = api.load(source), _session(request)

    def make(p, r):
        folder, _ = _loaded_export(session, p, r)
        if folder is not None and folder.is_dir():
            return api.load_qdir(folder)[0]
        return api.quantize(p, r, calib_settings=api.APP_CALIBRATION)

    return QUANTIZED.get(session, pipe, recipe, make)


def _loaded_export(session: str, pipe, recipe) -> tuple[Path | None, str | None]:
    """(QDIR folder, name the user knows it by: the uploaded zip's or the folder's) of the export this session loaded,
    if it holds ``recipe`` on ``pipe`` (its weights are used then, not a new quantization: they may come from GPTQ,
    VQ4DiT or other calibration settings); (None, None) otherwise."""
    source, recipe_json, folder, name = NOTES.get(session, "export", (None, None, None, None))
    return (folder, name) if (source, recipe_json) == (pipe.source, recipe.to_json(indent=None)) else (None, None)


# ---------------------------------------------------------------- handlers
def _slider_top(n_labels: int, cap: int) -> int:
    """An images-per-class slider's top: gradio refuses a slider whose top equals its bottom (1), so where the limit
    allows one image per class the top stays 2 and the slider is locked at 1 (``images_per_class``)."""
    return max(2, per_class_cap(n_labels, cap))


def images_per_class(labels, current, cap: int):
    """The images-per-class slider for the chosen classes: its top is what the images-per-request limit allows for
    that many classes (a value above it comes down to it), and its note says why, so it offers no refused request."""
    n = len(labels) if isinstance(labels, list) and labels else 1
    top, limit = per_class_cap(n, cap), api.limits().max_images
    value = min(current, top) if isinstance(current, (int, float)) and not isinstance(current, bool) else gr.update()
    note = f"at most {top} for {n} class{'es' if n > 1 else ''} ({limit} images per request)" if top < cap else ""  # None keeps the old note
    return gr.update(maximum=_slider_top(n, cap), value=value, interactive=top > 1, info=note)


@guarded(2)
def generate(labels, n_per_label, seed, steps, guidance, scheduler=api.DEFAULT_SCHEDULER, source="shipped", request: gr.Request = None,
             progress=gr.Progress(track_tqdm=True)):
    """A grid with one row per chosen class from the session's FP model (``source``). API clients may omit
    ``scheduler`` (default sampler) and ``source`` (the shipped model)."""
    n_per_label = api.whole_number(n_per_label, "images per class", 1, GENERATE_PER_CLASS)
    api.check_request(max(1, len(labels or [])) * n_per_label, steps, guidance, seed)  # no labels: generate_grid names the field
    api.check_scheduler(scheduler)
    pipe = api.load(source)
    with _job(request, "Generate"):  # a cached grid returns at once; the same grid asked twice is sampled once
        grid, info = api.generate_grid(pipe, labels, n_per_label, steps=int(steps), guidance=float(guidance), seed=int(seed), scheduler=scheduler)
    took = f"sampled in {info['seconds']} s, cached" if info.get("cached") else f"{info['seconds']} s"
    return grid, (f"{info['n_images']} images of `{source}` · seed {info['seed']} · {api.SCHEDULER_NAMES[scheduler]} · {took} · "
                  f"{info['path']}")


@guarded(13)
def load_model(kind, path):
    """Loads a model (shipped / local folder / hub id); resets the recipe to fp (and says so on the Recipe tab)."""
    source = api.model_source(kind, path)
    pipe = api.load(source)
    info = api.model_info(pipe)
    table, text, layers, memory, _ = _recipe_outputs(pipe, api.PRESETS["fp"], "")
    choices = api.label_choices(pipe)
    names, timesteps = [layer.name for layer in api.layers(pipe)], api.calibration_timesteps(pipe)
    return (source, api.model_markdown(info), layers, memory, table, text, gr.update(choices=choices, value=[v for _, v in choices][:8]),
            gr.update(choices=choices, value=[v for _, v in choices][:10]), "fp", gr.update(choices=names, value=names[0]), gr.update(choices=timesteps, value=timesteps[0]),
            f"recipe reset to **fp** for the model `{source}`", f"✓ loaded `{source}`")


@guarded(5)
def apply_preset(preset, source):
    """Replaces the recipe with a preset (or imported recipe JSON)."""
    if not isinstance(preset, str) or not preset.strip():
        raise ConfigError.invalid("preset", preset, "a preset name: " + ", ".join(PRESET_NAMES))
    pipe = api.load(source)
    recipe = api.parse_recipe(preset, pipe, field="preset")
    said = f"✓ preset **{recipe.name}** loaded" if preset.strip() in api.PRESETS else f"✓ recipe **{_shown(recipe.name)}** imported"
    return _recipe_outputs(pipe, recipe, said)


@guarded(5)
def table_edited(table, recipe_json, source, request: gr.Request = None):
    """Validates the edited table; the recipe JSON follows it (an invalid edit keeps the table and says why). The
    table is redrawn only where the recipe reads a row differently from how it was typed (method fp → 16/16 bits, a
    method on an fp row → W8, " 8" → 8), so an edit in progress elsewhere is never overwritten. The browser sends one edit twice: the second
    copy changes nothing (no second warning for one mistake)."""
    if request is not None and _seen_table(_session(request), table, recipe_json, source):
        return (gr.update(),) * 5
    pipe = api.load(source)
    recipe = api.table_recipe(pipe, table, api.parse_recipe(recipe_json))
    shown = api.recipe_table(pipe, recipe)
    table_update = gr.update() if api.same_table(table, shown) else shown
    return table_update, recipe.to_json(), api.layers_frame(pipe, recipe), api.memory_frame(pipe, recipe), f"✓ table valid · recipe **{_shown(recipe.name)}**"


def _seen_table(session: str, table, recipe_json, source) -> bool:
    """Whether this session's last table check, under a second ago, had exactly these inputs (the browser's second
    copy of one edit); records the inputs. After a second the same table is checked again: a preset may have
    replaced it meanwhile, and the status must then say what is wrong with it once more."""
    try:
        shown = api.as_frame(table)
        key = hashlib.sha256(repr((shown.astype(str).values.tolist(), list(shown.columns), recipe_json, source)).encode()).hexdigest()
    except Exception:  # noqa: BLE001 - a malformed table is table_recipe's to report
        return False
    now = time.monotonic()
    last_key, last_time = NOTES.swap(session, "table", (key, now), (None, 0.0))
    return key == last_key and now - last_time < 1.0


def recipe_for_run(table, recipe_json, source):
    """Before Compare/Export: the table's recipe, or stop the chain with the table's error."""
    try:
        return api.table_recipe(api.load(source), table, api.parse_recipe(recipe_json)).to_json()
    except DitlabError as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def preset_shown(recipe_json):
    """The preset picker follows the recipe, whoever changed it (a table edit, bulk edit, import, Allocate, Load
    export): the preset's name while the recipe is that preset, else empty."""
    try:
        recipe = api.parse_recipe(recipe_json)
    except DitlabError:
        return gr.update()
    return recipe.name if api.PRESETS.get(recipe.name) == recipe else None


def download_recipe(recipe_json, request: gr.Request = None):
    """The file the Download button serves: the current recipe as ``<name>.recipe.json``, refreshed whenever the
    recipe changes (a click serves the file the button holds, so setting it on the click gave the previous recipe).
    A session keeps only its newest file (gradio serves its own copy). An invalid recipe keeps the last file."""
    try:
        recipe = api.parse_recipe(recipe_json)
    except DitlabError:
        return gr.update()
    session = _session(request)
    folder = FOLDERS.fresh(session, "recipe")
    path = api.write_recipe(recipe, folder)
    FOLDERS.keep_only(session, "recipe", folder)
    return str(path)


@guarded(5)
def bulk_edit(table, recipe_json, target, setting, source):
    """Applies one setting to every layer a kind / block / pattern selects."""
    pipe = api.load(source)
    recipe = api.bulk_edit(pipe, table, api.parse_recipe(recipe_json), target, setting)
    return _recipe_outputs(pipe, recipe, f"✓ {_shown(target)} → {_shown(setting)} · recipe **{_shown(recipe.name)}**")


@guarded(5)
def import_recipe(text, upload, source):
    """Imports a recipe from pasted JSON or an uploaded .json file."""
    pipe = api.load(source)
    origin = f"the uploaded file `{Path(upload).name}`" + (" (the pasted text was not used)" if (text or "").strip() else "") if upload else "the pasted JSON"
    if upload and (size := Path(upload).stat().st_size) > api.limits().max_recipe_bytes:  # said before reading it
        raise ConfigError.invalid("recipe JSON", f"{size} bytes", f"at most {api.limits().max_recipe_bytes} bytes ({origin})")
    data = Path(upload).read_bytes() if upload else text
    try:
        recipe = api.parse_recipe(data, pipe)
    except DitlabError as exc:
        raise type(exc)(f"{origin}: {exc}") from None
    return _recipe_outputs(pipe, recipe, f"✓ recipe **{_shown(recipe.name)}** imported from {origin}")


@guarded(6)
def compare(recipe_json, labels, n_per_label, seed, steps, guidance, backend, source="shipped", scheduler=api.DEFAULT_SCHEDULER,
            request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
    """FP vs quantized images (same seeds), difference heat map, metrics and per-step divergence. ``source`` is the
    session's state; ``scheduler`` may be omitted by API clients (default sampler)."""
    pipe = api.load(source)
    recipe = api.parse_recipe(recipe_json, pipe)
    n_per_label = api.whole_number(n_per_label, "images per class", 1, COMPARE_PER_CLASS)
    api.check_request(max(1, len(labels or [])) * n_per_label, steps, guidance, seed)
    api.check_scheduler(scheduler)
    batch = [y for y in api.class_ids(labels, pipe.num_classes) for _ in range(n_per_label)]
    with _job(request, "Compare"):
        q = _quantized(source, recipe, request)
        c = api.compare(pipe, q, batch, steps=int(steps), guidance=float(guidance), seed=int(seed), scheduler=scheduler, backend=backend or None)
    rows = api.grid_rows(len(labels), n_per_label)
    quantized_any = any(cfg is not None and not cfg.is_fp for cfg in recipe.resolve(api.list_linears(pipe.transformer)).values())
    path = f"images by the **{api.BACKEND_NAMES.get(c.backend, c.backend)}**" if quantized_any else "**no layer is quantized**: both columns are the FP model"
    export = _loaded_export(_session(request), pipe, recipe)[1]
    if export is not None and quantized_any:
        path += f" · weights of the loaded export **{_shown(export)}** (Export tab), not a new quantization"
    status = f"recipe **{_shown(recipe.name)}** · {len(batch)} images · seed {int(seed)} · {api.SCHEDULER_NAMES[scheduler]} · {path}"
    return (api.image_grid(c.fp_images, rows, scale=3), api.image_grid(c.q_images, rows, scale=3), api.image_grid(c.diff, rows, scale=3),
            api.compare_metrics(c.metrics), api.divergence_figure(c.divergence, c.timesteps), status)


@guarded(4)
def outliers(layer, timestep, branch, source, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
    """Before/after views of one layer's input at one timestep and CFG branch, and the model-wide map."""
    pipe = api.load(source)
    with _job(request, "Outliers"):
        res, fig, table, omap = api.outlier_views(pipe, api.calibrate(pipe, **api.APP_CALIBRATION), layer, timestep, branch)
    return fig, table, omap, f"{res.layer} ({res.kind}) · t={res.timestep} · {res.branch} branch · {res.rows} rows × {res.in_features} channels"


@guarded(3)
def sensitivity(setting, metric, source, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
    """Layers × timestep-groups sensitivity of one setting (cached on disk)."""
    if not isinstance(setting, str) or not setting.strip():
        raise ConfigError.invalid("setting", setting, "a preset name or a recipe JSON")
    if metric not in SENSITIVITY_METRICS:  # before the run, not after it
        raise ConfigError.invalid("metric", metric, ", ".join(SENSITIVITY_METRICS))
    pipe = api.load(source)
    recipe = api.parse_recipe(setting, pipe, field="setting")  # a preset or recipe JSON text, size-limited: never a server file
    with _job(request, "Sensitivity"):
        res = api.sensitivity_run(pipe, recipe, lambda p: api.calibrate(p, **api.APP_CALIBRATION))
    NOTES.put(_session(request), "sensitivity", (source, setting, res))
    return (*_sensitivity_views(res, metric), f"{res.setting}: {res.n_computed} cells computed, {res.n_cached} cached, {res.seconds:.1f} s")


def _sensitivity_views(res, metric: str) -> tuple:
    """(heat-map figure, coloured table) of a sensitivity result shown as ``metric``."""
    return plots.sensitivity_figure(res, metric), api.sensitivity_table(res, metric)[1]


@guarded(3)
def sensitivity_metric(setting, metric, source, request: gr.Request = None):
    """A new metric re-draws the session's last sensitivity result at once (nothing is computed here)."""
    last = NOTES.get(_session(request), "sensitivity")
    if last is None or last[0] != source:
        return gr.update(), gr.update(), f"press **Run sensitivity** to measure {_shown(setting)} (then the metric choice re-draws it at once)"
    res = last[2]  # the table shown is the last result, whatever the setting picker names by now: it follows the metric
    other = f" (press **Run sensitivity** to measure {_shown(setting)})" if last[1] != setting else ""
    return (*_sensitivity_views(res, metric), f"{_shown(res.setting)}: shown as {metric}{other}")


def open_cell(source, evt: gr.SelectData, request: gr.Request = None):
    """A click on a cell of the sensitivity table opens that layer and timestep group in Outliers. The table is the
    session's last result, so nothing is measured here (the setting picker may name another setting by now). With no
    result the chain stops: no Outliers run."""
    last = NOTES.get(_session(request), "sensitivity")
    if last is None or last[0] != source:
        raise gr.Error("press Run sensitivity first: a click opens a cell of its table in Outliers", print_exception=False)
    try:
        pipe = api.load(source)
        layer, t = api.cell_target(pipe, last[2], api.calibration_timesteps(pipe), *evt.index)
    except DitlabError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    return gr.Tabs(selected="outliers"), layer, t, f"opened {layer} at t={t} (from the table of {last[2].setting})"


@guarded(9)
def allocate(budget, source, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
    """Runs the bit allocator at a budget and loads the result into the recipe table (the Allocate button only: a
    slider move never replaces the user's table). Outputs: recipe views, preset (cleared), Recipe-tab status, figures, status."""
    budget = api.real_number(budget, "budget", 4.0, 8.0)
    pipe = api.load(source)
    with _job(request, "Allocate"):
        alloc, alloc_fig, pareto_fig = api.allocation_views(pipe, budget)
    table, text, layers, memory, _ = _recipe_outputs(pipe, alloc.recipe, "")
    note = f"✓ recipe **{alloc.recipe.name}** from Allocate (average {alloc.avg_w_bits:.2f} weight bits)"
    return (table, text, layers, memory, None, note, alloc_fig, pareto_fig,
            f"✓ {alloc.recipe.name}: average {alloc.avg_w_bits:.2f} weight bits, loaded into the recipe table")


@guarded(3)
def export(recipe_json, source, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
    """Quantizes (cached) and writes the quantized model folder as a zip, plus the recipe JSON."""
    pipe = api.load(source)
    recipe = api.parse_recipe(recipe_json, pipe)
    session = _session(request)
    out = FOLDERS.fresh(session, "export")
    try:
        with _job(request, "Export"):
            folder = api.save(_quantized(source, recipe, request), pipe, out / api.safe_name(recipe.name))
        files = str(api.export_zip(folder)), str(api.write_recipe(recipe, out))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)  # the zip holds it
    FOLDERS.keep_only(session, "export", out)  # gradio served the earlier zips from its own copies
    return (*files, f"✓ exported `{folder.name}`")


@guarded(8)
def load_export(upload, path, request: gr.Request = None):
    """Loads an exported zip/folder back: its recipe fills the table and its quantized model is used by Compare."""
    if not upload and not (path or "").strip():
        raise ConfigError.invalid("export", "", "an exported .zip (upload it) or the path of a QDIR folder on the server")
    if not upload:
        api.check_server_path("export path", path)  # public mode: uploads only, no server paths
    RATE.check(api.client_address(request))  # each upload is unpacked on the server's disk
    session = _session(request)
    unpacked = FOLDERS.fresh(session, "upload")
    try:
        folder = api.unpack_qdir(upload or path, unpacked)
        q, source = api.load_qdir(folder)
        pipe = api.load(source)
    except BaseException as exc:
        shutil.rmtree(unpacked, ignore_errors=True)  # a refused upload leaves nothing behind
        if upload and isinstance(exc, DitlabError):  # name the upload, not the server folder it was unpacked in
            message = re.sub(re.escape(str(unpacked)) + r"/(qdir-[^/\s]+/)?", "", str(exc))
            raise type(exc)(message if Path(upload).name in message else f"{Path(upload).name}: {message}") from None
        raise
    name = Path(upload).name if upload else folder.name
    QUANTIZED.put(session, pipe, q.recipe, q)
    NOTES.put(session, "export", (pipe.source, q.recipe.to_json(indent=None), folder, name))
    FOLDERS.keep_only(session, "upload", unpacked)  # the export loaded before this one is no longer used
    unused = " (the server path was not used: the upload was)" if upload and str(path or "").strip() else ""
    return (source, *_recipe_outputs(pipe, q.recipe, "")[:4], None, f"✓ recipe **{_shown(q.recipe.name)}** from the export `{name}`",
            f"✓ loaded `{name}` (recipe {_shown(q.recipe.name)}, model {source}){unused}")


CANCEL_WAIT = 3.0  # s: how long Cancel waits for the jobs to stop, so its message can say they did (gradio_client gives up after 5 s)


def cancel(request: gr.Request = None):
    """Stops this session's running jobs at their next layer and reports the outcome (the Cancel buttons; scripts:
    /cancel). Not queued: it answers even while every worker is busy."""
    names = ", ".join(JOBS.names(_session(request)))  # Cancel on any tab stops the session's jobs of every tab: say which
    signalled, running = JOBS.cancel(_session(request), wait=CANCEL_WAIT)
    if not signalled:
        return "nothing to cancel: no job of yours is running"
    if running:
        return f"cancelling {signalled} job(s) ({names}): {running} still finishing its current layer"
    return f"cancelled {signalled} job(s) ({names}); the worker is free"


def forget_session(request: gr.Request):
    """When a browser session ends, its quantized copies leave the cache, its notes (loaded export, last sensitivity
    result and table check) are forgotten and its folders removed."""
    session = _session(request)
    QUANTIZED.drop_session(session)
    NOTES.forget(session)
    FOLDERS.drop(session)


# ---------------------------------------------------------------- layout
INTRO = ("# ditlab — post-training quantization lab for Diffusion Transformers\n"
         "Pick a **recipe** (how many bits each layer keeps), **compare** the quantized model with the full-precision one on the "
         "same seeds, and see **why** a setting fails (activation outliers, per-layer sensitivity).")
MODEL_STEP = ("**Model** loads another DiT (a local folder, or a hub id already in the local cache); the shipped tiny DiT is the default."
              if not api.limits().public else
              "**Model**: this is a public instance, so it loads " + api.public.allowed_sources_text() + "; the shipped tiny DiT is the default.")
HOW_TO = """1. **Generate** shows the full-precision model's images: the reference.
2. """ + MODEL_STEP + """
3. **Recipe**: pick a preset (e.g. `w4a8-hadanorm`), then edit any layer's method and bits in the table, or bulk-edit
   a kind of layer (`fc2`, `block 3`, a glob). The status line says at once if a value is not allowed, and why.
4. **Compare** quantizes the model with the table's recipe and renders both models on the same seeds: images,
   a difference heat map, PSNR / SSIM / class agreement and the per-step drift of the latents.
5. **Outliers** shows why a layer is hard to quantize (activation outliers before and after SmoothQuant, Hadamard,
   HadaNorm, ViDiT-Q); **Sensitivity & allocation** measures every layer's damage per timestep group and allocates
   bits under a budget with the **Allocate** button.
6. **Export** downloads the packed quantized weights and the recipe; loading the zip back restores both.

Long jobs show progress and can be cancelled (each tab's Cancel stops your running jobs). The full guide is docs/APP.md
in the repository."""
HEAVY = dict(concurrency_limit=2, concurrency_id="heavy")  # long jobs share 2 workers (2 CPU cores)


def _generate_tab():
    with gr.Tab("Generate", id="generate"):
        gr.Markdown("Full-precision samples of the session's model (the shipped one until you load another on the Model tab) — one row per class.")
        with gr.Row():
            with gr.Column(scale=1):
                labels = gr.CheckboxGroup(LABEL_CHOICES, value=FIRST_SCREEN["labels"], label="classes", elem_id="labels")
                n_per_label = gr.Slider(1, _slider_top(len(FIRST_SCREEN["labels"]), GENERATE_PER_CLASS), value=FIRST_SCREEN["n_per_label"], step=1,
                                        label="images per class", elem_id="n_per_label")
                seed = gr.Number(FIRST_SCREEN["seed"], label="seed", elem_id="seed")
                steps = gr.Slider(1, MAX_STEPS_SHOWN, value=FIRST_SCREEN["steps"], step=1, label="steps", elem_id="steps")
                guidance = gr.Slider(1.0, 10.0, value=FIRST_SCREEN["guidance"], step=0.5, label="CFG scale", elem_id="guidance")
                scheduler = gr.Radio(SCHEDULER_CHOICES, value=api.DEFAULT_SCHEDULER, label="sampler", elem_id="scheduler")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="g_cancel")
            with gr.Column(scale=2):
                grid = gr.Image(label="samples (one row per class)", type="numpy", elem_id="grid", format="png")
                status = gr.Markdown(label="status", elem_id="status")
    return [labels, n_per_label, seed, steps, guidance, scheduler], run, stop, [grid, status]


def build() -> gr.Blocks:
    fp = api.PRESETS["fp"]
    with gr.Blocks(title="ditlab", delete_cache=(3600, 3 * 3600)) as demo:  # gradio's copies of served files: kept 3 h
        source = gr.State("shipped")  # the session's model source; models themselves are cached per process
        gr.Markdown(INTRO)
        with gr.Accordion("New here? How to use ditlab", open=False, elem_id="how_to"):
            gr.Markdown(HOW_TO)
        with gr.Tabs(elem_id="tabs") as tabs:
            gen_inputs, gen_run, gen_cancel, gen_outputs = _generate_tab()
            with gr.Tab("Model", id="model"):
                with gr.Row():
                    kind = gr.Radio(list(api.MODEL_KINDS), value="shipped", label="model", elem_id="model_kind")
                    path = gr.Textbox(label="local folder or hub id", placeholder="/path/to/pipeline or facebook/DiT-XL-2-256", elem_id="model_path")
                    load_btn = gr.Button("Load", elem_id="load_model")
                model_md = gr.Markdown(api.model_markdown(api.model_info(PIPE)), elem_id="model_info")
                model_msg = gr.Markdown(label="status", elem_id="model_msg")
                memory = gr.Dataframe(api.memory_frame(PIPE, fp), label="weight memory: FP vs the current recipe", interactive=False, elem_id="memory")
                layers = gr.Dataframe(api.layers_frame(PIPE, fp), label="quantizable linear layers", interactive=False, max_height=360, elem_id="layers")
            with gr.Tab("Recipe", id="recipe"):
                with gr.Row():
                    preset = gr.Dropdown(PRESET_NAMES, value="fp", label="preset", elem_id="preset", scale=2)
                    target = gr.Dropdown(list(api.BULK_TARGETS), value="fc2", allow_custom_value=True, label="bulk edit: layers (kind, 'block N', glob)",
                                         elem_id="bulk_target", scale=2)
                    setting = gr.Textbox("W8", label="set to (e.g. W8, W4A8, FP, hadanorm W4A4 g64)", elem_id="bulk_setting", scale=2)
                    bulk_btn = gr.Button("Apply to layers", elem_id="bulk_apply", scale=1)
                table_msg = gr.Markdown("Edit method / w_bits / a_bits / w_group_size / a_granularity in the table; it is checked as you type.",
                                        label="status", elem_id="table_msg")
                with gr.Accordion("What each column accepts", open=False):
                    gr.Markdown(api.table_help())
                table = gr.Dataframe(api.recipe_table(PIPE, fp), label="per-layer recipe", interactive=True, static_columns=[0, 1, 2], max_height=480,
                                     datatype=["str", "str", "str", "str", "number", "number", "str", "str"], elem_id="recipe_table",
                                     column_widths=["30%", "8%", "9%", "11%", "8%", "8%", "13%", "13%"], wrap=True)  # the editable columns stay in view on a narrow window
                with gr.Accordion("Recipe JSON: import / export", open=False):
                    recipe_json = gr.Code(fp.to_json(), language="json", label="current recipe (what Compare and Export use)", interactive=False,
                                          elem_id="recipe_json")
                    with gr.Row():
                        paste = gr.Textbox(label="paste a recipe JSON", lines=4, elem_id="recipe_paste")
                        upload = gr.File(label="or upload a .json", file_types=[".json"], type="filepath", elem_id="recipe_upload")
                    with gr.Row():
                        import_btn = gr.Button("Import", elem_id="recipe_import")
                        download_btn = gr.DownloadButton("Download recipe JSON", value=str(api.write_recipe(fp, WORKDIR / "first-screen")),
                                                         elem_id="recipe_download")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    c_labels = gr.CheckboxGroup(LABEL_CHOICES, value=[v for _, v in LABEL_CHOICES][:8], label="classes", elem_id="c_labels", scale=3)
                    c_n = gr.Slider(1, _slider_top(8, COMPARE_PER_CLASS), value=1, step=1, label="images per class", elem_id="c_n")
                    c_seed = gr.Number(0, label="seed", elem_id="c_seed")
                with gr.Row():
                    c_steps = gr.Slider(1, MAX_STEPS_SHOWN, value=20, step=1, label="steps", elem_id="c_steps")
                    c_cfg = gr.Slider(1.0, 10.0, value=api.DEFAULT_GUIDANCE, step=0.5, label="CFG scale", elem_id="c_cfg")
                    c_backend = gr.Radio(api.backends.available(), value=api.default_backend(), label="execution path of the quantized layers",
                                         elem_id="c_backend")
                    c_sched = gr.Radio(SCHEDULER_CHOICES, value=api.DEFAULT_SCHEDULER, label="sampler", elem_id="c_scheduler")
                with gr.Row():
                    c_run = gr.Button("Compare", variant="primary", elem_id="compare")
                    c_cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                c_status = gr.Markdown(label="status", elem_id="c_status")
                with gr.Row():
                    fp_img = gr.Image(label="full precision (fp32, CPU)", type="numpy", format="png", elem_id="fp_images")
                    q_img = gr.Image(label="quantized", type="numpy", format="png", elem_id="q_images")
                    diff_img = gr.Image(label="|FP − quantized| heat map (×4)", type="numpy", format="png", elem_id="diff_images")
                with gr.Row():
                    metrics = gr.Dataframe(pd.DataFrame(columns=["metric", "value", "meaning"]), label="metrics", interactive=False, elem_id="metrics",
                                           scale=1, wrap=True, column_widths=["28%", "17%", "55%"])
                    divergence = gr.Plot(label="per-step divergence", elem_id="divergence", scale=1)
            with gr.Tab("Outliers", id="outliers"):
                with gr.Row():
                    o_layer = gr.Dropdown(LAYER_NAMES, value="transformer_blocks.0.ff.net.2", label="layer", elem_id="o_layer", scale=3,
                                          min_width=420)  # whole layer names (ff.net.0.proj vs ff.net.2) on a narrow window
                    # allow_custom_value: API clients may send a timestep as text ('999') or int; the handler checks it by name
                    o_t = gr.Dropdown(TIMESTEPS, value=TIMESTEPS[0], label="timestep", elem_id="o_timestep", allow_custom_value=True)
                    o_branch = gr.Radio(list(api.BRANCHES), value="cond", label="CFG branch", elem_id="o_branch", min_width=280)
                    o_run = gr.Button("Show", variant="primary", elem_id="outliers_run")
                    o_cancel = gr.Button("Cancel", variant="stop", elem_id="o_cancel", scale=0)
                o_msg = gr.Markdown(label="status", elem_id="o_msg")
                o_fig = gr.Plot(label="before / after each transform", elem_id="o_fig")
                o_table = gr.Dataframe(pd.DataFrame(columns=["transform", "kurtosis", "max_median", "err_a8", "err_a4", "out_err_a8", "out_err_a4"]),
                                       label="A8 / A4 errors per transform (out_err = layer-output error)", interactive=False, elem_id="o_table")
                o_map = gr.Plot(label="model-wide outlier map", elem_id="o_map")
            with gr.Tab("Sensitivity & allocation", id="sensitivity"):
                with gr.Row():
                    s_setting = gr.Dropdown([p for p in PRESET_NAMES if p != "fp"], value="w4a8-rtn", label="setting", elem_id="s_setting")
                    s_metric = gr.Dropdown(list(SENSITIVITY_METRICS), value="sqnr_db", label="metric", elem_id="s_metric")
                    s_run = gr.Button("Run sensitivity", variant="primary", elem_id="sensitivity_run")
                    s_cancel = gr.Button("Cancel", variant="stop", elem_id="s_cancel", scale=0)
                s_msg = gr.Markdown(label="status", elem_id="s_msg")
                s_fig = gr.Plot(label="layers × timestep groups", elem_id="s_fig")
                s_table = gr.Dataframe(pd.DataFrame(columns=["unit", "timestep groups: press Run sensitivity"]),
                                       label="click a cell to open that layer and timestep in Outliers", interactive=False, max_height=360, elem_id="s_table")
                with gr.Row():
                    budget = gr.Slider(4.0, 8.0, value=6.0, step=0.25, label="budget: average weight bits (W8A8 / W4A8 per layer)", elem_id="budget")
                    a_run = gr.Button("Allocate → recipe table", elem_id="allocate_run")
                a_msg = gr.Markdown(label="status", elem_id="a_msg")
                with gr.Row():
                    a_fig = gr.Plot(label="allocated bits", elem_id="a_fig")
                    p_fig = gr.Plot(label="Pareto sweep", elem_id="pareto_fig")
            with gr.Tab("Export", id="export"):
                gr.Markdown("Download the quantized model of the **current recipe** (the Recipe tab's table) — a QDIR folder, zipped: packed "
                            "weights, scales, recipe, manifest — and its recipe; load a previous export back (its recipe fills the table; "
                            "Compare uses it without re-quantizing).")
                with gr.Row():
                    with gr.Column():
                        e_run = gr.Button("Quantize and export", variant="primary", elem_id="export_run")
                        e_cancel = gr.Button("Cancel", variant="stop", elem_id="e_cancel")
                    e_zip = gr.File(label="quantized model (.zip)", elem_id="export_zip")
                    e_recipe = gr.File(label="recipe (.json)", elem_id="export_recipe")
                with gr.Row():
                    e_upload = gr.File(label="load an exported .zip", file_types=[".zip"], type="filepath", elem_id="export_upload")
                    e_path = gr.Textbox(label="or a QDIR folder on the server", elem_id="export_path")
                    e_load = gr.Button("Load export", elem_id="export_load")
                e_msg = gr.Markdown(label="status", elem_id="e_msg")

        recipe_views = [table, recipe_json, layers, memory]
        g_event = gen_run.click(generate, gen_inputs + [source], gen_outputs, api_name="generate", **HEAVY)
        g_load = demo.load(generate, gen_inputs, gen_outputs, api_name=False)
        for chosen, per_class, cap in ((gen_inputs[0], gen_inputs[1], GENERATE_PER_CLASS), (c_labels, c_n, COMPARE_PER_CLASS)):
            set_top = functools.partial(images_per_class, cap=cap)
            chosen.change(set_top, [chosen, per_class], per_class, api_name=False, queue=False, show_progress="hidden")
            demo.load(set_top, [chosen, per_class], per_class, api_name=False, queue=False, show_progress="hidden")  # the note, a lock at 1
        load_btn.click(load_model, [kind, path], [source, model_md, layers, memory, table, recipe_json, c_labels, gen_inputs[0], preset, o_layer, o_t,
                                                  table_msg, model_msg],
                       api_name="load_model")
        preset.input(apply_preset, [preset, source], recipe_views + [table_msg], api_name="apply_preset")
        table.input(table_edited, [table, recipe_json, source], recipe_views + [table_msg], api_name=False)
        bulk_btn.click(bulk_edit, [table, recipe_json, target, setting, source], recipe_views + [table_msg], api_name="bulk_edit")
        import_btn.click(import_recipe, [paste, upload, source], recipe_views + [table_msg], api_name="import_recipe")
        recipe_json.change(download_recipe, recipe_json, download_btn, api_name=False, queue=False, show_progress="hidden")
        recipe_json.change(preset_shown, recipe_json, preset, api_name=False, queue=False, show_progress="hidden")
        c_event = c_run.click(recipe_for_run, [table, recipe_json, source], recipe_json, api_name=False).success(
            compare, [recipe_json, c_labels, c_n, c_seed, c_steps, c_cfg, c_backend, source, c_sched], [fp_img, q_img, diff_img, metrics, divergence, c_status],
            api_name="compare", **HEAVY)
        o_event = o_run.click(outliers, [o_layer, o_t, o_branch, source], [o_fig, o_table, o_map, o_msg], api_name="outliers", **HEAVY)
        s_event = s_run.click(sensitivity, [s_setting, s_metric, source], [s_fig, s_table, s_msg], api_name="sensitivity", **HEAVY)
        s_metric.input(sensitivity_metric, [s_setting, s_metric, source], [s_fig, s_table, s_msg], api_name=False)
        cell_event = s_table.select(open_cell, [source], [tabs, o_layer, o_t, s_msg], api_name=False).success(
            outliers, [o_layer, o_t, o_branch, source], [o_fig, o_table, o_map, o_msg], api_name=False, **HEAVY)
        a_event = a_run.click(allocate, [budget, source], recipe_views + [preset, table_msg, a_fig, p_fig, a_msg], api_name="allocate", **HEAVY)
        e_event = e_run.click(recipe_for_run, [table, recipe_json, source], recipe_json, api_name=False).success(
            export, [recipe_json, source], [e_zip, e_recipe, e_msg], api_name="export", **HEAVY)
        e_load.click(load_export, [e_upload, e_path], [source] + recipe_views + [preset, table_msg, e_msg], api_name="load_export")
        jobs = [g_event, g_load, c_event, o_event, cell_event, s_event, a_event, e_event]
        for button, note in ((gen_cancel, gen_outputs[1]), (c_cancel, c_status), (o_cancel, o_msg), (s_cancel, s_msg), (e_cancel, e_msg)):
            # queue=False: a Cancel is never stuck behind (or refused by) a full queue; scripts can POST to /gradio_api/run/cancel
            button.click(cancel, None, note, cancels=jobs, api_name="cancel" if button is c_cancel else False, queue=False)
        demo.unload(forget_session)
    return demo


PAYLOAD_FIELDS = {"recipe_table": "table", "recipe_upload": "upload", "export_upload": "upload"}  # elem_id → field named in messages

demo = build()
api_inputs.refuse_unreadable_payloads(demo, PAYLOAD_FIELDS)
demo.queue(max_size=32, default_concurrency_limit=4)

if __name__ == "__main__":
    on_spaces = bool(os.environ.get("SPACE_ID"))  # Hugging Face Spaces serve 0.0.0.0:7860 (GRADIO_SERVER_NAME)
    status = 0
    try:
        demo.launch(
            server_name=os.environ.get("DITLAB_HOST") or os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_spaces else "127.0.0.1"),
            server_port=int(os.environ.get("DITLAB_PORT") or os.environ.get("GRADIO_SERVER_PORT") or "7860"),
            share=False,
            footer_links=["api"],
        )
    except KeyboardInterrupt:  # stopped while still starting (a stop once it serves ends launch() itself)
        pass
    except BaseException:  # noqa: BLE001 - e.g. the port is taken: say so, exit non-zero, still clean up
        traceback.print_exc()
        status = 1
    # Stopped (Ctrl-C, SIGTERM). A daemon thread may still be inside a torch operation (the warm-up grid, a job): the
    # interpreter's teardown under it makes the C++ runtime abort ("terminate called without an active exception",
    # exit status -6). Run the exit hooks (they remove the working folder) and leave without that teardown.
    atexit._run_exitfuncs()
    logging.shutdown()
    os._exit(status)
