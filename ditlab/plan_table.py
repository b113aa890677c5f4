"""The DataFrame round-trip of a per-layer plan (the app's editable table): ``plan_to_frame`` / ``frame_to_recipe``.

One row per linear: read-only columns ``name, kind, shape ("N×K" as "NxK"), n_weights, skipped`` and one editable
column per LayerConfig field (``params`` as a JSON string; ``w_group_size`` empty = per-channel). Editing the table
and calling ``frame_to_recipe(df, base)`` gives a Recipe equal to ``base`` plus one exact-name override per changed
layer (a skipped layer that is given a method is removed from the skip list).
"""

from __future__ import annotations

import dataclasses
import json
import math
from fnmatch import fnmatchcase
from typing import Mapping

from .config import FP, GPTQ_COMPOSABLE, PRESETS, LayerConfig, Recipe, _FIELD_RULES, check_field
from .errors import ConfigError

INFO_COLUMNS = ("name", "kind", "shape", "n_weights", "skipped")
CONFIG_COLUMNS = tuple(f.name for f in dataclasses.fields(LayerConfig))
_INTS = ("w_bits", "a_bits", "hadamard_seed", "rank")
_BOOLS = ("w_symmetric", "clip_search")
_FLOATS = ("alpha", "gptq_damp")


def _layer_tuple(info):
    if isinstance(info, str):
        return info, "other", None, None
    return info.name, info.kind, info.out_features, info.in_features


def _as_recipe(base, field: str) -> Recipe:
    """``base`` as a Recipe: a Recipe, or a preset name; ConfigError naming ``field`` otherwise."""
    if isinstance(base, Recipe):
        return base
    if isinstance(base, str) and base in PRESETS:
        return PRESETS[base]
    raise ConfigError.invalid(field, base if isinstance(base, str) else type(base).__name__, "a Recipe or a preset name (" + ", ".join(PRESETS) + ")")


def plan_to_frame(plan, layers) -> "object":
    """pandas DataFrame, one row per layer of ``layers`` (LayerInfo) with its planned config (None → FP, skipped).

    ``plan`` is ``recipe.resolve(layers)``; a Recipe or a preset name is resolved here."""
    import pandas as pd

    if isinstance(plan, (Recipe, str)):
        plan = _as_recipe(plan, "plan").resolve(layers)
    if not isinstance(plan, Mapping):
        raise ConfigError.invalid("plan", type(plan).__name__, "a resolved plan {layer name: LayerConfig | None} (Recipe.resolve), a Recipe or a preset name")
    rows = []
    for info in layers:
        name, kind, n, k = _layer_tuple(info)
        cfg = plan.get(name)
        d = (cfg or FP).to_dict()
        d["params"] = json.dumps(d["params"], sort_keys=True)
        rows.append({"name": name, "kind": kind, "shape": f"{n}x{k}" if n else "", "n_weights": (n or 0) * (k or 0), "skipped": cfg is None, **d})
    return pd.DataFrame(rows, columns=list(INFO_COLUMNS + CONFIG_COLUMNS))


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _coerce(field: str, value, layer: str):
    """A table cell (numpy scalar, string, NaN …) → the Python value of a LayerConfig field."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar → Python
    allowed = _FIELD_RULES[field][1]
    try:
        if field == "w_group_size":
            if _missing(value) or str(value).strip().lower() in ("none", "per-channel"):  # 0 is refused, as in recipe JSON
                return None
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if field in _INTS:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if field in _BOOLS:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "1.0"):
                return True
            if text in ("false", "no", "0", "0.0"):
                return False
            raise ValueError
        if field in _FLOATS:
            return float(value)
        if field == "params":
            if _missing(value):
                return {}
            return dict(value) if isinstance(value, dict) else json.loads(value)
        return str(value).strip()
    except (TypeError, ValueError, OverflowError):
        raise ConfigError.invalid(field, value, allowed, layer=layer) from None


def row_config(row: dict, layer: str) -> LayerConfig:
    """The LayerConfig of one table row (method 'fp', or w_bits = a_bits = 16, means full precision)."""
    fields = {f: _coerce(f, row[f], layer) for f in CONFIG_COLUMNS if f in row}
    for f, v in fields.items():  # also on full-precision rows: w_bits 99 is a mistake even where bits are unused
        check_field(f, v, layer)
    if fields.get("method") == "fp":
        return FP
    return LayerConfig.from_dict(fields, layer=layer)  # a method with 16/16 bits is refused there, naming the layer


def _row_for_method(row: dict, planned: LayerConfig | None) -> dict:
    """The row as meant when its method was typed anew (``planned`` is what the recipe gave the layer):

    * on a full-precision row whose bits still read 16/16, the method gets 8-bit weights, as bulk edit gives it
      ('rtn' on an fp row → rtn W8A16; the app redraws the row); 16-bit weights typed on a quantized row are still
      refused, naming the field;
    * on a quantized row, the settings of the old method that the table does not show give way: its ``params`` (each
      method reads its own keys; params written with the change stay) and GPTQ rounding when it came from method
      'gptq' or the new method cannot compose with it (w4a16-gptq's fc2 → rtn is plain rtn, → bnb-nf4 is not refused
      for a hidden field).
    """
    method = str(row.get("method", "")).strip().lower()
    if planned is None or planned.is_fp:
        try:
            w16 = float(row.get("w_bits")) == 16
        except (TypeError, ValueError):
            return row
        return {**row, "w_bits": 8} if w16 and method not in ("", "fp", "nan", "none") else row
    if method in ("", planned.method):
        return row
    row = dict(row)
    try:
        kept = "params" in row and _coerce("params", row["params"], "") == planned.to_dict()["params"]
    except ConfigError:
        kept = False  # unreadable params: row_config names them
    if kept:
        row["params"] = "{}"
    if row.get("weight_rounding", "nearest") == planned.weight_rounding and (planned.method == "gptq" or method not in GPTQ_COMPOSABLE):
        row["weight_rounding"] = "nearest"
    return row


def _escape(name: str) -> str:
    """A glob matching exactly ``name`` under fnmatch (brackets, stars and question marks quoted)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _unskipped(base: Recipe, name: str, k, n) -> LayerConfig | None:
    try:
        return base.replace(skip=()).config_for(name, k, n)
    except ConfigError:
        return None


def frame_to_recipe(df, base: "Recipe | str") -> Recipe:
    """Recipe = ``base`` + one exact-name override per layer whose row differs from ``base``'s plan.

    Overrides carry only the changed fields. A layer edited again keeps one exact-name override: the earlier one is
    replaced (none remains when the row is back to what the rest of the recipe gives it), so repeated edits never
    grow the recipe. A skipped layer given a method other than fp leaves the skip list (patterns that covered it are
    replaced by the exact names they still skip). A "<preset>-edited" recipe that is back to the preset is the preset.
    ``base`` may be a preset name; ``df`` is a pandas DataFrame (as ``plan_to_frame`` gives).
    """
    from .models import LayerInfo

    base = _as_recipe(base, "base recipe")
    if not (hasattr(df, "columns") and hasattr(df, "to_dict")):
        raise ConfigError.invalid("table", type(df).__name__, "a pandas DataFrame of the plan (from plan_to_frame)")

    for col in ("name", "shape") + ("method", "w_bits", "a_bits"):
        if col not in df.columns:
            raise ConfigError.invalid("table column", col, "present (the table comes from plan_to_frame)")
    records = df.to_dict("records")
    layers = []
    for r in records:
        try:
            n, k = (int(v) for v in str(r["shape"]).lower().split("x"))
        except ValueError:
            raise ConfigError.invalid("shape", r["shape"], "'NxK' as written by plan_to_frame", layer=str(r["name"])) from None
        layers.append(LayerInfo(str(r["name"]), str(r.get("kind", "other")), n, k, n * k, None))
    plan = base.resolve(layers)
    edited = {}  # layer → its row's config, for the rows that differ from base's plan
    for info, r in zip(layers, records):
        new = row_config(_row_for_method(r, plan[info.name]), info.name).validate(info.name, info.in_features, info.out_features)
        if new != plan[info.name] and not (plan[info.name] is None and new.is_fp):
            edited[info.name] = new
    own = {_escape(name) for name in edited}  # the edited layers' earlier exact-name overrides give way to new ones
    trimmed = base.replace(overrides=tuple((p, f) for p, f in base.overrides if p not in own))
    overrides, unskip = list(trimmed.overrides), set()
    for info in layers:
        if info.name not in edited:
            continue
        new = edited[info.name]
        if any(fnmatchcase(info.name, p) for p in trimmed.skip):  # skipped: unskip it
            unskip.add(info.name)
            old = _unskipped(trimmed, info.name, info.in_features, info.out_features)
        else:
            old = _valid_config(trimmed, info)
        if new == old:
            continue
        old_d = old.to_dict() if old is not None else {}
        changed = {f: v for f, v in new.to_dict().items() if f not in old_d or old_d[f] != v}
        overrides.append((_escape(info.name), changed))
    skip = list(base.skip)
    if unskip:
        names = [info.name for info in layers]
        skip = []
        for pattern in base.skip:
            hits = [n for n in names if fnmatchcase(n, pattern)]
            if not any(n in unskip for n in hits):
                skip.append(pattern)
            else:
                skip.extend(_escape(n) for n in hits if n not in unskip)
    name = base.name if base.name.endswith("-edited") else f"{base.name}-edited"
    recipe = Recipe(version=base.version, default=base.default, overrides=tuple(overrides), skip=tuple(skip), name=name)
    preset = PRESETS.get(name.removesuffix("-edited"))
    return preset if preset is not None and preset == recipe.replace(name=preset.name) else recipe


def _valid_config(recipe: Recipe, info) -> LayerConfig | None:
    """``recipe``'s config of one layer that no skip pattern matches, or None when it is not valid for the layer
    (e.g. a group size that only the layer's own override, now removed, had changed): the new override then
    carries every field."""
    try:
        return recipe.config_for(info.name, info.in_features, info.out_features)
    except ConfigError:
        return None
