"""The method registry: name → handler ``quantize_layer(linear, cfg, stats) -> nn.Module``.

A handler receives the float ``nn.Linear`` (it must not modify it), the layer's ``LayerConfig`` and its calibration
``LayerStats`` (or None) and returns the replacement module (a ``ditlab.nn.QuantLinear`` or a bitsandbytes module).
Register with ``@register("name")``; one module per method, imported at the bottom of this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:  # calibration.py imports nothing from here; the annotation is for readers
    from ..calibration import LayerStats
    from ..config import LayerConfig

MethodHandler = Callable[[nn.Linear, "LayerConfig", "LayerStats | None"], nn.Module]
METHODS: dict[str, MethodHandler] = {}


def register(name: str) -> Callable[[MethodHandler], MethodHandler]:
    """Decorator: registers a handler under ``name`` (a LayerConfig.method value). Names are unique."""

    def deco(fn: MethodHandler) -> MethodHandler:
        if name in METHODS and METHODS[name] is not fn:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__module__} and {fn.__module__})")
        METHODS[name] = fn
        return fn

    return deco


def get_handler(name: str, layer: str | None = None) -> MethodHandler:
    """The handler registered under ``name``; ConfigError naming the available ones otherwise."""
    if name not in METHODS:
        raise ConfigError.invalid("method", name, "one of the available methods: " + ", ".join(sorted(METHODS)), layer)
    return METHODS[name]


def require_stats(cfg, stats, layer: str | None = None):
    """Returns ``stats`` or raises ConfigError: 'method X needs calibration statistics'."""
    if stats is None:
        where = f"layer {layer!r}: " if layer else ""
        raise ConfigError(f"{where}method {cfg.method!r} needs calibration statistics; calibrate first (ditlab.calibration.calibrate)",
                          layer=layer, field="stats", value=None, allowed="LayerStats from calibration")
    return stats


# One line per method module. A module that does not exist yet (being written by another engineer) is skipped;
# any other import error propagates.
_METHOD_MODULES = ("rtn", "smoothquant", "hadamard", "hadanorm", "viditq", "gptq", "svd", "bnb", "vq4dit", "kmeans")
for _mod in _METHOD_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_mod}":
            raise
