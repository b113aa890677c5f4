"""Hadamard rotation (QuaRot-style baseline): ``X' = X Q``, ``W' = W Q`` with Q the block-diagonal randomised
normalised Hadamard of ``ditlab.hadamard_ops`` (block = largest power of two dividing K; signs seeded by
``cfg.hadamard_seed``). The activation side runs online as a fast Walsh–Hadamard transform; the weight side is
folded offline. Needs no calibration (unless GPTQ rounding or a static activation scale is asked for).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import hadamard_ops
from ..nn import InputTransform, QuantLinear
from . import register
from .gptq import quantize_folded

log = logging.getLogger(__name__)


def hadamard_signs(k: int, seed: int) -> torch.Tensor:
    """(K,) int8 ±1 signs of the randomised Hadamard for a K-channel input (warns when the block is tiny)."""
    block = hadamard_ops.block_size(k)
    if block < 16:
        log.warning("in_features=%d: the Hadamard block is only %d channels; the rotation barely spreads outliers", k, block)
    return hadamard_ops.random_signs(k, seed)


def hadamard_transform(linear: nn.Linear, cfg, stats=None) -> InputTransform:
    """The online part: ``X · Q``."""
    return InputTransform(linear.in_features, hadamard_signs=hadamard_signs(linear.in_features, cfg.hadamard_seed))


@register("hadamard")
def quantize_hadamard(linear: nn.Linear, cfg, stats=None) -> QuantLinear:
    """Hadamard handler: rotate, fold, round, quantize activations per token (or statically)."""
    with torch.no_grad():
        return quantize_folded(linear, cfg, stats, hadamard_transform(linear, cfg, stats))
