"""Activation-outlier analysis of a linear layer's input, before and after each input transform.

For one layer, diffusion timestep and CFG branch the layer's real input X is captured during one FP sampling run
(same labels / seeds / schedule as the calibration that is passed in; cached per process), then for every transform
— none, SmoothQuant, Hadamard, HadaNorm, ViDiT-Q channel balancing — the transformed input X' (the ``InputTransform``
that the method's own builder in ``ditlab.methods`` makes for this layer, i.e. exactly what the quantized layer
computes online) is summarised:

* per-channel absmax of X' (sorted, descending) and the outlier ratio max/median of it;
* |X'| as a token × channel map for one sample (for adaLN, whose input is one vector per sample, rows = samples);
* a histogram of the values and their kurtosis (Pearson: 3 for a Gaussian; large = heavy tails = outliers);
* the A8 / A4 error of per-token fake quantization (``primitives.fake_quantize_act``): in the transformed space,
  ‖Q(X') − X'‖_F / ‖X'‖_F, and at the layer output (``output_error``: weights in float, HadaNorm's mean added
  back exactly, as ``transforms.act_quant_error``) — the output error is the fair comparison, since rescaling channels changes what an
  input-side error means.

``outlier_map(calib)`` is the model-wide layers × timesteps table of the outlier ratio from calibration statistics.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .calibration import BRANCHES, CalibStats, model_fingerprint
from .config import LayerConfig
from .errors import ConfigError
from .models import Pipeline, layer_kind
from .nn import InputTransform
from .primitives import fake_quantize_act
from .sampling import DEFAULT_SCHEDULER, StepContext, make_scheduler, sample

log = logging.getLogger(__name__)

TRANSFORMS = ("none", "smoothquant", "hadamard", "hadanorm", "viditq")
BITS = (8, 4)
HIST_BINS = 80
_CACHE: "OrderedDict[str, dict]" = OrderedDict()  # capture key → {layer: X}; a few timesteps per process
_CACHE_SIZE = 4
_LOCK = threading.Lock()


@dataclass
class TransformView:
    """Statistics of one transform's X' (K = in_features, R = rows of the branch, T = tokens of one sample)."""

    name: str
    channel_absmax: np.ndarray  # (K,) sorted descending
    heat: np.ndarray  # (T, K) |X'| of one sample (adaLN: (n, K), one row per sample)
    hist_counts: np.ndarray  # (HIST_BINS,)
    hist_edges: np.ndarray  # (HIST_BINS + 1,)
    kurtosis: float
    max_median: float
    err_in: dict[int, float] = field(default_factory=dict)  # bits → ‖Q(X')−X'‖/‖X'‖
    err_out: dict[int, float] = field(default_factory=dict)  # bits → relative layer-output error


@dataclass
class OutlierResult:
    """Before/after views of one layer input at one (timestep, branch)."""

    layer: str
    kind: str
    timestep: int
    step: int
    branch: str
    sample: int
    rows: int
    in_features: int
    alpha: float
    views: list[TransformView]

    def table(self) -> pd.DataFrame:
        """One row per transform: kurtosis, max/median, A8/A4 errors (input side and layer output)."""
        rows = []
        for v in self.views:
            row = {"transform": v.name, "kurtosis": v.kurtosis, "max_median": v.max_median}
            row.update({f"err_a{b}": v.err_in[b] for b in BITS})
            row.update({f"out_err_a{b}": v.err_out[b] for b in BITS})
            rows.append(row)
        return pd.DataFrame(rows)

    def view(self, name: str) -> TransformView:
        for v in self.views:
            if v.name == name:
                return v
        raise ConfigError.invalid("transform", name, ", ".join(TRANSFORMS))


# ---- statistics (numpy-checkable) --------------------------------------------------------------------------------
def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis E[(x−μ)⁴]/σ⁴ of all entries (float64; 3 for a Gaussian, 0 if constant)."""
    v = x.double().reshape(-1)
    c = v - v.mean()
    var = c.pow(2).mean()
    return float(c.pow(4).mean() / var.pow(2)) if var > 0 else 0.0


def max_median_ratio(channel_absmax: torch.Tensor) -> float:
    """max_j a_j / median_j a_j of per-channel absmax a (K,) (lower median for even K, as torch.median)."""
    a = channel_absmax.double()
    med = float(a.median())
    return float(a.max()) / med if med > 0 else float("inf")


def rel_error(x: torch.Tensor, bits: int) -> float:
    """‖Q(X) − X‖_F / ‖X‖_F of per-token dynamic fake quantization of X (…, K)."""
    xf = x.float()
    return float((fake_quantize_act(xf, bits) - xf).norm() / xf.norm().clamp(min=1e-30))


# ---- transforms --------------------------------------------------------------------------------------------------
def build_transform(name: str, linear: nn.Linear, stats, alpha: float = 0.5, seed: int = 0) -> InputTransform:
    """The ``InputTransform`` that method ``name`` builds for this layer (the methods' own builders, so the view
    shows exactly what the quantized layer computes: e.g. HadaNorm without centring on single-token adaLN inputs).

    stats: the layer's LayerStats (SmoothQuant / ViDiT-Q absmax over all calibrated timesteps, HadaNorm σ);
    alpha: SmoothQuant / SDCB migration strength; seed: Hadamard signs.
    """
    from .methods.hadamard import hadamard_transform
    from .methods.hadanorm import hadanorm_transform
    from .methods.smoothquant import smoothquant_transform
    from .methods.viditq import viditq_transform

    builders = {"smoothquant": smoothquant_transform, "hadamard": hadamard_transform, "hadanorm": hadanorm_transform, "viditq": viditq_transform}
    if name == "none":
        return InputTransform(linear.in_features)
    if name not in builders:
        raise ConfigError.invalid("transform", name, ", ".join(TRANSFORMS))
    cfg = LayerConfig(method=name, w_bits=8, a_bits=8, alpha=float(alpha), hadamard_seed=int(seed))
    with torch.no_grad():
        return builders[name](linear, cfg, stats)


def output_error(x: torch.Tensor, w: torch.Tensor, transform: InputTransform, bits=BITS) -> dict[int, float]:
    """bits → ‖X Wᵀ − (Q_a(X') + T(μ)) W'ᵀ‖_F / ‖X Wᵀ‖_F: the layer-output error of activation quantization alone
    (weights in float; X', T(μ) = transform(X), W' = transform.fold_weight(W); the mean term is exact)."""
    xf = x.float()
    y = xf @ w.float().t()
    with torch.no_grad():
        xt, mu = transform(xf)
        wt = transform.fold_weight(w).t()
    out = {}
    for b in bits:
        xq = fake_quantize_act(xt, b)
        if mu is not None:
            xq = xq + mu  # HadaNorm's mean correction runs in full precision
        out[b] = float((y - xq @ wt).norm() / y.norm().clamp(min=1e-30))
    return out


def branch_rows(x: torch.Tensor, branch: str, batch_size: int) -> torch.Tensor:
    """Rows of the CFG branch of a layer input X (2n, …, K): cond = [0, n), uncond = [n, 2n), all = every row."""
    if branch == "all":
        return x
    if branch not in BRANCHES:
        raise ConfigError.invalid("branch", branch, ", ".join(BRANCHES) + ", all")
    if x.shape[0] != 2 * batch_size:
        raise ConfigError.invalid("branch", branch, "'all' (this run has no classifier-free guidance batch)")
    return x[:batch_size] if branch == "cond" else x[batch_size:]


def analyse(x: torch.Tensor, linear: nn.Linear, stats, *, branch: str = "cond", batch_size: int, sample_index: int = 0,
            alpha: float = 0.5, seed: int = 0, names=TRANSFORMS) -> list[TransformView]:
    """Views of every transform for a captured layer input x (2n, T, K) or (2n, K) of ``linear``.

    The transform is applied to the whole input as the layer sees it (HadaNorm's μ is per sample), then the
    branch's rows are summarised; the output error is measured on the branch's rows.
    """
    w = linear.weight.detach().float()
    views = []
    for name in names:
        it = build_transform(name, linear, stats, alpha, seed)
        with torch.no_grad():
            xt, _ = it(x)
        rows = branch_rows(xt, branch, batch_size)  # (n, T, K) or (n, K)
        xb = branch_rows(x, branch, batch_size)
        flat = rows.reshape(-1, rows.shape[-1])  # (R, K)
        chan = flat.abs().amax(0)
        heat = rows[sample_index].abs() if rows.dim() == 3 else rows.abs()
        counts, edges = np.histogram(flat.numpy().reshape(-1), bins=HIST_BINS)
        views.append(TransformView(
            name, np.sort(chan.numpy())[::-1].copy(), heat.numpy(), counts, edges, kurtosis(flat), max_median_ratio(chan),
            {b: rel_error(flat, b) for b in BITS}, output_error(xb, w, it)))
    return views


# ---- capture -----------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised after the captured step: later steps are not needed."""


def capture_step(pipe: Pipeline, settings: dict, step: int, layers=None) -> dict[str, torch.Tensor]:
    """Inputs of the linears (name → X float32 (2n, T, K) or (2n, K)) at sampling step ``step`` of the run that
    ``settings`` (a calibration's settings: labels, steps, guidance, seed, scheduler) describes. Cached per process."""
    key = json.dumps({"m": model_fingerprint(pipe.transformer), "s": {k: settings.get(k) for k in ("labels", "prompts", "steps", "guidance", "seed", "scheduler")},
                      "step": step}, sort_keys=True, default=str)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    modules = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)}
    grabbed: dict[str, torch.Tensor] = {}
    state = {"on": False}
    owner = threading.get_ident()  # the FP model is shared: ignore other threads' forwards

    class Hook:
        def before(self, ctx: StepContext):
            state["on"] = ctx.index == step

        def after(self, ctx: StepContext, latents, eps):
            if ctx.index >= step:
                raise _Stop

    def grab(name):
        def hook(module, args):
            if state["on"] and threading.get_ident() == owner:
                grabbed[name] = args[0].detach().float().clone()
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in modules.items()]
    try:
        sample(pipe, settings.get("labels"), settings.get("prompts"), guidance=settings["guidance"], steps=settings["steps"],
               scheduler=settings.get("scheduler", DEFAULT_SCHEDULER), seed=settings["seed"], hooks=[Hook()], decode_images=False, progress=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    with _LOCK:
        _CACHE[key] = grabbed
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return grabbed


def schedule(pipe: Pipeline, settings: dict) -> list[int]:
    """Diffusion timesteps of the sampling schedule of ``settings`` (step index → timestep)."""
    sched = make_scheduler(pipe.scheduler_config, settings.get("scheduler", DEFAULT_SCHEDULER))
    sched.set_timesteps(settings["steps"])
    return [int(t) for t in sched.timesteps]


def outlier_view(pipe: Pipeline, calib: CalibStats, layer: str, timestep: int | None = None, branch: str = "cond", *, sample_index: int = 0,
                 alpha: float = 0.5, seed: int = 0) -> OutlierResult:
    """Before/after views of ``layer``'s input at diffusion ``timestep`` (None: the first calibrated one) and branch.

    The input is captured in a run with ``calib``'s own sampling settings; the transforms use ``calib[layer]``.
    """
    linears = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)}
    if layer not in linears:
        raise ConfigError.invalid("layer", layer, f"a linear layer name, e.g. {next(iter(linears), '')!r}")
    ts = schedule(pipe, calib.settings)
    t = (calib.timesteps or ts)[0] if timestep is None else int(timestep)
    if t not in ts:
        raise ConfigError.invalid("timestep", timestep, f"a timestep of the {len(ts)}-step schedule: {', '.join(map(str, ts))}")
    step = ts.index(t)
    n = len(calib.settings.get("labels") or calib.settings.get("prompts") or [])
    if not 0 <= int(sample_index) < n:
        raise ConfigError.invalid("sample", sample_index, f"an image index from 0 to {n - 1}")
    x = capture_step(pipe, calib.settings, step)[layer]
    views = analyse(x, linears[layer], calib[layer], branch=branch, batch_size=n, sample_index=int(sample_index), alpha=alpha, seed=seed)
    rows = branch_rows(x, branch, n).reshape(-1, x.shape[-1]).shape[0]
    return OutlierResult(layer, layer_kind(layer), t, step, branch, int(sample_index), rows, x.shape[-1], float(alpha), views)


# ---- model-wide map ----------------------------------------------------------------------------------------------
@dataclass
class OutlierMap:
    """layers × timesteps of an outlier statistic (``frame``: index = layer, columns = timesteps in sampling order)."""

    frame: pd.DataFrame
    metric: str
    branch: str


MAP_METRICS = ("max_median", "absmax", "token_p100_p50")


def check_map_metric(metric: str) -> str:
    """``metric`` if it is one of MAP_METRICS; ConfigError naming the field otherwise."""
    if metric not in MAP_METRICS:
        raise ConfigError.invalid("metric", metric, ", ".join(MAP_METRICS))
    return metric


def outlier_map(calib: CalibStats, branch: str = "cond", metric: str = "max_median", layers=None) -> OutlierMap:
    """Model-wide table from calibration statistics: per (layer, timestep) of ``branch`` (cond, uncond or all),
    max/median of the channel absmax, the tensor absmax, or the ratio of the largest to the median per-token absmax."""
    check_map_metric(metric)
    names = [n for n in calib if layers is None or n in set(layers)]
    timesteps = calib.timesteps or sorted({t for n in names for t in calib[n].per_timestep}, reverse=True)
    data = {}
    for name in names:
        row = {}
        for t in timesteps:
            slot = calib[name].per_timestep.get(t, {})
            if branch == "all":
                picked = list(slot.values())
            else:  # a layer that could not be split by branch has only "all"
                picked = [slot[branch]] if branch in slot else [slot["all"]] if "all" in slot else []
            if not picked:
                row[t] = float("nan")
                continue
            chan = torch.stack([d["absmax"] for d in picked]).amax(0)
            if metric == "max_median":
                row[t] = max_median_ratio(chan)
            elif metric == "absmax":
                row[t] = float(chan.max())
            else:  # TOKEN_PERCENTILES = (50, 90, 99, 100) of the per-token absmax; branches: largest max / largest median
                top = max(float(d["token_absmax_pct"][-1]) for d in picked)
                mid = max(float(d["token_absmax_pct"][0]) for d in picked)
                row[t] = top / mid if mid > 0 else float("inf")
        data[name] = row
    frame = pd.DataFrame.from_dict(data, orient="index", columns=timesteps)
    return OutlierMap(frame, metric, branch)


# ---- CLI ---------------------------------------------------------------------------------------------------------
def cli_outliers(model: str = "shipped", layer: str | None = None, timestep: int | None = None, branch: str = "cond", *,
                 n_samples: int = 8, steps: int = 10, metric: str = "max_median", as_json: bool = False, progress: bool = False) -> str:
    """``python -m ditlab outliers``: without a layer, the model-wide layers × timesteps table of ``metric``; with a
    layer, its per-transform table (kurtosis, max/median, A8/A4 errors) at ``timestep`` (default: the first step).
    Calibrates first (cached on disk) with ``n_samples`` images and ``steps`` steps. Returns text or JSON."""
    from . import api

    check_map_metric(metric)  # before loading and calibrating
    pipe = api.load(model)
    calib = api.calibrate(pipe, n_samples=n_samples, steps=steps, progress=progress)
    if layer is None:
        omap = outlier_map(calib, branch, metric)
        if as_json:
            return json.dumps({"metric": metric, "branch": branch, "timesteps": [int(t) for t in omap.frame.columns],
                               "layers": {n: [float(v) for v in row] for n, row in omap.frame.iterrows()}})
        return f"{metric} of the layer input per timestep ({branch} branch)\n" + omap.frame.to_string(float_format=lambda v: f"{v:.3g}")
    res = outlier_view(pipe, calib, layer, timestep, branch)
    table = res.table()
    if as_json:
        return json.dumps({"layer": res.layer, "kind": res.kind, "timestep": res.timestep, "step": res.step, "branch": res.branch,
                           "rows": res.rows, "in_features": res.in_features, "transforms": table.to_dict(orient="records")})
    head = f"{res.layer} ({res.kind}) at t={res.timestep} (step {res.step}), {res.branch} branch, {res.rows} rows × {res.in_features} channels"
    return head + "\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
