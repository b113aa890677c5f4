"""The project's error types: every user-facing failure is one of these, with a one-line message."""

from __future__ import annotations


class DitlabError(Exception):
    """Base class: a message meant for the user (the CLI prints it, the app shows it)."""


class ModelLoadError(DitlabError):
    """The model source is missing, not a supported DiT, unsafe (pickle), or unreachable offline."""


class ConfigError(DitlabError, ValueError):
    """An invalid recipe or layer configuration. ``field`` names what was wrong."""

    def __init__(self, message: str, *, layer: str | None = None, field: str | None = None, value=None, allowed: str | None = None):
        self.layer, self.field, self.value, self.allowed = layer, field, value, allowed
        super().__init__(message)

    @classmethod
    def invalid(cls, field: str, value, allowed: str, layer: str | None = None) -> "ConfigError":
        where = f"layer {_clip(layer)}: " if layer else ""
        return cls(f"{where}{field} = {_clip(value)} is not allowed; allowed: {allowed}", layer=layer, field=field, value=value, allowed=allowed)


def _clip(value, limit: int = 160) -> str:
    """repr(value) on one line, shortened to about ``limit`` characters (a 1 MB value must not make a 1 MB message)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. a recursive structure or a huge int
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class CalibrationError(DitlabError):
    """Calibration failed: a non-finite activation (naming the layer and timestep), or statistics that are missing."""
