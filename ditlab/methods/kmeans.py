"""Plain k-means vector quantization (the VQ4DiT baseline: init + storage only, no candidates, no calibration).

Per layer: W (N, K) → sub-vectors of length d → k-means (k-means++ seeding, ≤ ``kmeans_iters`` Lloyd updates,
seeded) → codebook rounded to fp16 → every sub-vector assigned to its nearest fp16 codeword (so the stored
assignments are optimal for the stored codebook) → ``VQLinear``.

Layer parameters (``LayerConfig.params``; defaults from ``w_bits`` via ``ditlab.vq.default_k_d``):
  k             codewords (≤ 256), capped at the largest power of two ≤ (N·K/d)/4
  d             sub-vector length (1, 2, 4 or 8, dividing in_features)
  seed          k-means++ seed (default 0)
  kmeans_iters  at most this many Lloyd updates (1–100, default 100)
  kmeans_fit    points per centroid k-means trains on (default 256, as faiss; 0 = all): a layer with more than
                k·kmeans_fit sub-vectors is seeded and fitted on a seeded sample of that size, then every sub-vector
                is assigned to its nearest codeword (shipped tiny DiT: no 2-bit layer is sampled — ≤ 55,296 sub-vectors
                vs 65,536 — but every 3-bit layer is fitted on 16,384; DiT-XL/2: every layer at both widths)
The VQ4DiT method (``vq4dit.py``) shares this initialisation and adds its own keys (see ``config.VQ4DIT_KEYS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .. import vq
from ..errors import ConfigError
from . import register

log = logging.getLogger(__name__)



def _int_param(params: dict, key: str, default: int, lo: int, hi: int, layer: str | None) -> int:
    v = params.get(key, default)
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise ConfigError.invalid(f"params.{key}", v, f"an integer from {lo} to {hi}", layer)
    return v


@dataclass(frozen=True)
class VQLayerParams:
    """Resolved per-layer VQ settings: codewords k (after the cap), sub-vector length d, seed, Lloyd updates, candidates,
    points per centroid k-means fits on."""

    k: int
    d: int
    seed: int
    kmeans_iters: int
    n_candidates: int
    kmeans_fit: int = 256


def layer_params(cfg, out_features: int, in_features: int, layer: str | None = None) -> VQLayerParams:
    """Validates ``cfg.params`` of a kmeans / vq4dit layer (N = out_features, K = in_features) and resolves defaults.

    Raises ConfigError naming ``params.<key>`` and what is allowed.
    """
    params = dict(cfg.params or {})  # its keys were checked by LayerConfig (config.METHOD_PARAM_KEYS)
    k0, d0 = vq.default_k_d(cfg.w_bits)
    d = params.get("d", d0)
    if d not in vq.SUBVECTOR_LENGTHS or in_features % d:
        raise ConfigError.invalid("params.d", d, f"one of {vq.SUBVECTOR_LENGTHS} dividing in_features={in_features}", layer)
    k = _int_param(params, "k", k0, 2, vq.MAX_CODES, layer)
    k = vq.cap_k(k, out_features * in_features // d)
    seed = _int_param(params, "seed", 0, 0, 2**31 - 1, layer)
    iters = _int_param(params, "kmeans_iters", 100, 1, 100, layer)
    fit = _int_param(params, "kmeans_fit", 256, 0, 1 << 20, layer)
    n_cand = _int_param(params, "n_candidates", 2, 1, 4, layer) if cfg.method == "vq4dit" else 1
    return VQLayerParams(k=k, d=d, seed=seed, kmeans_iters=iters, n_candidates=min(n_cand, k), kmeans_fit=fit)


def kmeans_init(weight: torch.Tensor, p: VQLayerParams, desc: str = "k-means") -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook (k, d) fp16 and nearest assignments (N, K/d) uint8 of W (N, K) (k-means++ then Lloyd, seeded)."""
    x = vq.subvectors(weight, p.d)  # (N·K/d, d)
    # the final assignment is made against the fp16-rounded codebook (what is stored), so it is optimal for it
    result = vq.kmeans(x, p.k, iters=p.kmeans_iters, seed=p.seed, max_points=p.k * p.kmeans_fit or None,
                       codebook_dtype=torch.float16, desc=desc)
    codebook = result.codebook.to(torch.float16)  # exact: already rounded
    assignments = result.assignments.to(torch.uint8).reshape(weight.shape[0], weight.shape[1] // p.d)
    return codebook, assignments


@register("kmeans")
def quantize_kmeans(linear: nn.Linear, cfg, stats=None) -> vq.VQLinear:
    """k-means handler: codebook + nearest assignments, no calibration (the baseline VQ4DiT must beat)."""
    n, k = linear.out_features, linear.in_features
    p = layer_params(cfg, n, k)
    codebook, assignments = kmeans_init(linear.weight, p)
    return vq.VQLinear.from_parts(assignments, codebook, linear.bias, method=cfg.method)
