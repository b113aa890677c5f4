"""Property-based fuzzing of recipes: malformed recipes (wrong types, bits out of range, activation bits a method
cannot run, group sizes that do not divide the channels, patterns that match no layer, unknown methods and fields,
wrong containers, huge or deeply nested JSON, non-UTF-8 bytes) fed to the config layer, the DataFrame import, the CLI
(in process, and twice as a real subprocess) and the app's handlers. Every input must give exactly one clear line
naming the field — never a traceback, never an "internal error" — and the app must leave the user's table as it was.

Each test counts the inputs it tried; with DITLAB_FUZZ_SUMMARY=path the counts are written there as JSON (the
figures in docs/RELIABILITY.md), and when every test of the module ran, the total must reach 1000.
"""

import contextlib
import fnmatch
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditlab import api, recipe_editing
from ditlab.config import (DEFAULT_SKIP, FIXED_WEIGHT_BITS, METHOD_NAMES, PRESETS, WEIGHT_ONLY_METHODS, Recipe, _FIELD_RULES,
                           frame_to_recipe, load_recipe, plan_to_frame)
from ditlab.errors import ConfigError
from ditlab.models import list_linears
from ditlab.testing import tiny_dit_pipeline

ROOT = Path(__file__).resolve().parent.parent
TRIED: Counter = Counter()  # test name → inputs tried
FAILURES: Counter = Counter()
EXPECTED_TESTS = {"config", "dataframe", "cli", "app_import", "app_table", "app_bulk"}
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))  # no timing: the machine may be busy


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Writes the counts (and checks the ≥ 1000 total) after the module."""
    yield
    total = sum(TRIED.values())
    path = os.environ.get("DITLAB_FUZZ_SUMMARY")
    if path:
        Path(path).write_text(json.dumps({"inputs": dict(TRIED), "total": total, "failures": sum(FAILURES.values())}, indent=2))
    if EXPECTED_TESTS <= set(TRIED):
        assert total >= 1000, dict(TRIED)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_dit_pipeline(tmp_path_factory.mktemp("fuzz") / "tiny-dit")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return api.load(str(tiny_dir))


def _layer_names(pipe) -> list[str]:
    return [i.name for i in list_linears(pipe.transformer)]


# ---------------------------------------------------------------- the malformed recipes
BASES = [n for n in PRESETS if n not in ("fp",)]
FIELDS = list(_FIELD_RULES)
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
IN_FEATURES = (64, 256)  # every quantizable layer of the tiny DiT reads 64 (attention, fc1, adaLN) or 256 (fc2) channels


def _base(name: str) -> dict:
    return json.loads(PRESETS[name].to_json())


def _bad_for(field: str):
    """Values the single-field rule of ``field`` rejects (the rule itself decides: no list to keep in sync)."""
    ok = _FIELD_RULES[field][0]
    return ANY_JSON.filter(lambda v: not ok(v))


@st.composite
def _wrong_value(draw):
    """A field of the default or of an override set to a value of the wrong type or out of range."""
    base_name = draw(st.sampled_from(BASES))
    field = draw(st.sampled_from(FIELDS))
    if field == "weight_rounding" and base_name.endswith("gptq"):
        field = "w_bits"  # method gptq forces weight_rounding = "gptq" by definition
    value = draw(_bad_for(field))
    recipe = _base(base_name)
    if draw(st.booleans()):
        recipe["default"][field] = value
    else:
        recipe["overrides"] = [{"pattern": "transformer_blocks.*", "set": {field: value}}]
    return recipe, (field,)


@st.composite
def _bits_out_of_range(draw):
    field = draw(st.sampled_from(["w_bits", "a_bits"]))
    lo, hi = (2, 8) if field == "w_bits" else (4, 8)
    bits = draw(st.integers(-2**40, 2**40).filter(lambda b: not (lo <= b <= hi or b == 16)))
    recipe = _base(draw(st.sampled_from(BASES)))
    recipe["default"][field] = bits
    return recipe, (field,)


@st.composite
def _method_cannot_run(draw):
    """Activation bits on a weight-only method, wrong fixed bits, 16-bit weights, fp with bits, GPTQ rounding on VQ/bnb,
    a group size on a method with its own blocks (bnb, k-means, VQ4DiT)."""
    kind = draw(st.sampled_from(["a_bits", "fixed w_bits", "w16", "fp bits", "rounding", "group"]))
    if kind == "group":
        method = draw(st.sampled_from(WEIGHT_ONLY_METHODS))
        group = draw(st.sampled_from([2, 4, 8, 16, 32, 64]))  # divisors of every in_features: only the method refuses it
        default = {"method": method, "w_bits": FIXED_WEIGHT_BITS.get(method, 2), "a_bits": 16}
        if draw(st.booleans()):
            return {"version": 1, "default": {**default, "w_group_size": group}}, ("w_group_size",)
        return {"version": 1, "default": default, "overrides": [{"pattern": "*.ff.*", "set": {"w_group_size": group}}]}, ("w_group_size",)
    if kind == "a_bits":
        method = draw(st.sampled_from(WEIGHT_ONLY_METHODS))
        w = FIXED_WEIGHT_BITS.get(method, 2 if method in ("vq4dit", "kmeans") else 4)
        return {"version": 1, "default": {"method": method, "w_bits": w, "a_bits": draw(st.integers(4, 8))}}, ("a_bits",)
    if kind == "fixed w_bits":
        method = draw(st.sampled_from(list(FIXED_WEIGHT_BITS)))
        w = draw(st.integers(2, 8).filter(lambda b: b != FIXED_WEIGHT_BITS[method]))
        return {"version": 1, "default": {"method": method, "w_bits": w, "a_bits": 16}}, ("w_bits",)
    if kind == "w16":
        method = draw(st.sampled_from([m for m in METHOD_NAMES if m != "fp"]))
        return {"version": 1, "default": {"method": method, "w_bits": 16, "a_bits": 16}}, ("w_bits",)
    if kind == "fp bits":
        return {"version": 1, "default": {"method": "fp", "w_bits": draw(st.integers(2, 8)), "a_bits": 16}}, ("w_bits",)
    method = draw(st.sampled_from(["bnb-int8", "bnb-nf4", "vq4dit", "kmeans"]))
    w = FIXED_WEIGHT_BITS.get(method, 3)
    return {"version": 1, "default": {"method": method, "w_bits": w, "a_bits": 16, "weight_rounding": "gptq"}}, ("weight_rounding",)


@st.composite
def _shape_mismatch(draw):
    """Group sizes that divide no/some layer's channels; an SVD rank above min(out, in). Caught against the model."""
    if draw(st.booleans()):
        recipe = _base("w4a4-svd")
        recipe["default"]["rank"] = draw(st.integers(65, 10**9))
        return recipe, ("rank",)
    recipe = _base(draw(st.sampled_from(["w8a8-rtn", "w4a8-rtn", "w4a8-hadanorm", "w4a16-gptq", "w8a8-smoothquant"])))
    if draw(st.booleans()):
        recipe["default"]["w_group_size"] = draw(st.integers(2, 10**6).filter(lambda g: 64 % g))
    else:
        recipe["overrides"] = [{"pattern": "*.ff.net.2", "set": {"w_group_size": draw(st.integers(2, 10**6).filter(lambda g: 256 % g))}}]
    return recipe, ("w_group_size",)


def _matches_nothing(pattern: str, names=None) -> bool:
    names = names or _TINY_NAMES
    return not any(fnmatch.fnmatchcase(n, pattern) for n in names)


_TINY_NAMES: list[str] = []  # filled by the `tiny_names` fixture before any example is drawn


@st.composite
def _unmatched_pattern(draw):
    pattern = draw(st.text(min_size=1, max_size=30).filter(lambda p: _matches_nothing(p) and p not in DEFAULT_SKIP))
    recipe = _base(draw(st.sampled_from(BASES)))
    if draw(st.booleans()):
        if draw(st.booleans()):  # a pattern that matches only layers the skip list keeps in FP: no effect, refused too
            pattern = draw(st.sampled_from([n for n in _TINY_NAMES if any(fnmatch.fnmatchcase(n, p) for p in DEFAULT_SKIP)] + ["proj_out*"]))
        recipe["overrides"] = [{"pattern": pattern, "set": {"w_bits": 8}}]
        return recipe, ("override pattern",)
    recipe["skip"] = list(recipe["skip"]) + [pattern]
    return recipe, ("skip pattern",)


@st.composite
def _unknown_names(draw):
    kind = draw(st.sampled_from(["method", "field", "override field", "recipe key"]))
    recipe = _base(draw(st.sampled_from(BASES)))
    name = draw(st.text(min_size=1, max_size=20))
    if kind == "method":
        recipe["default"]["method"] = draw(st.text(max_size=20).filter(lambda m: m not in METHOD_NAMES))
        return recipe, ("method",)
    if kind == "recipe key":
        key = draw(st.text(max_size=20).filter(lambda k: k not in recipe))
        recipe[key] = draw(ANY_JSON)
        return recipe, ("recipe key",)
    if name in FIELDS:
        name += "_typo"
    if kind == "field":
        recipe["default"][name] = 1
    else:
        recipe["overrides"] = [{"pattern": "transformer_blocks.*", "set": {name: 1}}]
    return recipe, ("field",)


@st.composite
def _wrong_structure(draw):
    """Wrong containers: the recipe, default, overrides, an override item, skip; a missing or wrong version."""
    kind = draw(st.sampled_from(["recipe", "default", "overrides", "override item", "skip", "version", "no version"]))
    recipe = _base(draw(st.sampled_from(BASES)))
    if kind == "recipe":
        return draw(ANY_JSON.filter(lambda v: not isinstance(v, dict))), ("recipe",)
    if kind == "default":
        recipe["default"] = draw(ANY_JSON.filter(lambda v: not isinstance(v, dict)))
        return recipe, ("default",)
    if kind == "overrides":
        recipe["overrides"] = draw(ANY_JSON.filter(lambda v: not isinstance(v, list)))
        return recipe, ("overrides",)
    if kind == "override item":
        recipe["overrides"] = [draw(ANY_JSON.filter(lambda v: not (isinstance(v, dict) and set(v) == {"pattern", "set"} and isinstance(v["pattern"], str)
                                                                  and isinstance(v["set"], dict))))]
        return recipe, ("overrides",)
    if kind == "skip":
        recipe["skip"] = draw(ANY_JSON.filter(lambda v: not (isinstance(v, list) and all(isinstance(p, str) for p in v))))
        return recipe, ("skip",)
    if kind == "version":
        recipe["version"] = draw(ANY_JSON.filter(lambda v: not (type(v) is int and v == 1)))
        return recipe, ("version",)
    del recipe["version"]
    return recipe, ("version",)


GROUPS = {"wrong value": _wrong_value(), "bits out of range": _bits_out_of_range(), "method cannot run": _method_cannot_run(),
          "shape mismatch": _shape_mismatch(), "unmatched pattern": _unmatched_pattern(), "unknown name": _unknown_names(),
          "wrong structure": _wrong_structure()}


@st.composite
def _as_text(draw, recipes=st.one_of(*GROUPS.values())):
    """A malformed recipe as JSON text/bytes; or raw damage: not JSON, non-UTF-8, deeply nested, huge."""
    kind = draw(st.sampled_from(["json"] * 6 + ["not json", "non-utf8", "deep", "deep params", "huge"]))
    if kind == "json":
        obj, fields = draw(recipes)
        return json.dumps(obj), fields
    if kind == "not json":
        text = draw(st.text(min_size=1, max_size=60).filter(lambda t: t.strip() and not _is_json(t)))
        return "{" + text, ("recipe JSON",)
    if kind == "non-utf8":
        good = json.dumps(_base(draw(st.sampled_from(BASES)))).encode()
        at = draw(st.integers(0, len(good)))
        junk = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
        return good[:at] + junk + good[at:], ("recipe JSON",)
    if kind == "deep":
        depth = draw(st.integers(2_000, 200_000))
        return "[" * depth + "]" * depth, ("recipe JSON", "recipe")
    if kind == "deep params":
        depth = draw(st.integers(2_000, 50_000))
        recipe = _base("w4a8-rtn")
        text = json.dumps(recipe).replace('"params": {}', '"params": ' + '{"a": ' * depth + "1" + "}" * depth)
        return text, ("params", "recipe JSON")
    obj, fields = draw(recipes)  # huge: 2 000 valid overrides before the bad part, a name of up to 1.1 MB
    pad = [{"pattern": "transformer_blocks.*", "set": {"hadamard_seed": 1}}] * 2_000
    if isinstance(obj, dict) and isinstance(obj.get("overrides", []), list):
        obj = {**obj, "overrides": pad + list(obj.get("overrides", [])), "name": "x" * draw(st.sampled_from([1_000, 1_100_000]))}
    return json.dumps(obj), fields + ("recipe JSON",)  # the app's size limit may speak first


def _is_json(text: str) -> bool:
    try:
        json.loads("{" + text)
        return True
    except (ValueError, RecursionError):
        return False


@pytest.fixture(scope="module", autouse=True)
def tiny_names(tiny):
    _TINY_NAMES[:] = _layer_names(tiny)


def _check_message(message: str, fields, where: str) -> None:
    """One clear line that names the field; no traceback, no internal error."""
    ok = ("\n" not in message.strip() and "Traceback" not in message and "internal error" not in message
          and len(message) < 2_000 and any(f in message for f in fields))
    if not ok:
        FAILURES[where] += 1
    assert ok, f"{where}: expected one line naming {fields}, got: {message[:500]!r}"


# ---------------------------------------------------------------- (a) the config layer
@settings(FUZZ, max_examples=500)
@given(case=_as_text())
def test_config_layer(tiny, tmp_path_factory, case):
    """Recipe.from_json (text/bytes), Recipe.from_dict, load_recipe(file) — then resolve() on a model."""
    TRIED["config"] += 1
    text, fields = case
    layers = list_linears(tiny.transformer)
    with pytest.raises(ConfigError) as err:
        Recipe.from_json(text).resolve(layers)
    _check_message(str(err.value), fields, "Recipe.from_json")
    path = tmp_path_factory.getbasetemp() / "fuzz-recipe.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    with pytest.raises(ConfigError) as err:
        load_recipe(str(path)).resolve(layers)
    _check_message(str(err.value), fields, "load_recipe(file)")
    if isinstance(text, str) and len(text) < 100_000 and not text.startswith("["):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return
        with pytest.raises(ConfigError) as err:
            Recipe.from_dict(obj).resolve(layers)
        _check_message(str(err.value), fields, "Recipe.from_dict")


# ---------------------------------------------------------------- (a) the DataFrame import
COLUMNS = ["method", "w_bits", "a_bits", "w_group_size", "w_symmetric", "a_granularity", "clip_search", "alpha", "hadamard_seed",
           "sigma", "rank", "weight_rounding", "gptq_damp", "params"]


def _bad_cell(column: str, in_features: int, fp_row: bool = False):
    """Cell values the table import must refuse for ``column`` on a rtn W8A8 row (the table's cells arrive as text,
    numbers or NaN). On a full-precision row bits and group size are not used, so only values outside every method's
    domain are refused there (w_bits 4 on an fp row is a pending edit, w_bits 99 is a mistake)."""
    text = st.text(max_size=12)
    if fp_row and column in ("w_bits", "a_bits", "w_group_size"):
        ok = _FIELD_RULES[column][0]
        bad_int = st.integers(-10**6, 10**6).filter(lambda v: not ok(v) and not (column == "w_group_size" and v in (0,)))
        return bad_int | text.filter(lambda t: t.strip().lower() not in ("", "0", "none", "per-channel") and not _numeric(t))
    if column == "method":
        return text.filter(lambda t: t.strip().lower() not in METHOD_NAMES)  # the table reads "RTN" as rtn (as bulk edit)
    if column in ("w_bits", "a_bits"):
        lo = 2 if column == "w_bits" else 4
        good = set(range(lo, 9)) | ({16} if column == "a_bits" else set())
        return (st.integers(-10**6, 10**6).filter(lambda b: b not in good) | st.floats(allow_nan=False).filter(lambda f: f not in good)
                | text.filter(lambda t: not _numeric(t)).filter(lambda t: t.strip()))
    if column == "w_group_size":
        return (st.integers(1, 10**6).filter(lambda g: in_features % g and g != 0) | st.integers(-10**6, -1)
                | text.filter(lambda t: t.strip().lower() not in ("", "0", "none", "per-channel") and not _numeric(t)))
    if column in ("w_symmetric", "clip_search"):
        return text.filter(lambda t: t.strip().lower() not in ("true", "yes", "1", "1.0", "false", "no", "0", "0.0"))
    if column in ("alpha", "gptq_damp"):
        ok = _FIELD_RULES[column][0]
        return st.floats(allow_nan=False).filter(lambda f: not ok(f)) | text.filter(lambda t: not _numeric(t))
    if column in ("hadamard_seed", "rank"):
        return st.integers(-10**9, -1 if column == "hadamard_seed" else 0) | text.filter(lambda t: not _numeric(t)) | st.floats(0.1, 1e3).filter(lambda f: f != int(f))
    if column == "params":
        return text.filter(lambda t: t.strip() and not _json_object(t)) | st.just("[1, 2]") | st.just('{"a": NaN}')
    return text.filter(lambda t: t.strip() not in _ENUMS[column])


_ENUMS = {"a_granularity": ("per-token", "per-tensor"), "sigma": ("std", "absmax"), "weight_rounding": ("nearest", "gptq")}


def _numeric(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def _json_object(t: str) -> bool:
    try:
        return isinstance(json.loads(t), dict)
    except ValueError:
        return False


@st.composite
def _table_edit(draw):
    row = draw(st.integers(0, len(_TINY_NAMES) - 1))
    column = draw(st.sampled_from(COLUMNS))
    return row, column


@settings(FUZZ, max_examples=220)
@given(edit=_table_edit(), data=st.data())
def test_dataframe_import(tiny, edit, data):
    """plan_to_frame → one bad cell → frame_to_recipe names the column (and the layer)."""
    TRIED["dataframe"] += 1
    infos = list_linears(tiny.transformer)
    base = Recipe(default=PRESETS["w8a8-rtn"].default, skip=())  # every row quantized: every cell is read
    frame = plan_to_frame(base.resolve(infos), infos).astype(object)
    row, column = edit
    value = data.draw(_bad_cell(column, infos[row].in_features))
    frame.at[row, column] = value
    with pytest.raises(ConfigError) as err:
        frame_to_recipe(frame, base).resolve(infos)
    _check_message(str(err.value), (column,), "frame_to_recipe")
    assert infos[row].name in str(err.value)


# ---------------------------------------------------------------- (b) the CLI
@settings(FUZZ, max_examples=220)
@given(case=_as_text(), command=st.sampled_from(["quantize", "eval"]))
def test_cli_in_process(tiny_dir, tmp_path_factory, case, command):
    """``python -m ditlab quantize|eval --recipe FILE`` through cli.main: exit 2, one line naming the field, no output."""
    from ditlab.cli import main

    TRIED["cli"] += 1
    text, fields = case
    work = tmp_path_factory.getbasetemp()
    recipe = work / "fuzz-cli.json"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    out = work / "fuzz-cli-out"
    argv = [command, "--model", str(tiny_dir), "--recipe", str(recipe)] + (["--out", str(out)] if command == "quantize" else ["--steps", "1"])
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(argv)
    message = stderr.getvalue()
    assert code == 2 and stdout.getvalue() == "" and not out.exists(), (code, message[:300])
    assert message.startswith(f"ditlab {command}: error:")
    _check_message(message, fields, f"cli {command}")


def test_cli_subprocess(tiny_dir, tmp_path, content=b'{"version": 1, "name": "\xff\xfe"}', field="recipe JSON"):
    """The real command line (one run: it imports torch): exit code 2 and one line on stderr, no traceback."""
    recipe = tmp_path / "bad.json"
    recipe.write_bytes(content)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ditlab", "quantize", "--model", str(tiny_dir), "--recipe", str(recipe), "--out", str(tmp_path / "q")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    TRIED["cli subprocess"] += 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ditlab")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1 and field in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------- (c) the app's handlers
@pytest.fixture(scope="module")
def app():
    return pytest.importorskip("app")


def _untouched(outputs) -> bool:
    """gr.update() with no value for every output but the status line: the table (and the rest) stay as they were."""
    return all(isinstance(o, dict) and set(o) <= {"__type__"} for o in outputs[:-1])


@settings(FUZZ, max_examples=220)
@given(case=_as_text(), via=st.sampled_from(["paste", "upload", "compare"]))
def test_app_import(app, tiny_dir, tmp_path_factory, case, via):
    """Import (pasted / uploaded) and Compare with a malformed recipe: one line naming the field, nothing replaced."""
    TRIED["app_import"] += 1
    text, fields = case
    source = str(tiny_dir)
    if via == "upload" or isinstance(text, bytes):
        upload = tmp_path_factory.getbasetemp() / "fuzz-upload.json"
        upload.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        out = app.import_recipe("", str(upload), source)
    elif via == "paste":
        out = app.import_recipe(text, None, source)
    else:
        out = app.compare(text, [0], 1, 0, 2, 4.0, "cpu-int", source)
    message = out[-1]
    assert message.startswith("⚠️") and _untouched(out), message[:300]
    _check_message(message, fields + ("recipe",), f"app {via}")


@settings(FUZZ, max_examples=180)
@given(edit=_table_edit(), data=st.data())
def test_app_table(app, tiny, tiny_dir, edit, data):
    """A bad cell in the recipe table: table_edited and bulk_edit name the column; the table itself is not modified,
    Compare/Export are stopped with the same message."""
    TRIED["app_table"] += 1
    source = str(tiny_dir)
    table = recipe_editing.recipe_table(tiny, PRESETS["w8a8-rtn"]).astype(object)
    row, column = edit
    if column not in recipe_editing.EDITABLE:
        column = recipe_editing.EDITABLE[row % len(recipe_editing.EDITABLE)]
    info = list_linears(tiny.transformer)[row]
    value = data.draw(_bad_cell(column, info.in_features, fp_row=table.at[row, "method"] == "fp"))
    if column == "w_group_size" and isinstance(value, int):
        value = str(value)  # the table shows group sizes as text
    table.at[row, column] = value
    before = table.copy()
    recipe_json = PRESETS["w8a8-rtn"].to_json()
    out = app.table_edited(table, recipe_json, source)
    assert out[-1].startswith("⚠️") and _untouched(out), out[-1][:300]
    _check_message(out[-1], (column,), "app table_edited")
    out = app.bulk_edit(table, recipe_json, "fc1", "W8", source)
    assert _untouched(out)
    _check_message(out[-1], (column,), "app bulk_edit")
    with pytest.raises(app.gr.Error) as err:
        app.recipe_for_run(table, recipe_json, source)
    _check_message(str(err.value), (column,), "app recipe_for_run")
    pd.testing.assert_frame_equal(table, before)  # the user's table is exactly as it was


@settings(FUZZ, max_examples=150)
@given(target=st.sampled_from(["fc1", "all", "block 0", "qkv"]) | st.text(max_size=20),
       setting=st.sampled_from(["W8", "W4A8 g32", "A3", "W9", "g7", "magic", "hadanorm W4A4", "W16A16", "FP", ""]) | st.text(max_size=20))
def test_app_bulk(app, tiny, tiny_dir, target, setting):
    """Bulk edits with arbitrary targets/settings: either applied, or one line naming the setting, the pattern or the
    field that the result would break — and the table is kept."""
    TRIED["app_bulk"] += 1
    table = recipe_editing.recipe_table(tiny, PRESETS["w8a8-rtn"])
    before = table.copy()
    out = app.bulk_edit(table, PRESETS["w8a8-rtn"].to_json(), target, setting, str(tiny_dir))
    pd.testing.assert_frame_equal(table, before)
    if out[-1].startswith("✓"):
        assert isinstance(out[0], pd.DataFrame) and len(out[0]) == len(table)
        return
    assert _untouched(out)
    _check_message(out[-1], ("setting", "layer pattern", "w_bits", "a_bits", "w_group_size", "method", "weight_rounding", "rank"), "app bulk_edit")


# ---------------------------------------------------------------- (d) fields a method ignores, through the app's editing
@pytest.mark.parametrize("preset", ["bnb-nf4", "bnb-int8", "w2-kmeans"])
def test_bulk_group_size_on_own_block_methods_is_a_clear_refusal(tiny, preset):
    """A group size on a bnb / k-means layer (which would be ignored) is refused in one line naming w_group_size and
    the method, through bulk edit and the table; other edits of those rows still work."""
    base = PRESETS[preset]
    table = recipe_editing.recipe_table(tiny, base)
    with pytest.raises(ConfigError) as err:
        recipe_editing.bulk_edit(tiny, table, base, "fc1", "g32")
    _check_message(str(err.value), ("w_group_size",), "bulk_edit group on " + preset)
    assert err.value.field == "w_group_size" and base.default.method in str(err.value)
    edited = table.copy()
    edited.loc[edited["kind"] == "fc1", "w_group_size"] = "64"
    with pytest.raises(ConfigError) as err:
        recipe_editing.table_recipe(tiny, edited, base)
    assert err.value.field == "w_group_size" and err.value.layer
    assert recipe_editing.bulk_edit(tiny, table, base, "fc1", "FP").overrides  # other edits still apply
    assert recipe_editing.bulk_edit(tiny, table, base, "fc1", "per-channel") == base
    assert recipe_editing.bulk_edit(tiny, table, base, "qkv", "rtn W4A8 g32").resolve(list_linears(tiny.transformer))
