"""``quantize_(model, recipe, calib)``: swap every planned ``nn.Linear`` of a deep copy for its quantized module.

The recipe resolves to a plan ``{name: LayerConfig | None}`` over the model's linears (``models.list_linears``);
skipped layers (None) and ``fp`` layers stay untouched; every other layer goes through the handler registered for
its method (``ditlab.methods``) with its calibration statistics. The input model is never modified (it is the
shared read-only FP model). Returns the copy and a ``QuantReport`` (per layer: method, bits, bytes, seconds).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LayerConfig, Recipe, load_recipe
from .errors import ConfigError, DitlabError
from .methods import get_handler
from .models import layer_kind, list_linears
from .nn import codec_for

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, layer name)


@dataclass
class LayerReport:
    """One row of the report. bytes_packed: stored weight bytes (``weight_bytes``); bytes_fp16: 2·N·K."""

    name: str
    kind: str
    method: str
    w_bits: int
    a_bits: int
    w_group_size: int | None
    out_features: int
    in_features: int
    bytes_packed: int
    bytes_fp16: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_packed / self.bytes_fp16 if self.bytes_fp16 else float("nan")


@dataclass
class QuantReport:
    """Per-layer rows (quantized layers only) plus totals; ``skipped`` lists the layers kept in full precision."""

    recipe: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_packed(self) -> int:
        return sum(r.bytes_packed for r in self.layers)

    @property
    def bytes_fp16(self) -> int:
        return sum(r.bytes_fp16 for r in self.layers)

    @property
    def ratio(self) -> float:
        """Packed bytes / fp16 bytes of the quantized layers (nan if nothing was quantized)."""
        return self.bytes_packed / self.bytes_fp16 if self.bytes_fp16 else float("nan")

    def totals(self) -> dict:
        return {"recipe": self.recipe, "n_quantized": len(self.layers), "n_skipped": len(self.skipped), "bytes_packed": self.bytes_packed,
                "bytes_fp16": self.bytes_fp16, "ratio": self.ratio, "seconds": self.seconds}

    def to_frame(self):
        """pandas DataFrame, one row per quantized layer (columns of LayerReport plus ``ratio``)."""
        import pandas as pd

        rows = [{**asdict(r), "ratio": r.ratio} for r in self.layers]
        columns = [f for f in LayerReport.__dataclass_fields__] + ["ratio"]
        return pd.DataFrame(rows, columns=columns)

    def to_dict(self) -> dict:
        return {**self.totals(), "layers": [asdict(r) for r in self.layers], "skipped": list(self.skipped)}


def weight_bytes(module: nn.Module) -> int:
    """Stored bytes of a layer's weight (everything but the bias): packed codes + scales + zeros + low-rank +
    codebooks for quantized modules (their ``weight_bytes()``), ``numel · element_size`` of the weight for nn.Linear,
    and for other modules (e.g. bitsandbytes) every parameter and buffer except the bias, plus a 4-bit quant state."""
    own = getattr(module, "weight_bytes", None)
    if callable(own):
        return int(own())
    codec = codec_for(module)  # modules of other libraries (bitsandbytes) count through their registered codec
    if codec is not None:
        return int(codec.nbytes(module))
    if type(module) is nn.Linear:
        return module.weight.numel() * module.weight.element_size()
    total = 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name.rsplit(".", 1)[-1] != "bias":
            total += t.numel() * t.element_size()
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is not None:  # bitsandbytes Params4bit keeps its block scales outside the parameter
        for attr in ("absmax", "code"):
            t = getattr(state, attr, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        nested = getattr(state, "state2", None)
        if nested is not None and isinstance(getattr(nested, "absmax", None), torch.Tensor):
            total += nested.absmax.numel() * nested.absmax.element_size()
    return total


def stats_for(calib, name: str):
    """The LayerStats of ``name`` in a CalibStats (or any mapping), or None."""
    if calib is None:
        return None
    if isinstance(calib, Mapping) and name in calib:
        return calib[name]
    return None


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def plan_for(model: nn.Module, recipe: Recipe | str) -> dict[str, LayerConfig | None]:
    """The resolved plan of ``recipe`` over the linears of ``model`` (validated; names every bad layer/pattern)."""
    return load_recipe(recipe).resolve([info for info in list_linears(model)])


def layers_needing_stats(model: nn.Module, recipe: Recipe | str) -> list[str]:
    """Names of the layers whose planned config needs calibration statistics (empty: no calibration needed)."""
    return [n for n, c in plan_for(model, recipe).items() if c is not None and not c.is_fp and c.needs_stats]


def quantize_pipeline(pipe, recipe: Recipe | str, calib=None, progress: bool | Progress | None = None):
    """``quantize_`` on ``pipe.transformer``; returns (a Pipeline sharing every other component, QuantReport)."""
    import dataclasses

    qmodel, report = quantize_(pipe.transformer, recipe, calib, progress)
    return dataclasses.replace(pipe, transformer=qmodel), report


def has_quantized_layers(model: nn.Module) -> bool:
    """True if some linear of ``model`` is already quantized (a ``quantize_`` result or a loaded QDIR)."""
    return any(getattr(m, "is_quantized_linear", False) for m in model.modules())


def quantize_(model: nn.Module, recipe: Recipe | str, calib=None, progress: bool | Progress | None = None) -> tuple[nn.Module, QuantReport]:
    """Quantizes a deep copy of ``model`` (a transformer) with ``recipe`` (Recipe, preset name or JSON path).

    calib: CalibStats (layer name → LayerStats) or None; layers whose config needs statistics raise ConfigError
    before any work starts. progress: True/None → tqdm bar, False → silent, a callable → ``(done, total, name)``.
    Returns ``(quantized copy, QuantReport)``.
    """
    recipe = load_recipe(recipe)
    if has_quantized_layers(model):
        raise ConfigError.invalid("model", "already quantized", "a full-precision model (quantize the loaded FP transformer)")
    plan = plan_for(model, recipe)
    todo = [(n, c) for n, c in plan.items() if c is not None and not c.is_fp]
    for name, cfg in todo:
        if cfg.needs_stats and stats_for(calib, name) is None:
            raise ConfigError(f"layer {name!r}: method {cfg.method!r} ({cfg.short()}) needs calibration statistics for this layer; "
                              "calibrate first (ditlab.calibration.calibrate) and pass calib=", layer=name, field="calib", value=None,
                              allowed="CalibStats covering this layer")
    t_start = time.perf_counter()
    # Deep copy everything except the weights of layers about to be replaced: those tensors are shared with the
    # (read-only) FP model until the handler has read them and the new module takes the layer's place. This avoids
    # copying ~all of the model's bytes (DiT-XL/2: 2.9 GB) just to throw them away. The copy starts without forward
    # pre-hooks: those on the shared FP model belong to another session's running calibration or outlier capture (they
    # would keep its statistics alive in this copy), and their dicts change while that session ends.
    memo = {id(m._forward_pre_hooks): type(m._forward_pre_hooks)() for m in model.modules()}
    for name, _ in todo:
        linear = model.get_submodule(name)
        for t in (linear.weight, linear.bias):
            if t is not None:
                memo[id(t)] = t
    qmodel = copy.deepcopy(model, memo)
    report = QuantReport(recipe=recipe.name, skipped=[n for n, c in plan.items() if c is None or c.is_fp])
    callback = progress if callable(progress) else None
    bar = tqdm(todo, desc=f"quantize {recipe.name}", disable=progress is False or callback is not None, leave=False)
    for i, (name, cfg) in enumerate(bar):
        linear = qmodel.get_submodule(name)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                new = get_handler(cfg.method, layer=name)(linear, cfg, stats_for(calib, name))
        except ConfigError as exc:
            if exc.layer or exc.field is None:
                raise
            raise ConfigError.invalid(exc.field, exc.value, exc.allowed, layer=name) from None
        except DitlabError:
            raise
        new.train(linear.training)
        _set_module(qmodel, name, new)
        seconds = time.perf_counter() - t0
        n, k = linear.out_features, linear.in_features
        report.layers.append(LayerReport(name, layer_kind(name), cfg.method, cfg.w_bits, cfg.a_bits, cfg.w_group_size, n, k,
                                         weight_bytes(new), 2 * n * k, seconds))
        log.debug("quantized %s (%s) in %.3fs", name, cfg.short(), seconds)
        if callback is not None:
            callback(i + 1, len(todo), name)
    report.seconds = time.perf_counter() - t_start
    qmodel.ditlab_recipe = recipe  # read by qdir.save_quantized and the UI; plain attribute, not a buffer
    log.info("quantized %d layers with %s in %.2fs (%.3f× fp16 bytes)", len(todo), recipe.name, report.seconds, report.ratio)
    return qmodel, report
