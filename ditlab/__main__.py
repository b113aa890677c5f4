"""Command line: ``python -m ditlab <command> …`` (see ``cli.py``)."""

from .cli import main

raise SystemExit(main())
