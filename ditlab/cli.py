"""The ``python -m ditlab`` command line: thin argument parsing over ``ditlab.api``.

Every command prints either a table/JSON on stdout or one clear line on stderr with exit code 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import DitlabError


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one line (no usage dump) on a bad argument."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"ditlab {self.prog.split()[-1]}: error: {message}\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="generate Shapes-10 and train the shipped tiny DiT and classifier")
    p.add_argument("--out", default="assets", help="folder that receives tiny-dit/ and classifier/ (default: assets)")
    p.add_argument("--steps", type=int, default=None, help="DiT optimisation steps (default 4000)")
    p.add_argument("--only", choices=["all", "classifier"], default="all", help="train both, or only the classifier")


def _cmd_train(args) -> int:
    from dataclasses import replace

    from .train import TrainConfig, train_all

    cfg = TrainConfig() if args.steps is None else replace(TrainConfig(), steps=args.steps)
    command = "python -m ditlab train " + " ".join(sys.argv[2:])
    print(json.dumps(train_all(args.out, cfg, command=command.strip(), only=args.only), indent=2))
    return 0


COMMANDS = {"train": (_add_train, _cmd_train)}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ditlab", description="ditlab: post-training quantization lab for Diffusion Transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        return COMMANDS[args.command][1](args)
    except DitlabError as exc:
        print(f"ditlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
