"""Read-only recipe values: ``LayerConfig.params`` and the field maps of ``Recipe.overrides`` are frozen on
construction (``freeze``) and turned back into plain dicts and lists for JSON (``thaw``)."""

from __future__ import annotations

from collections.abc import Mapping


class FrozenParams(dict):
    """A read-only dict: ``LayerConfig.params`` (and the field maps of ``Recipe.overrides``). A frozen config must not
    change after validation, nor share a mutable dict with its caller or with the presets. Being a dict, it
    JSON-dumps, compares and pickles like one; copying (shallow or deep) returns itself. Nested lists are tuples."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("recipe settings are read-only: build a new config, e.g. cfg.replace(params={**cfg.params, 'key': value})")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _refuse

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return FrozenParams, (dict(self),)

    def __repr__(self):
        return repr(dict(self))


def freeze(v):
    """A JSON-able value with every dict made a FrozenParams and every list a tuple (nothing shared with ``v``)."""
    if isinstance(v, Mapping):
        return FrozenParams({k: freeze(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    return v


def thaw(v):
    """The inverse of ``freeze``: plain dicts and lists (what ``to_dict`` returns)."""
    if isinstance(v, Mapping):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [thaw(x) for x in v]
    return v
