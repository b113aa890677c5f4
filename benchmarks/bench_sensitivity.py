"""Analysis benchmark on the shipped tiny DiT: sensitivity timing, outliers on real activations, bit allocation.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sensitivity.py [--part timing|outliers|allocation|all]
       [--figures docs/figures] [--n-per-label 10] [--steps 25] [--random 6]

* timing: ``run_sensitivity`` of every quantized linear × 4 timestep groups at W4A8 (w4a8-rtn, 10 images, 10 steps)
  into an empty cache (goal ≤ 180 s on 2 cores), then the same call again (cached).
* outliers: per-transform tables of ``outlier_view`` for one layer of every kind, and the median over all 36 layers
  of the max/median ratio and of the A4/A8 layer-output error (every calibrated timestep, cond branch).
* allocation: sensitivity at W2A8 / W4A8 / W8A8 (RTN, groups of 64), milp allocation at an average of 5 weight bits,
  measured with ``api.evaluate`` (n-per-label × 10 classes, 25 steps) against uniform W4, uniform W8 and random
  allocations with the same budget; a Pareto sweep with three measured points.
``--figures DIR`` writes PNGs (rendered with matplotlib, a docs-only dependency: ``pip install matplotlib``).
Markdown tables are printed on stdout.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ditlab import allocation, api, outliers  # noqa: E402
from ditlab.evaluation import SampleSettings  # noqa: E402
from ditlab.sensitivity import SensitivitySettings, run_sensitivity  # noqa: E402

log = logging.getLogger("bench_sensitivity")
KIND_LAYERS = ("transformer_blocks.2.attn1.to_q", "transformer_blocks.2.attn1.to_out.0", "transformer_blocks.2.ff.net.0.proj",
               "transformer_blocks.2.ff.net.2", "transformer_blocks.2.norm1.linear")


def md(rows: list[dict], floats: str = "{:.4g}") -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(floats.format(v) if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(out)


def part_timing(pipe) -> None:
    with tempfile.TemporaryDirectory() as cache:
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_sensitivity(pipe, "w4a8-rtn", cache_dir=cache, progress=True)
        first, cpu1 = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        again = run_sensitivity(pipe, "w4a8-rtn", cache_dir=cache, progress=False)
        second, cpu2 = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds of this process (all threads): on a machine shared with other jobs, wall time overstates the cost
    print(md([{"run": "empty cache", "cells": res.n_computed, "units": res.frame.unit.nunique(), "wall s": first, "cpu s": cpu1},
              {"run": "cached", "cells": again.n_cached, "units": again.frame.unit.nunique(), "wall s": second, "cpu s": cpu2}], "{:.2f}"))
    print(f"\ngoal: ≤ 180 s for {res.n_computed} cells on {torch.get_num_threads()} threads: {'met' if first <= 180 else 'MISSED'}\n")


def part_outliers(pipe, calib, figures: Path | None) -> None:
    mid = calib.timesteps[len(calib.timesteps) // 2]
    for layer in KIND_LAYERS:
        res = outliers.outlier_view(pipe, calib, layer, mid, "cond")
        print(f"\n**{layer}** ({res.kind}), t = {res.timestep}, cond branch, {res.rows} rows × {res.in_features} channels\n")
        print(md(res.table().to_dict(orient="records")), flush=True)
        if figures and layer.endswith("ff.net.2"):
            outlier_png(res, figures / "outliers_fc2.png")
    names = [i.name for i in api.layers(pipe) if i.kind in ("qkv", "out", "fc1", "fc2", "adaLN")]
    cols = ("max_median", "kurtosis", "out_err_a8", "out_err_a4")
    per = {tr: {c: [] for c in cols} for tr in outliers.TRANSFORMS}
    for t in calib.timesteps:
        for name in names:
            tab = outliers.outlier_view(pipe, calib, name, t, "cond").table().set_index("transform")
            for tr in outliers.TRANSFORMS:
                for c in cols:
                    per[tr][c].append(float(tab.loc[tr, c]))
    none_a4 = per["none"]["out_err_a4"]
    rows = [{"transform": tr, **{f"median {c}": statistics.median(v) for c, v in d.items()},
             "A4 error below none (layer×t)": f"{sum(a < b for a, b in zip(d['out_err_a4'], none_a4))}/{len(none_a4)}"} for tr, d in per.items()]
    print(f"\nMedian over {len(names)} layers × {len(calib.timesteps)} timesteps (cond branch):\n")
    print(md(rows))
    if figures:
        map_png(outliers.outlier_map(calib, "cond"), figures / "outlier_map.png")


def candidates(pipe, st: SensitivitySettings, w_bits):
    return [run_sensitivity(pipe, r, settings=st, progress=True) for r in allocation.candidate_recipes("w4a8-rtn", w_bits, (8,))]


def evaluate(pipe, recipe, ss: SampleSettings, **extra) -> dict:
    r = api.evaluate(pipe, recipe, settings=ss, progress=False)
    q_bytes = r["weight_bytes"]
    return {"recipe": r["recipe"], **extra, "class_acc": r["class_acc"], "psnr": r["psnr"], "ssim": r["ssim"],
            "class_acc_fp": r["class_acc_fp"], "weight_bytes": q_bytes}


def part_allocation(pipe, figures: Path | None, ss: SampleSettings, n_random: int, groups: int, measure_pareto: bool, w_bits, unit: str,
                    sens_images: int, budget: float = 5.0) -> None:
    st = SensitivitySettings(n_groups=groups, unit=unit, n_images=sens_images)
    t0, c0 = time.perf_counter(), time.process_time()
    sens = candidates(pipe, st, w_bits)
    print(f"sensitivity of {sum(len(s.frame) for s in sens)} cells ({unit} units, {groups} groups, W{'/'.join(map(str, w_bits))}A8): "
          f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s cpu", flush=True)
    alloc = allocation.solve(sens, budget, name=f"alloc-{budget:g}b")
    print(f"\nallocation at {budget} bits (decoupled metrics, split 1.0): average {alloc.avg_w_bits:.3f} bits, choices:")
    counts = alloc.frame.groupby(["kind", "w_bits"]).size().unstack(fill_value=0)
    print(counts.to_string())
    joint = allocation.solve(sens, budget, metric="sqnr", split=None, name=f"alloc-{budget:g}b-sqnr")
    rows = [evaluate(pipe, "w4a8-rtn", ss, avg_w_bits=4.0), evaluate(pipe, "w8a8-rtn", ss, avg_w_bits=8.0),
            evaluate(pipe, alloc.recipe, ss, avg_w_bits=alloc.avg_w_bits), evaluate(pipe, joint.recipe, ss, avg_w_bits=joint.avg_w_bits)]
    print(md(rows), flush=True)
    table = allocation.damage_table(sens)
    params = dict(zip(table.unit, table.params))
    for seed in range(n_random):
        pick = allocation.random_choice(sens, budget, seed, window=0.25)
        avg = sum(params[u] * w for u, (w, a) in pick.items()) / sum(params.values())
        rows.append(evaluate(pipe, allocation.choice_recipe(pick, sens, f"random-{seed}"), ss, avg_w_bits=avg))
    print(f"\nMeasured ({ss.n_per_label} images per class, {ss.steps} steps, seed {ss.seed}):\n")
    print(md(rows))
    randoms = [r for r in rows if r["recipe"].startswith("random")]
    best = rows[2]
    beats = all(best["class_acc"] >= r["class_acc"] and best["psnr"] > r["psnr"] for r in [rows[0], *randoms])
    print(f"\nallocated beats uniform W4 and all {len(randoms)} random allocations on class accuracy and PSNR: {beats}\n")
    par = allocation.pareto(sens, [b / 2 for b in range(4, 17)])
    measured = [rows[2]]  # the 5-bit point measured above
    for a in par.allocations if measure_pareto else []:
        if a.budget_bits in (3.0, 7.0):
            measured.append(evaluate(pipe, a.recipe, ss, avg_w_bits=a.avg_w_bits))
    print(md(par.frame.to_dict(orient="records")))
    print(md(measured))
    if figures:
        sensitivity_png(sens[list(w_bits).index(4)] if 4 in w_bits else sens[0], figures / f"sensitivity_w4a8_{unit}_{groups}groups.png")
        pareto_png(par, measured, figures / "pareto.png")


# ---- PNG figures for docs/ (matplotlib, docs only; the app shows the plotly figures of ditlab.plots) ---------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def outlier_png(res, path: Path) -> None:
    """Heatmaps of |X'| per transform + sorted channel absmax + A8/A4 output error bars (the app's overview)."""
    plt = _plt()
    n = len(res.views)
    fig = plt.figure(figsize=(3.2 * n, 7.2))
    grid = fig.add_gridspec(2, n, height_ratios=[1, 1], hspace=0.45)
    for i, v in enumerate(res.views):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(v.heat / max(float(v.heat.max()), 1e-30), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{PNG_LABELS[v.name]}\nmax/med {v.max_median:.1f}, kurt {v.kurtosis:.1f}", fontsize=9)
        ax.set_xlabel("channel", fontsize=8)
        ax.set_ylabel("token", fontsize=8)
    ax = fig.add_subplot(grid[1, : n // 2 + 1])
    for v in res.views:
        ax.semilogy(v.channel_absmax / v.channel_absmax[0], label=PNG_LABELS[v.name])
    ax.set_title("per-channel absmax / max (sorted)", fontsize=9)
    ax.set_xlabel("channel rank")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, n // 2 + 1 :])
    x = range(n)
    ax.bar([i - 0.2 for i in x], [v.err_out[8] for v in res.views], 0.4, label="A8")
    ax.bar([i + 0.2 for i in x], [v.err_out[4] for v in res.views], 0.4, label="A4")
    ax.set_xticks(list(x), [PNG_LABELS[v.name].split()[0] for v in res.views], fontsize=8)
    ax.set_yscale("log")
    ax.set_title("relative layer-output error (per-token act. quant.)", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(f"{res.layer} input, t = {res.timestep}, {res.branch} branch ({res.rows} × {res.in_features})")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def map_png(omap, path: Path) -> None:
    import numpy as np

    plt = _plt()
    df = omap.frame
    fig, ax = plt.subplots(figsize=(7, 0.16 * len(df) + 1.5))
    im = ax.imshow(np.log10(df.to_numpy(float)), aspect="auto", cmap="inferno")
    ax.set_xticks(range(len(df.columns)), [str(c) for c in df.columns], fontsize=7)
    ax.set_yticks(range(len(df)), list(df.index), fontsize=6)
    ax.set_xlabel("timestep (sampling order)")
    fig.colorbar(im, label=f"log10 {omap.metric}")
    ax.set_title(f"outlier ratio of every linear input ({omap.branch} branch)")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def sensitivity_png(res, path: Path) -> None:
    plt = _plt()
    table = res.pivot("sqnr_db")
    fig, ax = plt.subplots(figsize=(6, 0.16 * len(table) + 1.5))
    im = ax.imshow(table.to_numpy(float), aspect="auto", cmap="RdYlGn")
    ax.set_xticks(range(len(table.columns)), [f"g{g}: {s}" for g, s in zip(table.columns, dict.fromkeys(res.frame.steps))], fontsize=8)
    ax.set_yticks(range(len(table)), list(table.index), fontsize=6)
    fig.colorbar(im, label="SQNR of ε vs FP (dB)")
    ax.set_title(f"sensitivity at {res.setting}: layer quantized only in one timestep group")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def pareto_png(par, measured: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(par.frame.avg_w_bits, par.frame.predicted_damage, "o-", label="predicted damage (Σ d)")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("predicted damage")
    if measured:
        ax2 = ax.twinx()
        ax2.plot([m["avg_w_bits"] for m in measured], [m["psnr"] for m in measured], "D", color="C3", label="measured PSNR")
        ax2.set_ylabel("measured PSNR vs FP (dB)")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("Pareto sweep of the bit allocation")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


PNG_LABELS = {"none": "no transform", "smoothquant": "SmoothQuant", "hadamard": "Hadamard", "hadanorm": "HadaNorm", "viditq": "ViDiT-Q SDCB"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["timing", "outliers", "allocation", "all"], default="all")
    parser.add_argument("--figures", type=Path, default=None)
    parser.add_argument("--n-per-label", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--random", type=int, default=6)
    parser.add_argument("--groups", type=int, default=4, help="timestep groups of the allocation's sensitivity runs")
    parser.add_argument("--sens-images", type=int, default=10, help="images of the allocation's sensitivity runs")
    parser.add_argument("--w-bits", default="2,4,8", help="weight-bit candidates of the allocation")
    parser.add_argument("--unit", choices=["layer", "group"], default="layer", help="sensitivity unit of the allocation")
    parser.add_argument("--measure-pareto", action="store_true", help="also measure the 3- and 7-bit Pareto points")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
    pipe = api.load("shipped")
    if args.part in ("timing", "all"):
        part_timing(pipe)
    if args.part in ("outliers", "all"):
        part_outliers(pipe, api.calibrate(pipe, progress=False), args.figures)
    if args.part in ("allocation", "all"):
        part_allocation(pipe, args.figures, SampleSettings(n_per_label=args.n_per_label, steps=args.steps), args.random, args.groups, args.measure_pareto,
                        tuple(int(b) for b in args.w_bits.split(",")), args.unit, args.sens_images)


if __name__ == "__main__":
    main()
