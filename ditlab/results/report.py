"""Assembles docs/RESULTS.md (and the PNG figures) from the part documents in docs/results/ — no measurement here."""

from __future__ import annotations

from pathlib import Path

from . import claims, figures, pareto, quality, speed
from .common import caption, fmt, md_table, measured_on_current_model, pct, read_doc

PART_FILES = ("quality", "act", "vq", "mixed", "speed")
FIG = {"quality": "results_quality.png", "act": "results_act_error.png", "pareto": "results_pareto.png"}


def load_docs(results_dir: Path) -> dict:
    return {p: read_doc(results_dir, p) for p in PART_FILES}


def _rows(doc):
    return (doc or {}).get("data", {}).get("rows")


def _verdicts(vs) -> str:
    return "\n".join(v.markdown() for v in vs) + "\n"


def claim_a(docs: dict) -> str:
    q = docs["quality"]
    text = "### (a) ViDiT-Q: W8A8 near-lossless, naive per-tensor static W8A8 degrades\n\n"
    if q:
        rows = claims.by_recipe(_rows(q))
        pick = [rows[n] for n in ("fp", "w8a8-viditq", "w8a8-rtn", "w8a8-smoothquant", "w8a8-rtn-static") if n in rows]
        text += (f"{caption(q)}\n\nRows of the quality table (section 1). `w8a8-rtn`: per-token dynamic RTN, "
                 "`w8a8-rtn-static`: one static scale per tensor from calibration absmax (symmetric weights).\n\n")
        text += md_table(["recipe", "PSNR (dB)", "SSIM", "class acc", "FD"],
                         [[f"`{r['recipe']}`", "∞" if r["recipe"] == "fp" else fmt(r["psnr"], ".2f"), fmt(r["ssim"], ".4f"), pct(r["class_acc"]), fmt(r["fd"], ".2f")] for r in pick]) + "\n\n"
    return text + _verdicts(claims.viditq_verdicts(_rows(q)))


def claim_b(docs: dict, figure: str | None) -> str:
    a = docs["act"]
    text = "### (b) HadaNorm: activation-quantization error per block component\n\n"
    if not a:
        return text + _verdicts(claims.hadanorm_verdicts(None))
    med, methods = a["data"]["medians"], a["data"]["methods"]
    s = a["settings"]
    text += (f"{caption(a)}\n\nPer layer: relative output error ‖XWᵀ − Q(X)W'ᵀ‖/‖XWᵀ‖ of per-token activation quantization after each "
             f"method's transform (weights in float: columns A4, A8), and of the whole quantized layer (W8A4, W4A8), on held-out "
             f"activations (4 labels, seed 987, {s['act_steps']} steps, 4 of them) with statistics from calibration "
             f"({s['calib_samples']} images × {s['calib_steps']} steps). Cells: median over the layers of a component; **bold** = lowest. "
             "Methods that rescale channels (SmoothQuant, ViDiT-Q SDCB) move difficulty into the weights, which only the W columns charge. "
             "The 'synthetic' column: DiT-like activations with planted outlier channels at tiny-DiT and DiT-XL/2 widths "
             "(`benchmarks/act_error_by_method.py`).\n\n")
    groups = [g for g in ("qkv", "out", "fc1", "fc2", "adaLN", "all", "synthetic") if g in med]
    for col in ("A4", "A8", "W4A8", "W8A4"):
        best = {g: min(methods, key=lambda m: med[g][m][col]) for g in groups}
        body = [[m] + [(f"**{med[g][m][col]:.4f}**" if best[g] == m else f"{med[g][m][col]:.4f}") for g in groups] for m in methods]
        text += f"{col}:\n\n" + md_table(["method", *[f"{g} ({med[g]['_n']})" for g in groups]], body) + "\n\n"
    if figure:
        text += f"![activation-quantization error by component]({figure})\n\n"
    return text + _verdicts(claims.hadanorm_verdicts(med, _rows(docs["quality"])))


def claim_c(docs: dict) -> str:
    v = docs["vq"]
    text = "### (c) VQ4DiT: 2- and 3-bit vector quantization vs k-means vs RTN / GPTQ\n\n"
    if not v:
        return text + _verdicts(claims.vq_verdicts(None))
    text += (f"{caption(v)}\n\nWeight-only (activations in float). RTN and GPTQ: groups of 64 input channels, asymmetric. VQ: "
             "2 bits = k 256, d 4; 3 bits = k 64, d 2 (6-bit indices packed four in three bytes, so 3 bits per weight; × fp16 also counts the codebooks). VQ4DiT's quantize "
             "time includes its zero-data calibration (column 'VQ4DiT calib s'). Rows of presets come from the quality run "
             "when its settings match.\n\n")
    text += md_table(["recipe", "class acc", "FD", "PSNR (dB)", "SSIM", "× fp16", "quantize s", "VQ4DiT calib s"],
                     [[f"`{r['recipe']}`", pct(r["class_acc"]), fmt(r["fd"], ".2f"), "∞" if r["recipe"] == "fp" else fmt(r["psnr"], ".2f"),
                       fmt(r["ssim"], ".4f"), fmt(r["ratio_fp16"], ".4f"), fmt(r["seconds_quantize"], ".1f"), fmt(r.get("seconds_vq_calibration"), ".1f")]
                      for r in _rows(v)]) + "\n\n"
    return text + _verdicts(claims.vq_verdicts(_rows(v)))


def claim_d(docs: dict) -> str:
    m = docs["mixed"]
    text = "### (d) Mixed precision from sensitivity vs uniform and random allocations at the same budget\n\n"
    if not m:
        return text + _verdicts(claims.mixed_verdicts(None))
    d, s = m["data"], m["settings"]
    text += (f"{caption(m)}\n\nSensitivity (`ditlab.sensitivity.run_sensitivity`): every quantized linear at W2/W4/W8 A8 (RTN, groups "
             f"of 64) × {s['sens_groups']} timestep groups, {s['sens_images']} images, {s['sens_steps']} steps, into an empty cache. "
             f"Allocation (`ditlab.allocation.solve`, scipy milp, MixDQ's metric-decoupled damages and group split 1.0) at "
             f"{d['budget_bits']:g} average weight bits. Random allocations: uniformly random bits per layer, rejection-sampled to an "
             "average within 0.25 bits below the budget. Uniform baselines: RTN W4A8 / W5A8 / W8A8 (groups of 64, W8 per channel). "
             f"Measured like section 1 ({s['n_per_label'] * 10} images, {s['steps']} steps).\n\n")
    t = d.get("timing")
    if t:
        text += (f"Sensitivity cost ({t['setting']}): {t['cells']} cells ({t['units']} layers × {t['groups']} groups) in {t['wall_s']:.0f} s wall "
                 f"/ {t['cpu_s']:.0f} s CPU; the same call again (cached): {t['cached_s']:.2f} s.\n\n")
    counts = d.get("choice_counts") or {}
    if counts:
        bits = sorted({b for c in counts.values() for b in c}, key=int)
        text += "Allocated weight bits per layer kind (number of layers):\n\n" + md_table(
            ["kind", *[f"W{b}" for b in bits]], [[k, *[c.get(b, 0) for b in bits]] for k, c in counts.items()]) + "\n\n"
    text += md_table(["role", "recipe", "avg W bits", "class acc", "PSNR (dB)", "SSIM", "FD", "× fp16", "predicted damage"],
                     [[r["role"], f"`{r['recipe']}`", fmt(r["avg_w_bits"], ".2f"), pct(r["class_acc"]), fmt(r["psnr"], ".2f"), fmt(r["ssim"], ".4f"),
                       fmt(r["fd"], ".2f"), fmt(r["ratio_fp16"], ".3f"), fmt(r.get("predicted_damage"), ".3g")] for r in d.get("rows", [])], "llrrrrrrr") + "\n\n"
    return text + _verdicts(claims.mixed_verdicts(d.get("rows"), d.get("budget_bits")))


def summary(docs: dict) -> str:
    """Headline rows and every verdict in one list (the top of RESULTS.md)."""
    lines = ["## Summary\n"]
    q = claims.by_recipe(_rows(docs["quality"]))
    fp = q.get("fp")
    if fp:
        lines.append(f"{caption(docs['quality'])}\n\nFP model: class acc {pct(fp['class_acc'])}, FD {fmt(fp['fd'], '.2f')} "
                     f"({fp['n_images']} images). Headline rows of section 1:\n")
        if fp["class_acc"] is not None and fp["class_acc"] < 0.9:
            weak = "weak models and are provisional" if fp["class_acc"] < 0.5 else "models short of that goal (provisional)"
            lines.append(f"**Caveat:** the FP model itself reaches {pct(fp['class_acc'])} class accuracy (the project's goal is 90 %), so "
                         f"accuracy-based verdicts below compare {weak}.\n")
        heads = [n for n in ("w8a8-viditq", "w8a8-rtn-static", "w4a8-hadanorm", "w4a8-rtn", "w4a16-gptq", "w4a4-hadanorm", "w2-vq4dit", "w3-vq4dit") if n in q]
        lines.append(md_table(["recipe", "PSNR (dB)", "class acc", "FD", "× fp16"],
                              [[f"`{n}`", fmt(q[n]["psnr"], ".2f"), pct(q[n]["class_acc"]), fmt(q[n]["fd"], ".2f"), fmt(q[n]["ratio_fp16"], ".3f")] for n in heads]) + "\n")
    lines.append("Claims (verdicts computed from the numbers below):\n")
    rows_m = _rows(docs["mixed"])
    vs = [*claims.viditq_verdicts(_rows(docs["quality"])),
          *claims.hadanorm_verdicts((docs["act"] or {}).get("data", {}).get("medians"), _rows(docs["quality"])),
          *claims.vq_verdicts(_rows(docs["vq"])),
          *claims.mixed_verdicts(rows_m, (docs["mixed"] or {}).get("data", {}).get("budget_bits"))]
    lines.append("\n".join(f"- {v.claim}: **{v.status}**" for v in vs) + "\n")
    return "\n".join(lines) + "\n"


def status(docs: dict) -> str:
    """Which parts this file holds: complete, interrupted (with what finished) or not run; wall and CPU seconds."""
    body = []
    for name in PART_FILES:
        d = docs[name]
        if not d:
            body.append([f"`{name}`", "not run", "–", "–", "–", "–"])
            continue
        rows = len((d.get("data") or {}).get("rows") or [])
        state = "complete" if d.get("complete") else "**interrupted**" + (f" after {rows} rows" if rows else "")
        model = {True: "current", False: "**earlier**", None: "–"}[measured_on_current_model(d)] if name != "speed" else "(kernels)"
        body.append([f"`{name}`", state, model, d["date"], f"{d['seconds']:.0f}", fmt(d.get("cpu_seconds"), ".0f")])
    done = [docs[n] for n in PART_FILES if docs[n]]
    total = f"Sum of the parts' wall times: {sum(d['seconds'] for d in done):.0f} s." if done else ""
    note = ("Model: whether the part was measured on the weights the model source holds now (an **earlier** part is kept until it "
            "is re-run, and its tables say so).")
    return "## Run status\n\n" + md_table(["part", "state", "model", "date", "wall s", "CPU s"], body, "lllrrr") + f"\n\n{total} {note}\n"


def assemble(docs_dir: Path, results_dir: Path | None = None, figures_dir: Path | None = None) -> Path:
    """Writes ``docs_dir/RESULTS.md`` (and figures under ``figures_dir``) from the part documents; returns its path."""
    docs_dir = Path(docs_dir)
    results_dir = Path(results_dir or docs_dir / "results")
    figures_dir = Path(figures_dir or docs_dir / "figures")
    docs = load_docs(results_dir)
    figs = _figures(docs, docs_dir, figures_dir)
    parts = ["# Results: the seed papers' claims on ditlab's own model\n",
             "Generated by `python -m ditlab bench all` (each section names the part command that produced it: `bench quality`, "
             "`bench claims` = parts act + vq + mixed, `bench speed`, `bench pareto`; `bench report` reassembles this file from "
             "`docs/results/*.json` without measuring). Every table states its command, settings, machine and date. Verdicts and "
             "their explanations are computed from the numbers by `ditlab/results/claims.py`; nothing below is typed by hand.\n",
             _figure_note(figs), status(docs), summary(docs), quality.render(docs["quality"])]
    if figs.get("quality"):
        parts.append(f"![quality of every preset]({figs['quality']})\n")
    parts += ["## 2. The papers' claims, checked\n", claim_a(docs), claim_b(docs, figs.get("act")), claim_c(docs), claim_d(docs),
              speed.render(docs["speed"]), pareto.render(docs["quality"], docs["vq"], docs["mixed"], figs.get("pareto")),
              "## 5. The issues' \"Done when\" criteria on this run\n",
              "Computed from the same documents (issues 3, 4 and 6; the DiT-XL/2 timing goals of issues 3 and 4 are in section 3).\n",
              claims.criteria_table(claims.criteria(_rows(docs["quality"]), (docs["act"] or {}).get("data", {}).get("medians"),
                                                    _rows(docs["vq"]), (docs["mixed"] or {}).get("data"))) + "\n"]
    path = docs_dir / "RESULTS.md"
    path.write_text("\n".join(p.rstrip("\n") + "\n" for p in parts if p))
    return path


def _figure_note(figs: dict) -> str:
    return "" if figures.available() else ("*Figures not rendered: matplotlib is not installed (a docs-only extra: "
                                           "`pip install matplotlib`, then `python -m ditlab bench report`).*\n")


def _figures(docs: dict, docs_dir: Path, figures_dir: Path) -> dict[str, str]:
    """Renders the PNGs that have data; returns {name: path relative to docs_dir}."""
    if not figures.available():
        return {}
    figures_dir.mkdir(parents=True, exist_ok=True)
    out = {}

    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(docs_dir.resolve()))
        except ValueError:
            return str(p)

    if _rows(docs["quality"]):
        out["quality"] = rel(figures.quality_png(_rows(docs["quality"]), figures_dir / FIG["quality"]))
    if docs["act"]:
        out["act"] = rel(figures.act_png(docs["act"]["data"]["medians"], docs["act"]["data"]["methods"], figures_dir / FIG["act"]))
    pts = pareto.points(docs["quality"], docs["vq"], docs["mixed"])
    if pts:
        fronts = {m: pareto.frontier(pts, m) for m in ("psnr", "class_acc")}
        out["pareto"] = rel(figures.pareto_png(pts, fronts, figures_dir / FIG["pareto"]))
    return out
