"""argparse value types shared by the ``python -m ditlab`` commands (``cli.py``, ``cli_analysis.py``).

Each raises ``argparse.ArgumentTypeError`` with a message naming the value, which ``cli._Parser`` prints as one line.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """A non-empty comma-separated list of integers, e.g. ``2,4,8``."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 2,4,8") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value, e.g. 2,4,8")
    return values
