"""Claim (d), measurement: mixed precision from layer × timestep sensitivity (MixDQ / ViDiT-Q-MP style integer program)
vs uniform precision at the same budget and vs random allocations with the same budget (as
``benchmarks/bench_sensitivity.py --part allocation``, kept as numbers); plus the sensitivity cost (issue 6).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..config import LayerConfig, Recipe
from .common import Part, ResultsSettings, Say, evaluate_row, fmt, is_scorable, pct, read_doc, reuse_rows

W_BITS = (2, 4, 8)
SETTING = "w4a8-rtn"  # the candidates: this preset's config at W2/W4/W8, A8 (RTN, groups of 64)


def uniform(bits: int) -> Recipe:
    return Recipe(default=LayerConfig(method="rtn", w_bits=bits, a_bits=8, w_group_size=64), name=f"w{bits}a8-rtn-g64")


def run(pipe, settings: ResultsSettings, results_dir: Path, say: Say) -> dict:
    from .. import allocation
    from ..sensitivity import SensitivitySettings, run_sensitivity

    part = Part("mixed", settings, results_dir)
    st = SensitivitySettings(n_images=settings.sens_images, steps=settings.sens_steps, n_groups=settings.sens_groups)
    cands = allocation.candidate_recipes(SETTING, W_BITS, (8,))
    # the shipped classifier scores Shapes-10 only; another model's content cells then use SSIM alone (agreement = 1)
    classify = None if is_scorable(pipe) else (lambda images: torch.zeros(len(images), dtype=torch.long))
    sens = []
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: the first W4A8 run is the issue-6 timing
        for recipe in cands:
            say(f"[mixed] sensitivity {recipe.name}: {settings.sens_images} images, {settings.sens_steps} steps, {settings.sens_groups} groups")
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_sensitivity(pipe, recipe, settings=st, cache_dir=cache, classifier=classify, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            sens.append(res)
            if recipe.default.w_bits == 4:
                t0 = time.perf_counter()
                again = run_sensitivity(pipe, recipe, settings=st, cache_dir=cache, classifier=classify, progress=False)
                part.data["timing"] = {"setting": recipe.name, "cells": res.n_computed, "units": int(res.frame.unit.nunique()),
                                       "groups": settings.sens_groups, "wall_s": wall, "cpu_s": cpu,
                                       "cached_s": time.perf_counter() - t0, "cached_cells": again.n_cached}
                part.save()
    alloc = allocation.solve(sens, settings.budget_bits, name=f"alloc-{settings.budget_bits:g}b")
    counts = alloc.frame.groupby(["kind", "w_bits"]).size().unstack(fill_value=0)
    part.data["choice_counts"] = {str(k): {str(b): int(v) for b, v in row.items()} for k, row in counts.iterrows()}
    part.data["budget_bits"] = settings.budget_bits
    part.save()  # an interrupted run keeps the sensitivity cost and the allocation
    kept = reuse_rows(read_doc(results_dir, "quality"), settings)
    rows = part.data.setdefault("rows", [])

    def add(recipe, role: str, avg_bits: float, predicted=None):
        name = recipe if isinstance(recipe, str) else recipe.name
        row = dict(kept[name]) if name in kept else evaluate_row(pipe, recipe, settings)
        row.update(role=role, avg_w_bits=avg_bits, predicted_damage=predicted)
        if role != "uniform":
            row.update(method="mixed", w_bits=None, a_bits=8)
        rows.append(row)
        part.save()
        say(f"[mixed] {name} ({role}, {avg_bits:.2f} bits): class acc {pct(row['class_acc'])}, PSNR {fmt(row['psnr'], '.2f')} dB")

    add(alloc.recipe, "allocated", alloc.avg_w_bits, alloc.predicted_damage)
    add("w4a8-rtn", "uniform", 4.0)
    same = int(settings.budget_bits)  # uniform precision at the budget (rounded down to whole bits)
    if same not in (4, 8):
        add(uniform(same), "uniform", float(same))
    add("w8a8-rtn", "uniform", 8.0)
    table = allocation.damage_table(sens)
    params = dict(zip(table.unit, table.params))
    for seed in range(settings.n_random):
        pick = allocation.random_choice(sens, settings.budget_bits, seed, window=0.25)
        avg = sum(params[u] * w for u, (w, a) in pick.items()) / sum(params.values())
        damage = float(sum(table[(table.unit == u) & (table.w_bits == w) & (table.a_bits == a)].damage.iloc[0] for u, (w, a) in pick.items()))
        add(allocation.choice_recipe(pick, sens, f"random-{seed}"), "random", avg, damage)
    par = allocation.pareto(sens, [b / 2 for b in range(4, 17)])
    part.data["pareto_predicted"] = par.frame.to_dict(orient="records")
    for a in par.allocations:
        if any(abs(a.budget_bits - b) < 1e-9 for b in settings.pareto_measure):
            add(a.recipe, "pareto", a.avg_w_bits, a.predicted_damage)
    part.complete = True
    part.save()
    return part.doc()
