"""``python -m ditlab bench all``: regenerate docs/RESULTS.md — quality of every preset, the seed papers' claims checked
(ViDiT-Q, HadaNorm, VQ4DiT, mixed precision), speed and memory, a quality–size Pareto plot.

One module per part; each measuring part writes one JSON document to ``docs/results/<part>.json`` (only when the part
completes; its progress after every row goes to ``<part>.partial.json``, which ``--resume`` reads), and ``report.assemble`` renders RESULTS.md and its PNGs from those documents alone, so a part can be rerun
without redoing the others (``bench report`` only reassembles).

    quality  every preset of ditlab.config.PRESETS on the shipped model       (quality.py)
    act      activation-quantization error per component and method       (act.py,    claim b)
    vq       VQ4DiT vs k-means vs RTN / GPTQ at 2 and 3 bits               (vq.py,     claim c)
    mixed    sensitivity → allocation vs uniform / random at one budget    (mixed.py,  claim d)
    speed    DiT-XL/2 quantize time + forward + memory, GEMM throughputs   (speed.py)
Claim (a) and the Pareto front (pareto.py) are computed from the quality / vq / mixed rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .common import REPO, ResultsSettings, Say, check_settings, full_settings, read_doc  # noqa: F401 - re-exported

log = logging.getLogger("ditlab.results")

MEASURED = ("quality", "act", "vq", "mixed", "speed")
GROUPS = {"all": MEASURED, "claims": ("act", "vq", "mixed"), "pareto": (), "report": ()}
PARTS = (*MEASURED, *GROUPS)  # what `python -m ditlab bench` accepts besides its older parts


def run(part: str, settings: ResultsSettings = ResultsSettings(), *, docs_dir: str | Path | None = None, say: Say | None = None,
        resume: bool = False) -> Path:
    """Runs ``part`` (a measured part or a group: all, claims, pareto, report) and reassembles RESULTS.md; returns its path.

    docs_dir: where RESULTS.md, results/*.json and figures/results_*.png go (default: the checkout's docs/).
    resume: keep the quality rows of an earlier run with identical settings (after an interruption).
    """
    from . import report

    say = say or log.info
    docs_dir = Path(docs_dir) if docs_dir is not None else REPO / "docs"
    results_dir = docs_dir / "results"
    todo = GROUPS.get(part, (part,))
    if part not in PARTS:
        from ..errors import ConfigError

        raise ConfigError.invalid("part", part, ", ".join(PARTS))
    check_settings(settings)  # every preset name and count before any measurement
    t_all = time.perf_counter()
    pipe = None
    for name in todo:
        t0 = time.perf_counter()
        if name != "speed" and pipe is None:
            from .. import api

            pipe = api.load(settings.model)
        say(f"== part {name} ==")
        _run_one(name, pipe, settings, results_dir, say, resume)
        path = report.assemble(docs_dir, results_dir)
        say(f"== part {name} done in {time.perf_counter() - t0:.0f} s; {path} reassembled ==")
    path = report.assemble(docs_dir, results_dir)
    say(f"done in {time.perf_counter() - t_all:.0f} s: {path}")
    return path


def _run_one(name: str, pipe, settings: ResultsSettings, results_dir: Path, say: Say, resume: bool) -> dict:
    from . import act, mixed, quality, speed, vq

    if name == "quality":
        return quality.run(pipe, settings, results_dir, say, resume=read_doc(results_dir, "quality", partial=True) if resume else None)
    if name == "act":
        return act.run(pipe, settings, results_dir, say)
    if name == "vq":
        return vq.run(pipe, settings, results_dir, say)
    if name == "mixed":
        return mixed.run(pipe, settings, results_dir, say)
    return speed.run(settings, results_dir, say)
