"""Activation-quantization error by method: RTN, SmoothQuant, Hadamard, ViDiT-Q SDCB, HadaNorm.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/act_error_by_method.py [--synthetic-only] [--steps 10] [--samples 8]

Two inputs:
  * synthetic: DiT-like activations (unit channels, a few channels with 20–100× spread, per-sample channel means,
    a few "massive" constant channels) for layer shapes of the tiny DiT and DiT-XL/2 (K = 192, 768, 1152);
  * real: the shipped tiny DiT — statistics from ``ditlab.calibration.calibrate`` (cached), errors measured on
    held-out activations of a different seed, over every quantized layer (qkv, out, fc1, fc2, adaLN).
Columns: ``A4`` / ``A8`` = activation-only relative output error ‖XWᵀ − (Q_a(X') + T(μ)) W'ᵀ‖ / ‖XWᵀ‖ with the
(transformed) weights kept in float; ``W8A4`` / ``W4A8`` = the whole quantized layer from the method's handler vs the
FP layer. Each cell is the median over layers. Methods that rescale channels (SmoothQuant, SDCB) move difficulty into
the weights, which the activation-only columns do not charge them for: read the W columns next to them.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ditlab import transforms  # noqa: E402
from ditlab.config import LayerConfig  # noqa: E402
from ditlab.methods import METHODS  # noqa: E402
from ditlab.methods.hadamard import hadamard_transform  # noqa: E402
from ditlab.methods.hadanorm import hadanorm_transform  # noqa: E402
from ditlab.methods.smoothquant import smoothquant_transform  # noqa: E402
from ditlab.methods.viditq import viditq_transform  # noqa: E402
from ditlab.nn import InputTransform  # noqa: E402

METHOD_ORDER = ("rtn", "smoothquant", "hadamard", "viditq", "hadanorm")
BUILDERS = {
    "rtn": lambda lin, cfg, st: InputTransform(lin.in_features),
    "smoothquant": smoothquant_transform,
    "hadamard": hadamard_transform,
    "viditq": viditq_transform,
    "hadanorm": hadanorm_transform,
}
LAYER_CFGS = {"W8A4": dict(w_bits=8, a_bits=4, w_group_size=None), "W4A8": dict(w_bits=4, a_bits=8, w_group_size=64)}


def stats_of(x: torch.Tensor):
    """LayerStats-like fields from X (B, T, K) (synthetic case: statistics of the same distribution, other seed)."""
    from types import SimpleNamespace

    flat = x.reshape(-1, x.shape[-1])
    centered = (x - x.mean(1, keepdim=True)).reshape(-1, x.shape[-1])
    return SimpleNamespace(absmax=flat.abs().amax(0), mean=flat.mean(0), std=flat.std(0, unbiased=False),
                           centered_std=centered.std(0, unbiased=False), centered_absmax=centered.abs().amax(0),
                           xtx=flat.double().t() @ flat.double(), n_rows=flat.shape[0], rows=flat[:512])


def synthetic_acts(b: int, t: int, k: int, structure: int, draw: int) -> torch.Tensor:
    """(B, T, K) DiT-like activations (see the module docstring); ~3 % outlier channels, half wide, half massive.
    ``structure`` seeds which channels are outliers and their sizes (the layer), ``draw`` the values (the batch)."""
    g = torch.Generator().manual_seed(structure)
    n_out = max(2, k // 32)
    idx = torch.randperm(k, generator=g)[:n_out]
    wide, massive = idx[: n_out // 2], idx[n_out // 2 :]
    spread = torch.ones(k)
    spread[wide] = 20 + 80 * torch.rand(len(wide), generator=g)
    shared = torch.randn(1, 1, k, generator=g)
    big = (20 + 80 * torch.rand(len(massive), generator=g)) * torch.sign(shared[..., massive])
    d = torch.Generator().manual_seed(draw)
    mean = shared + 0.5 * torch.randn(b, 1, k, generator=d)
    mean[..., massive] = big * (1 + 0.1 * torch.randn(b, 1, len(massive), generator=d))
    return torch.randn(b, t, k, generator=d) * spread + mean


def layer_errors(lin: torch.nn.Linear, stats, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """{method: {column: relative error}} for one layer, held-out input x (B, T, K)."""
    out = {}
    y = lin(x)
    for m in METHOD_ORDER:
        cfg = LayerConfig(method=m, w_bits=8, a_bits=8, w_symmetric=False, alpha=0.5)
        t = BUILDERS[m](lin, cfg, stats)
        rot = t.rotate if t.had_signs is not None else None
        row = {f"A{b}": transforms.act_quant_error(x, lin.weight, b, t.smooth, t.center, t.sigma, rot) for b in (4, 8)}
        for name, kw in LAYER_CFGS.items():
            q = METHODS[m](lin, cfg.replace(**kw), stats)
            row[name] = float((q(x) - y).norm() / y.norm())
        out[m] = row
    return out


def table(per_layer: list[dict[str, dict[str, float]]], title: str) -> str:
    cols = ["A4", "A8", *LAYER_CFGS]
    lines = [f"### {title} (median over {len(per_layer)} layers)", "", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in METHOD_ORDER:
        cells = [statistics.median(d[m][c] for d in per_layer) for c in cols]
        lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def synthetic() -> str:
    rows = []
    for i, (k, n) in enumerate([(192, 192), (192, 768), (768, 192), (1152, 1152)]):
        lin = torch.nn.Linear(k, n).requires_grad_(False)
        torch.nn.init.normal_(lin.weight, std=k**-0.5, generator=torch.Generator().manual_seed(i))
        stats = stats_of(synthetic_acts(8, 64, k, structure=i, draw=1000 + i))  # calibration batch
        x = synthetic_acts(4, 64, k, structure=i, draw=2000 + i)  # held-out batch of the same layer
        rows.append(layer_errors(lin, stats, x))
    return table(rows, "synthetic DiT-like activations")


@torch.no_grad()
def real(steps: int, samples: int) -> str | None:
    from ditlab import api, models
    from ditlab.calibration import calibrate
    from ditlab.sampling import sample

    try:
        pipe = api.load("shipped")
    except Exception as exc:  # noqa: BLE001 - no checkpoint yet: report and skip
        return f"(shipped model not available: {exc})"
    names = [l.name for l in models.list_linears(pipe.transformer) if l.kind in ("qkv", "out", "fc1", "fc2", "adaLN")]
    calib = calibrate(pipe, n_samples=samples, steps=steps, layers=names, progress=False)
    mods = dict(pipe.transformer.named_modules())
    held: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: held[n].append(a[0].detach().clone())) for n in names]
    try:
        sample(pipe, labels=list(range(4)), steps=steps, seed=987, progress=False, decode_images=False)
    finally:
        for h in hooks:
            h.remove()
    per_layer, by_kind = [], {}
    for n in names:
        x = torch.cat([t.reshape(t.shape[0], -1, t.shape[-1]) for t in held[n][:: max(1, steps // 4)]])  # 4 steps
        errs = layer_errors(mods[n], calib[n], x)
        per_layer.append(errs)
        by_kind.setdefault(models.layer_kind(n), []).append(errs)
    parts = [table(per_layer, f"shipped tiny DiT, held-out activations ({steps} steps, calibration {samples} samples)")]
    parts += [table(v, f"shipped tiny DiT, {k} layers only") for k, v in by_kind.items()]
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-only", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    print(synthetic())
    if not args.synthetic_only:
        print()
        print(real(args.steps, args.samples))


if __name__ == "__main__":
    main()
