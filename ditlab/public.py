"""Public deployment mode: the policy of a ditlab app that anyone on the internet can use.

Public mode is on when ``DITLAB_PUBLIC=1`` and by default on a Hugging Face Space (``SPACE_ID`` set) unless
``DITLAB_PUBLIC=0``. The environment is read on every call, so a test can switch it with ``monkeypatch.setenv``.
In public mode:

* **Model sources** (``check_source``): the shipped model; local folders only under the allowlist
  ``DITLAB_ALLOWED_DIRS`` (``os.pathsep``-separated; default: the shipped ``assets/``), compared after resolving
  ``..`` and symlinks, and given the same message whether or not a refused folder exists; hub ids only if listed in
  ``DITLAB_ALLOWED_HUB_IDS`` (comma-separated; default: none). Server folders cannot be given as exports either
  (``check_server_path``): exports come back as uploaded zips.
* **Per-request limits** (``limits`` / ``check_request`` / ``check_calibration``): images per request, sampling steps,
  recipe size, upload size, and the calibration cost (images × steps of a calibration run; iterations × images ×
  steps of VQ4DiT's block-wise calibration). The messages name the field and the limit.
* **A rate limit** (``RateLimiter``): at most ``max_jobs_per_minute`` heavy jobs (sampling, quantizing, analysis)
  started per client address in any 60 s (``DITLAB_MAX_JOBS_PER_MINUTE`` overrides the default of 12).

In every mode:

* **Export names** are sanitised (``safe_name``): no path separators, no ``..``, no absolute paths.
* **No remote code**: ditlab never passes ``trust_remote_code=True``; the transformer/VAE classes are fixed by the
  pipeline family (``models.FAMILIES``), never taken from a model folder, and weights are read from safetensors only.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError


def is_public() -> bool:
    """True in public mode: DITLAB_PUBLIC=1, or on a Hugging Face Space (SPACE_ID set) unless DITLAB_PUBLIC=0."""
    flag = os.environ.get("DITLAB_PUBLIC", "1" if os.environ.get("SPACE_ID") else "")
    return flag.strip() not in ("", "0", "false", "False", "no")


@dataclass(frozen=True)
class Limits:
    """Per-request bounds (tighter in public mode). ``max_calib_cost`` None = no bound."""

    max_images: int
    max_steps: int
    max_recipe_bytes: int
    max_upload_bytes: int
    public: bool
    max_calib_cost: int | None = None  # images × steps of one calibration run (VQ4DiT: × iterations)
    max_jobs_per_minute: int | None = None  # heavy jobs started per client address in any 60 s


PUBLIC_LIMITS = Limits(max_images=16, max_steps=50, max_recipe_bytes=64_000, max_upload_bytes=200_000_000, public=True,
                       max_calib_cost=2_000,  # 2 000 admits every preset (VQ4DiT default 8 × 8 × 25 = 1 600)
                       max_jobs_per_minute=12)
LOCAL_LIMITS = Limits(max_images=64, max_steps=200, max_recipe_bytes=1_000_000, max_upload_bytes=4_000_000_000, public=False)


def limits() -> Limits:
    """The limits for this process (public or local; read from the environment on every call)."""
    if not is_public():
        return LOCAL_LIMITS
    rate = os.environ.get("DITLAB_MAX_JOBS_PER_MINUTE", "").strip()
    return dataclasses.replace(PUBLIC_LIMITS, max_jobs_per_minute=int(rate)) if rate.isdigit() else PUBLIC_LIMITS


class RateLimiter:
    """Sliding 60 s window of heavy-job starts per client address; enforced only when ``limits()`` sets
    ``max_jobs_per_minute`` (public mode). Thread-safe: Gradio runs handlers on several worker threads."""

    WINDOW = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._starts: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def check(self, client: str | None) -> None:
        """Records a job start for ``client``, or raises ConfigError ("request rate") if it is over the limit."""
        cap = limits().max_jobs_per_minute
        if cap is None:
            return
        now = self._clock()
        with self._lock:
            starts = self._starts.setdefault(client or "unknown", collections.deque())
            while starts and now - starts[0] >= self.WINDOW:
                starts.popleft()
            if len(starts) >= cap:
                wait = math.ceil(self.WINDOW - (now - starts[0]))
                raise ConfigError.invalid("request rate", f"{len(starts)} jobs in the last minute",
                                          f"at most {cap} per minute per client (public mode); try again in {wait} s")
            starts.append(now)
            if len(self._starts) > 10_000:  # forget idle clients so the table stays bounded
                for key in [k for k, v in self._starts.items() if not v or now - v[-1] >= self.WINDOW]:
                    del self._starts[key]


def client_address(request) -> str | None:
    """The caller's address from a Gradio request: the first X-Forwarded-For hop behind a proxy (Spaces), else the socket peer."""
    if request is None:
        return None
    headers = getattr(request, "headers", None) or {}
    forwarded = headers.get("x-forwarded-for", "") if hasattr(headers, "get") else ""
    if forwarded:
        return forwarded.split(",")[0].strip()
    client = getattr(request, "client", None)
    return getattr(client, "host", None)


def whole_number(value, field: str, lo: int, hi: int) -> int:
    """``value`` as an int if it is a whole number from ``lo`` to ``hi`` (a cleared UI number arrives as None), else
    ConfigError naming ``field``. A 0-d tensor counts as its number."""
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or int(value) != value \
            or not lo <= int(value) <= hi:
        raise ConfigError.invalid(field, value, f"an integer from {lo} to {hi}")
    return int(value)


def check_counts(settings, fields, label=str) -> None:
    """ConfigError naming ``label(field)`` for the first of ``settings``' ``fields`` that is not an integer ≥ 1."""
    for field in fields:
        value = getattr(settings, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError.invalid(label(field), value, "an integer ≥ 1")


def real_number(value, field: str, lo: float, hi: float) -> float:
    """``value`` as a float if it is a finite number from ``lo`` to ``hi``, else ConfigError naming ``field``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or not lo <= float(value) <= hi:
        raise ConfigError.invalid(field, value, f"a number from {lo:g} to {hi:g}")
    return float(value)


def check_request(n_images: int, steps, guidance, seed=0) -> None:
    """Raises ConfigError naming the field if a sampling request is outside the limits (or the seed is not an integer)."""
    from .sampling import check_seed

    lim = limits()
    whole = isinstance(seed, numbers.Real) and not isinstance(seed, bool) and math.isfinite(seed) and int(seed) == seed
    check_seed(int(seed) if whole else seed)  # a number field may send 3.0 for 3; check_seed refuses the rest by name
    if not isinstance(n_images, numbers.Integral) or not 1 <= int(n_images) <= lim.max_images:
        raise ConfigError.invalid("images", n_images, f"1 to {lim.max_images} images per request (pick fewer classes)")
    if not isinstance(steps, (int, float)) or isinstance(steps, bool) or not math.isfinite(steps) or int(steps) != steps \
            or not 1 <= int(steps) <= lim.max_steps:
        raise ConfigError.invalid("steps", steps, f"an integer from 1 to {lim.max_steps}")
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance) or not 1.0 <= float(guidance) <= 20.0:
        raise ConfigError.invalid("CFG scale", guidance, "a number from 1 to 20")


def check_calibration(n_samples: int, steps: int, iterations: int = 1, field: str = "calibration cost") -> None:
    """Raises ConfigError if ``iterations × n_samples × steps`` exceeds the calibration budget (public mode only)."""
    cap = limits().max_calib_cost
    if cap is None:
        return
    try:
        cost = int(iterations) * int(n_samples) * int(steps)
    except (TypeError, ValueError, OverflowError):
        return  # not numbers: calibration's own validation names the field
    if cost > cap:
        what = f"{iterations} iterations × " if iterations != 1 else ""
        raise ConfigError.invalid(field, f"{what}{n_samples} images × {steps} steps = {cost}", f"at most {cap} image-steps (public mode)")


def check_quantize_cost(transformer, recipe) -> None:
    """Bounds VQ4DiT's block-wise calibration (``params.iterations × samples × steps``) in public mode."""
    if limits().max_calib_cost is None:
        return
    from .methods import vq4dit

    settings = vq4dit.settings_for(transformer, recipe)
    if settings is not None:
        check_calibration(settings.samples, settings.steps, settings.iterations, field="params.iterations × samples × steps")


# ---------------------------------------------------------------- model sources
def allowed_dirs() -> list[Path]:
    """Folders local models may be loaded from in public mode ($DITLAB_ALLOWED_DIRS, default: the shipped assets/)."""
    from .models import ASSETS

    raw = os.environ.get("DITLAB_ALLOWED_DIRS", "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()] or [ASSETS.resolve()]


def allowed_hub_ids() -> list[str]:
    """Hub ids loadable in public mode ($DITLAB_ALLOWED_HUB_IDS, comma-separated; default none)."""
    return [s.strip() for s in os.environ.get("DITLAB_ALLOWED_HUB_IDS", "").split(",") if s.strip()]


def allowed_sources_text() -> str:
    """What public mode lets a user load, in words: "the shipped model, a folder under …, or one of the hub ids …"."""
    hubs = allowed_hub_ids()
    return ("the shipped model, a folder under " + ", ".join(map(str, allowed_dirs()))
            + (", or one of the hub ids " + ", ".join(hubs) if hubs else " (hub ids are not loadable)"))


def _allowed_text() -> str:
    return allowed_sources_text() + " (public mode)"


def check_source(source, field: str = "model source"):
    """The source to load, or ConfigError naming ``field`` if public mode forbids it (a no-op outside public mode).

    In public mode an allowed folder comes back as its resolved absolute path (so it can never be mistaken for a hub
    id); a refused folder gets the same message whether or not it exists (nothing about the server leaks).
    """
    if not is_public():
        return source
    from .models import SHIPPED_ALIASES

    text = "" if source is None else str(source).strip()
    if text in SHIPPED_ALIASES:
        return source
    if text in allowed_hub_ids():
        return text
    if "\x00" not in text:
        try:
            folder = Path(text).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):  # symlink loops, unknown ~user …
            folder = None
        if folder is not None and any(folder.is_relative_to(a) for a in allowed_dirs()):
            return str(folder)
    raise ConfigError.invalid(field, _clip(text), _allowed_text())


def checked_path(text: str, field: str) -> Path:
    """``text`` as a Path the operating system can look up, or a ConfigError naming ``field``: no NUL character, at
    most 4096 characters and 255 bytes per name (beyond those, looking the path up raises instead of saying no)."""
    if "\x00" in text:
        raise ConfigError.invalid(field, text, "a path without NUL characters")
    path = Path(text).expanduser()
    if len(str(path)) > 4096 or any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in path.parts):
        raise ConfigError.invalid(field, text, "a path of at most 4096 characters and 255 per file or folder name")
    return path


def check_server_path(field: str, path) -> None:
    """In public mode a user may not name files or folders on the server (exports come back as uploads)."""
    if is_public() and str(path or "").strip():
        raise ConfigError.invalid(field, _clip(str(path)), "an uploaded .zip (public mode reads no server paths)")


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + "…"


# ---------------------------------------------------------------- file names
def safe_name(name) -> str:
    """A file-name-safe version of a recipe/export name: only [A-Za-z0-9._-], no leading dots (so no ``..``, no
    hidden files), no separators (so no absolute paths), at most 64 characters; "recipe" if nothing is left."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-")[:64].strip(".-")
    return cleaned or "recipe"
