"""Shared pieces of the results parts: settings, part documents on disk, evaluation rows, tables (the machine line and
the model provenance: ``provenance.py``).

A part's output is one JSON document (``docs/results/<part>.json``)::

    {"part", "command", "settings", "machine", "date", "seconds", "model", "complete", "data"}

and the markdown is rendered from those documents only (``report.assemble``), so any part can be rerun alone and
RESULTS.md reassembled without recomputing the others.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..atomic import write_text_atomic
from ..sampling import DEFAULT_SCHEDULER
from .provenance import REPO, _current_provenance, machine_info, machine_line, measured_on_current_model, model_provenance, now_utc  # noqa: F401 - re-exported

log = logging.getLogger("ditlab.results")
Say = Callable[[str], None]  # progress lines (the CLI prints them on stderr)


@dataclass(frozen=True)
class ResultsSettings:
    """Everything a ``bench`` results part measures with; recorded in every part document and table caption."""

    model: str = "shipped"
    n_per_label: int = 10  # quality: images per class (10 classes → 100 images)
    steps: int = 25
    guidance: float = 4.0
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER  # documents written before this setting existed used DDIM
    presets: tuple = ()  # empty = every preset of ditlab.config.PRESETS
    calib_samples: int = 8  # calibration (api.calibrate; cached on disk)
    calib_steps: int = 10
    vq_params: tuple = ()  # (key, value) pairs merged into the params of vq4dit recipes (e.g. shorter calibration)
    act_steps: int = 10  # claim (b): sampler steps of the held-out activations
    sens_images: int = 10  # claim (d): sensitivity cost controls
    sens_steps: int = 10
    sens_groups: int = 4
    budget_bits: float = 5.0
    n_random: int = 5
    pareto_measure: tuple = (3.0, 7.0)  # allocation budgets measured for the Pareto plot (besides budget_bits)
    kernel_m: int = 512
    kernel_repeats: int = 5
    xl: bool = True  # speed: run benchmarks/bench_dit_xl.py (DiT-XL/2, random weights)
    xl_args: tuple = ()  # extra arguments for it
    full: bool = False

    def sample_settings(self):
        from ..evaluation import SampleSettings

        return SampleSettings(n_per_label=self.n_per_label, steps=self.steps, guidance=self.guidance, seed=self.seed, scheduler=self.scheduler)

    @property
    def calib(self) -> dict:
        return {"n_samples": self.calib_samples, "steps": self.calib_steps}

    def preset_names(self) -> list[str]:
        from ..config import PRESETS

        names = list(self.presets) or list(PRESETS)
        return ["fp", *[n for n in names if n != "fp"]]  # FP first

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["presets"] = self.preset_names()
        out["vq_params"] = dict(self.vq_params)
        return out


POSITIVE_INTS = ("n_per_label", "steps", "calib_samples", "calib_steps", "act_steps", "sens_images", "sens_steps", "sens_groups",
                 "n_random", "kernel_m", "kernel_repeats")


def option(name: str) -> str:
    """The ``bench`` option of a settings field (``n_per_label`` → ``--n-per-label``)."""
    return "--" + name.replace("_", "-")


def check_settings(settings: ResultsSettings) -> None:
    """ConfigError naming the ``bench`` option for a bad setting: counts below 1, an unknown preset, vq params that
    are not key/value pairs. Called before any measurement, so a typo never costs a run or its results file."""
    from ..config import load_recipe
    from ..errors import ConfigError
    from ..public import check_counts

    check_counts(settings, POSITIVE_INTS, option)
    for name in settings.presets:
        try:
            load_recipe(name)
        except ConfigError as exc:
            raise ConfigError.invalid("--presets", name, exc.allowed or str(exc)) from None
    if not all(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in settings.vq_params):
        raise ConfigError.invalid("--vq-params", settings.vq_params, 'a JSON object, e.g. {"iterations": 2}')


FULL = dict(n_per_label=50, n_random=10, pareto_measure=(2.5, 3.0, 3.5, 4.0, 6.0, 7.0), kernel_repeats=10, full=True)


def full_settings(settings: ResultsSettings) -> ResultsSettings:
    """The heavier ``--full`` variant: 500 images, 10 random allocations, 6 measured Pareto points, 10 kernel repeats."""
    return dataclasses.replace(settings, **FULL)


# ---- provenance ----------------------------------------------------------------------------------------------------
_SAMPLING = ("model", "n_per_label", "steps", "guidance", "seed", "scheduler", "calib_samples", "calib_steps")
SCHEDULER_TITLES = {"ddim": "DDIM", "dpm++": "DPM-Solver++"}  # a missing "scheduler" in a part document means DDIM

PART_FIELDS = {  # the settings each part depends on (its command line shows only these)
    "quality": (*_SAMPLING, "presets", "vq_params"),
    "act": ("model", "calib_samples", "calib_steps", "act_steps"),
    "vq": (*_SAMPLING, "vq_params"),
    "mixed": (*_SAMPLING, "sens_images", "sens_steps", "sens_groups", "budget_bits", "n_random", "pareto_measure"),
    "speed": ("kernel_m", "kernel_repeats", "xl", "xl_args"),
}


def command_for(part: str, settings: ResultsSettings) -> str:
    """The command line that reproduces ``part`` with ``settings`` (flags only for the part's settings that differ
    from the defaults; groups such as ``all`` show every setting)."""
    base = ResultsSettings()
    if settings.full:
        base = full_settings(base)
    flags = ["--full"] if settings.full else []
    relevant = PART_FIELDS.get(part)
    for f in dataclasses.fields(ResultsSettings):
        v, d = getattr(settings, f.name), getattr(base, f.name)
        if f.name == "full" or v == d or (relevant is not None and f.name not in relevant):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif f.name == "vq_params":
            flags.append(f"{flag} '{json.dumps(dict(v))}'")
        elif isinstance(v, tuple):
            flags.append(f"{flag} {','.join(str(x) for x in v)}")
        else:
            flags.append(f"{flag} {v}")
    return " ".join(["python -m ditlab bench", part, *flags])


# ---- part documents ------------------------------------------------------------------------------------------------
def _clean(v):
    """Strict JSON: non-finite floats become None (e.g. the PSNR of identical images)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _clean(v.tolist())
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _clean(v.item())
    return v


@dataclass
class Part:
    """A part's document being filled; ``save()`` after every row so an interrupted run keeps what it measured."""

    part: str
    settings: ResultsSettings
    results_dir: Path
    data: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=time.process_time)
    complete: bool = False

    def doc(self) -> dict:
        return {"part": self.part, "command": command_for(self.part, self.settings), "settings": self.settings.to_dict(),
                "machine": machine_info(), "date": now_utc(), "seconds": round(time.perf_counter() - self.started, 1),
                "cpu_seconds": round(time.process_time() - self.started_cpu, 1), "load_average": _loadavg(),
                "model": model_provenance(self.settings.model), "complete": self.complete, "data": self.data}

    def save(self) -> Path:
        """Writes the document: complete → ``<part>.json`` (atomically, and the progress file is removed); not yet
        complete → ``<part>.partial.json``, so a failed or interrupted run never replaces the last complete results."""
        if not self.complete:
            return write_doc(self.results_dir, self.doc(), name=partial_name(self.part))
        path = write_doc(self.results_dir, self.doc())
        (Path(self.results_dir) / f"{partial_name(self.part)}.json").unlink(missing_ok=True)
        return path


def partial_name(part: str) -> str:
    """The file stem of a part's in-progress document (``quality.partial``)."""
    return f"{part}.partial"


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 1)
    except OSError:
        return None


def write_doc(results_dir: Path, doc: dict, name: str | None = None) -> Path:
    """Writes ``doc`` to ``results_dir/<name or part>.json`` atomically, readable by everyone (not mkstemp's 0600)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name or doc['part']}.json"
    write_text_atomic(path, json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    return path


def read_doc(results_dir: Path, part: str, *, partial: bool = False) -> dict | None:
    """The part's complete document; with ``partial``, its in-progress one first (what an interrupted run measured)."""
    names = [partial_name(part), part] if partial else [part]
    for name in names:
        path = Path(results_dir) / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def caption(doc: dict) -> str:
    """The line above every table: command, settings, machine, date, wall time."""
    state = "" if doc.get("complete", True) else " — **incomplete run** (interrupted; rows below are what finished)"
    model = doc.get("model") or {}
    which = f" — model `{model.get('source')}`" + (f" (git {model['commit']})" if model.get("commit") else "") if model else ""
    cpu = f" / CPU {doc['cpu_seconds']:.0f} s (this process, all threads)" if doc.get("cpu_seconds") is not None else ""
    load = f", load average {doc['load_average']:g} at the end (other jobs shared the cores)" if (doc.get("load_average") or 0) > 2.5 else ""
    if measured_on_current_model(doc) is False:
        which += " — **measured on an earlier model** than the one this source holds now: not comparable with parts measured on the current one"
    return (f"Command: `{doc['command']}` — Machine: {machine_line(doc['machine'])} — Date: {doc['date']} — "
            f"wall {doc['seconds']:.0f} s{cpu}{load}{which}{state}")


# ---- evaluation rows -----------------------------------------------------------------------------------------------
def is_scorable(pipe) -> bool:
    from ..evaluation import check_scorable
    from ..errors import ConfigError

    try:
        check_scorable(pipe)
        return True
    except ConfigError:
        return False


_FP_IMAGES: dict = {}


def _fp_images(pipe, ss):
    from .. import api

    key = (id(pipe), ss)
    if key not in _FP_IMAGES:
        labels = api.eval_labels(pipe.num_classes, ss.n_per_label)
        _FP_IMAGES[key] = api.generate(pipe, labels, steps=ss.steps, guidance=ss.guidance, seed=ss.seed, scheduler=ss.scheduler, progress=False)
    return _FP_IMAGES[key]


def with_vq_params(recipe, vq_params: dict):
    """``recipe`` with ``vq_params`` merged into the params of its vq4dit default, and their k-means keys (k, d, seed,
    kmeans_iters, kmeans_fit) into a kmeans default, so both start from the same k-means (other recipes unchanged)."""
    from ..config import KMEANS_KEYS, load_recipe

    recipe = load_recipe(recipe)
    method = recipe.default.method
    extra = vq_params if method == "vq4dit" else {k: v for k, v in vq_params.items() if k in KMEANS_KEYS} if method == "kmeans" else {}
    if extra:
        recipe = recipe.replace(default=recipe.default.replace(params={**recipe.default.params, **extra}))
    return recipe


def evaluate_row(pipe, recipe, settings: ResultsSettings) -> dict:
    """One quality row: ``api.evaluate`` (the numbers of ``python -m ditlab eval --recipe R --json``) with the
    calibration settings of ``settings``; for models the shipped classifier cannot score, PSNR/SSIM vs FP only."""
    from .. import api, evaluation
    from ..config import load_recipe

    recipe = with_vq_params(load_recipe(recipe), dict(settings.vq_params))
    ss = settings.sample_settings()
    is_fp = recipe.name == "fp" and not recipe.overrides and recipe.default.is_fp
    q = None if is_fp else api.quantize(pipe, recipe, progress=False, calib_settings=settings.calib)
    if is_scorable(pipe):
        r = api.evaluate(pipe, recipe, settings=ss, progress=False, quantized=q)
    else:
        fp = _fp_images(pipe, ss)
        if q is None:
            images, seconds, (packed, fp16) = fp.images, fp.seconds, api.weight_bytes(pipe)
        else:
            out = api.generate(q.pipe, api.eval_labels(pipe.num_classes, ss.n_per_label), steps=ss.steps, guidance=ss.guidance, seed=ss.seed,
                               scheduler=ss.scheduler, progress=False)
            images, seconds, (packed, fp16) = out.images, out.seconds, api.weight_bytes(q.pipe)
        from .. import backends

        r = {"recipe": recipe.name, **evaluation.fidelity(fp.images, images), "backend": backends.current(), "class_acc": None, "class_acc_fp": None, "fd": None, "fd_fp": None,
             "weight_bytes": packed, "weight_bytes_fp16": fp16, "seconds_calibrate": q.seconds_calibrate if q else 0.0,
             "seconds_quantize": q.seconds_quantize if q else 0.0, "seconds_sample": seconds, "n_images": len(images)}
    calib = getattr(q.pipe.transformer, "ditlab_calibration", None) if q else None
    d = recipe.default
    return {"recipe": recipe.name, "method": d.method, "w_bits": d.w_bits, "a_bits": d.a_bits, "w_group_size": d.w_group_size,
            "psnr": r["psnr"], "ssim": r["ssim"], "class_acc": r["class_acc"], "fd": r["fd"], "class_agreement": r.get("class_agreement"),
            "weight_bytes": r["weight_bytes"], "weight_bytes_fp16": r["weight_bytes_fp16"],
            "ratio_fp16": r["weight_bytes"] / r["weight_bytes_fp16"] if r["weight_bytes_fp16"] else None,
            "seconds_calibrate": r["seconds_calibrate"], "seconds_quantize": r["seconds_quantize"],
            "seconds_vq_calibration": getattr(calib, "seconds", None), "seconds_sample": r["seconds_sample"], "n_images": r["n_images"],
            "backend": r.get("backend")}


def reuse_rows(doc: dict | None, settings: ResultsSettings) -> dict[str, dict]:
    """Rows of an earlier part document measured with the same model and sampling/calibration settings (by recipe)."""
    if not doc:
        return {}
    keys = ("model", "n_per_label", "steps", "guidance", "seed", "calib_samples", "calib_steps", "vq_params")
    mine = settings.to_dict()
    if any(doc["settings"].get(k) != mine[k] for k in keys) or doc.get("model") != model_provenance(settings.model):
        return {}
    return {r["recipe"]: r for r in doc["data"].get("rows", [])}


# ---- numbers → text ------------------------------------------------------------------------------------------------
def fmt(v, spec: str = ".3g", none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, float):
        if not math.isfinite(v):
            return "∞" if v > 0 else "−∞"
        return format(v, spec)
    return str(v)


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def md_table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", sep]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def acc_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p measured on n images."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def acc_diff_clear(a: float, b: float, n: int) -> bool:
    """True when two accuracies on n images differ by more than 2 standard errors of the difference."""
    return abs(a - b) > 2 * math.sqrt(acc_se(a, n) ** 2 + acc_se(b, n) ** 2)


def repo_script(relative: str):
    """Imports a script of the repository (benchmarks/…) by path, or None when it is absent."""
    path = REPO / relative
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_ditlab_results_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
