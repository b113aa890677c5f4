"""Part 1: the quality table — every preset on the shipped tiny DiT vs the FP model (same seeds and labels)."""

from __future__ import annotations

from pathlib import Path

from .common import SCHEDULER_TITLES, Part, ResultsSettings, Say, caption, evaluate_row, fmt, md_table, pct, reuse_rows


def run(pipe, settings: ResultsSettings, results_dir: Path, say: Say, resume: dict | None = None) -> dict:
    """Evaluates every preset (FP first); saves the document after each row. ``resume``: an earlier document whose
    rows with the same settings are kept instead of measured again."""
    part = Part("quality", settings, results_dir)
    kept = reuse_rows(resume, settings)
    rows = part.data.setdefault("rows", [])
    names = settings.preset_names()
    for i, name in enumerate(names, 1):
        if name in kept:
            rows.append(kept[name])
            say(f"[quality {i}/{len(names)}] {name}: kept from the earlier run")
            continue
        row = evaluate_row(pipe, name, settings)
        rows.append(row)
        part.save()
        say(f"[quality {i}/{len(names)}] {name}: PSNR {fmt(row['psnr'], '.2f')} dB, class acc {pct(row['class_acc'])}, "
            f"×fp16 {fmt(row['ratio_fp16'], '.3f')}, quantize {row['seconds_quantize']:.1f} s, sample {row['seconds_sample']:.1f} s")
    part.complete = True
    part.save()
    return part.doc()


def table(rows: list[dict]) -> str:
    header = ["recipe", "method", "W/A", "PSNR vs FP (dB)", "SSIM vs FP", "class acc", "FD", "packed bytes", "× fp16",
              "calibrate s", "quantize s", "sample s"]
    body = []
    for r in rows:
        psnr = "∞ (reference)" if r["recipe"] == "fp" else fmt(r["psnr"], ".2f")
        body.append([f"`{r['recipe']}`", r["method"], f"W{r['w_bits']}A{r['a_bits']}", psnr, fmt(r["ssim"], ".4f"), pct(r["class_acc"]),
                     fmt(r["fd"], ".2f"), f"{r['weight_bytes']:,}", fmt(r["ratio_fp16"], ".3f"), fmt(r["seconds_calibrate"], ".1f"),
                     fmt(r["seconds_quantize"], ".1f"), fmt(r["seconds_sample"], ".1f")])
    return md_table(header, body, "lll" + "r" * (len(header) - 3))


def render(doc: dict | None) -> str:
    head = "## 1. Quality of every preset on the shipped tiny DiT\n\n"
    if not doc:
        return head + "Not run yet: `python -m ditlab bench quality`.\n"
    s = doc["settings"]
    n = s["n_per_label"] * 10
    text = (f"{caption(doc)}\n\n{n} images ({s['n_per_label']} per class, class-major), {s['steps']} {SCHEDULER_TITLES[s.get('scheduler', 'ddim')]} steps, CFG {s['guidance']:g}, "
            f"seed {s['seed']}; the quantized model samples the same labels and initial noise as FP. PSNR/SSIM: final uint8 images vs "
            f"FP. Class acc: the shipped classifier on the intended labels{_se_points(doc)}. FD: Fréchet distance of classifier features to 2000 real Shapes-10 images. Packed bytes: stored weights "
            f"(codes + scales + codebooks, no bias) of the quantizable linears; embedders and the final layer stay FP. Calibration "
            f"(when a method needs statistics): {s['calib_samples']} images × {s['calib_steps']} steps, cached on disk, so "
            f"'calibrate s' is 0 after the first recipe that needed it. Quantize s includes VQ4DiT's zero-data calibration. "
            f"Execution path: {_backends(doc)}.\n\n")
    return head + text + table(doc["data"]["rows"]) + "\n"


def _se_points(doc: dict) -> str:
    from .common import acc_se

    rows = doc["data"]["rows"]
    fp = next((r for r in rows if r["recipe"] == "fp"), None)
    if not fp or fp["class_acc"] is None:
        return " (not scored: the shipped classifier scores Shapes-10 models only)"
    return f" (binomial standard error ≈ ±{100 * acc_se(fp['class_acc'], fp['n_images']):.0f} points at this n)"


def _backends(doc: dict) -> str:
    seen = sorted({r.get("backend") or "?" for r in doc["data"]["rows"] if r["recipe"] != "fp"})
    return ", ".join(seen) or "–"
