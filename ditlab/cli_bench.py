"""The ``bench`` and ``kernels`` subcommands of ``python -m ditlab``: benchmarks that print markdown tables (the results
parts regenerate docs/RESULTS.md) and the Triton kernels' self-check. Registered in ``cli.COMMANDS``."""

from __future__ import annotations

import dataclasses
import json
import sys

from .errors import DitlabError


def add_bench(sub) -> None:
    from .bench import BENCHMARKS
    from .results import PARTS
    from .results.cli import add_arguments

    p = sub.add_parser("bench", help="run a benchmark and print a markdown table; `bench all` regenerates docs/RESULTS.md",
                       description="`bench sampling` takes --model, --steps, --guidance and --out; `bench kernels` takes --kernel-m, "
                                   "--kernel-repeats and --out; the results parts take the options below except --out. An option "
                                   "a part does not use is refused, naming the parts that use it.")
    p.add_argument("part", choices=sorted([*BENCHMARKS, "kernels", *PARTS]), help="what to measure (all/quality/claims/…: docs/RESULTS.md parts)")
    p.add_argument("--out", default=None, help="sampling and kernels only: also append the table to this markdown file")
    add_arguments(p)


# The options each non-results part honours (`bench sampling --model M --steps S --guidance G`, `bench kernels
# --kernel-m --kernel-repeats`); every other option given to them is refused by name instead of silently ignored.
BENCH_OPTIONS = {"sampling": ("model", "steps", "guidance", "out"), "kernels": ("kernel_m", "kernel_repeats", "out")}


def _given_bench_options(args) -> list[str]:
    """The ``bench`` options given on the command line (as settings field names), in the parser's order."""
    from .results.common import ResultsSettings

    names = [f.name for f in dataclasses.fields(ResultsSettings)] + ["docs", "resume", "out"]
    flags = ("full", "resume")  # store_true: False when not given; every other option defaults to None
    return [n for n in names if getattr(args, n, None) is not None and not (n in flags and getattr(args, n) is False)]


def _parts_using(name: str) -> str:
    """'quality, vq, mixed, all, claims' — the bench parts that use the option of field ``name`` (for refusal messages)."""
    from .results.common import PART_FIELDS

    if name in ("docs", "full"):
        return "the results parts (all, claims, quality, act, vq, mixed, speed, pareto, report)"
    if name == "resume":
        return "quality, all"
    parts = [part for part, fields in PART_FIELDS.items() if name in fields]
    groups = {"all": tuple(PART_FIELDS), "claims": ("act", "vq", "mixed")}
    parts += [group for group, members in groups.items() if any(name in PART_FIELDS[m] for m in members)]
    parts += [part for part, fields in BENCH_OPTIONS.items() if name in fields]
    return ", ".join(parts)


def _check_bench_options(args) -> None:
    """ConfigError naming the first option given that ``args.part`` does not use (sampling, kernels: only theirs;
    the results parts: everything but --out)."""
    from .errors import ConfigError
    from .results.common import option

    allowed = BENCH_OPTIONS.get(args.part)
    for name in _given_bench_options(args):
        if (allowed is not None and name not in allowed) or (allowed is None and name == "out"):
            raise ConfigError(f"{option(name)} is not used by `bench {args.part}`; it is used by: {_parts_using(name)}", field=option(name))


def _repo_script(relative: str):
    """Imports a script of the repository (benchmarks/…) by path: they are not part of the installed package."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / relative
    if not path.is_file():
        raise DitlabError(f"{relative} not found: run from a ditlab checkout")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _append_table(out: str | None, table: str) -> None:
    """Appends ``table`` to the markdown file ``out`` (``bench --out``), if given."""
    if out:
        with open(out, "a") as f:
            f.write(table + "\n")


def _bench_kernels(args) -> int:
    """``bench kernels``: benchmarks/bench_kernels.py with --kernel-m/--kernel-repeats, its tables printed (and appended to --out)."""
    import contextlib
    import io

    from .results.common import ResultsSettings

    d = ResultsSettings()
    argv = ["--m", str(args.kernel_m or d.kernel_m), "--repeats", str(args.kernel_repeats or d.kernel_repeats)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = _repo_script("benchmarks/bench_kernels.py").main(argv)
    print(buffer.getvalue(), end="")
    _append_table(args.out, buffer.getvalue())
    return code


def _bench_sampling(args) -> int:
    """``bench sampling``: fp32 vs bf16 sampling time with --model/--steps/--guidance (defaults: bench_sampling's)."""
    from .bench import bench_sampling, markdown_table

    given = {k: v for k, v in (("model", args.model), ("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    kwargs = {("source" if k == "model" else k): v for k, v in given.items()}
    flags = "".join(f" --{k} {v}" for k, v in given.items())
    table = markdown_table(bench_sampling(**kwargs), "python -m ditlab bench sampling" + flags)
    print(table)
    _append_table(args.out, table)
    return 0


def cmd_bench(args) -> int:
    from .cli_args import writable_file
    from .results import PARTS

    _check_bench_options(args)
    if args.out is not None:
        writable_file(args.out, "--out")
    if args.part in PARTS:
        from .results.cli import main

        return main(args)
    if args.part == "kernels":
        return _bench_kernels(args)
    return _bench_sampling(args)


def add_kernels(sub) -> None:
    p = sub.add_parser("kernels", help="self-test of the Triton kernels (interpreter vs torch twins, AOT compile for sm_80/sm_90)")
    p.add_argument("--check", action="store_true", required=True, help="run the checks and print a table; exit 1 on any failure")
    p.add_argument("--no-aot", action="store_true", help="skip the ahead-of-time compilation for sm_80/sm_90")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def cmd_kernels(args) -> int:
    try:
        from kernels.selfcheck import failed, format_table, run_checks
    except ImportError as exc:
        raise DitlabError(f"the kernels package is not importable ({exc}); run from a ditlab checkout with triton installed") from None
    rows = run_checks(aot=not args.no_aot)
    print(json.dumps(rows) if args.json else format_table(rows))
    bad = failed(rows)
    if bad:
        print(f"ditlab kernels: {len(bad)} of {len(rows)} checks failed", file=sys.stderr)
    return 1 if bad else 0
