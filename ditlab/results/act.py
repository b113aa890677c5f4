"""Claim (b), measurement: activation-quantization error per block component for RTN, SmoothQuant, Hadamard,
ViDiT-Q channel balancing and HadaNorm (``benchmarks/act_error_by_method.py``'s per-layer computation, kept as numbers).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .common import Part, ResultsSettings, Say, repo_script

KINDS = ("qkv", "out", "fc1", "fc2", "adaLN")
COLUMNS = ("A4", "A8", "W8A4", "W4A8")


def _script():
    mod = repo_script("benchmarks/act_error_by_method.py")
    if mod is None:
        from ..errors import DitlabError

        raise DitlabError("benchmarks/act_error_by_method.py not found: run from a ditlab checkout")
    return mod


@torch.no_grad()
def real_layers(pipe, settings: ResultsSettings) -> list[dict]:
    """Per layer: {"layer", "kind", "errors": {method: {column: relative error}}} on held-out activations of ``pipe``.

    Statistics from ``api.calibrate`` (the settings' calibration, cached); held-out inputs: another sampling run
    (4 labels, seed 987, ``act_steps`` steps), every (steps // 4)-th step — as in the benchmark script.
    """
    from .. import api, models
    from ..sampling import sample

    script = _script()
    names = [i.name for i in models.list_linears(pipe.transformer) if i.kind in KINDS]
    calib = api.calibrate(pipe, n_samples=settings.calib_samples, steps=settings.calib_steps, progress=False)
    mods = dict(pipe.transformer.named_modules())
    held: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: held[n].append(a[0].detach().clone())) for n in names]
    try:
        sample(pipe, labels=[i % max(pipe.num_classes, 1) for i in range(4)], steps=settings.act_steps, seed=987, progress=False, decode_images=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for n in names:
        x = torch.cat([t.reshape(t.shape[0], -1, t.shape[-1]) for t in held[n][:: max(1, settings.act_steps // 4)]])
        out.append({"layer": n, "kind": models.layer_kind(n), "errors": script.layer_errors(mods[n], calib[n], x)})
    return out


@torch.no_grad()
def synthetic_layers() -> list[dict]:
    """The script's synthetic DiT-like activations for shapes of the tiny DiT and DiT-XL/2 (K = 192, 768, 1152)."""
    script = _script()
    out = []
    for i, (k, n) in enumerate([(192, 192), (192, 768), (768, 192), (1152, 1152)]):
        lin = torch.nn.Linear(k, n).requires_grad_(False)
        torch.nn.init.normal_(lin.weight, std=k**-0.5, generator=torch.Generator().manual_seed(i))
        stats = script.stats_of(script.synthetic_acts(8, 64, k, structure=i, draw=1000 + i))
        x = script.synthetic_acts(4, 64, k, structure=i, draw=2000 + i)
        out.append({"layer": f"synthetic {k}→{n}", "kind": "synthetic", "errors": script.layer_errors(lin, stats, x)})
    return out


def medians(layers: list[dict]) -> dict:
    """{group: {method: {column: median}}} for group in KINDS (present ones), "all" (every real layer), "synthetic"."""
    groups: dict[str, list[dict]] = {}
    for layer in layers:
        groups.setdefault(layer["kind"], []).append(layer)
        if layer["kind"] != "synthetic":
            groups.setdefault("all", []).append(layer)
    out = {}
    for g, items in groups.items():
        methods = list(items[0]["errors"])
        out[g] = {m: {c: statistics.median(it["errors"][m][c] for it in items) for c in COLUMNS} for m in methods}
        out[g]["_n"] = len(items)
    return out


def run(pipe, settings: ResultsSettings, results_dir: Path, say: Say) -> dict:
    part = Part("act", settings, results_dir)
    say("[act] activation-quantization error: synthetic layers")
    layers = synthetic_layers()
    say("[act] real activations of the model (calibration + one held-out sampling run)")
    layers += real_layers(pipe, settings)
    part.data = {"layers": layers, "medians": medians(layers), "methods": list(_script().METHOD_ORDER)}
    part.complete = True
    part.save()
    return part.doc()
