"""Bit allocation: milp against brute force on hand-made problems, exact budgets, group split, recipes, Pareto."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from ditlab import allocation
from ditlab.allocation import AllocationError, solve, solve_choice
from ditlab.config import LayerConfig

BASE = LayerConfig(method="rtn", w_bits=4, a_bits=8, w_group_size=64)


def cells(spec, groups=2, seed=0):
    """A sensitivity-like cell table: spec = [(unit, kind, params)], damages random but decreasing with bits."""
    rng = np.random.default_rng(seed)
    rows = []
    for unit, kind, params in spec:
        base_noise = rng.uniform(1e-4, 1e-1)
        for w in (2, 4, 8):
            for g in range(groups):
                noise = base_noise * 4.0 ** (-(w - 2)) * rng.uniform(0.5, 2.0)  # ~ 6 dB per bit
                rows.append({"unit": unit, "kind": kind, "layers": unit, "params": params, "group": g, "w_bits": w, "a_bits": 8,
                             "sqnr_db": -10 * math.log10(noise), "ssim": 1 - noise * rng.uniform(0.1, 1.0), "agreement": 1.0,
                             "bytes": params * (w if w > 4 else 4) // 8 + 8 * params // 64,
                             "config": json.dumps(BASE.replace(w_bits=w).to_dict(), sort_keys=True)})
    return pd.DataFrame(rows)


def brute_force(damage: np.ndarray, cost: np.ndarray, groups: np.ndarray, caps, items: np.ndarray) -> tuple[float, np.ndarray]:
    """Reference optimum of ``solve_choice``'s problem by enumeration (small problems only)."""
    per_item = [np.flatnonzero(items == i) for i in range(int(items.max()) + 1)]
    best, best_x = math.inf, None
    for combo in itertools.product(*per_item):
        idx = np.array(combo)
        if all(int(cost[idx][groups[idx] == g].sum()) <= c for g, c in enumerate(caps)):
            d = float(damage[idx].sum())
            if d < best:
                best, best_x = d, idx
    if best_x is None:
        raise AllocationError("infeasible")
    x = np.zeros(len(damage), bool)
    x[best_x] = True
    return best, x


SPEC = [("b0.q", "qkv", 4), ("b0.k", "qkv", 4), ("b0.fc1", "fc1", 16), ("b0.fc2", "fc2", 16), ("b0.ada", "adaLN", 24), ("b1.q", "qkv", 4)]


def test_solve_choice_matches_brute_force_on_random_problems():
    rng = np.random.default_rng(1)
    for trial in range(25):
        n_items, n_opts = rng.integers(2, 6), rng.integers(2, 4)
        items = np.repeat(np.arange(n_items), n_opts)
        damage = rng.uniform(0, 1, len(items))
        cost = rng.integers(1, 20, len(items)).astype(np.int64)
        groups = rng.integers(0, 2, n_items)[items]
        caps = [int(rng.integers(5, 40)), int(rng.integers(5, 40))]
        try:
            best, x_ref = brute_force(damage, cost, groups, caps, items)
        except AllocationError:
            with pytest.raises(AllocationError):
                solve_choice(damage, cost, groups, caps, items)
            continue
        x = solve_choice(damage, cost, groups, caps, items)
        assert damage[x].sum() == pytest.approx(best, abs=1e-9), trial
        for g, cap in enumerate(caps):
            assert cost[x & (groups == g)].sum() <= cap
        assert np.array_equal(np.bincount(items[x], minlength=n_items), np.ones(n_items))


@pytest.mark.parametrize("budget", [2.0, 3.3, 4.0, 5.0, 6.5, 8.0])
def test_budget_respected_exactly_and_optimal(budget):
    df = cells(SPEC)
    res = solve(df, budget, metric="sqnr", split=None)
    params = {u: p for u, _, p in SPEC}
    used = sum(params[u] * w for u, (w, a) in res.choice.items())
    assert used <= budget * sum(params.values()) + 1e-9  # integer bit count never above the budget
    assert res.avg_w_bits <= budget + 1e-12
    # brute force over 3^6 per-layer choices with the summed-over-groups damage
    table = allocation.damage_table(df, "sqnr")
    dmg = {(r.unit, r.w_bits): r.damage for r in table.itertuples()}
    best = math.inf
    for combo in itertools.product((2, 4, 8), repeat=len(SPEC)):
        if sum(p * w for (_, _, p), w in zip(SPEC, combo)) <= budget * sum(params.values()):
            best = min(best, sum(dmg[u, w] for (u, _, _), w in zip(SPEC, combo)))
    assert res.predicted_damage == pytest.approx(best, rel=1e-12)


def test_decoupled_split_gives_each_group_its_own_budget():
    df = cells(SPEC)
    res = solve(df, 5.0, split=0.5)
    params = {u: p for u, _, p in SPEC}
    content = [u for u, k, _ in SPEC if k in allocation.CONTENT_KINDS]
    quality = [u for u in params if u not in content]
    pq, pc = sum(params[u] for u in quality), sum(params[u] for u in content)
    a_q = 5.0 * (pq + pc) / (pq + 0.5 * pc)
    assert sum(params[u] * res.choice[u][0] for u in quality) <= a_q * pq + 1e-9
    assert sum(params[u] * res.choice[u][0] for u in content) <= 0.5 * a_q * pc + 1e-9
    # content damages are 1 − SSIM, quality damages noise energies (checked on one cell of each)
    t = allocation.damage_table(df)
    fc1 = df[(df.unit == "b0.fc1") & (df.w_bits == 4)]
    q = df[(df.unit == "b0.q") & (df.w_bits == 4)]
    assert float(t[(t.unit == "b0.fc1") & (t.w_bits == 4)].damage.iloc[0]) == pytest.approx((1 - fc1.ssim).sum())
    assert float(t[(t.unit == "b0.q") & (t.w_bits == 4)].damage.iloc[0]) == pytest.approx((10 ** (-q.sqnr_db / 10)).sum())


def test_recipe_has_one_override_per_layer_and_resolves():
    df = cells(SPEC)
    res = solve(df, 5.0)
    names = [p for p, _ in res.recipe.overrides]
    assert names == [u for u, _, _ in SPEC]
    plan = res.recipe.resolve(names)
    for u, (w, a) in res.choice.items():
        assert plan[u].w_bits == w and plan[u].a_bits == a and plan[u].method == "rtn" and plan[u].w_group_size == 64
    assert allocation.allocate(df, 5.0).to_dict() == res.recipe.to_dict()


def test_memory_budget_and_per_group():
    df = cells(SPEC)
    full = int(df[df.w_bits == 8].groupby("unit").bytes.first().sum())
    cap = int(full * 0.8)  # between all-W4 (0.625·params) and all-W8 (1.125·params) bytes
    res = solve(df, budget_bytes=cap, metric="sqnr", split=None)
    assert res.bytes <= cap and sorted({w for w, _ in res.choice.values()}) != [8]
    pg = solve(df, 4.0, metric="sqnr", split=None, per_group=True)
    assert set(pg.choice) == {(u, g) for u, _, _ in SPEC for g in range(2)} and len(pg.recipes) == 2
    params = {u: p for u, _, p in SPEC}
    assert sum(params[u] * w for (u, g), (w, a) in pg.choice.items()) <= 4.0 * 2 * sum(params.values())


def test_errors_name_the_field():
    df = cells(SPEC)
    with pytest.raises(AllocationError, match="budget_bits"):
        solve(df, 0.5)
    with pytest.raises(AllocationError, match="no allocation meets the budget"):
        solve(df, 1.5)  # below the smallest candidate (2 bits)
    with pytest.raises(AllocationError, match="split"):
        solve(df, 5.0, metric="sqnr")  # decoupled split needs metric='decoupled'
    with pytest.raises(AllocationError, match="metric"):
        solve(df, 5.0, metric="fid", split=None)
    with pytest.raises(AllocationError, match="exactly one"):
        solve(df, 5.0, budget_bytes=100)


def test_pareto_is_monotone_and_random_baseline_respects_budget():
    df = cells(SPEC)
    par = allocation.pareto(df, [2.0, 3.0, 4.0, 5.0, 6.0, 8.0], metric="sqnr", split=None)
    d = par.frame.predicted_damage.to_numpy()
    assert len(d) == 6 and np.all(np.diff(d) <= 1e-15)  # more bits never predicts more damage
    params = {u: p for u, _, p in SPEC}
    for seed in range(5):
        pick = allocation.random_choice(df, 5.0, seed)
        avg = sum(params[u] * w for u, (w, a) in pick.items()) / sum(params.values())
        assert 4.5 <= avg <= 5.0
        recipe = allocation.choice_recipe(pick, df, name=f"random{seed}")
        assert recipe.resolve(list(params))["b0.fc1"].w_bits == pick["b0.fc1"][0]
