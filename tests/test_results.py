"""The results machinery (`python -m ditlab bench all` → docs/RESULTS.md): verdicts follow the numbers both ways,
every table carries its command / machine / date, and the parts run end to end on the tiny test model."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import pytest

from ditlab.results import claims, pareto, report
from ditlab.results.common import ResultsSettings, command_for, machine_info, now_utc, write_doc

TINY = ResultsSettings(n_per_label=1, steps=2, presets=("fp", "w8a8-rtn", "w8a8-rtn-static", "w8a8-viditq", "w4a8-rtn", "w4a8-hadanorm"),
                       calib_samples=2, calib_steps=2, vq_params=(("iterations", 1), ("kmeans_iters", 3), ("samples", 2), ("steps", 2)), act_steps=4,
                       sens_images=2, sens_steps=2, sens_groups=2, n_random=1, pareto_measure=(3.0,), kernel_m=16, kernel_repeats=1, xl=False)


# ---- crafted numbers -------------------------------------------------------------------------------------------------
def row(recipe, psnr, acc, fd=30.0, ratio=0.5, **extra):
    w = {"fp": 16}.get(recipe, 8 if "w8" in recipe else 4 if "w4" in recipe else 2 if "w2" in recipe else 3)
    return {"recipe": recipe, "method": recipe.split("-")[1] if "-" in recipe else recipe, "w_bits": w, "a_bits": 8, "w_group_size": 64 if w == 4 else None,
            "psnr": psnr, "ssim": 0.9, "class_acc": acc, "fd": fd, "class_agreement": None, "weight_bytes": int(ratio * 1000),
            "weight_bytes_fp16": 1000, "ratio_fp16": ratio, "seconds_calibrate": 0.0, "seconds_quantize": 1.0, "seconds_vq_calibration": None,
            "seconds_sample": 1.0, "n_images": 100, "backend": "cpu-int", **extra}


def quality_rows(viditq_psnr=32.0, viditq_acc=0.90, static_psnr=14.0, static_acc=0.40, hadanorm_psnr=24.0, rtn4_psnr=22.0):
    return [row("fp", None, 0.90, ratio=1.0), row("w8a8-viditq", viditq_psnr, viditq_acc, ratio=0.54),
            row("w8a8-rtn-static", static_psnr, static_acc, ratio=0.51), row("w4a8-hadanorm", hadanorm_psnr, 0.8, ratio=0.29),
            row("w4a8-rtn", rtn4_psnr, 0.8, ratio=0.27)]


def medians(best="hadanorm"):
    methods = ("rtn", "smoothquant", "hadamard", "viditq", "hadanorm")
    base = {"rtn": 0.15, "smoothquant": 0.10, "hadamard": 0.09, "viditq": 0.085, "hadanorm": 0.08}
    if best != "hadanorm":
        base = {**base, best: 0.01, "hadanorm": 0.2}
    cell = lambda m: {"A4": base[m], "A8": base[m] / 20, "W8A4": base[m], "W4A8": 0.06}  # noqa: E731
    return {k: {**{m: cell(m) for m in methods}, "_n": 6} for k in ("qkv", "out", "fc1", "fc2", "adaLN", "all")}


def test_viditq_verdicts_follow_the_numbers():
    good = claims.viditq_verdicts(quality_rows())
    assert [v.status for v in good] == [claims.HOLDS, claims.HOLDS]
    both_fine = claims.viditq_verdicts(quality_rows(static_psnr=31.0, static_acc=0.90))
    assert [v.status for v in both_fine] == [claims.HOLDS, claims.FAILS]
    assert "one static scale per tensor is already enough" in both_fine[1].evidence
    worse_but_fine = claims.viditq_verdicts(quality_rows(static_psnr=27.0, static_acc=0.90))
    assert worse_but_fine[1].status == claims.PARTLY
    bad = claims.viditq_verdicts(quality_rows(viditq_psnr=20.0, viditq_acc=0.70))
    assert bad[0].status == claims.FAILS and "below 25 dB" in bad[0].evidence and "-20.0 points" in bad[0].evidence
    assert claims.viditq_verdicts([])[0].status == claims.MISSING


def test_hadanorm_verdicts_follow_the_numbers():
    good = claims.hadanorm_verdicts(medians("hadanorm"), quality_rows())
    assert [v.status for v in good] == [claims.HOLDS, claims.HOLDS, claims.HOLDS]
    bad = claims.hadanorm_verdicts(medians("smoothquant"), quality_rows(hadanorm_psnr=20.0, rtn4_psnr=22.0))
    assert [v.status for v in bad] == [claims.FAILS, claims.FAILS, claims.FAILS]
    assert "smoothquant 0.0100 < hadanorm 0.2000" in bad[0].evidence
    partly = medians("hadanorm")
    partly["fc2"]["viditq"]["A4"] = 0.01
    assert claims.hadanorm_verdicts(partly)[0].status == claims.PARTLY


def vq_rows(vq_acc, vq_fd):
    return [row("fp", None, 0.9, fd=10.0, ratio=1.0), row("w2-vq4dit", 20.0, vq_acc, fd=vq_fd, ratio=0.136),
            row("w2-kmeans", 18.0, 0.5, fd=40.0, ratio=0.136), row("w2a16-rtn-g64", 17.0, 0.4, fd=50.0, ratio=0.31),
            row("w2a16-gptq-g64", 19.0, 0.6, fd=35.0, ratio=0.31)]


def test_vq_verdicts_follow_the_numbers():
    assert claims.vq_verdicts(vq_rows(0.85, 20.0))[0].status == claims.HOLDS
    assert claims.vq_verdicts(vq_rows(0.85, 60.0))[0].status == claims.PARTLY
    lost = claims.vq_verdicts(vq_rows(0.30, 60.0))
    assert lost[0].status == claims.FAILS and "`w2a16-gptq-g64` 60.0 %" in lost[0].evidence
    assert lost[1].status == claims.MISSING  # no 3-bit rows


def mixed_rows(alloc_acc, alloc_psnr):
    return [row("alloc-5b", alloc_psnr, alloc_acc, role="allocated", avg_w_bits=4.99), row("w4a8-rtn", 20.0, 0.6, role="uniform", avg_w_bits=4.0),
            row("w5a8-rtn-g64", 22.0, 0.7, role="uniform", avg_w_bits=5.0), row("w8a8-rtn", 40.0, 0.9, role="uniform", avg_w_bits=8.0)] + \
        [row(f"random-{i}", 18.0 + i, 0.5, role="random", avg_w_bits=4.8) for i in range(5)]


def test_mixed_verdicts_follow_the_numbers():
    good = claims.mixed_verdicts(mixed_rows(0.8, 25.0), 5.0)[0]
    assert good.status == claims.HOLDS and "beats 7 of 7 rivals" in good.evidence  # uniform W8 has more bits: not a rival
    some = claims.mixed_verdicts(mixed_rows(0.65, 21.0), 5.0)[0]
    assert some.status == claims.PARTLY and "`w5a8-rtn-g64`" in some.evidence
    assert claims.mixed_verdicts(mixed_rows(0.3, 10.0), 5.0)[0].status == claims.FAILS


def test_criteria_are_computed_both_ways():
    met = {c: ok for _, c, _, ok in claims.criteria(quality_rows(), medians(), vq_rows(0.85, 20.0), {"rows": mixed_rows(0.8, 25.0)})}
    assert met["`w8a8-viditq` class acc within 2 points of FP"] is True
    assert met["median A4 activation error HadaNorm < Hadamard < RTN"] is True
    assert met["`w2-vq4dit` beats `w2-kmeans` and 2-bit RTN g64 on class acc and FD"] is True
    missed = {c: ok for _, c, _, ok in claims.criteria(quality_rows(viditq_acc=0.80), medians("rtn"), vq_rows(0.3, 60.0), {"rows": mixed_rows(0.3, 10.0)})}
    assert missed["`w8a8-viditq` class acc within 2 points of FP"] is False
    assert missed["median A4 activation error HadaNorm < Hadamard < RTN"] is False
    assert missed["`w2-vq4dit` class acc within 10 points of FP"] is False
    assert missed["allocation at 5 bits beats uniform W4 and every random allocation (≥ 5) on class acc and PSNR"] is False


def test_packed_w4_criterion_sets_svd_aside_but_not_a_bloated_w4():
    label = "packed size W4 (groups; SVD, whose low-rank branch is fp16, aside) ≤ 0.3× fp16 (largest over the presets)"
    svd = row("w4a4-svd", 26.0, 0.8, ratio=0.51)  # method "svd": an fp16 low-rank branch rides along by design
    crit = {c: (m, ok) for _, c, m, ok in claims.criteria(quality_rows() + [svd], medians(), None, None)}
    assert crit[label] == ("0.290 (`w4a8-hadanorm`)", True)
    bloated = row("w4a8-fat", 24.0, 0.8, ratio=0.35)
    crit = {c: (m, ok) for _, c, m, ok in claims.criteria(quality_rows() + [svd, bloated], medians(), None, None)}
    assert crit[label] == ("0.350 (`w4a8-fat`)", False)


def test_pareto_notes_parts_measured_on_different_image_counts():
    doc = lambda n: {"data": {"rows": [{"recipe": "fp", "n_images": 10 * n}]}}  # noqa: E731
    assert pareto.mixed_image_counts(doc(10), doc(10), doc(10)) == ""
    assert "quality 100, vq 100, mixed 500" in pareto.mixed_image_counts(doc(10), doc(10), doc(50))
    assert pareto.mixed_image_counts(doc(10), None, None) == ""


def test_pareto_front():
    pts = [{"recipe": "a", "group": "preset", "ratio_fp16": 0.5, "psnr": 30.0, "class_acc": 0.9, "ssim": 1, "avg_w_bits": None},
           {"recipe": "b", "group": "preset", "ratio_fp16": 0.3, "psnr": 25.0, "class_acc": 0.9, "ssim": 1, "avg_w_bits": None},
           {"recipe": "c", "group": "preset", "ratio_fp16": 0.4, "psnr": 20.0, "class_acc": 0.5, "ssim": 1, "avg_w_bits": None}]
    assert [p["recipe"] for p in pareto.frontier(pts, "psnr")] == ["b", "a"]
    assert [p["recipe"] for p in pareto.frontier(pts, "class_acc")] == ["b"]


def _doc(part, data, settings=ResultsSettings()):
    return {"part": part, "command": command_for(part, settings), "settings": settings.to_dict(), "machine": machine_info(), "date": now_utc(),
            "seconds": 1.0, "model": {"source": "shipped", "commit": None}, "complete": True, "data": data}


def _assemble(tmp_path, q_rows, meds, v_rows, m_rows):
    res = tmp_path / "results"
    write_doc(res, _doc("quality", {"rows": q_rows}))
    write_doc(res, _doc("act", {"medians": meds, "methods": ["rtn", "smoothquant", "hadamard", "viditq", "hadanorm"], "layers": []}))
    write_doc(res, _doc("vq", {"rows": v_rows}))
    write_doc(res, _doc("mixed", {"rows": m_rows, "budget_bits": 5.0, "choice_counts": {"qkv": {"4": 3, "8": 3}},
                                  "timing": {"setting": "w4a8-rtn@w4a8", "cells": 8, "units": 4, "groups": 2, "wall_s": 3.0, "cpu_s": 5.0, "cached_s": 0.1, "cached_cells": 8}}))
    write_doc(res, _doc("speed", {"dit_xl": {"status": "missing", "script": "benchmarks/bench_dit_xl.py"}, "kernels_cpu": None, "cuda": False}))
    return report.assemble(tmp_path, res, tmp_path / "figures").read_text()


def test_report_captions_and_verdicts_follow_crafted_numbers(tmp_path):
    good = _assemble(tmp_path, quality_rows(), medians(), vq_rows(0.85, 20.0), mixed_rows(0.8, 25.0))
    captions = [line for line in good.splitlines() if line.startswith("Command: `")]
    assert len(captions) >= 5  # quality, act, vq, mixed, speed
    for line in captions:
        assert re.search(r"Command: `python -m ditlab bench \w+.*` — Machine: .+ cores, .* — Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", line), line
    assert "ViDiT-Q W8A8 (`w8a8-viditq`) is near-lossless (PSNR ≥ 25 dB and class acc within 2 points of FP): **holds**" in good
    assert "not run: no CUDA device".lower() in good.lower()
    assert "**TODO**" in good  # the DiT-XL/2 rows when the script is absent
    bad = _assemble(tmp_path, quality_rows(viditq_psnr=20.0, viditq_acc=0.5), medians("rtn"), vq_rows(0.3, 60.0), mixed_rows(0.3, 10.0))
    assert "ViDiT-Q W8A8 (`w8a8-viditq`) is near-lossless (PSNR ≥ 25 dB and class acc within 2 points of FP): **does not hold**" in bad
    assert good.count("**holds**") > bad.count("**holds**")
    assert "**missed**" not in good and "**missed**" in bad


def test_command_line_round_trip():
    from ditlab.cli import build_parser
    from ditlab.results.cli import settings_from_args

    cmd = command_for("all", TINY)
    args = build_parser().parse_args(shlex.split(cmd)[3:])
    assert args.part == "all"
    assert settings_from_args(args) == TINY
    full = dataclasses.replace(ResultsSettings(full=True), n_per_label=50, n_random=10, pareto_measure=(2.5, 3.0, 3.5, 4.0, 6.0, 7.0), kernel_repeats=10)
    assert command_for("quality", full) == "python -m ditlab bench quality --full"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ditlab.testing import tiny_dit_pipeline

    return str(tiny_dit_pipeline(tmp_path_factory.mktemp("results") / "model"))


@pytest.mark.slow  # ~10 s on 2 quiet cores (fresh-clone CI, 2026-11-28); > 15 min under a load average of ~17
def test_bench_all_runs_end_to_end_on_the_tiny_model(tiny_model, tmp_path, monkeypatch):
    from ditlab.results import run

    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    settings = dataclasses.replace(TINY, model=tiny_model)
    lines = []
    path = run("all", settings, docs_dir=tmp_path, say=lines.append)
    text = path.read_text()
    for part in ("quality", "act", "vq", "mixed", "speed"):
        doc = json.loads((tmp_path / "results" / f"{part}.json").read_text())
        assert doc["complete"] and doc["command"].startswith(f"python -m ditlab bench {part} ")
        assert f"Command: `{doc['command']}`" in text
    quality = json.loads((tmp_path / "results" / "quality.json").read_text())["data"]["rows"]
    assert [r["recipe"] for r in quality] == list(settings.presets)
    assert quality[0]["psnr"] is None and all(r["psnr"] > 10 for r in quality[1:])  # FP vs itself: ∞ → null
    assert any(line.startswith("[quality 2/") for line in lines)  # progress
    assert "## 4. Quality vs size" in text and "Pareto-optimal on PSNR" in text
    # a rerun of one part reuses the other documents and reassembles
    before = (tmp_path / "results" / "act.json").read_text()
    run("report", settings, docs_dir=tmp_path, say=lines.append)
    assert (tmp_path / "results" / "act.json").read_text() == before


def test_a_part_measured_on_other_weights_is_marked_earlier(tmp_path):
    """Retraining the model leaves old part documents in docs/results/: their captions and the status table say so."""
    from ditlab.results import common
    from ditlab.testing import tiny_dit_pipeline

    folder = tiny_dit_pipeline(tmp_path / "m", seed=0)
    doc = {"model": common.model_provenance(str(folder)), "command": "x", "machine": machine_info(), "date": now_utc(), "seconds": 1.0}
    assert doc["model"]["weights"] and common.measured_on_current_model(doc) is True
    assert "earlier model" not in common.caption(doc)
    tiny_dit_pipeline(folder, seed=1)  # new weights in the same folder
    common._current_provenance.cache_clear()
    assert common.measured_on_current_model(doc) is False and "earlier model" in common.caption(doc)
    assert common.measured_on_current_model({"model": {"source": str(folder)}}) is None  # nothing recorded: cannot tell
