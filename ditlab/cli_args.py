"""argparse value types shared by the ``python -m ditlab`` commands (``cli.py``, ``cli_analysis.py``).

Each raises ``argparse.ArgumentTypeError`` with a message naming the value, which ``cli._Parser`` prints as one line.
"""

from __future__ import annotations

import argparse


def _parsed(text: str, convert, kind: str):
    """``convert(text)`` (int or float), or an ArgumentTypeError "'x' is not {kind}"."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    value = _parsed(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def guidance_scale(text: str) -> float:
    """A CFG scale from 0 to 50 (what the sampler accepts; 1 = no guidance)."""
    value = _parsed(text, float, "a number")
    if not 0.0 <= value <= 50.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a number from 0 to 50 (1 = no guidance)")
    return value


def seed(text: str) -> int:
    """A seed from 0 to ``sampling.MAX_SEED`` (2**32 - 1)."""
    from .sampling import MAX_SEED

    value = _parsed(text, int, "an integer")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not an integer from 0 to {MAX_SEED}")
    return value


MAX_N_PER_LABEL = 100  # sample/eval run every image in one batch (twice with CFG); the app caps a request at 64 images


def n_per_label(text: str) -> int:
    """An integer from 1 to MAX_N_PER_LABEL (images per label of ``sample`` and ``eval``)."""
    value = positive_int(text)
    if value > MAX_N_PER_LABEL:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_N_PER_LABEL} images per label (all are sampled in one batch)")
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


def _reason(exc: OSError) -> str:
    """'permission denied', 'no such file or directory', … (lower case, no errno number)."""
    import os

    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def writable_folder(path: str, option: str, shown: str | None = None) -> "Path":
    """``path`` as a folder that exists (created with its parents if missing) and accepts new files; otherwise a
    ConfigError naming ``option`` and ``shown`` (default ``path``). Called before long work, so an unwritable output
    fails in a second, not after it."""
    import tempfile
    from pathlib import Path

    from .errors import ConfigError

    folder = Path(str(path)).expanduser()
    if not str(path).strip():
        raise ConfigError.invalid(option, path, "a folder path (not empty)")
    if folder.exists() and not folder.is_dir():
        raise ConfigError.invalid(option, str(path), "a folder (this is a file)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError.invalid(option, shown or str(path), f"{'a file in ' if shown else ''}a writable folder (cannot write there: {_reason(exc)})") from None
    return folder


def writable_file(path: str, option: str, suffixes: tuple[str, ...] = ()) -> "Path":
    """``path`` as a file that can be written: not a folder, ending in one of ``suffixes`` (if given), in a folder
    that exists (created if missing) and accepts new files; otherwise a ConfigError naming ``option``."""
    from pathlib import Path

    from .errors import ConfigError

    what = f"a {' or '.join(suffixes)} file path" if suffixes else "a file path"
    if not str(path).strip():
        raise ConfigError.invalid(option, path, f"{what} (not empty)")
    file = Path(str(path)).expanduser()
    if file.is_dir():
        raise ConfigError.invalid(option, str(path), f"{what} (this is a folder)")
    if suffixes and file.suffix.lower() not in suffixes:
        raise ConfigError.invalid(option, str(path), what)
    writable_folder(str(file.parent), option, shown=str(path))
    return file


def refuse_qdir(model: str, hint: str) -> None:
    """ConfigError naming --model when ``model`` is a QDIR (a quantized folder): the analysis commands measure
    what quantizing an FP model does, so they need the FP model. ``hint`` says what to pass instead."""
    from .errors import ConfigError
    from .qdir import is_qdir

    if str(model).strip() and is_qdir(str(model).strip()):
        raise ConfigError.invalid("--model", model, f"a full-precision model, not a QDIR (already quantized); {hint}")


def check_recipe(spec: str, option: str = "--recipe"):
    """The Recipe ``spec`` names (a preset or a recipe JSON file), loaded before any model is; a broken JSON file is
    reported with its name and the JSON error ("--recipe 'x.json': recipe JSON = 'Expecting … at line 1 col 2' …")."""
    from .config import load_recipe
    from .errors import ConfigError

    try:
        return load_recipe(spec)
    except ConfigError as exc:
        if exc.field == "recipe":  # an unknown preset, a missing or unreadable file
            raise ConfigError.invalid(option, exc.value, exc.allowed) from None
        if not str(exc.field or "").startswith("recipe JSON"):
            raise
        raise ConfigError(f"{option} {spec!r}: {exc}", field=exc.field, value=exc.value, allowed=exc.allowed) from None
