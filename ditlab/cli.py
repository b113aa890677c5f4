"""The ``python -m ditlab`` command line: thin argument parsing over ``ditlab.api``.

Every command prints either a table/JSON on stdout or one clear line on stderr with exit code 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import cli_analysis, cli_bench
from .cli_args import MAX_N_PER_LABEL, guidance_scale, n_per_label as _n_per_label, positive_int as _positive_int, seed as _seed
from .errors import DitlabError


def _json(obj) -> str:
    """Strict JSON: non-finite floats (e.g. the PSNR of identical images) become null."""
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, default=str)


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one line (no usage dump) on a bad argument, prefixed with the command
    ("ditlab: error: …" at the top, "ditlab sample: error: …" for a subcommand)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{command_name(self.prog)}: error: {message}\n")


def command_name(prog: str) -> str:
    """'ditlab sample' from argparse's prog 'python -m ditlab sample' (what the error lines start with)."""
    words = prog.split()
    return " ".join(words[words.index("ditlab"):]) if "ditlab" in words else "ditlab " + words[-1]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="generate Shapes-10 and train the shipped tiny DiT and classifier")
    p.add_argument("--out", default="assets", help="folder that receives tiny-dit/ and classifier/ (default: assets)")
    p.add_argument("--steps", type=_positive_int, default=None, help="DiT optimisation steps (default 7500)")
    p.add_argument("--init", choices=["diffusers", "adaln-zero"], default="adaln-zero",
                   help="DiT weight init: DiT's adaLN-Zero reference init (default; what the shipped model used) or diffusers' defaults")
    from .train import LOSS_WEIGHTINGS

    p.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default=None,
                   help="per-timestep loss weight: plain v-MSE, Min-SNR-5, or v-MSE with only the low-noise steps capped (default: the TrainConfig default)")
    p.add_argument("--only", choices=["all", "classifier", "dit"], default="all",
                   help="train both (default), or only one of them (the other must already exist in --out)")


def _cmd_train(args) -> int:
    from dataclasses import replace

    from .cli_args import writable_folder
    from .train import TrainConfig, check_outputs, train_all

    check_outputs(args.out, args.only)  # before minutes of data generation and training
    writable_folder(args.out, "--out")
    cfg = replace(TrainConfig(), init=args.init, **({} if args.steps is None else {"steps": args.steps}),
                  **({} if args.loss_weighting is None else {"loss_weighting": args.loss_weighting}))
    command = (f"python -m ditlab train --out {args.out}" + (f" --steps {args.steps}" if args.steps else "")
               + (f" --loss-weighting {args.loss_weighting}" if args.loss_weighting else "")
               + (f" --init {args.init}" if args.init != "adaln-zero" else "") + (f" --only {args.only}" if args.only != "all" else ""))
    print(json.dumps(train_all(args.out, cfg, command=command, only=args.only), indent=2))
    return 0


def _label_list(text: str) -> list[int]:
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of class ids, e.g. 0,1,2") from None
    if not labels:
        raise argparse.ArgumentTypeError("give at least one class id, e.g. 0,1,2")
    return labels


def _add_sampling_args(p, *, labels: bool, n_per_label: int) -> None:
    p.add_argument("--model", default="shipped", help="pipeline folder, QDIR or hub id (default: the shipped tiny DiT)")
    if labels:
        p.add_argument("--labels", type=_label_list, default=None, help="comma-separated class ids (default: every class)")
    p.add_argument("--n-per-label", type=_n_per_label, default=n_per_label, help=f"images per label, 1 to {MAX_N_PER_LABEL} (default {n_per_label})")
    p.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default 25)")
    p.add_argument("--cfg", type=guidance_scale, default=None, help="classifier-free guidance scale, 0 to 50 (1 = off; default 4)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise (default 0)")
    from .sampling import DEFAULT_SCHEDULER, SCHEDULERS

    p.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER, help=f"sampler (default {DEFAULT_SCHEDULER})")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a model's configuration and its quantizable linear layers")
    p.add_argument("--model", default="shipped", help="pipeline folder or hub id (default: the shipped tiny DiT)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _cmd_info(args) -> int:
    from . import api

    info = api.model_info(api.load(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    head = {k: v for k, v in info.items() if k not in ("layers", "labels")}
    for key, value in head.items():
        print(f"{key:>14}: {value}")
    print(f"\n{'name':<52} {'kind':<9} {'shape':>12} {'params':>10}")
    for layer in info["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        print(f"{layer['name']:<52} {layer['kind']:<9} {shape:>12} {layer['params']:>10}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate a grid of images (one row per label)")
    _add_sampling_args(p, labels=True, n_per_label=8)
    p.add_argument("--recipe", default="fp", help="quantize first: a preset name or a recipe JSON file (default fp)")
    p.add_argument("--out", default="grid.png", help=f"output image path, {' or '.join(IMAGE_SUFFIXES)} (default grid.png)")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _qdir_recipe(pipe, recipe: str):
    """The Recipe a QDIR was quantized with (None for an FP model); a QDIR with a --recipe other than fp is refused."""
    stored = getattr(pipe.transformer, "ditlab_recipe", None)
    if stored is not None and recipe != "fp":
        raise DitlabError(f"--recipe {recipe!r}: --model is already quantized (a QDIR); omit --recipe")
    return stored


def _checked_labels(pipe, labels: list[int] | None) -> list[int]:
    """``labels`` (default: every class), each a class id of ``pipe``; otherwise a ConfigError naming --labels that
    lists each bad id once (before any quantizing or sampling)."""
    from .errors import ConfigError

    if labels is None:
        return list(range(pipe.num_classes))
    bad = sorted({y for y in labels if not 0 <= y < pipe.num_classes})
    if bad:
        shown = bad[0] if len(bad) == 1 else bad
        raise ConfigError.invalid("--labels", shown, f"class ids from 0 to {pipe.num_classes - 1}" if pipe.num_classes else "none (the model is not class-conditional)")
    return labels


def _cmd_sample(args) -> int:
    from . import api, backends
    from .cli_args import check_recipe, writable_file

    writable_file(args.out, "--out", IMAGE_SUFFIXES)  # before loading, quantizing and sampling
    check_recipe(args.recipe)
    pipe = api.load(args.model)
    stored = _qdir_recipe(pipe, args.recipe)
    labels = _checked_labels(pipe, args.labels)
    if args.recipe != "fp":
        pipe = api.quantize(pipe, args.recipe, progress=sys.stderr.isatty()).pipe
    result = api.generate(pipe, [y for y in labels for _ in range(args.n_per_label)], steps=args.steps, seed=args.seed, scheduler=args.scheduler,
                          guidance=api.DEFAULT_GUIDANCE if args.cfg is None else args.cfg, progress=sys.stderr.isatty())
    path = api.save_grid(result.images, args.out, rows=len(labels))
    print(json.dumps({"out": str(path), "recipe": stored.name if stored is not None else args.recipe, "backend": backends.current(),
                      "n_images": len(result.images), "seconds_sample": round(result.seconds, 3)}))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score generated images with the shipped classifier (JSON on stdout)")
    _add_sampling_args(p, labels=False, n_per_label=10)
    p.add_argument("--recipe", default="fp", help="quantization recipe: a preset name or a recipe JSON file (default fp)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output)")


def _load_fp_source(qdir: str):
    """The FP pipeline a QDIR was quantized from (``qdir.fp_source``); a ModelLoadError saying it is the recorded source."""
    from . import api
    from .errors import ModelLoadError
    from .qdir import fp_source

    source = fp_source(qdir)
    try:
        return api.load(source)
    except ModelLoadError as exc:
        raise ModelLoadError(f"--model {qdir}: the FP source recorded in the QDIR ({source}) cannot be loaded: {exc}") from None


def _cmd_eval(args) -> int:
    from . import api
    from .cli_args import check_recipe
    from .evaluation import SampleSettings

    check_recipe(args.recipe)  # before loading the model
    settings = SampleSettings(n_per_label=args.n_per_label, steps=args.steps, seed=args.seed, scheduler=args.scheduler,
                              guidance=api.DEFAULT_GUIDANCE if args.cfg is None else args.cfg)
    pipe = api.load(args.model)
    quantized = None
    stored = _qdir_recipe(pipe, args.recipe)
    if stored is not None:  # a QDIR: compare with the FP model it came from
        quantized = api.Quantized(pipe=pipe, recipe=stored, report=None, seconds_quantize=0.0)
        pipe = _load_fp_source(args.model)
    result = api.evaluate(pipe, quantized.recipe if quantized else args.recipe, settings=settings, progress=sys.stderr.isatty(), quantized=quantized)
    if quantized is not None:  # the model evaluated is the QDIR; its FP source is the reference
        result = {**result, "model": str(args.model), "fp_model": pipe.source}
    print(_json(result))
    return 0


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a recipe and write a standalone QDIR")
    p.add_argument("--model", default="shipped", help="pipeline folder or hub id (default: the shipped tiny DiT)")
    p.add_argument("--recipe", required=True, help="a preset name or a recipe JSON file")
    p.add_argument("--out", required=True, help="output folder (QDIR); written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing QDIR at --out")


def _cmd_quantize(args) -> int:
    from . import api
    from .cli_args import check_recipe

    check_recipe(args.recipe)  # before loading the model
    if not str(args.out).strip():
        from .errors import ConfigError

        raise ConfigError.invalid("--out", args.out, "a folder path for the QDIR (not empty)")

    pipe = api.load(args.model)
    quantized = api.quantize(pipe, args.recipe, progress=sys.stderr.isatty())
    path = api.save(quantized, pipe, args.out, overwrite=args.overwrite)
    packed, fp16 = api.weight_bytes(quantized.pipe)
    print(json.dumps({"out": str(path), "recipe": quantized.recipe.name, "weight_bytes": packed, "weight_bytes_fp16": fp16,
                      "seconds_calibrate": round(quantized.seconds_calibrate, 3), "seconds_quantize": round(quantized.seconds_quantize, 3)}))
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="collect (and cache) per-layer activation statistics")
    p.add_argument("--model", default="shipped", help="pipeline folder or hub id (default: the shipped tiny DiT)")
    p.add_argument("--n-samples", type=_positive_int, default=8, help="images sampled for calibration (default 8)")
    p.add_argument("--steps", type=_positive_int, default=10, help="sampler steps (default 10)")


def _cmd_calibrate(args) -> int:
    from . import api
    from .cli_args import refuse_qdir

    refuse_qdir(args.model, "pass the FP model it was quantized from (e.g. --model shipped); quantize calibrates it when a recipe needs statistics")

    stats = api.calibrate(api.load(args.model), n_samples=args.n_samples, steps=args.steps, progress=sys.stderr.isatty())
    print(json.dumps({"layers": len(stats), "timesteps": stats.timesteps, "settings": stats.settings}, default=str))
    return 0


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "kernels": (cli_bench.add_kernels, cli_bench.cmd_kernels),
    "bench": (cli_bench.add_bench, cli_bench.cmd_bench),
    "info": (_add_info, _cmd_info),
    "sample": (_add_sample, _cmd_sample),
    "eval": (_add_eval, _cmd_eval),
    "quantize": (_add_quantize, _cmd_quantize),
    "calibrate": (_add_calibrate, _cmd_calibrate),
    "outliers": (cli_analysis.add_outliers, cli_analysis.cmd_outliers),
    "sensitivity": (cli_analysis.add_sensitivity, cli_analysis.cmd_sensitivity),
    "allocate": (cli_analysis.add_allocate, cli_analysis.cmd_allocate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ditlab", description="ditlab: post-training quantization lab for Diffusion Transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    for command in sub.choices.values():  # -v also after the subcommand (`ditlab info -v`)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    parser.subcommands = sub.choices
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; an unknown option is reported by its subcommand ("ditlab info: error: unrecognized
    arguments: --bogus"), not by the top-level parser."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _check_model_option(args) -> None:
    """An empty --model is refused (it used to load the shipped model silently; say `--model shipped` for that)."""
    from .errors import ConfigError

    model = getattr(args, "model", None)
    if model is not None and not str(model).strip():
        raise ConfigError.invalid("--model", model, "a pipeline folder, QDIR or hub id, or shipped (the default)")


def _quiet_broken_pipe() -> int:
    """Exit status after stdout's reader went away (e.g. `| head`): no traceback, and no second one at shutdown."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        _check_model_option(args)
        code = COMMANDS[args.command][1](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter shutdown
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except DitlabError as exc:
        print(f"ditlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
