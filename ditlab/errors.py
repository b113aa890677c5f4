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
        where = f"layer {layer!r}: " if layer else ""
        return cls(f"{where}{field} = {value!r} is not allowed; allowed: {allowed}", layer=layer, field=field, value=value, allowed=allowed)


class CalibrationError(DitlabError):
    """Calibration failed: a non-finite activation (naming the layer and timestep), or statistics that are missing."""
