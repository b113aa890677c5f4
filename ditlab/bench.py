"""Benchmarks that print markdown tables (``python -m ditlab bench <part>``); never used as timed assertions.

Each benchmark returns rows (list of dicts); ``markdown_table`` renders them with the machine and the command,
so a table pasted into docs/ always says where and how it was measured.
"""

from __future__ import annotations

import copy
import datetime
import statistics
import time

import torch


def machine() -> str:
    """'CPU model, N cores, T torch threads, GPU, torch version' for table captions (the results documents' line)."""
    from .results.provenance import machine_info, machine_line

    return machine_line(machine_info())


def markdown_table(rows: list[dict], command: str) -> str:
    """A markdown table of ``rows`` (same keys) preceded by the command, the machine and the date."""
    if not rows:
        return f"`{command}`: no rows\n"
    keys = list(rows[0])
    head = "| " + " | ".join(keys) + " |\n|" + "|".join("---:" if isinstance(rows[0][k], (int, float)) else "---" for k in keys) + "|\n"
    body = "".join("| " + " | ".join(_fmt(r[k]) for k in keys) + " |\n" for r in rows)
    return f"Command: `{command}` — {machine()} — {datetime.date.today().isoformat()}\n\n{head}{body}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _to_bf16(model):
    """A bf16 copy of ``model`` without diffusers' warning about modules kept in float32 (DiT lists none: ``[]``)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return copy.deepcopy(model).to(torch.bfloat16)
    finally:
        diffusers_logging.set_verbosity(level)


def bench_sampling(source: str = "shipped", n_images: int = 16, steps: int = 25, guidance: float = 4.0, repeats: int = 3) -> list[dict]:
    """Seconds to sample ``n_images`` at ``steps`` steps with CFG (one batch) for the fp32 and bf16 transformer."""
    from . import api

    pipe = api.load(source)
    labels = [i % max(1, pipe.num_classes) for i in range(n_images)]
    rows = []
    variants = {"fp32": pipe.transformer, "bf16": _to_bf16(pipe.transformer)}
    for name, model in variants.items():
        api.generate(pipe, labels[:2], steps=2, guidance=guidance, transformer=model, progress=False)  # warm-up
        times = _timed(lambda: api.generate(pipe, labels, steps=steps, guidance=guidance, transformer=model, progress=False), repeats)
        median = statistics.median(times)
        rows.append({"model": name, "images": n_images, "steps": steps, "cfg": guidance, "median s": median, "min s": min(times),
                     "images/s": n_images / median, "goal (< 10 s)": "met" if median < 10 else "missed"})
    return rows


BENCHMARKS = {"sampling": bench_sampling}
