"""Calibration: run the FP model's own sampler and collect per-layer input statistics → ``CalibStats``.

``calibrate(pipe, ...)`` samples a few images with classifier-free guidance exactly as inference does, and a forward
pre-hook on every selected ``nn.Linear`` folds each input X ((B, T, K) token layers, (B, K) adaLN/embedders) into a
``LayerStats`` (see ``calib_collect`` for the numerics). Statistics are global over the chosen steps and, per
diffusion timestep, split by CFG branch (rows [0, n) conditional, [n, 2n) unconditional, as ``StepContext`` says).
Results are cached on disk (``calib_cache``) keyed by the model identity and the settings.

Method handlers read ``stats.absmax``, ``stats.centered_std``, ``stats.centered_absmax``, ``stats.xtx``,
``stats.n_rows`` and ``stats.rows`` of ``calib[layer_name]``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calib_cache
from .calib_collect import ALL_BRANCH, BRANCHES, TOKEN_PERCENTILES, LayerAccumulator
from .errors import CalibrationError, ConfigError
from .models import Pipeline
from .sampling import DEFAULT_SCHEDULER, StepContext, check_count, check_labels, check_steps, sample

log = logging.getLogger(__name__)

CALIB_VERSION = 2  # bump when the statistics change meaning: old cache entries then miss
DEFAULT_PROMPTS = ("a red circle", "a blue square", "a green star", "a big red square", "a small blue circle",
                   "a green circle on a blue square", "a red star", "a small green square")

__all__ = ["BRANCHES", "CalibStats", "LayerStats", "TOKEN_PERCENTILES", "calibrate", "model_fingerprint", "timestep_groups"]


@dataclass
class LayerStats:
    """Statistics of one linear layer's input over every calibrated row (K = in_features).

    Rows are tokens of all samples, both CFG branches and all calibrated timesteps (B·T rows per call, T = 1 for
    (B, K) inputs). std / centered_std are population (ddof = 0) standard deviations.
    """

    absmax: torch.Tensor  # (K,) float32  max |x| per channel
    minimum: torch.Tensor  # (K,) float32
    maximum: torch.Tensor  # (K,) float32
    mean: torch.Tensor  # (K,) float32
    std: torch.Tensor  # (K,) float32
    centered_std: torch.Tensor  # (K,) float32  std of x − (per-sample mean over tokens): HadaNorm's σ; 0 when T = 1
    centered_absmax: torch.Tensor  # (K,) float32  max |x − per-sample token mean|
    xtx: torch.Tensor | None  # (K, K) float64  Σ xᵀx over all rows; None if collect_xtx=False
    n_rows: int
    rows: torch.Tensor  # (R, K) float32  uniform reservoir of raw input rows, R ≤ reservoir size
    row_info: torch.Tensor  # (R, 3) int32  per reservoir row: timestep, branch (0 cond, 1 uncond, 2 all), token index
    # per_timestep[t][branch] = {"absmax": (K,), "tensor_absmax": (), "token_absmax_pct": (len(TOKEN_PERCENTILES),),
    #                            "n_tokens": () int64};  branch ∈ {"cond", "uncond"} ("all" if the batch is not 2n rows)
    per_timestep: dict[int, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    # (S, K) float32  uniform reservoir of per-sample channel means over tokens (token layers; (0, K) when T = 1);
    # None for statistics built without them
    sample_means: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.absmax.shape[0])

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2·XᵀX / n (K, K) float64."""
        if self.xtx is None:
            raise CalibrationError("this calibration was run with collect_xtx=False; recalibrate with collect_xtx=True for GPTQ")
        return 2.0 * self.xtx / max(self.n_rows, 1)

    def absmax_at(self, timesteps: Sequence[int] | None = None, branch: str | None = None) -> torch.Tensor:
        """Channel absmax (K,) over the given timesteps (None: all) and branch (None: every branch)."""
        picked = [d["absmax"] for t, branches in self.per_timestep.items() if timesteps is None or t in set(timesteps)
                  for b, d in branches.items() if branch is None or b == branch]
        if not picked:
            raise CalibrationError(f"no statistics for timesteps {list(timesteps or [])} / branch {branch!r}; calibrated: {sorted(self.per_timestep)}")
        return torch.stack(picked).amax(0)


@dataclass
class CalibStats(Mapping):
    """Layer name → LayerStats, plus the settings that produced them and the model identity they belong to."""

    layers: dict[str, LayerStats]
    settings: dict
    model_key: str

    def __getitem__(self, name: str) -> LayerStats:
        try:
            return self.layers[name]
        except KeyError:
            raise CalibrationError(f"no calibration statistics for layer {name!r}; calibrated {len(self.layers)} layers (pass layers=None to calibrate all)") from None

    def __contains__(self, name: object) -> bool:  # Mapping's default would call __getitem__ and expect KeyError
        return name in self.layers

    def get(self, name: str, default=None):
        return self.layers.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def timesteps(self) -> list[int]:
        """Calibrated diffusion timesteps, in sampling order (high noise first)."""
        return list(self.settings.get("timestep_values", []))


def timestep_groups(timesteps: Sequence[int] | int, n_groups: int = 4) -> list[list[int]]:
    """Splits timesteps (in sampling order; an int n means step indices 0..n-1) into ≤ n_groups contiguous groups.

    Sizes differ by at most one, the earlier (high-noise) groups taking the extra; no group is empty.
    E.g. 10 steps, 4 groups → sizes 3, 3, 2, 2.
    """
    items = list(range(timesteps)) if isinstance(timesteps, int) else list(timesteps)
    if int(n_groups) < 1:
        raise ConfigError.invalid("n_groups", n_groups, "a positive integer")
    g = min(int(n_groups), len(items))
    if g == 0:
        return []
    base, extra = divmod(len(items), g)
    out, start = [], 0
    for i in range(g):
        size = base + (1 if i < extra else 0)
        out.append(items[start : start + size])
        start += size
    return out


def model_fingerprint(transformer: nn.Module) -> str:
    """SHA-256 (hex) of the transformer's class, config and a cheap fingerprint of every parameter and buffer.

    Per tensor: name, shape, dtype, its float64 sum (one pass, no copy) and ≤ 256 strided raw values, so any retrained
    or edited checkpoint changes the key while fingerprinting DiT-XL (750M parameters) stays well under a second.
    """
    digest = hashlib.sha256(type(transformer).__name__.encode())
    config = getattr(transformer, "config", {})
    digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in list(transformer.named_parameters()) + list(transformer.named_buffers()):
            flat = tensor.detach().reshape(-1)
            sample_ = flat[:: max(1, flat.numel() // 256)][:256].float()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{float(flat.sum(dtype=torch.float64))!r}|".encode())
            digest.update(sample_.numpy().tobytes())
    return digest.hexdigest()


def _select_layers(transformer: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Linear]:
    """Name → nn.Linear for the requested names or glob patterns (None: every linear)."""
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        return linears
    if isinstance(layers, str):
        layers = [layers]
    chosen: dict[str, nn.Linear] = {}
    for pattern in layers:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)] if any(c in pattern for c in "*?[") else [n for n in linears if n == pattern]
        if not hits:
            raise ConfigError.invalid("layers", pattern, f"names (or glob patterns) of the model's {len(linears)} linear layers, e.g. {next(iter(linears), '')!r}")
        chosen.update((n, linears[n]) for n in hits)
    return {n: linears[n] for n in linears if n in chosen}  # module order


class _StopSampling(Exception):
    """Raised by the step hook after the last calibrated step: later steps cannot change the statistics."""


class _Recorder:
    """StepHook: tells the layer hooks which step runs; advances the progress bar; stops after the last wanted step."""

    def __init__(self, wanted: set[int], bar):
        self.wanted, self.last, self.bar = wanted, max(wanted), bar
        self.ctx: StepContext | None = None
        self.timestep_values: list[int] = []

    def before(self, ctx: StepContext) -> None:
        self.ctx = ctx if ctx.index in self.wanted else None
        if self.ctx is not None:
            self.timestep_values.append(ctx.timestep)

    def after(self, ctx: StepContext, latents: torch.Tensor, model_output: torch.Tensor) -> None:
        self.bar.update(1)
        if ctx.index >= self.last and ctx.index < ctx.num_steps - 1:
            raise _StopSampling


def _settings(pipe: Pipeline, labels, n_samples, steps, timesteps, guidance, seed, layers, collect_xtx, reservoir, scheduler) -> dict:
    """Validated, JSON-ready settings (also the cache key's settings part)."""
    n_samples = check_count(n_samples, "n_samples", 1, 4096)
    steps = check_steps(steps)
    idx = list(range(steps)) if timesteps is None else sorted({int(i) for i in timesteps})
    if not idx or any(not 0 <= i < steps for i in idx):
        raise ConfigError.invalid("timesteps", timesteps, f"step indices from 0 to {steps - 1} (None for all)")
    if not isinstance(reservoir, int) or reservoir < 0:
        raise ConfigError.invalid("reservoir", reservoir, "a non-negative integer")
    settings = {"version": CALIB_VERSION, "family": pipe.family, "n_samples": n_samples, "steps": steps, "step_indices": idx,
                "guidance": float(guidance), "seed": int(seed), "collect_xtx": bool(collect_xtx), "reservoir": reservoir,
                "scheduler": scheduler, "layers": None if layers is None else sorted(layers)}
    if pipe.family == "dit":
        base = list(range(pipe.num_classes)) if labels is None else check_labels(labels, pipe.num_classes)  # None: every class
        settings["labels"] = [base[i % len(base)] for i in range(n_samples)]  # cycled to n_samples
    else:
        base = list(DEFAULT_PROMPTS) if labels is None else [str(p) for p in labels]  # text models: labels are prompts
        settings["prompts"] = [base[i % len(base)] for i in range(n_samples)]
    return settings


def _collect(pipe: Pipeline, settings: dict, modules: dict[str, nn.Linear], progress: bool) -> tuple[dict[str, dict], list[int]]:
    """Runs the sampler with the hooks installed; returns ({layer: LayerStats fields}, calibrated timesteps)."""
    accs = {n: LayerAccumulator(n, m.in_features, seed=settings["seed"], reservoir=settings["reservoir"], collect_xtx=settings["collect_xtx"])
            for n, m in modules.items()}
    idx = settings["step_indices"]
    bar = tqdm(total=max(idx) + 1, desc="calibration", disable=not progress, leave=False)
    recorder = _Recorder(set(idx), bar)
    owner = threading.get_ident()  # the FP model is shared: ignore forwards of other sessions' threads

    def make_hook(acc: LayerAccumulator):
        def hook(module, args):
            ctx = recorder.ctx
            if ctx is not None and args and threading.get_ident() == owner:
                acc.update(args[0], timestep=ctx.timestep, step=ctx.index, batch_size=ctx.batch_size, cfg=ctx.cfg)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(accs[n])) for n, m in modules.items()]
    try:
        sample(pipe, settings.get("labels"), settings.get("prompts"), guidance=settings["guidance"], steps=settings["steps"],
               scheduler=settings["scheduler"], seed=settings["seed"], hooks=[recorder], decode_images=False, progress=False)
    except _StopSampling:
        pass
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    results = {}
    for name, acc in accs.items():
        if acc.n == 0:
            log.warning("calibration: layer %s was never called during sampling; no statistics", name)
            continue
        results[name] = acc.result()
    return results, recorder.timestep_values


def calibrate(
    pipe: Pipeline,
    *,
    labels: Sequence[int] | Sequence[str] | None = None,
    n_samples: int = 8,
    steps: int = 10,
    timesteps: Sequence[int] | None = None,
    guidance: float = 4.0,
    seed: int = 1234,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    collect_xtx: bool = True,
    reservoir: int = 512,
    scheduler: str = DEFAULT_SCHEDULER,
) -> CalibStats:
    """Collects input statistics of the pipeline's linear layers while its FP sampler generates ``n_samples`` images.

    labels: class ids (cycled to n_samples; default every class in turn) — for text models, prompts.
    steps / scheduler: the sampling schedule; timesteps: the step indices (0 = first, noisiest) to record, None = all.
    layers: names or glob patterns of linears (default every nn.Linear); collect_xtx=False skips the (K, K) sums.
    cache_dir: default ``$DITLAB_CACHE`` or ``~/.cache/ditlab``; use_cache=False neither reads nor writes it.
    Raises CalibrationError naming the layer and timestep if an activation is NaN/Inf; ConfigError for bad settings.
    """
    modules = _select_layers(pipe.transformer, layers)
    settings = _settings(pipe, labels, n_samples, steps, timesteps, guidance, seed,
                         None if layers is None else list(modules), collect_xtx, reservoir, scheduler)
    model_key = model_fingerprint(pipe.transformer)
    key = hashlib.sha256(json.dumps({"model": model_key, "settings": settings}, sort_keys=True).encode()).hexdigest()[:32]
    folder = calib_cache.default_cache_dir() if cache_dir is None else cache_dir
    if use_cache:
        hit = calib_cache.load(folder, key)
        if hit is not None:
            fields, sidecar = hit
            try:
                stats = CalibStats({n: LayerStats(**f) for n, f in fields.items()}, sidecar["settings"], model_key)
                log.info("calibration: cache hit %s", key)
                return stats
            except (TypeError, KeyError) as exc:  # an entry from an incompatible writer: recompute and overwrite
                log.warning("calibration cache: entry %s is unusable (%s); recomputing", key, exc)
    fields, timestep_values = _collect(pipe, settings, modules, progress)
    settings = {**settings, "timestep_values": timestep_values, "cache_key": key}
    if use_cache:
        calib_cache.save(folder, key, fields, {"settings": settings, "model_key": model_key})
    return CalibStats({n: LayerStats(**f) for n, f in fields.items()}, settings, model_key)
