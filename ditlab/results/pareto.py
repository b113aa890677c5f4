"""Part 4: quality vs size of every measured preset and allocation, and the Pareto-optimal ones (no new measurements:
it reads the quality, vq and mixed documents)."""

from __future__ import annotations

from .common import fmt, md_table, pct


def points(quality: dict | None, vq: dict | None, mixed: dict | None) -> list[dict]:
    """One point per measured recipe (FP excluded): recipe, group, ratio_fp16, psnr, class_acc, ssim."""
    seen: dict[str, dict] = {}
    for doc, group in ((quality, "preset"), (vq, "VQ comparison"), (mixed, "allocation")):
        for r in (doc or {}).get("data", {}).get("rows", []):
            if r["recipe"] == "fp" or r["recipe"] in seen or r.get("ratio_fp16") is None:
                continue
            g = group if group != "allocation" else {"uniform": "uniform (allocation baseline)", "random": "random allocation"}.get(r.get("role"), "sensitivity allocation")
            seen[r["recipe"]] = {"recipe": r["recipe"], "group": g, "ratio_fp16": r["ratio_fp16"], "psnr": r["psnr"], "class_acc": r["class_acc"],
                                 "ssim": r["ssim"], "avg_w_bits": r.get("avg_w_bits")}
    return list(seen.values())


def frontier(pts: list[dict], metric: str) -> list[dict]:
    """Points not dominated on (smaller ratio_fp16, larger ``metric``), sorted by size."""
    valid = [p for p in pts if p.get(metric) is not None]
    out = []
    for p in valid:
        dominated = any(q is not p and q["ratio_fp16"] <= p["ratio_fp16"] and q[metric] >= p[metric]
                        and (q["ratio_fp16"] < p["ratio_fp16"] or q[metric] > p[metric]) for q in valid)
        if not dominated:
            out.append(p)
    return sorted(out, key=lambda p: p["ratio_fp16"])


def mixed_image_counts(quality: dict | None, vq: dict | None, mixed: dict | None) -> str:
    """A caveat when the parts sampled different numbers of images (their points then differ by sampling noise too)."""
    counts = {name: rows[0]["n_images"] for name, d in (("quality", quality), ("vq", vq), ("mixed", mixed))
              if (rows := (d or {}).get("data", {}).get("rows")) and rows[0].get("n_images")}
    if len(set(counts.values())) <= 1:
        return ""
    return ("The parts sampled different numbers of images (" + ", ".join(f"{k} {v}" for k, v in counts.items())
            + "): points from different parts also differ by sampling noise (about ±3 points of class accuracy at 100 images).\n\n")


def render(quality: dict | None, vq: dict | None, mixed: dict | None, figure: str | None) -> str:
    head = "## 4. Quality vs size: the Pareto front\n\n"
    pts = points(quality, vq, mixed)
    if not pts:
        return head + "Not run yet: needs `python -m ditlab bench quality` (and `bench claims` for the allocations).\n"
    cmds = [d["command"] for d in (quality, vq, mixed) if d]
    text = (head + "Drawn by `python -m ditlab bench pareto` from the measured rows of " + ", ".join(f"`{c}`" for c in cmds)
            + " (no new measurements). Size: packed weight bytes of the quantizable linears / fp16 bytes.\n\n")
    text += mixed_image_counts(quality, vq, mixed)
    if figure:
        text += f"![quality vs size]({figure})\n\n"
    for metric, label, f in (("psnr", "PSNR vs FP (dB)", lambda v: fmt(v, ".2f")), ("class_acc", "class acc", pct)):
        front = frontier(pts, metric)
        if not front:
            text += f"No {label} measured (the shipped classifier scores Shapes-10 models only).\n\n"
            continue
        text += f"Pareto-optimal on {label} ({len(front)} of {len(pts)} points):\n\n"
        text += md_table(["recipe", "kind", "× fp16", label], [[f"`{p['recipe']}`", p["group"], f"{p['ratio_fp16']:.3f}", f(p[metric])] for p in front], "llrr") + "\n\n"
    return text
