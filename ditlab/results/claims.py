"""Part 2: the seed papers' claims checked on ditlab's own model — verdicts computed from the measured numbers.

Every function here is pure (numbers in, ``Verdict``s / markdown out) so the tests can feed it crafted numbers both
ways. Statuses: "holds", "partly holds", "does not hold", "not measured". The thresholds are the issues' own
"Done when" criteria; differences in class accuracy smaller than two binomial standard errors are called out as
indistinguishable from sampling noise at the measured number of images.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import acc_diff_clear, fmt, md_table, pct

HOLDS, PARTLY, FAILS, MISSING = "holds", "partly holds", "does not hold", "not measured"
NEAR_LOSSLESS_PSNR = 25.0  # dB (issue 3)
NEAR_LOSSLESS_ACC = 0.02  # class-accuracy points below FP (issue 3)
DEGRADE_GAP_DB = 3.0  # PSNR gap that counts as "measurably worse" although still near-lossless


@dataclass(frozen=True)
class Verdict:
    """One checked statement: its status and the numbers that decided it."""

    claim: str
    status: str
    evidence: str

    def markdown(self) -> str:
        return f"- **{self.claim}: {self.status}.** {self.evidence}"


def by_recipe(rows: list[dict] | None) -> dict[str, dict]:
    return {r["recipe"]: r for r in rows or []}


def _n(row: dict) -> int:
    return int(row.get("n_images") or 100)


def _acc_gap(row: dict, fp: dict) -> str:
    """'−3.0 points (within noise)' text for row's class accuracy vs FP."""
    d = row["class_acc"] - fp["class_acc"]
    noise = "" if acc_diff_clear(row["class_acc"], fp["class_acc"], _n(row)) else ", within 2 standard errors: not distinguishable from sampling noise"
    return f"{100 * d:+.1f} points vs FP{noise}"


# ---- (a) ViDiT-Q ---------------------------------------------------------------------------------------------------
def near_lossless(row: dict, fp: dict) -> bool:
    """Issue 3's bar: PSNR vs FP ≥ 25 dB and (when scored) class accuracy within 2 points of FP."""
    ok_psnr = row["psnr"] is not None and row["psnr"] >= NEAR_LOSSLESS_PSNR
    ok_acc = row["class_acc"] is None or fp["class_acc"] is None or row["class_acc"] >= fp["class_acc"] - NEAR_LOSSLESS_ACC - 1e-12
    return ok_psnr and ok_acc


def _describe(row: dict, fp: dict) -> str:
    acc = f", class acc {pct(row['class_acc'])} ({_acc_gap(row, fp)})" if row["class_acc"] is not None and fp["class_acc"] is not None else ""
    return f"`{row['recipe']}`: PSNR {fmt(row['psnr'], '.2f')} dB, SSIM {fmt(row['ssim'], '.3f')}{acc}"


def viditq_verdicts(rows: list[dict] | None) -> list[Verdict]:
    q = by_recipe(rows)
    fp, vq, st = q.get("fp"), q.get("w8a8-viditq"), q.get("w8a8-rtn-static")
    c1 = "ViDiT-Q W8A8 (`w8a8-viditq`) is near-lossless (PSNR ≥ 25 dB and class acc within 2 points of FP)"
    c2 = "naive per-tensor static W8A8 (`w8a8-rtn-static`) degrades"
    if not fp or not vq:
        return [Verdict(c1, MISSING, "run `python -m ditlab bench quality` (needs the fp and w8a8-viditq rows)."), Verdict(c2, MISSING, "")]
    out = []
    if near_lossless(vq, fp):
        out.append(Verdict(c1, HOLDS, _describe(vq, fp) + "."))
    else:
        why = []
        if vq["psnr"] is None or vq["psnr"] < NEAR_LOSSLESS_PSNR:
            why.append(f"PSNR {fmt(vq['psnr'], '.2f')} dB is below {NEAR_LOSSLESS_PSNR:g} dB")
        if vq["class_acc"] is not None and fp["class_acc"] is not None and vq["class_acc"] < fp["class_acc"] - NEAR_LOSSLESS_ACC:
            why.append(f"class acc is {_acc_gap(vq, fp)}")
        out.append(Verdict(c1, FAILS, _describe(vq, fp) + ": " + "; ".join(why) + "."))
    if not st:
        out.append(Verdict(c2, MISSING, "the `w8a8-rtn-static` row is missing."))
        return out
    gap = (vq["psnr"] or 0.0) - (st["psnr"] or 0.0)
    text = f"{_describe(st, fp)}; {gap:+.2f} dB behind ViDiT-Q."
    if not near_lossless(st, fp):
        out.append(Verdict(c2, HOLDS, text + " It fails the near-lossless bar that ViDiT-Q " + ("passes." if near_lossless(vq, fp) else "also fails.")))
    elif gap >= DEGRADE_GAP_DB:
        out.append(Verdict(c2, PARTLY, text + f" Measurably worse than ViDiT-Q (≥ {DEGRADE_GAP_DB:g} dB) but still above the near-lossless "
                                              "bar: a single static scale per tensor costs fidelity without breaking the model."))
    else:
        out.append(Verdict(c2, FAILS, text + " On this model one static scale per tensor is already enough at 8 bits: 256 levels cover "
                                             "its activation range (the tiny DiT has far smaller outliers than the large video / image "
                                             "DiTs ViDiT-Q targets; see the A8 column of (b)), so dynamic per-token scales and channel "
                                             "balancing have little to fix at W8A8."))
    return out


# ---- (b) HadaNorm --------------------------------------------------------------------------------------------------
def hadanorm_verdicts(medians: dict | None, quality_rows: list[dict] | None = None, kinds=("qkv", "out", "fc1", "fc2", "adaLN")) -> list[Verdict]:
    c1 = "HadaNorm gives the lowest activation-quantization error of the five methods in every block component (qkv, out, fc1, fc2, adaLN) at A4 and A8"
    c2 = "issue 3: median A4 error over all layers ordered HadaNorm < Hadamard < RTN"
    c3 = "issue 3: `w4a8-hadanorm` beats `w4a8-rtn` on PSNR"
    if not medians:
        return [Verdict(c1, MISSING, "run `python -m ditlab bench claims` (part act)."), Verdict(c2, MISSING, ""), Verdict(c3, MISSING, "")]
    wins, losses = 0, []
    present = [k for k in kinds if k in medians]
    for k in present:
        for col in ("A4", "A8"):
            errs = {m: v[col] for m, v in medians[k].items() if not m.startswith("_")}
            best = min(errs, key=errs.get)
            if best == "hadanorm":
                wins += 1
            else:
                losses.append(f"{k} {col}: {best} {errs[best]:.4f} < hadanorm {errs['hadanorm']:.4f}")
    cells = 2 * len(present)
    status = HOLDS if wins == cells else (FAILS if wins == 0 else PARTLY)
    ev = f"HadaNorm is lowest in {wins} of {cells} (component, bits) cells (medians over the layers of each component)"
    ev += "." if not losses else "; not in: " + "; ".join(losses) + "."
    paid = _paid_in_weights(medians, present)
    if paid:
        ev += (" Where a channel-rescaling method wins on activation error alone, the whole layer at W8A4 (which also charges the "
               "rescaled weights) tells: " + "; ".join(paid) + ".")
    out = [Verdict(c1, status, ev)]
    allm = medians.get("all")
    if allm:
        h, d, r = (allm[m]["A4"] for m in ("hadanorm", "hadamard", "rtn"))
        ok = h < d < r
        out.append(Verdict(c2, HOLDS if ok else FAILS, f"HadaNorm {h:.4f}, Hadamard {d:.4f}, RTN {r:.4f} (median over {allm.get('_n', '?')} layers)."))
        w4 = {m: allm[m]["W4A8"] for m in allm if not m.startswith("_")}
        best = min(w4, key=w4.get)
        if best != "hadanorm":
            out[-1] = Verdict(c2, out[-1].status, out[-1].evidence + f" With 4-bit weights as well (W4A8 column, the whole layer) the lowest "
                                                                      f"median error is {best}'s ({w4[best]:.4f}; HadaNorm {w4['hadanorm']:.4f}): "
                                                                      "lower activation error does not by itself make the best W4A8 layer.")
    else:
        out.append(Verdict(c2, MISSING, ""))
    q = by_recipe(quality_rows)
    if "w4a8-hadanorm" in q and "w4a8-rtn" in q:
        h, r = q["w4a8-hadanorm"]["psnr"], q["w4a8-rtn"]["psnr"]
        holds = (h or 0) > (r or 0)
        why = "" if holds else (" At W4A8 the 8-bit activation error is negligible, so this compares 4-bit weight rounding. docs/HADANORM.md "
                                "(`benchmarks/bench_hadanorm.py`) measures it per layer, per step and over image seeds: HadaNorm's "
                                "average layer beats RTN's, its worst layers do not, and at this margin the ranking flips with the image set.")
        out.append(Verdict(c3, HOLDS if holds else FAILS, f"PSNR {fmt(h, '.2f')} vs {fmt(r, '.2f')} dB." + why))
    else:
        out.append(Verdict(c3, MISSING, "needs the quality rows of both presets."))
    return out


def _paid_in_weights(medians: dict, kinds) -> list[str]:
    """For components where SmoothQuant or ViDiT-Q SDCB beat HadaNorm at A4: whether they still do for the whole W8A4 layer."""
    out = []
    for k in kinds:
        errs = {m: v for m, v in medians[k].items() if not m.startswith("_")}
        best = min(errs, key=lambda m: errs[m]["A4"])
        if best in ("smoothquant", "viditq") and "W8A4" in errs[best]:
            b, h = errs[best]["W8A4"], errs["hadanorm"]["W8A4"]
            out.append(f"{k}: {best} {b:.4f} vs hadanorm {h:.4f} — " + ("the advantage holds" if b < h else "HadaNorm is better once the weights are quantized too"))
    return out


# ---- (c) VQ4DiT ----------------------------------------------------------------------------------------------------
def vq_verdicts(rows: list[dict] | None) -> list[Verdict]:
    q = by_recipe(rows)
    fp = q.get("fp")
    out = []
    for bits in (2, 3):
        claim = f"{bits}-bit VQ4DiT beats plain k-means, RTN and GPTQ (g64) at {bits} bits on class accuracy and FD"
        names = [f"w{bits}-vq4dit", f"w{bits}-kmeans", f"w{bits}a16-rtn-g64", f"w{bits}a16-gptq-g64"]
        have = [q[n] for n in names if n in q]
        if len(have) < 2 or names[0] not in q or q[names[0]]["class_acc"] is None:
            out.append(Verdict(claim, MISSING, "run `python -m ditlab bench claims` (part vq)."))
            continue
        v, others = q[names[0]], [q[n] for n in names[1:] if n in q]
        best_acc = max(others, key=lambda r: r["class_acc"])
        best_fd = min(others, key=lambda r: r["fd"])
        win_acc, win_fd = v["class_acc"] > best_acc["class_acc"], v["fd"] < best_fd["fd"]
        status = HOLDS if win_acc and win_fd else (PARTLY if win_acc or win_fd else FAILS)
        ev = (f"VQ4DiT: class acc {pct(v['class_acc'])}, FD {v['fd']:.2f}; best other on accuracy `{best_acc['recipe']}` "
              f"{pct(best_acc['class_acc'])}, on FD `{best_fd['recipe']}` {best_fd['fd']:.2f}.")
        if win_acc and not acc_diff_clear(v["class_acc"], best_acc["class_acc"], _n(v)):
            ev += " The accuracy margin is within 2 standard errors (sampling noise at this n)."
        if not win_acc and not acc_diff_clear(v["class_acc"], best_acc["class_acc"], _n(v)):
            ev += " The accuracy deficit is within 2 standard errors (sampling noise at this n)."
        if fp and fp["fd"] is not None and any(r["fd"] < fp["fd"] and r["class_acc"] < fp["class_acc"] - 0.05 for r in [v, *others]):
            ev += (" Some recipe has a lower FD than FP while losing accuracy: FD on 100 classifier features is not monotone in "
                   "quality here, so read accuracy first.")
        out.append(Verdict(claim, status, ev))
    return out


# ---- (d) mixed precision -------------------------------------------------------------------------------------------
def mixed_verdicts(rows: list[dict] | None, budget_bits: float | None = None) -> list[Verdict]:
    claim = (f"mixed precision from sensitivity at {fmt(budget_bits, 'g')} average weight bits beats uniform precision and random "
             "allocations with the same budget on class accuracy and PSNR")
    rows = rows or []
    alloc = next((r for r in rows if r.get("role") == "allocated"), None)
    if not alloc:
        return [Verdict(claim, MISSING, "run `python -m ditlab bench claims` (part mixed).")]
    limit = budget_bits if budget_bits is not None else alloc["avg_w_bits"]  # rivals: at most the same budget
    rivals = [r for r in rows if r.get("role") in ("uniform", "random") and (r.get("avg_w_bits") or 0) <= limit + 1e-9]
    beaten, lost = [], []
    for r in rivals:
        acc_ok = alloc["class_acc"] is None or r["class_acc"] is None or alloc["class_acc"] >= r["class_acc"]
        psnr_ok = (alloc["psnr"] or 0) > (r["psnr"] or 0)
        (beaten if acc_ok and psnr_ok else lost).append(r)
    status = HOLDS if rivals and not lost else (FAILS if not beaten else PARTLY)
    ev = (f"`{alloc['recipe']}` ({alloc['avg_w_bits']:.2f} bits): class acc {pct(alloc['class_acc'])}, PSNR {fmt(alloc['psnr'], '.2f')} dB; "
          f"beats {len(beaten)} of {len(rivals)} rivals with at most {fmt(limit, 'g')} bits on both")
    if lost:
        ev += "; not: " + "; ".join(f"`{r['recipe']}` ({r['avg_w_bits']:.2f} bits, {pct(r['class_acc'])}, {fmt(r['psnr'], '.2f')} dB)" for r in lost)
    clear = [r for r in beaten if r["class_acc"] is not None and alloc["class_acc"] is not None and acc_diff_clear(alloc["class_acc"], r["class_acc"], _n(alloc))]
    if alloc["class_acc"] is not None and beaten:
        ev += f". The accuracy margin exceeds 2 standard errors against {len(clear)} of the {len(beaten)} beaten rivals"
    ev += "."
    ranked = [r for r in rows if r.get("predicted_damage") is not None and r["psnr"] is not None]
    pairs = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if a["predicted_damage"] != b["predicted_damage"]]
    if pairs:
        good = sum((a["predicted_damage"] < b["predicted_damage"]) == (a["psnr"] > b["psnr"]) for a, b in pairs)
        ev += (f" The summed per-layer sensitivity (predicted damage) orders {good} of {len(pairs)} pairs of measured allocations "
               "the same way as their PSNR" + (": the per-layer proxy (each layer quantized alone, others FP) predicts the joint effect "
                                               "poorly here." if good <= len(pairs) / 2 else "."))
    return [Verdict(claim, status, ev)]


# ---- the issues' "Done when" criteria ------------------------------------------------------------------------------
def criteria(quality: list[dict] | None, act_medians: dict | None, vq: list[dict] | None, mixed: dict | None) -> list[tuple]:
    """(issue, criterion, measured, met: bool | None) rows computed from the part documents' data."""
    q = by_recipe(quality)
    v = {**q, **by_recipe(vq)}
    out: list[tuple] = []
    fp = q.get("fp") or v.get("fp")

    def acc_within(name: str, points: float, issue: int):
        r = v.get(name)
        if r and fp and r["class_acc"] is not None and fp["class_acc"] is not None:
            d = r["class_acc"] - fp["class_acc"]
            out.append((issue, f"`{name}` class acc within {points:g} points of FP", f"{100 * d:+.1f} points", d >= -points / 100 - 1e-12))
        else:
            out.append((issue, f"`{name}` class acc within {points:g} points of FP", "–", None))

    acc_within("w8a8-viditq", 2, 3)
    r = q.get("w8a8-viditq")
    out.append((3, "`w8a8-viditq` PSNR vs FP ≥ 25 dB", f"{fmt(r['psnr'], '.2f')} dB" if r else "–", (r["psnr"] or 0) >= 25 if r else None))
    allm = (act_medians or {}).get("all")
    if allm:
        h, d, rt = (allm[m]["A4"] for m in ("hadanorm", "hadamard", "rtn"))
        out.append((3, "median A4 activation error HadaNorm < Hadamard < RTN", f"{h:.4f} / {d:.4f} / {rt:.4f}", h < d < rt))
    else:
        out.append((3, "median A4 activation error HadaNorm < Hadamard < RTN", "–", None))
    h, rt = q.get("w4a8-hadanorm"), q.get("w4a8-rtn")
    out.append((3, "`w4a8-hadanorm` beats `w4a8-rtn` on PSNR", f"{fmt(h['psnr'], '.2f')} vs {fmt(rt['psnr'], '.2f')} dB" if h and rt else "–",
                (h["psnr"] or 0) > (rt["psnr"] or 0) if h and rt else None))
    for bits, limit, pick in ((8, 0.55, lambda r: r["w_bits"] == 8 and not r["method"].startswith("bnb")),
                              # SVD keeps an fp16 low-rank branch beside the W4 residual: not a packed-W4 format.
                              (4, 0.30, lambda r: r["w_bits"] == 4 and r.get("w_group_size") and r["method"] != "svd")):
        rs = [r for r in (quality or []) if r["recipe"] != "fp" and pick(r) and r["ratio_fp16"] is not None]
        worst = max(rs, key=lambda r: r["ratio_fp16"]) if rs else None
        label = f"packed size W{bits}{' (groups; SVD, whose low-rank branch is fp16, aside)' if bits == 4 else ''} ≤ {limit}× fp16 (largest over the presets)"
        out.append((3, label, f"{worst['ratio_fp16']:.3f} (`{worst['recipe']}`)" if worst else "–", worst["ratio_fp16"] <= limit if worst else None))
    acc_within("w2-vq4dit", 10, 4)
    a, km, rt2 = v.get("w2-vq4dit"), v.get("w2-kmeans"), v.get("w2a16-rtn-g64")
    if a and km and rt2 and a["class_acc"] is not None:
        ok = all(a["class_acc"] > o["class_acc"] and a["fd"] < o["fd"] for o in (km, rt2))
        out.append((4, "`w2-vq4dit` beats `w2-kmeans` and 2-bit RTN g64 on class acc and FD",
                    f"acc {pct(a['class_acc'])} vs {pct(km['class_acc'])} / {pct(rt2['class_acc'])}; FD {a['fd']:.2f} vs {km['fd']:.2f} / {rt2['fd']:.2f}", ok))
    else:
        out.append((4, "`w2-vq4dit` beats `w2-kmeans` and 2-bit RTN g64 on class acc and FD", "–", None))
    acc_within("w3-vq4dit", 3, 4)
    out.append((4, "packed size at 2 bits ≤ 0.14× fp16 (codebooks included)", f"{a['ratio_fp16']:.4f}" if a else "–", a["ratio_fp16"] <= 0.14 if a else None))
    secs = [v[n]["seconds_vq_calibration"] for n in ("w2-vq4dit", "w3-vq4dit") if n in v and v[n].get("seconds_vq_calibration") is not None]
    out.append((4, "VQ4DiT calibration of the tiny model ≤ 10 min (default settings)", " / ".join(f"{s:.0f} s" for s in secs) or "–",
                all(s <= 600 for s in secs) if secs else None))
    t = (mixed or {}).get("timing")
    out.append((6, "sensitivity of all quantized linears × 4 groups at W4A8 ≤ 3 min (empty cache; then cached)",
                f"{t['wall_s']:.0f} s wall / {t['cpu_s']:.0f} s CPU ({t['cells']} cells, {t['groups']} groups); cached {t['cached_s']:.2f} s" if t else "–",
                (t["wall_s"] <= 180) if t and t["groups"] >= 4 else None))
    rows = (mixed or {}).get("rows") or []
    al = next((r for r in rows if r.get("role") == "allocated"), None)
    rivals = [r for r in rows if r["recipe"] == "w4a8-rtn" or r.get("role") == "random"]
    n_random = sum(r.get("role") == "random" for r in rows)
    if al and rivals and al["class_acc"] is not None:
        beaten = [r for r in rivals if al["class_acc"] >= r["class_acc"] and (al["psnr"] or 0) > (r["psnr"] or 0)]
        out.append((6, "allocation at 5 bits beats uniform W4 and every random allocation (≥ 5) on class acc and PSNR",
                    f"{len(beaten)} of {len(rivals)} beaten ({n_random} random)" + (f", {al['n_images']} images" if al.get("n_images") else ""),
                    len(beaten) == len(rivals) and n_random >= 5))
    else:
        out.append((6, "allocation at 5 bits beats uniform W4 and every random allocation (≥ 5) on class acc and PSNR", "–", None))
    return out


def criteria_table(rows: list[tuple]) -> str:
    mark = {True: "met", False: "**missed**", None: "not measured"}
    return md_table(["issue", "criterion", "measured", "result"], [[f"#{i}", c, m, mark[ok]] for i, c, m, ok in rows], "llll")
