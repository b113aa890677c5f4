"""Editing a recipe in the app: the per-layer table (one row per linear layer) and its round trip to a Recipe, bulk
settings ("W4A8 g64" on every fc1), recipe JSON import and download.

Pure functions over ditlab objects (DataFrames, Recipes, paths); nothing here imports gradio. Every user mistake
raises a ``ConfigError`` naming the layer and field, with what is allowed.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from pathlib import Path

import pandas as pd

from .config import FIXED_WEIGHT_BITS, METHOD_NAMES, OWN_BLOCK_METHODS, PRESETS, WEIGHT_ONLY_METHODS, Recipe, check_field
from .errors import ConfigError
from .exports import write_file
from .models import LAYER_KINDS, Pipeline, list_linears
from .plan_table import frame_to_recipe, plan_to_frame
from .public import limits, safe_name

TABLE_COLUMNS = ("name", "kind", "shape", "method", "w_bits", "a_bits", "w_group_size", "a_granularity")
EDITABLE = ("method", "w_bits", "a_bits", "w_group_size", "a_granularity")
BULK_TARGETS = ("all", "qkv", "out", "fc1", "fc2", "adaLN", "block 0")
_SETTING_HELP = "tokens like 'W8', 'W4A8', 'A16', 'FP', a method name (rtn, hadanorm, viditq, …), 'g64', 'per-channel', 'per-tensor'"


def recipe_table(pipe: Pipeline, recipe: Recipe) -> pd.DataFrame:
    """The editable per-layer table of ``recipe`` on ``pipe`` (skipped layers show as fp)."""
    infos = list_linears(pipe.transformer)
    full = plan_to_frame(recipe.resolve(infos), infos)
    table = full[list(TABLE_COLUMNS)].copy()
    table["w_group_size"] = ["per-channel" if g is None or (isinstance(g, float) and math.isnan(g)) else str(int(g)) for g in full["w_group_size"]]
    table["w_bits"] = full["w_bits"].astype(int)
    table["a_bits"] = full["a_bits"].astype(int)
    return table


def as_frame(table) -> pd.DataFrame:
    """The recipe table as a DataFrame, from a DataFrame or gradio's ``{"headers", "data"}`` form; ConfigError naming
    the table otherwise."""
    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, dict) and "headers" in table and "data" in table:
        return pd.DataFrame(table["data"], columns=table["headers"])
    raise ConfigError.invalid("table", type(table).__name__, "the per-layer table (columns " + ", ".join(TABLE_COLUMNS) + ")")


def table_recipe(pipe: Pipeline, table, base: Recipe) -> Recipe:
    """The Recipe of an edited table: ``base`` plus one exact-name override per changed row (validated on ``pipe``)."""
    table = as_frame(table)
    infos = list_linears(pipe.transformer)
    missing = [c for c in ("name",) + EDITABLE if c not in table.columns]
    if missing:
        raise ConfigError.invalid("table column", missing[0], "the columns " + ", ".join(TABLE_COLUMNS))
    names = [str(n) for n in table["name"]]
    if len(names) != len(infos):
        raise ConfigError.invalid("table rows", f"{len(table)} rows", f"the {len(infos)} layers of the model in order (reload the preset)")
    for row, (name, info) in enumerate(zip(names, infos)):
        if name != info.name:
            raise ConfigError.invalid(f"table row {row} name", name, f"{info.name!r}: the model's layers in order (reload the preset)")
    table = _as_typed(table)
    for name, method, gran in zip(table["name"], table["method"], table["a_granularity"]):  # also on fp rows, which
        check_field("method", method, layer=str(name))  # frame_to_recipe reads as FP whatever the text
        check_field("a_granularity", gran, layer=str(name))
    full = plan_to_frame(base.resolve(infos), infos).astype({c: object for c in EDITABLE})
    for col in EDITABLE:
        full[col] = list(table[col])
    recipe = frame_to_recipe(full, base)
    if recipe.overrides == base.overrides and recipe.skip == base.skip:
        return base
    recipe.resolve(infos)
    return recipe


def _as_typed(table: pd.DataFrame) -> pd.DataFrame:
    """The text columns as bulk edit reads them: method and granularity trimmed and lower-case ("FP" → fp), a group
    size written as in settings ("g64" → 64)."""
    table = table.copy()
    for col in ("method", "a_granularity"):
        table[col] = [str(v).strip().lower() for v in table[col]]
    table["w_group_size"] = [v.strip()[1:] if isinstance(v, str) and re.fullmatch(r"\s*[gG]\d+\s*", v) else v for v in table["w_group_size"]]
    return table


def same_table(table, shown: pd.DataFrame) -> bool:
    """Whether the table as the user has it reads cell for cell (as trimmed text) like ``shown``, the table of the
    recipe it gives; False when a row was normalised, e.g. method fp typed on a W4A8 row shows 16/16 bits."""
    table = as_frame(table)
    if list(table.columns) != list(shown.columns) or len(table) != len(shown):
        return False
    def text(v) -> str:
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()

    return all(text(a) == str(b) for col in shown.columns for a, b in zip(table[col], shown[col]))


def parse_setting(text: str) -> dict:
    """'W4A8', 'fp', 'hadanorm W4 A4 g64', 'W8' … → LayerConfig fields (each checked, so 'A3' names a_bits)."""
    fields: dict = {}
    tokens = [t for t in re.split(r"[\s,]+", (text or "").strip()) if t]
    if not tokens:
        raise ConfigError.invalid("setting", text, _SETTING_HELP)
    set_by: dict = {}  # field → the token that set it
    for tok in tokens:
        low = tok.lower()
        if low in METHOD_NAMES:
            update = {"method": low}
        elif m := re.fullmatch(r"w(\d+)(?:a(\d+))?", low):
            update = {"w_bits": int(m.group(1)), **({"a_bits": int(m.group(2))} if m.group(2) else {})}
        elif m := re.fullmatch(r"a(\d+)", low):
            update = {"a_bits": int(m.group(1))}
        elif m := re.fullmatch(r"g(\d+)", low):
            update = {"w_group_size": int(m.group(1))}
        elif low == "per-channel":
            update = {"w_group_size": None}
        elif low in ("per-token", "per-tensor"):
            update = {"a_granularity": low}
        else:
            raise ConfigError.invalid("setting", tok, _SETTING_HELP)
        for k in update:
            if k in set_by:  # 'W4 W8' is a contradiction, not "the last one wins"
                raise ConfigError.invalid("setting", text, f"each field set once ({set_by[k]!r} and {tok!r} both set {k})")
            set_by[k] = tok
        fields.update(update)
    if fields.get("method") == "fp" and len(fields) > 1:
        raise ConfigError.invalid("setting", text, "FP alone (full precision has no bits, groups or granularity to set)")
    for k, v in fields.items():
        check_field(k, v)
    return fields


def target_names(layer_names: list[str], kinds: dict[str, str], target: str) -> list[str]:
    """Layer names selected by a bulk-edit target: a kind, 'block N', 'all' (every non-embedder/final layer) or a glob."""
    if not isinstance(target, str):
        raise ConfigError.invalid("layer pattern", target, "text: a kind (qkv, out, fc1, fc2, adaLN), 'block N', 'all' or a glob")
    t = target.strip()
    if t == "all":
        names = [n for n in layer_names if kinds[n] not in ("embedder", "final", "other")]
    elif t in LAYER_KINDS:
        names = [n for n in layer_names if kinds[n] == t]
    elif m := re.fullmatch(r"block\s*(\d+)", t):
        names = [n for n in layer_names if n.startswith(f"transformer_blocks.{m.group(1)}.")]
    else:
        names = [n for n in layer_names if t and fnmatch.fnmatchcase(n, t)]
    if not names:
        raise ConfigError.invalid("layer pattern", target, "a kind (qkv, out, fc1, fc2, adaLN), 'block N', 'all', or a glob matching a layer name "
                                  "such as 'transformer_blocks.0.*'")
    return names


def bulk_edit(pipe: Pipeline, table, base: Recipe, target: str, setting: str) -> Recipe:
    """Applies ``setting`` to every layer ``target`` selects ("fc2" + "W8", "block 0" + "FP") on top of the table's edits."""
    current = table_recipe(pipe, table, base)
    fields = parse_setting(setting)
    frame = recipe_table(pipe, current)
    kinds = dict(zip(frame["name"], frame["kind"]))
    names = set(target_names(list(frame["name"]), kinds, target))
    fallback = current.default.method if not current.default.is_fp else "rtn"
    for idx in frame.index[frame["name"].isin(names)]:
        row = frame.loc[idx]
        if fields.get("method") == "fp" or (fields.get("w_bits") == 16 and fields.get("a_bits", row["a_bits"]) == 16 and "method" not in fields):
            frame.loc[idx, ["method", "w_bits", "a_bits", "w_group_size"]] = ["fp", 16, 16, "per-channel"]
            continue
        method = fields.get("method", fallback if row["method"] == "fp" else row["method"])
        w_bits = fields.get("w_bits", 8 if int(row["w_bits"]) == 16 else int(row["w_bits"]))
        group = fields.get("w_group_size", None if row["w_group_size"] == "per-channel" else int(row["w_group_size"]))
        a_bits = fields.get("a_bits", int(row["a_bits"]))
        if method != row["method"]:  # a new method (named, or the fallback on an fp row): what it cannot take gives way
            w_bits = fields.get("w_bits", FIXED_WEIGHT_BITS.get(method, w_bits))
            a_bits = fields.get("a_bits", 16 if method in WEIGHT_ONLY_METHODS else a_bits)
            group = fields.get("w_group_size", None if method in OWN_BLOCK_METHODS else group)
        frame.loc[idx, ["method", "w_bits", "a_bits", "w_group_size"]] = [method, w_bits, a_bits, "per-channel" if group is None else str(group)]
        if "a_granularity" in fields:
            frame.loc[idx, "a_granularity"] = fields["a_granularity"]
    return table_recipe(pipe, frame, current)


def table_help() -> str:
    """One Markdown line per editable column of the recipe table: what it accepts (from the recipe validator)."""
    from .config import allowed_values

    notes = {"w_group_size": "per-channel, or an integer ≥ 2 dividing the layer's in_features"}
    cols = ("method", "w_bits", "a_bits", "w_group_size", "a_granularity")
    return "\n".join(f"- **{c}**: {notes.get(c) or allowed_values(c)}" for c in cols)


# ---------------------------------------------------------------- recipe JSON
def parse_recipe(text, pipe: Pipeline | None = None, field: str = "recipe JSON") -> Recipe:
    """A Recipe from JSON text/bytes (or a preset name), size-limited, validated on ``pipe`` when given. Never a file
    path (the app's users may not read the server's files). ``field`` names the input in messages ("preset",
    "setting"). A leading byte-order mark (Windows Notepad saves one) is ignored."""
    lim = limits()
    if isinstance(text, (bytes, bytearray)):
        if len(text) > lim.max_recipe_bytes:
            raise ConfigError.invalid(field, f"{len(text)} bytes", f"at most {lim.max_recipe_bytes} bytes")
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError.invalid(field, "non-UTF-8 bytes", "UTF-8 text") from None
    text = str(text or "").lstrip("\ufeff").strip()
    if not text:
        raise ConfigError.invalid(field, "", "a recipe JSON object or a preset name")
    if len(text.encode("utf-8", "replace")) > lim.max_recipe_bytes:
        raise ConfigError.invalid(field, f"{len(text)} characters", f"at most {lim.max_recipe_bytes} bytes")
    if not text.startswith(("{", "[")):
        if text not in PRESETS:
            raise ConfigError.invalid(field, text, "a preset name (" + ", ".join(PRESETS) + ") or recipe JSON text")
        recipe = PRESETS[text]
    else:
        try:
            recipe = Recipe.from_json(text)
        except ConfigError as exc:
            if exc.field in ("recipe JSON", "recipe") and field != "recipe JSON":  # the text as a whole: name the input
                raise ConfigError.invalid(field, exc.value, exc.allowed) from None
            raise
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
            raise ConfigError.invalid(field, type(exc).__name__, "a recipe object {version, name, default, overrides, skip} as exported") from None
    if pipe is not None:
        recipe.resolve(list_linears(pipe.transformer))
    return recipe


def write_recipe(recipe: Recipe, folder: str | os.PathLike) -> Path:
    """Writes ``recipe`` as ``<folder>/<name>.recipe.json`` for download; returns the path."""
    path = Path(folder) / f"{safe_name(recipe.name)}.recipe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, lambda tmp: Path(tmp).write_text(recipe.to_json() + "\n"))
