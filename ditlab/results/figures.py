"""PNG figures of RESULTS.md, rendered from the part documents with matplotlib when it is installed (a docs-only
extra: ``pip install matplotlib``; the library itself draws plotly figures). Without it the figures are skipped and
the markdown says so."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("ditlab.results")
GROUP_STYLE = {"preset": ("o", "C0"), "VQ comparison": ("s", "C1"), "sensitivity allocation": ("*", "C3"),
               "uniform (allocation baseline)": ("D", "C2"), "random allocation": ("x", "C7")}
METHOD_LABELS = {"rtn": "RTN", "smoothquant": "SmoothQuant", "hadamard": "Hadamard", "viditq": "ViDiT-Q SDCB", "hadanorm": "HadaNorm"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quality_png(rows: list[dict], path: Path) -> Path:
    """Horizontal bars per preset: PSNR vs FP and class accuracy (FP's accuracy as a line)."""
    plt = _plt()
    rows = [r for r in rows if r["recipe"] != "fp"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.32 * len(rows) + 1.6), sharey=True)
    names = [r["recipe"] for r in rows][::-1]
    axes[0].barh(names, [r["psnr"] or 0 for r in rows][::-1], color="C0")
    axes[0].axvline(25, color="k", lw=0.8, ls="--")
    axes[0].set_xlabel("PSNR vs FP (dB); dashed: 25 dB")
    accs = [r["class_acc"] for r in rows]
    if all(a is not None for a in accs):
        axes[1].barh(names, [100 * a for a in accs][::-1], color="C2")
        axes[1].set_xlabel("class accuracy (%)")
    axes[1].set_xlim(0, 100)
    fig.suptitle("quality of every preset vs the FP model")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def act_png(medians: dict, methods: list[str], path: Path, kinds=("qkv", "out", "fc1", "fc2", "adaLN")) -> Path:
    """Grouped bars: median activation-quantization error per component, one panel per bit width (log scale)."""
    plt = _plt()
    present = [k for k in (*kinds, "all") if k in medians]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(methods)
    for ax, col in zip(axes, ("A4", "A8")):
        for i, m in enumerate(methods):
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(present))], [medians[k][m][col] for k in present], width,
                   label=METHOD_LABELS.get(m, m))
        ax.set_xticks(range(len(present)), present)
        ax.set_yscale("log")
        ax.set_title(f"{col}: relative layer-output error (median over layers)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pareto_png(pts: list[dict], fronts: dict[str, list[dict]], path: Path) -> Path:
    """PSNR and class accuracy vs size (× fp16) of every point; the Pareto front as a line."""
    plt = _plt()
    metrics = [("psnr", "PSNR vs FP (dB)", 1.0)] + ([("class_acc", "class accuracy (%)", 100.0)] if any(p["class_acc"] is not None for p in pts) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], metrics):
        for group, (marker, color) in GROUP_STYLE.items():
            g = [p for p in pts if p["group"] == group and p[metric] is not None]
            if g:
                ax.scatter([p["ratio_fp16"] for p in g], [scale * p[metric] for p in g], marker=marker, color=color, label=group, s=36)
        front = fronts.get(metric, [])
        ax.plot([p["ratio_fp16"] for p in front], [scale * p[metric] for p in front], "-", color="k", lw=0.8, label="Pareto front")
        for p in front:
            ax.annotate(p["recipe"], (p["ratio_fp16"], scale * p[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("packed weight bytes / fp16 bytes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("quality vs size of every preset and allocation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
