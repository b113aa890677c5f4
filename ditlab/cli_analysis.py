"""The analysis commands of ``python -m ditlab``: ``outliers``, ``sensitivity`` and ``allocate``.

Thin argument parsing over ``outliers.cli_outliers``, ``sensitivity.cli_sensitivity`` and
``allocation.cli_allocate``; each prints a table (or one JSON object with ``--json``) on stdout.
"""

from __future__ import annotations

import sys

from .cli_args import check_recipe, int_list, positive_int, refuse_qdir, writable_file, writable_folder
from .errors import ConfigError

FP_HINT = "pass the FP model it was quantized from (e.g. --model shipped)"


def _common(p) -> None:
    p.add_argument("--model", default="shipped", help="pipeline folder or hub id (default: the shipped tiny DiT)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


# The --metric values are checked by the library before any work (outliers.check_map_metric,
# sensitivity.TABLE_METRICS, allocation.check_metric), not by argparse choices: importing those modules to build the parser would add their
# start-up (pandas, scipy) to every command. tests/test_cli.py keeps the help texts' lists equal to the tuples.


def add_outliers(sub) -> None:
    p = sub.add_parser("outliers", help="activation outliers: the model-wide layers × timesteps map, or one layer before/after each transform")
    _common(p)
    p.add_argument("--layer", default=None, help="a linear layer name (see `info`); without it, the model-wide map")
    p.add_argument("--timestep", type=int, default=None, help="with --layer: diffusion timestep of the layer view (default: the first calibrated one)")
    p.add_argument("--branch", choices=("cond", "uncond", "all"), default="cond", help="CFG branch, or all = both pooled (default cond)")
    p.add_argument("--metric", default=None, help="without --layer: metric of the model-wide map: max_median (default), absmax or token_p100_p50")
    p.add_argument("--n-samples", type=positive_int, default=8, help="calibration images (default 8; cached)")
    p.add_argument("--steps", type=positive_int, default=10, help="calibration sampler steps (default 10)")


def cmd_outliers(args) -> int:
    from .outliers import cli_outliers

    refuse_qdir(args.model, FP_HINT + "; outliers measures the FP activations every method starts from")
    _check_outlier_view(args)
    print(cli_outliers(args.model, args.layer, args.timestep, args.branch, n_samples=args.n_samples, steps=args.steps,
                       metric=args.metric or "max_median", as_json=args.json, progress=sys.stderr.isatty()))
    return 0


def _check_outlier_view(args) -> None:
    """--timestep belongs to the layer view (--layer), --metric to the model-wide map: refused by name where unused."""
    if args.layer is None and args.timestep is not None:
        raise ConfigError(f"--timestep {args.timestep} is used only by the layer view; add --layer NAME (or omit --timestep for the map)", field="--timestep")
    if args.layer is not None and args.metric is not None:
        raise ConfigError(f"--metric {args.metric} is used only by the model-wide map; omit --layer for the map (the layer view shows every metric)", field="--metric")


def _cost_args(p) -> None:
    p.add_argument("--setting", default="w4a8-rtn", help="the quantization setting measured: a preset or recipe JSON (default w4a8-rtn)")
    p.add_argument("--n-images", type=positive_int, default=10, help="images per measurement (default 10)")
    p.add_argument("--steps", type=positive_int, default=10, help="sampler steps (default 10)")
    p.add_argument("--groups", type=positive_int, default=4, help="timestep groups (default 4)")
    p.add_argument("--cache-dir", default=None, help="sensitivity cache folder (default: the ditlab cache)")


def add_sensitivity(sub) -> None:
    p = sub.add_parser("sensitivity", help="layer × timestep-group sensitivity (quality SQNR and content scores), cached and incremental")
    _common(p)
    _cost_args(p)
    p.add_argument("--unit", choices=("layer", "group"), default="layer", help="quantize one layer, or one block group (attention / feed-forward / adaLN)")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: every quantized linear)")
    p.add_argument("--metric", default="sqnr_db", help="column of the table: sqnr_db, ssim, psnr, agreement, class_acc (default sqnr_db)")


def _check_cost_args(args) -> None:
    """--model not a QDIR and --cache-dir writable, before any sensitivity measurement."""
    refuse_qdir(args.model, FP_HINT + " and the quantization to measure as --setting (a preset or recipe JSON)")
    check_recipe(args.setting, "--setting")
    if args.groups > args.steps:
        raise ConfigError.invalid("--groups", args.groups, f"at most --steps ({args.steps}): each timestep group needs at least one step")
    if args.cache_dir is not None:
        writable_folder(args.cache_dir, "--cache-dir")


def _layer_names(text: str | None) -> list[str] | None:
    """--layers as a list of names (None: every layer); an empty list (e.g. ``--layers ,``) is refused by name."""
    if text is None:
        return None
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise ConfigError.invalid("--layers", text, "comma-separated layer or unit names (see `python -m ditlab info`), or omit it for every layer")
    return names


def cmd_sensitivity(args) -> int:
    from .sensitivity import cli_sensitivity

    _check_cost_args(args)
    layers = _layer_names(args.layers)
    print(cli_sensitivity(args.model, args.setting, n_images=args.n_images, steps=args.steps, groups=args.groups, unit=args.unit,
                          layers=layers, metric=args.metric, as_json=args.json, cache_dir=args.cache_dir, progress=sys.stderr.isatty()))
    return 0


def add_allocate(sub) -> None:
    p = sub.add_parser("allocate", help="mixed-precision bits per layer from measured sensitivity under an average-bits budget (scipy milp)")
    _common(p)
    _cost_args(p)
    p.add_argument("--budget-bits", type=float, required=True, help="average weight bits over the quantized linears, e.g. 5")
    p.add_argument("--w-bits", type=int_list, default=(2, 4, 8), help="candidate weight bits (default 2,4,8)")
    p.add_argument("--a-bits", type=int_list, default=(8,), help="candidate activation bits (default 8)")
    p.add_argument("--split", type=float, default=1.0, help="MixDQ budget split between quality and content layers (default 1.0)")
    p.add_argument("--metric", default="decoupled", help="damage per cell: decoupled (default; MixDQ's metric-decoupled scores), sqnr, ssim or agreement")
    p.add_argument("--out", default=None, help="write the allocated recipe JSON here (load it with --recipe FILE.json)")


def cmd_allocate(args) -> int:
    from .allocation import cli_allocate

    _check_cost_args(args)
    if args.out is not None:
        writable_file(args.out, "--out", (".json",))

    print(cli_allocate(args.model, args.budget_bits, setting=args.setting, w_bits=args.w_bits, a_bits=args.a_bits, split=args.split,
                       metric=args.metric, n_images=args.n_images, steps=args.steps, groups=args.groups, out=args.out,
                       as_json=args.json, cache_dir=args.cache_dir, progress=sys.stderr.isatty()))
    return 0
