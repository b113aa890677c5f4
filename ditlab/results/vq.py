"""Claim (c), measurement: VQ4DiT vs plain k-means vs RTN and GPTQ (groups of 64) at the same 2 and 3 weight bits."""

from __future__ import annotations

from pathlib import Path

from ..config import LayerConfig, Recipe
from .common import Part, ResultsSettings, Say, evaluate_row, fmt, pct, read_doc, reuse_rows

BITS = (2, 3)


def recipes(bits: int) -> list:
    """The compared recipes at ``bits`` weight bits (weight-only, activations in float)."""
    rtn = Recipe(default=LayerConfig(method="rtn", w_bits=bits, a_bits=16, w_group_size=64), name=f"w{bits}a16-rtn-g64")
    gptq = Recipe(default=LayerConfig(method="gptq", w_bits=bits, a_bits=16, w_group_size=64), name=f"w{bits}a16-gptq-g64")
    return [f"w{bits}-vq4dit", f"w{bits}-kmeans", rtn, gptq]


def run(pipe, settings: ResultsSettings, results_dir: Path, say: Say) -> dict:
    """Rows for every recipe of ``recipes(2)`` and ``recipes(3)``; preset rows are taken from the quality document
    when it was measured with the same settings."""
    part = Part("vq", settings, results_dir)
    kept = reuse_rows(read_doc(results_dir, "quality"), settings)
    rows = part.data.setdefault("rows", [])
    fp = kept.get("fp") or evaluate_row(pipe, "fp", settings)
    rows.append(fp)
    todo = [r for b in BITS for r in recipes(b)]
    for i, recipe in enumerate(todo, 1):
        name = recipe if isinstance(recipe, str) else recipe.name
        row = kept.get(name) or evaluate_row(pipe, recipe, settings)
        rows.append(row)
        part.save()
        say(f"[vq {i}/{len(todo)}] {name}: class acc {pct(row['class_acc'])}, FD {fmt(row['fd'], '.2f')}, PSNR {fmt(row['psnr'], '.2f')} dB"
            + (" (from the quality run)" if name in kept else ""))
    part.complete = True
    part.save()
    return part.doc()
