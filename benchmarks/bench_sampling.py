"""Time to sample 16 images at 25 steps (CFG) with the shipped tiny DiT, fp32 vs bf16. Prints a markdown table.

    python benchmarks/bench_sampling.py [--model M] [--steps S] [--guidance G] [--out FILE.md]

Same as `python -m ditlab bench sampling` with the same options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    """Parses the options (``--help`` prints them and exits) and runs ``python -m ditlab bench sampling``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: the shipped tiny DiT)")
    parser.add_argument("--steps", default=None, help="sampling steps (default 25)")
    parser.add_argument("--guidance", default=None, help="CFG scale (default 4)")
    parser.add_argument("--out", default=None, help="also append the table to this markdown file")
    args = parser.parse_args(argv)
    from ditlab.cli import main as ditlab_main

    flags = [x for name in ("model", "steps", "guidance", "out") if getattr(args, name) is not None for x in (f"--{name}", getattr(args, name))]
    return ditlab_main(["bench", "sampling", *flags])


if __name__ == "__main__":
    sys.exit(main())
