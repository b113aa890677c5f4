"""Arguments of ``python -m ditlab bench {all,quality,claims,act,vq,mixed,speed,pareto,report}`` (wired by ditlab/cli.py)."""

from __future__ import annotations

import dataclasses
import json
import sys

from ..sampling import SCHEDULERS
from .common import ResultsSettings, full_settings


def _floats(text: str) -> tuple:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p) -> None:
    """The results options (defaults = the documented default run; --full = the heavier one)."""
    d = ResultsSettings()
    g = p.add_argument_group("results parts (all, quality, claims, act, vq, mixed, speed, pareto, report)")
    g.add_argument("--full", action="store_true", help="heavier settings: 500 images, 10 random allocations, 6 measured Pareto points")
    g.add_argument("--model", default=None, help=f"model (default {d.model})")
    g.add_argument("--n-per-label", type=int, default=None, help=f"images per class (default {d.n_per_label}; --full 50)")
    g.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {d.steps})")
    g.add_argument("--guidance", type=float, default=None, help=f"CFG scale (default {d.guidance:g})")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None, help=f"sampler (default {d.scheduler})")
    g.add_argument("--presets", type=_names, default=None, help="comma-separated presets (default: all)")
    g.add_argument("--calib-samples", type=int, default=None)
    g.add_argument("--calib-steps", type=int, default=None)
    g.add_argument("--vq-params", type=json.loads, default=None, help='JSON merged into vq4dit params, e.g. \'{"iterations": 2}\'')
    g.add_argument("--act-steps", type=int, default=None)
    g.add_argument("--sens-images", type=int, default=None)
    g.add_argument("--sens-steps", type=int, default=None)
    g.add_argument("--sens-groups", type=int, default=None)
    g.add_argument("--budget-bits", type=float, default=None)
    g.add_argument("--n-random", type=int, default=None)
    g.add_argument("--pareto-measure", type=_floats, default=None, help="allocation budgets measured for the Pareto plot, e.g. 3,7")
    g.add_argument("--kernel-m", type=int, default=None)
    g.add_argument("--kernel-repeats", type=int, default=None)
    g.add_argument("--no-xl", dest="xl", action="store_false", default=None, help="skip the DiT-XL/2 measurements (per-method block times and benchmarks/bench_dit_xl.py)")
    g.add_argument("--xl-args", type=lambda s: tuple(s.split()), default=None, help="arguments passed to benchmarks/bench_dit_xl.py")
    g.add_argument("--docs", default=None, help="output folder of RESULTS.md, results/ and figures/ (default: the checkout's docs/)")
    g.add_argument("--resume", action="store_true", help="keep quality rows of an interrupted run with the same settings")


def settings_from_args(args) -> ResultsSettings:
    s = full_settings(ResultsSettings()) if args.full else ResultsSettings()
    changes = {}
    for f in dataclasses.fields(ResultsSettings):
        v = getattr(args, f.name, None)
        if f.name == "full" or v is None:
            continue
        changes[f.name] = tuple(sorted(v.items())) if f.name == "vq_params" else v
    return dataclasses.replace(s, **changes)


def main(args) -> int:
    from . import run

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    path = run(args.part, settings_from_args(args), docs_dir=args.docs, say=say, resume=args.resume)
    print(path)
    return 0
