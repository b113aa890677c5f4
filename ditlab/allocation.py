"""Mixed-precision bit allocation by integer programming (MixDQ §3.4 / ViDiT-Q-MP), pure Python on numbers.

Input: sensitivity cells (``ditlab.sensitivity``: one row per (unit, timestep group, candidate setting) with the
measured ``sqnr_db``, ``ssim``, ``agreement``, ``psnr``). Every candidate c = (w_bits, a_bits) of a layer l gets a
*damage* d_{l,c} ≥ 0, summed over the timestep groups (or kept per group with ``per_group=True``):

* quality layers (default: attention q/k/v/out and adaLN):  d = Σ_g 10^(−SQNR_g/10), the relative noise energy of
  the model output ε — noise powers of independent error sources add, dB values do not;
* content layers (default: the MLP fc1/fc2, MixDQ's "content" group):  d = Σ_g (1 − SSIM_g) of the final images.

The program (``scipy.optimize.milp``, HiGHS)::

    minimise  Σ_{l,c} d_{l,c} x_{l,c}            (= maximise the summed score s = −d)
    s.t.      Σ_c x_{l,c} = 1                      for every layer (one-hot choice)
              Σ_{l∈G} p_l w_c x_{l,c} ≤ ⌊B_G P_G⌋   per budget group G (weight params p_l, bits w_c)
              x ∈ {0, 1}

The MixDQ group split: with ``split = r`` the content layers get an average of r times the quality layers' bits
and the two groups are budgeted apart, so that a quality damage is never traded against a content damage (different
units). ``split=None`` puts every layer in one budget and needs a single metric for all of them
(``metric="sqnr"`` or ``"ssim"``). Budgets are integer bit counts: after solving, the chosen 0/1 vector is
checked in exact integer arithmetic and the program is re-solved with a tightened bound if the solver's feasibility
tolerance let it overshoot, so the result never exceeds the budget. A memory budget (``budget_bytes``) uses the
stored bytes of each candidate as measured by the sensitivity run (``quantize.weight_bytes``; note that ≤ 4-bit
codes are packed as nibbles, so W2 costs the same bytes as W4 in this implementation).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from .config import FP, LayerConfig, Recipe
from .errors import DitlabError

log = logging.getLogger(__name__)

CONTENT_KINDS = ("fc1", "fc2", "ff")  # MixDQ: feed-forward layers / units (cross-attention is absent in class-conditional DiT)
METRICS = ("decoupled", "sqnr", "ssim", "agreement")
MAX_RESOLVES = 4


class AllocationError(DitlabError):
    """An allocation problem that cannot be solved as asked (budget too small, missing candidates, bad field)."""


@dataclass
class Allocation:
    """A solved allocation. ``choice[unit]`` = (w_bits, a_bits), or ``choice[(unit, group)]`` with per_group."""

    choice: dict
    recipe: Recipe | None  # one override per layer (None with per_group: see ``recipes``)
    recipes: list[Recipe] | None  # per timestep group (per_group=True only), in group order
    avg_w_bits: float  # parameter-weighted average weight bits (over groups too with per_group)
    avg_a_bits: float  # plain mean of the activation bits over the choices
    bytes: int  # stored weight bytes of the chosen candidates (per_group: the mean over groups)
    predicted_damage: float  # Σ d of the chosen candidates (lower is better); the score is its negative
    budget_bits: float | None
    budget_bytes: int | None
    frame: pd.DataFrame = field(repr=False, default=None)  # one row per choice: unit, group, w_bits, a_bits, params, damage

    @property
    def predicted_score(self) -> float:
        return -self.predicted_damage


# ---- damages from sensitivity cells ------------------------------------------------------------------------------
def _frame_of(sensitivity) -> pd.DataFrame:
    """Concatenated cell table of SensitivityResult(s) / DataFrame(s)."""
    items = sensitivity if isinstance(sensitivity, (list, tuple)) else [sensitivity]
    frames = [getattr(s, "frame", s) for s in items]
    if not frames or not all(isinstance(f, pd.DataFrame) for f in frames):
        raise AllocationError("sensitivity = a SensitivityResult, a DataFrame of cells, or a list of them is required")
    df = pd.concat(frames, ignore_index=True)
    need = {"unit", "kind", "group", "w_bits", "a_bits", "params"}
    if missing := need - set(df.columns):
        raise AllocationError(f"sensitivity frame: missing columns {sorted(missing)}; allowed: cells from ditlab.sensitivity.run_sensitivity")
    return df


def check_metric(metric: str) -> str:
    """``metric`` if it is one of METRICS; AllocationError naming the field otherwise."""
    if metric not in METRICS:
        raise AllocationError(f"metric = {metric!r} is not allowed; allowed: {', '.join(METRICS)}")
    return metric


def cell_damage(df: pd.DataFrame, metric: str = "decoupled", content_kinds: Sequence[str] = CONTENT_KINDS) -> pd.Series:
    """Damage per cell row (≥ 0, lower is better) under ``metric`` (see the module docstring)."""
    check_metric(metric)
    noise = np.power(10.0, -df["sqnr_db"].astype(float) / 10.0)  # relative noise energy ‖ε̂−ε‖²/‖ε‖²
    if metric == "sqnr":
        return noise
    if metric == "ssim":
        return 1.0 - df["ssim"].astype(float)
    if metric == "agreement":
        return 1.0 - df["agreement"].astype(float)
    content = df["kind"].isin(list(content_kinds))
    return noise.where(~content, 1.0 - df["ssim"].astype(float))


def damage_table(sensitivity, metric: str = "decoupled", content_kinds: Sequence[str] = CONTENT_KINDS, per_group: bool = False) -> pd.DataFrame:
    """One row per (unit[, group], w_bits, a_bits): kind, params, damage (summed over groups unless per_group)."""
    df = _frame_of(sensitivity).copy()
    df["damage"] = cell_damage(df, metric, content_kinds).clip(lower=0.0)
    keys = ["unit", "group", "w_bits", "a_bits"] if per_group else ["unit", "w_bits", "a_bits"]
    agg = {"kind": "first", "params": "first", "damage": "sum"}
    for col in ("config", "bytes", "layers"):
        if col in df.columns:
            agg[col] = "first"
    out = df.groupby(keys, sort=False).agg(agg).reset_index()
    return out


# ---- the integer program -----------------------------------------------------------------------------------------
def solve_choice(damage: np.ndarray, cost: np.ndarray, groups: np.ndarray, caps: Sequence[int], items: np.ndarray) -> np.ndarray:
    """0/1 solution of: min Σ damage·x  s.t. one choice per item, Σ_{group g} cost·x ≤ caps[g] (exact integers).

    damage (V,) float, cost (V,) int64, groups (V,) int (budget group of each variable), items (V,) int (which
    one-hot item the variable belongs to). Returns x (V,) bool. Raises AllocationError when infeasible.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    v = len(damage)
    n_items = int(items.max()) + 1 if v else 0
    one_hot = np.zeros((n_items, v))
    one_hot[items, np.arange(v)] = 1.0
    caps = [int(c) for c in caps]
    scale = [max(1, math.gcd(*[int(c) for c in cost[groups == g]] or [1])) for g in range(len(caps))]
    slack = [0] * len(caps)
    for _ in range(MAX_RESOLVES):
        rows, ub = [], []
        for g, cap in enumerate(caps):
            # dividing by the gcd keeps the coefficients small integers (e.g. 1, 4, 6 parameter units × bits),
            # so HiGHS sees a well-scaled row; the bound is rounded down, which is exact for integer costs
            rows.append(np.where(groups == g, cost / scale[g], 0.0))
            ub.append(float((cap - slack[g]) // scale[g]))
        cons = [LinearConstraint(one_hot, 1.0, 1.0), LinearConstraint(np.array(rows), -np.inf, np.array(ub))]
        res = milp(c=np.asarray(damage, float), constraints=cons, integrality=np.ones(v), bounds=Bounds(0, 1))
        if res.x is None:
            log.info("milp found no allocation: %s", res.message.strip())  # solver internals: for -v, not the message
            raise AllocationError("no allocation meets the budget; allowed: a budget at or above the smallest candidate bits "
                                  "(with --split, for both the quality and the content layers' share)")
        x = np.round(res.x).astype(bool)
        used = [int(cost[(groups == g) & x].sum()) for g in range(len(caps))]
        over = [u - c for u, c in zip(used, caps)]
        if all(o <= 0 for o in over) and np.array_equal(one_hot @ x, np.ones(n_items)):
            return x
        slack = [s + max(o, 0) for s, o in zip(slack, over)]
        log.warning("allocation: solver tolerance overshot the budget by %s; re-solving with a tighter bound", over)
    raise AllocationError("the solver could not meet the budget exactly; allowed: a slightly larger budget")


def _avg_bits_check(name: str, value) -> float:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool) or not 1.0 <= float(value) <= 16.0:
        raise AllocationError(f"{name} = {value!r} is not allowed; allowed: a number from 1 to 16 (average weight bits)")
    return float(value)


def check_budget(budget_bits: float, w_bits: Sequence[int]) -> float:
    """``budget_bits`` if some allocation of the ``w_bits`` candidates can meet it (from 1 to 16 and at least the
    smallest candidate); AllocationError naming the field otherwise. Cheap: called before the sensitivity runs."""
    lowest = min(w_bits) if w_bits else 1
    number = isinstance(budget_bits, (int, float)) and not isinstance(budget_bits, bool)
    if not number or not lowest <= float(budget_bits) <= 16.0:  # NaN fails too
        raise AllocationError(f"budget_bits = {budget_bits!r} is not allowed; allowed: a number from {lowest} to 16 (average weight "
                              f"bits; {lowest} is the smallest weight-bits candidate, --w-bits {','.join(map(str, w_bits or [1]))})")
    return float(budget_bits)


def solve(sensitivity, budget_bits: float | None = None, *, budget_bytes: int | None = None, w_bits: Sequence[int] | None = None,
          a_bits: Sequence[int] | None = None, metric: str = "decoupled", content_kinds: Sequence[str] = CONTENT_KINDS,
          split: float | None = 1.0, per_group: bool = False, name: str | None = None) -> Allocation:
    """Solves the allocation program over the candidates present in ``sensitivity`` (see the module docstring).

    budget_bits: average weight bits (parameter-weighted); or budget_bytes: stored weight bytes (one of the two).
    w_bits / a_bits: restrict the candidate set (default: every (w, a) measured). split: content/quality average-bits
    ratio (MixDQ; needs metric="decoupled"), None = one joint budget. per_group: one choice per (unit, timestep group)
    with the budget on the mean over groups (a per-step precision switch; returns one recipe per group).
    Candidates' stored bytes come from the cells' ``bytes`` column (measured ``weight_bytes`` of the quantized modules).
    """
    if (budget_bits is None) == (budget_bytes is None):
        raise AllocationError("budget: give exactly one of budget_bits (average weight bits) or budget_bytes")
    if split is not None and (not isinstance(split, (int, float)) or not 0.1 <= float(split) <= 10.0):
        raise AllocationError(f"split = {split!r} is not allowed; allowed: a content/quality bits ratio from 0.1 to 10, or None")
    if split is not None and metric != "decoupled":
        raise AllocationError(f"split = {split!r} with metric = {metric!r} is not allowed; allowed: split=None for a single metric, or metric='decoupled'")
    if split is None and metric == "decoupled":
        raise AllocationError("split = None is not allowed with metric='decoupled' (quality and content damages have different units); "
                              "allowed: a ratio such as 1.0, or metric='sqnr' / 'ssim' / 'agreement'")
    table = damage_table(sensitivity, metric, content_kinds, per_group)
    if w_bits is not None:
        table = table[table["w_bits"].isin(list(w_bits))]
    if a_bits is not None:
        table = table[table["a_bits"].isin(list(a_bits))]
    if table.empty:
        raise AllocationError(f"w_bits = {w_bits!r} / a_bits = {a_bits!r}: no measured candidate left; allowed: bits present in the sensitivity cells")
    item_keys = ["unit", "group"] if per_group else ["unit"]
    table = table.reset_index(drop=True)
    items = table.groupby(item_keys, sort=False).ngroup().to_numpy()
    n_groups = int(table["group"].nunique()) if per_group else 1
    content = table["kind"].isin(list(content_kinds)).to_numpy()
    bgroup = content.astype(int) if split is not None else np.zeros(len(table), int)
    if split is not None and not content.any() or split is not None and content.all():
        bgroup = np.zeros(len(table), int)  # only one kind present: nothing to split
    params = table["params"].astype(np.int64).to_numpy()
    if budget_bits is not None:
        budget = _avg_bits_check("budget_bits", budget_bits)
        cost = params * table["w_bits"].astype(np.int64).to_numpy()
        first = ~pd.Series(items).duplicated().to_numpy()
        p_tot = [int(params[first & (bgroup == g)].sum()) for g in range(int(bgroup.max()) + 1)]
        if len(p_tot) == 2:  # a_q P_q + r a_q P_c = B (P_q + P_c)
            a_q = budget * (p_tot[0] + p_tot[1]) / (p_tot[0] + float(split) * p_tot[1])
            caps = [math.floor(a_q * p_tot[0] + 1e-9), math.floor(float(split) * a_q * p_tot[1] + 1e-9)]
        else:
            caps = [math.floor(budget * p_tot[0] + 1e-9)]
    else:
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise AllocationError(f"budget_bytes = {budget_bytes!r} is not allowed; allowed: a positive integer")
        if "bytes" not in table.columns:
            raise AllocationError("budget_bytes needs the stored bytes of each candidate (column 'bytes' of the sensitivity cells)")
        cost = table["bytes"].astype(np.int64).to_numpy()
        bgroup = np.zeros(len(table), int)
        caps = [int(budget_bytes) * n_groups]
    x = solve_choice(table["damage"].to_numpy(float), cost, bgroup, caps, items)
    chosen = table[x].reset_index(drop=True)
    return _result(chosen, per_group, n_groups, budget_bits, budget_bytes, name)


def _override(config_json: str | None, w: int, a: int) -> dict:
    """Fields of the chosen candidate that differ from the FP default (what a Recipe override needs)."""
    cfg = LayerConfig.from_dict(json.loads(config_json)) if isinstance(config_json, str) else LayerConfig()
    full = cfg.replace(w_bits=int(w), a_bits=int(a)).to_dict()
    base = FP.to_dict()
    return {k: v for k, v in full.items() if k in ("method", "w_bits", "a_bits") or v != base[k]}


def _recipe(rows: pd.DataFrame, name: str) -> Recipe:
    """One override per layer (a unit of several layers, e.g. a block's attention, expands to each of them)."""
    overrides = []
    for _, r in rows.iterrows():
        fields = _override(r.get("config"), r["w_bits"], r["a_bits"])
        names = str(r["layers"]).split(",") if isinstance(r.get("layers"), str) else [r["unit"]]
        overrides.extend((n, dict(fields)) for n in names)
    return Recipe(default=FP, overrides=tuple(overrides), name=name)


def _result(chosen: pd.DataFrame, per_group: bool, n_groups: int, budget_bits, budget_bytes, name) -> Allocation:
    params = chosen["params"].astype(np.int64)
    avg_w = float((params * chosen["w_bits"]).sum() / params.sum())
    label = name or (f"alloc-{budget_bits:g}b" if budget_bits is not None else f"alloc-{budget_bytes}B")
    nbytes = int(chosen["bytes"].sum() // n_groups) if "bytes" in chosen.columns else -1
    if per_group:
        choice = {(r["unit"], int(r["group"])): (int(r["w_bits"]), int(r["a_bits"])) for _, r in chosen.iterrows()}
        recipes = [_recipe(chosen[chosen["group"] == g], f"{label}-g{g}") for g in sorted(chosen["group"].unique())]
        recipe = None
    else:
        choice = {r["unit"]: (int(r["w_bits"]), int(r["a_bits"])) for _, r in chosen.iterrows()}
        recipe, recipes = _recipe(chosen, label), None
    return Allocation(choice, recipe, recipes, avg_w, float(chosen["a_bits"].mean()), nbytes,
                      float(chosen["damage"].sum()), budget_bits, budget_bytes, chosen)


def allocate(sensitivity, budget_bits: float | None = None, **kwargs) -> Recipe:
    """The allocated ``Recipe`` (one override per layer, everything else FP); see ``solve`` for the arguments."""
    result = solve(sensitivity, budget_bits, **kwargs)
    if result.recipe is None:
        raise AllocationError("per_group = True gives one recipe per timestep group; allowed here: per_group=False (use solve())")
    return result.recipe


# ---- sweeps and baselines ----------------------------------------------------------------------------------------
@dataclass
class ParetoResult:
    """Allocations over a sweep of budgets; ``frame``: budget_bits, avg_w_bits, bytes, predicted_damage (+ measured)."""

    frame: pd.DataFrame
    allocations: list[Allocation]


def pareto(sensitivity, budgets: Sequence[float] | None = None, **kwargs) -> ParetoResult:
    """Solves ``solve(sensitivity, b, **kwargs)`` for every budget b (default: 2.5 … 8 in steps of 0.5)."""
    budgets = list(budgets) if budgets is not None else [2.5 + 0.5 * i for i in range(12)]
    rows, allocs = [], []
    for b in budgets:
        try:
            a = solve(sensitivity, b, **kwargs)
        except AllocationError as exc:
            log.info("pareto: budget %.2f skipped (%s)", b, exc)
            continue
        allocs.append(a)
        rows.append({"budget_bits": float(b), "avg_w_bits": a.avg_w_bits, "bytes": a.bytes, "predicted_damage": a.predicted_damage,
                     "predicted_score": a.predicted_score})
    return ParetoResult(pd.DataFrame(rows), allocs)


def random_choice(sensitivity, budget_bits: float, seed: int, *, w_bits: Sequence[int] | None = None, a_bits: Sequence[int] | None = None,
                  window: float = 0.5, tries: int = 200_000) -> dict[str, tuple[int, int]]:
    """A random allocation (unit → (w, a)) with average weight bits in [budget − window, budget] (rejection sampling)."""
    table = damage_table(sensitivity, "sqnr")
    if w_bits is not None:
        table = table[table["w_bits"].isin(list(w_bits))]
    if a_bits is not None:
        table = table[table["a_bits"].isin(list(a_bits))]
    units = list(dict.fromkeys(table["unit"]))
    options = {u: list(zip(table.loc[table["unit"] == u, "w_bits"].astype(int), table.loc[table["unit"] == u, "a_bits"].astype(int))) for u in units}
    params = {u: int(table.loc[table["unit"] == u, "params"].iloc[0]) for u in units}
    total = sum(params.values())
    rng = random.Random(seed)
    for _ in range(tries):
        pick = {u: rng.choice(options[u]) for u in units}
        avg = sum(params[u] * pick[u][0] for u in units) / total
        if budget_bits - window <= avg <= budget_bits + 1e-12:
            return pick
    raise AllocationError(f"budget_bits = {budget_bits!r}: no random allocation found within {window} bits below it; allowed: a budget between the candidate bits")


def choice_recipe(choice: dict[str, tuple[int, int]], sensitivity, name: str = "custom") -> Recipe:
    """The Recipe of a given choice (unit → (w_bits, a_bits)), with each candidate's measured config (baselines)."""
    table = damage_table(sensitivity, "sqnr")
    picked = [table[(table["unit"] == u) & (table["w_bits"] == w) & (table["a_bits"] == a)].head(1) for u, (w, a) in choice.items()]
    if any(p.empty for p in picked):
        raise AllocationError("choice: a (unit, bits) pair that was not measured; allowed: candidates present in the sensitivity cells")
    return _recipe(pd.concat(picked, ignore_index=True), name)


def candidate_recipes(setting, w_bits: Sequence[int] = (2, 4, 8), a_bits: Sequence[int] = (8,)) -> list[Recipe]:
    """The setting (preset name, LayerConfig, Recipe) at every (w, a) candidate: its default config with the bits replaced."""
    from .sensitivity import setting_recipe

    base = setting_recipe(setting)
    return [base.replace(default=base.default.replace(w_bits=int(w), a_bits=int(a)), name=f"{base.name}@w{w}a{a}") for w in w_bits for a in a_bits]


def _save_recipe(recipe: Recipe, out: str) -> None:
    """Writes the recipe JSON to ``out`` atomically (``config.save_recipe``), its parent folders created."""
    from pathlib import Path

    from .config import save_recipe

    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, path)


def cli_allocate(model: str = "shipped", budget_bits: float = 5.0, *, setting: str = "w4a8-rtn", w_bits: Sequence[int] = (2, 4, 8),
                 a_bits: Sequence[int] = (8,), split: float | None = 1.0, metric: str = "decoupled", n_images: int = 10, steps: int = 10,
                 groups: int = 4, out: str | None = None, as_json: bool = False, cache_dir: str | None = None, progress: bool = True) -> str:
    """``python -m ditlab allocate``: sensitivity of ``setting`` at every (w, a) candidate (cached), then the milp
    allocation at ``budget_bits``; writes the recipe JSON to ``out`` if given. Returns a summary (text or JSON)."""
    from . import api
    from .sensitivity import SensitivitySettings, _refuse_quantized, run_sensitivity

    check_metric(metric)  # before minutes of sensitivity measurements
    check_budget(budget_bits, w_bits)
    pipe = api.load(model)
    _refuse_quantized(pipe)
    st = SensitivitySettings(n_images=n_images, steps=steps, n_groups=groups)
    recipes = candidate_recipes(setting, w_bits, a_bits)
    calib = api.calibrate(pipe, progress=progress) if any(api.needs_calibration(pipe, r) for r in recipes) else None
    results = [run_sensitivity(pipe, r, settings=st, calib=calib, cache_dir=cache_dir, progress=progress) for r in recipes]
    alloc = solve(results, budget_bits, metric=metric, split=split, name=f"alloc-{setting}-{budget_bits:g}b")
    if out:
        _save_recipe(alloc.recipe, out)
    if as_json:
        return json.dumps({"recipe": alloc.recipe.to_dict(), "avg_w_bits": alloc.avg_w_bits, "avg_a_bits": alloc.avg_a_bits,
                           "bytes": alloc.bytes, "predicted_damage": alloc.predicted_damage, "budget_bits": budget_bits, "out": out,
                           "choice": {u: list(c) for u, c in alloc.choice.items()}})
    lines = [f"allocation at {budget_bits:g} average weight bits: {alloc.avg_w_bits:.3f} used, {alloc.bytes} bytes, "
             f"predicted damage {alloc.predicted_damage:.4g}" + (f" → {out}" if out else "")]
    lines += [f"  {u:<44} W{w}A{a}" for u, (w, a) in alloc.choice.items()]
    return "\n".join(lines)
