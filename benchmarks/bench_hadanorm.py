"""W4A8 HadaNorm vs W4A8 RTN on the shipped tiny DiT, measured. Each part prints a markdown table.

  python benchmarks/bench_hadanorm.py layers [--steps 0,5,9]
      Per layer kind (qkv, out, fc1, fc2, adaLN) of the shipped model, means over its layers:
      - the kurtosis of the weights as stored (W), after the block Hadamard (W·Q) and after HadaNorm's fold
        (W·diag(σ)·Q): rotations make any distribution more Gaussian (kurtosis 3);
      - the SQNR of those three matrices at 4 bits, groups of 64, asymmetric min–max (the W4 presets' grid);
      - the SQNR of each layer's *output* for RTN, Hadamard, HadaNorm (σ = std, the default; σ = absmax; and
        without the mean term's low-rank correction, ``mean_rank`` 0) at W4A8, W4A16 and W8A4, on inputs captured
        at sampling steps ``--steps`` of a *held-out* run (other seed, all ten classes: the calibration saw
        neither), so the statistics the methods fit are not scored on their own data.
  python benchmarks/bench_hadanorm.py steps [--steps 0,2,5,9]
      Per sampling step of the held-out run: the mean over the 42 layers of the W4A8 output SQNR of each method,
      and its worst layer relative to RTN — HadaNorm's static σ is fitted over all timesteps, and the first,
      high-noise step is where it fits worst.
  python benchmarks/bench_hadanorm.py seeds [--group w4a8|a4] [--seeds 0,1,2] [--n-per-label 10]
      End-to-end PSNR / class accuracy / FD vs the FP model (same seeds) per image seed: ``w4a8`` — RTN, Hadamard,
      HadaNorm (default, and without the mean term's correction, and σ = absmax), RTN and HadaNorm both with GPTQ
      weight rounding; ``a4`` — RTN vs HadaNorm with 4-bit activations (W8A4, W4A4); ``rotations`` — HadaNorm with
      three other random Hadamard sign vectors (the preset's is seed 0): how far the same method moves the PSNR.
  python benchmarks/bench_hadanorm.py split [--seeds 0,1] [--n-per-label 10]
      End-to-end PSNR with the method switched by timestep group (4 groups of the 25 steps): RTN in the first
      group and HadaNorm after it, and the reverse.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ditlab import api, hadamard_ops, metrics, outliers, primitives  # noqa: E402
from ditlab.config import PRESETS, Recipe  # noqa: E402
from ditlab.evaluation import SampleSettings  # noqa: E402
from ditlab.methods import get_handler  # noqa: E402
from ditlab.methods.hadanorm import hadanorm_sigma  # noqa: E402
from ditlab.models import layer_kind  # noqa: E402
from ditlab.quantize import plan_for, stats_for  # noqa: E402

KINDS = ("qkv", "out", "fc1", "fc2", "adaLN")
VARIANTS = {"RTN": ("rtn", {}), "Hadamard": ("hadamard", {}), "HadaNorm σ=std": ("hadanorm", {}), "HadaNorm σ=absmax": ("hadanorm", {"sigma": "absmax"}),
            "HadaNorm σ=std, mean rank 0": ("hadanorm", {"params": {"mean_rank": 0}})}
HELD_OUT = {"seed": 77, "labels": list(range(10))}  # the layers/steps parts score layers on this run, not on the calibration's
SETTINGS = {"W4A8": (4, 8, 64), "W4A16": (4, 16, 64), "W8A4": (8, 4, None)}


def w4_sqnr(w: torch.Tensor) -> float:
    """SQNR (dB) of W (N, K) after 4-bit asymmetric min–max rounding in groups of 64 along K."""
    return metrics.sqnr(w, primitives.fake_quantize_weight(w, 4, 64, symmetric=False))


def weight_views(linear: nn.Linear, stats) -> dict[str, torch.Tensor]:
    """W (N, K), W·Q and W·diag(σ)·Q (σ = HadaNorm's default, std) of one layer."""
    w = linear.weight.detach().float()
    signs, block = hadamard_ops.random_signs(w.shape[1], 0), hadamard_ops.block_size(w.shape[1])
    sigma, _ = hadanorm_sigma(stats, "std")
    return {"W": w, "W·Q": hadamard_ops.rotate(w, signs, block), "W·diag(σ)·Q": hadamard_ops.rotate(w * sigma, signs, block)}


def output_sqnr(linear: nn.Linear, q: nn.Module, inputs: list[torch.Tensor]) -> float:
    """SQNR (dB) of the quantized layer's output over the captured inputs, pooled."""
    with torch.no_grad():
        return metrics.sqnr(torch.cat([linear(x).reshape(-1) for x in inputs]), torch.cat([q(x).reshape(-1) for x in inputs]))


def held_out_inputs(pipe, calib, steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """{step: {layer: X}} captured on a run with another seed and all classes (``HELD_OUT``), same steps and CFG."""
    return {s: outliers.capture_step(pipe, {**calib.settings, **HELD_OUT}, s) for s in steps}


def layer_setup(steps: list[int]):
    """(calib, held-out inputs {step: {layer: X}}, modules {name: module}, plan {layer: w4a8-rtn LayerConfig}) of the
    shipped model: what the per-layer parts measure on."""
    pipe = api.load(None)
    calib = api.calibrate(pipe, progress=False)
    plan = {n: c for n, c in plan_for(pipe.transformer, "w4a8-rtn").items() if c is not None}
    return calib, held_out_inputs(pipe, calib, steps), dict(pipe.transformer.named_modules()), plan


def variant_layer(linear: nn.Linear, cfg, stats, label: str, **changes) -> nn.Module:
    """The quantized layer of VARIANTS[label] built from ``cfg`` with ``changes`` (e.g. other bits)."""
    method, extra = VARIANTS[label]
    return get_handler(method)(linear, dataclasses.replace(cfg, method=method, **changes, **extra), stats)


def layers_part(steps: list[int]) -> str:
    calib, captured, modules, plan = layer_setup(steps)
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, cfg in plan.items():
        linear, stats, kind = modules[name], stats_for(calib, name), layer_kind(name)
        for view, w in weight_views(linear, stats).items():
            rows[kind][f"kurtosis {view}"].append(outliers.kurtosis(w))
            rows[kind][f"W4 SQNR {view}"].append(w4_sqnr(w))
        inputs = [captured[s][name] for s in steps]
        for setting, (wb, ab, group) in SETTINGS.items():
            for label in VARIANTS:
                q = variant_layer(linear, cfg, stats, label, w_bits=wb, a_bits=ab, w_group_size=group)
                rows[kind][f"{setting} {label}"].append(output_sqnr(linear, q, inputs))
    kinds = [k for k in KINDS if k in rows]
    cols = list(next(iter(rows.values())))
    out = [f"Shipped tiny DiT, {len(plan)} quantized linears; layer outputs on inputs captured at sampling steps {steps} of a held-out run "
           f"(seed {HELD_OUT['seed']}, classes 0–9, {calib.settings['steps']} {calib.settings.get('scheduler', 'ddim')} steps; calibration: seed "
           f"{calib.settings['seed']}, classes {calib.settings['labels']}). Means over the layers of each kind; SQNR in dB.", "",
           "| measure | " + " | ".join(f"{k} ({len(next(iter(rows[k].values())))})" for k in kinds) + " |",
           "|---|" + "---:|" * len(kinds)]
    for col in cols:
        out.append(f"| {col} | " + " | ".join(f"{statistics.fmean(rows[k][col]):.2f}" for k in kinds) + " |")
    return "\n".join(out)


def steps_part(steps: list[int]) -> str:
    """Per sampling step: mean W4A8 output SQNR over the layers per method, and the worst layer's gap to RTN."""
    calib, captured, modules, plan = layer_setup(steps)
    labels = ("RTN", "Hadamard", "HadaNorm σ=std", "HadaNorm σ=absmax")
    sqnr: dict[tuple[int, str], list[float]] = defaultdict(list)
    worst: dict[tuple[int, str], tuple[float, str]] = {}
    for name, cfg in plan.items():
        linear, stats = modules[name], stats_for(calib, name)
        layers = {lab: variant_layer(linear, cfg, stats, lab) for lab in labels}
        for s in steps:
            got = {lab: output_sqnr(linear, q, [captured[s][name]]) for lab, q in layers.items()}
            for lab, v in got.items():
                sqnr[s, lab].append(v)
                gap = v - got["RTN"]
                if lab != "RTN" and ((s, lab) not in worst or gap < worst[s, lab][0]):
                    worst[s, lab] = (gap, name)
    out = [f"Shipped tiny DiT, W4A8 (groups of 64), {len(plan)} quantized linears; inputs of the held-out run (seed {HELD_OUT['seed']}, classes 0–9) "
           f"at each sampling step of {calib.settings['steps']} (step 0 = the first, pure-noise step). Mean output SQNR over the layers (dB); "
           "in brackets the worst layer's SQNR minus RTN's on that layer.", "",
           "| step | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for s in steps:
        cells = [f"{statistics.fmean(sqnr[s, 'RTN']):.2f}"]
        cells += [f"{statistics.fmean(sqnr[s, lab]):.2f} ({worst[s, lab][0]:+.1f} `{short(worst[s, lab][1])}`)" for lab in labels[1:]]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def short(name: str) -> str:
    """transformer_blocks.3.attn1.to_k → b3.to_k; ….norm1.linear → b3.adaLN; ….ff.net.0.proj → b3.fc1."""
    parts = name.split(".")
    block = f"b{parts[1]}" if parts[0] == "transformer_blocks" else parts[0]
    kind = layer_kind(name)
    return f"{block}.{parts[-1] if kind in ('qkv',) else kind}"


FULL_MEAN_RANK = 100_000  # ≥ every layer's K: U = I, the mean term uses W̃ itself (methods/hadanorm.py)


def variant_recipe(base: str, name: str, **changes) -> Recipe:
    r = PRESETS[base]
    return dataclasses.replace(r, name=name, default=dataclasses.replace(r.default, **changes))


def seed_recipes(group: str) -> list[Recipe]:
    """The recipes of the ``seeds`` part: "w4a8" (rounding of 4-bit weights), "a4" (4-bit activations),
    "rotations" (w4a8-hadanorm with other random Hadamard signs: the same method, a different error) or "mean-term"
    (w4a8-hadanorm with METHODS.md's full-precision mean term instead of the stored low-rank one: what the
    approximation costs)."""
    if group == "mean-term":
        return [variant_recipe("w4a8-hadanorm", "w4a8-hadanorm, full-precision mean term", params={"mean_rank": FULL_MEAN_RANK})]
    if group == "rotations":
        return [variant_recipe("w4a8-hadanorm", f"w4a8-hadanorm, hadamard_seed {h}", hadamard_seed=h) for h in (1, 2, 3)]
    if group == "a4":
        return [variant_recipe("w4a8-rtn", "w8a4-rtn", w_bits=8, a_bits=4, w_group_size=None),
                variant_recipe("w4a8-hadanorm", "w8a4-hadanorm", w_bits=8, a_bits=4, w_group_size=None),
                variant_recipe("w4a8-rtn", "w4a4-rtn", a_bits=4), PRESETS["w4a4-hadanorm"]]
    return [PRESETS["w4a8-rtn"], PRESETS["w4a8-hadamard"], PRESETS["w4a8-hadanorm"],
            variant_recipe("w4a8-hadanorm", "w4a8-hadanorm, mean rank 0", params={"mean_rank": 0}),
            variant_recipe("w4a8-hadanorm", "w4a8-hadanorm σ=absmax", sigma="absmax"),
            variant_recipe("w4a8-rtn", "w4a8-rtn + GPTQ rounding", weight_rounding="gptq"),
            variant_recipe("w4a8-hadanorm", "w4a8-hadanorm + GPTQ rounding", weight_rounding="gptq")]


def seeds_part(seeds: list[int], n_per_label: int, group: str) -> str:
    pipe = api.load(None)
    recipes = seed_recipes(group)
    out = [f"Shipped tiny DiT, {10 * n_per_label} images per seed, 25 DPM-Solver++ steps, CFG 4; PSNR vs the FP model's images "
           "(same seeds and labels).", "", "| recipe | " + " | ".join(f"PSNR seed {s}" for s in seeds) + " | mean PSNR | mean class acc | mean FD |",
           "|---|" + "---:|" * (len(seeds) + 3)]
    for recipe in recipes:
        res = [api.evaluate(pipe, recipe, settings=SampleSettings(n_per_label=n_per_label, seed=s), progress=False) for s in seeds]
        out.append(f"| `{recipe.name}` | " + " | ".join(f"{r['psnr']:.2f}" for r in res)
                   + f" | {statistics.fmean(r['psnr'] for r in res):.2f} | {statistics.fmean(r['class_acc'] for r in res):.1%}"
                   + f" | {statistics.fmean(r['fd'] for r in res):.2f} |")
        print(out[-1], file=sys.stderr, flush=True)
    return "\n".join(out)


def split_part(seeds: list[int], n_per_label: int) -> str:
    """RTN / HadaNorm / switched by timestep group (``sensitivity.measure`` with one recipe per group of 4)."""
    from ditlab import sensitivity

    pipe = api.load(None)
    calib = api.calibrate(pipe, progress=False)
    rtn, hn = PRESETS["w4a8-rtn"], PRESETS["w4a8-hadanorm"]
    runs = {"`w4a8-rtn`": rtn, "`w4a8-hadanorm`": hn, "RTN in the first quarter of the steps, HadaNorm after": [rtn, hn, hn, hn],
            "HadaNorm in the first quarter of the steps, RTN after": [hn, rtn, rtn, rtn]}
    out = [f"Shipped tiny DiT, {10 * n_per_label} images per seed (classes cycled), 25 DPM-Solver++ steps in 4 timestep groups, CFG 4; "
           "PSNR vs the FP model's images (dB).", "", "| recipe per timestep group | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
           "|---|" + "---:|" * (len(seeds) + 1)]
    for label, recipes in runs.items():
        vals = [sensitivity.measure(pipe, recipes, settings=sensitivity.SensitivitySettings(n_images=10 * n_per_label, steps=25, n_groups=4, seed=s),
                                    calib=calib)["psnr"] for s in seeds]
        out.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {statistics.fmean(vals):.2f} |")
        print(out[-1], file=sys.stderr, flush=True)
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("layers", "steps", "seeds", "split"))
    p.add_argument("--steps", default=None, help="sampling steps whose layer inputs are captured (layers: default 0,5,9; steps: 0,2,5,9)")
    p.add_argument("--seeds", default=None, help="image seeds (seeds: default 0,1,2; split: 0,1)")
    p.add_argument("--n-per-label", type=int, default=10)
    p.add_argument("--group", choices=("w4a8", "a4", "rotations", "mean-term"), default="w4a8",
                   help="recipes of the seeds part: 4-bit weights' rounding, 4-bit activations, HadaNorm with other Hadamard seeds, "
                        "or HadaNorm with the full-precision mean term")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    steps = [int(s) for s in (args.steps or ("0,2,5,9" if args.part == "steps" else "0,5,9")).split(",")]
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.part == "split" else "0,1,2")).split(",")]
    if args.part == "layers":
        table = layers_part(steps)
    elif args.part == "steps":
        table = steps_part(steps)
    elif args.part == "split":
        table = split_part(seeds, args.n_per_label)
    else:
        table = seeds_part(seeds, args.n_per_label, args.group)
    print(f"Command: `python benchmarks/bench_hadanorm.py {' '.join(sys.argv[1:])}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
          f"{time.time() - t0:.0f} s\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
