"""Arguments of ``python -m ditlab bench {all,quality,claims,act,vq,mixed,speed,pareto,report}`` (wired by ditlab/cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from ..cli_args import guidance_scale, positive_int, seed
from ..sampling import SCHEDULERS
from .common import ResultsSettings, full_settings


def _floats(text: str) -> tuple:
    """A non-empty comma-separated list of finite numbers, e.g. ``3,7``."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 3,7") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give finite numbers, e.g. 3,7")
    return values


def _names(text: str) -> tuple:
    """A non-empty comma-separated list of names, e.g. ``fp,w8a8-rtn``."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one preset name, e.g. fp,w8a8-rtn")
    return names


def _json_object(text: str) -> dict:
    """A JSON object, e.g. ``{"iterations": 2}``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'{text!r} is not a JSON object; give one like \'{{"iterations": 2}}\'')
    return value


def add_arguments(p) -> None:
    """The results options (defaults = the documented default run; --full = the heavier one)."""
    d = ResultsSettings()
    g = p.add_argument_group("results parts (all, quality, claims, act, vq, mixed, speed, pareto, report)")
    g.add_argument("--full", action="store_true", help="heavier settings: 500 images, 10 random allocations, 6 measured Pareto points")
    g.add_argument("--model", default=None, help=f"model (default {d.model})")
    g.add_argument("--n-per-label", type=positive_int, default=None, help=f"images per class (default {d.n_per_label}; --full 50)")
    g.add_argument("--steps", type=positive_int, default=None, help=f"sampling steps (default {d.steps})")
    g.add_argument("--guidance", type=guidance_scale, default=None, help=f"CFG scale (default {d.guidance:g})")
    g.add_argument("--seed", type=seed, default=None, help=f"seed of the initial noise (default {d.seed})")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None, help=f"sampler (default {d.scheduler})")
    g.add_argument("--presets", type=_names, default=None, help="comma-separated presets (default: all)")
    g.add_argument("--calib-samples", type=positive_int, default=None, help=f"calibration images (default {d.calib_samples})")
    g.add_argument("--calib-steps", type=positive_int, default=None, help=f"calibration sampler steps (default {d.calib_steps})")
    g.add_argument("--vq-params", type=_json_object, default=None, help='JSON merged into vq4dit params, e.g. \'{"iterations": 2}\'')
    g.add_argument("--act-steps", type=positive_int, default=None, help=f"act: sampler steps of the held-out activations (default {d.act_steps})")
    g.add_argument("--sens-images", type=positive_int, default=None, help=f"mixed: sensitivity images (default {d.sens_images})")
    g.add_argument("--sens-steps", type=positive_int, default=None, help=f"mixed: sensitivity sampler steps (default {d.sens_steps})")
    g.add_argument("--sens-groups", type=positive_int, default=None, help=f"mixed: sensitivity timestep groups (default {d.sens_groups})")
    g.add_argument("--budget-bits", type=float, default=None, help=f"mixed: average weight bits of the allocation (default {d.budget_bits:g})")
    g.add_argument("--n-random", type=positive_int, default=None, help=f"mixed: random allocations compared (default {d.n_random}; --full 10)")
    g.add_argument("--pareto-measure", type=_floats, default=None, help="allocation budgets measured for the Pareto plot, e.g. 3,7")
    g.add_argument("--kernel-m", type=positive_int, default=None, help=f"speed, kernels: GEMM rows (default {d.kernel_m})")
    g.add_argument("--kernel-repeats", type=positive_int, default=None, help=f"speed, kernels: timing repeats (default {d.kernel_repeats})")
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
    from ..cli_args import writable_folder
    from . import REPO, run

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    docs = writable_folder(args.docs if args.docs is not None else str(REPO / "docs"), "--docs")
    writable_folder(str(docs / "results"), "--docs")  # where the part documents go
    path = run(args.part, settings_from_args(args), docs_dir=args.docs, say=say, resume=args.resume)
    print(path)
    return 0
