"""ditlab.workbench without gradio: the recipe table round trip, bulk edits, recipe JSON import (bad input names the
field), request limits and public mode, the per-session quantized cache, QDIR zip export/import, analysis views."""

import json
import threading
import time
import zipfile

import pytest

from ditlab import exports, jobs, models, plan_table, public, recipe_editing, workbench as wb
from ditlab.config import PRESETS, Recipe
from ditlab.errors import ConfigError, DitlabError, ModelLoadError
from ditlab.models import load_pipeline
from ditlab.testing import tiny_dit_pipeline

FC2 = "transformer_blocks.0.ff.net.2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_pipeline(tiny_dit_pipeline(tmp_path_factory.mktemp("wb") / "dit"))


def test_table_round_trip_unchanged_and_one_edit(tiny):
    base = PRESETS["w8a8-viditq"]
    table = recipe_editing.recipe_table(tiny, base)
    assert list(table.columns) == list(recipe_editing.TABLE_COLUMNS)
    assert recipe_editing.table_recipe(tiny, table, base) is base  # nothing edited: the same recipe
    row = table.index[table["name"] == FC2][0]
    table.loc[row, "w_bits"] = 4
    table.loc[row, "w_group_size"] = "32"
    edited = recipe_editing.table_recipe(tiny, table, base)
    plan = edited.resolve(models.list_linears(tiny.transformer))
    assert (plan[FC2].w_bits, plan[FC2].w_group_size, plan[FC2].method) == (4, 32, "viditq")
    assert plan["transformer_blocks.0.ff.net.0.proj"] == base.resolve(models.list_linears(tiny.transformer))["transformer_blocks.0.ff.net.0.proj"]
    again = recipe_editing.recipe_table(tiny, edited)
    assert again.loc[row, "w_bits"] == 4 and again.loc[row, "w_group_size"] == "32"
    assert recipe_editing.table_recipe(tiny, again, edited) is edited  # idempotent


def test_repeated_edits_keep_one_override_per_layer(tiny):
    """Edits used to append an override each time (14 bulk edits of "all": 42 → 588 overrides, 64 kB, which public
    mode then refused as the app's own recipe). An edited layer keeps one exact-name override, a row set back
    to what the rest of the recipe gives it has none, and a preset edited back is the preset again."""
    base = PRESETS["w4a8-rtn"]
    layers = models.list_linears(tiny.transformer)
    table, recipe = recipe_editing.recipe_table(tiny, base), base
    for i in range(14):
        recipe = recipe_editing.bulk_edit(tiny, table, recipe, "all", "W8" if i % 2 == 0 else "W4")
        table = recipe_editing.recipe_table(tiny, recipe)
    assert len(recipe.overrides) <= len(base.overrides) + len(layers)
    assert len(recipe.to_json()) < 2 * len(recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, base), base, "all", "W4").to_json())
    assert {c.w_bits for c in recipe.resolve(layers).values() if c is not None and not c.is_fp} == {4}
    # one layer to fp and back: the preset again, by name
    table = recipe_editing.recipe_table(tiny, base).astype(object)
    row = table.index[table["name"] == FC2][0]
    table.loc[row, ["method", "w_bits", "a_bits"]] = ["fp", 16, 16]
    to_fp = recipe_editing.table_recipe(tiny, table, base)
    assert to_fp.name == "w4a8-rtn-edited" and to_fp.resolve(layers)[FC2].is_fp
    back = recipe_editing.recipe_table(tiny, base)
    assert recipe_editing.table_recipe(tiny, back, to_fp) == base
    # the same layer edited twice: one override for it, carrying the last edit
    table = recipe_editing.recipe_table(tiny, base).astype(object)
    table.loc[row, "w_bits"] = 8
    once = recipe_editing.table_recipe(tiny, table, base)
    table.loc[row, "a_bits"] = 6
    twice = recipe_editing.table_recipe(tiny, table, once)
    mine = [f for p, f in twice.overrides if p == FC2]
    assert len(mine) == 1 and twice.resolve(layers)[FC2].short() == "rtn W8A6 g64"


@pytest.mark.parametrize("column, value, field", [("a_bits", 3, "a_bits"), ("w_bits", "eight", "w_bits"), ("method", "magic", "method"),
                                                  ("w_group_size", "7", "w_group_size"), ("a_granularity", "per-row", "a_granularity")])
def test_bad_cell_names_the_field_and_layer(tiny, column, value, field):
    table = recipe_editing.recipe_table(tiny, PRESETS["w8a8-rtn"]).astype(object)  # as the UI sends it: any cell may hold text
    table.loc[table["name"] == FC2, column] = value
    with pytest.raises(ConfigError) as err:
        recipe_editing.table_recipe(tiny, table, PRESETS["w8a8-rtn"])
    assert err.value.field == field and FC2 in str(err.value) and "\n" not in str(err.value)


def test_table_with_wrong_rows_is_refused(tiny):
    table = recipe_editing.recipe_table(tiny, PRESETS["fp"]).iloc[:-1]
    with pytest.raises(ConfigError, match="table rows"):
        recipe_editing.table_recipe(tiny, table, PRESETS["fp"])


def test_bulk_edit_kind_block_and_glob(tiny):
    base = PRESETS["w8a8-rtn"]
    table = recipe_editing.recipe_table(tiny, base)
    infos = models.list_linears(tiny.transformer)
    r = recipe_editing.bulk_edit(tiny, table, base, "fc2", "W4 g32")
    plan = r.resolve(infos)
    assert all(plan[i.name].w_bits == 4 and plan[i.name].w_group_size == 32 for i in infos if i.kind == "fc2")
    assert all(plan[i.name].w_bits == 8 for i in infos if i.kind == "fc1")
    r2 = recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, r), r, "block 0", "FP")
    plan2 = r2.resolve(infos)
    assert all(plan2[i.name] is None or plan2[i.name].is_fp for i in infos if i.block == 0)
    assert plan2["transformer_blocks.1.ff.net.2"].w_bits == 4  # earlier edit kept
    r3 = recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, PRESETS["fp"]), PRESETS["fp"], "transformer_blocks.1.attn1.to_*", "W8A8")
    plan3 = r3.resolve(infos)
    assert plan3["transformer_blocks.1.attn1.to_q"].short() == "rtn W8A8" and plan3["transformer_blocks.0.attn1.to_q"].is_fp


def test_bulk_edit_to_a_method_with_its_own_grid_drops_what_it_cannot_take(tiny):
    """'bnb-nf4' on W4A8 g64 rows gives bnb-nf4 W4A16 (its own blocks): the row's A8 and group give way instead of a
    refusal; bits the user writes are still checked ('bnb-nf4 A8' is refused by name)."""
    base = PRESETS["w4a8-rtn"]
    table = recipe_editing.recipe_table(tiny, base)
    infos = models.list_linears(tiny.transformer)
    plan = recipe_editing.bulk_edit(tiny, table, base, "fc1", "bnb-nf4").resolve(infos)
    assert {plan[i.name].short() for i in infos if i.kind == "fc1"} == {"bnb-nf4 W4A16"}
    assert {plan[i.name].short() for i in infos if i.kind == "fc2"} == {"rtn W4A8 g64"}
    plan = recipe_editing.bulk_edit(tiny, table, base, "fc2", "kmeans W3").resolve(infos)
    assert {plan[i.name].short() for i in infos if i.kind == "fc2"} == {"kmeans W3A16"}
    plan = recipe_editing.bulk_edit(tiny, table, base, "fc2", "bnb-int8").resolve(infos)
    assert {plan[i.name].short() for i in infos if i.kind == "fc2"} == {"bnb-int8 W8A16"}
    with pytest.raises(ConfigError) as err:
        recipe_editing.bulk_edit(tiny, table, base, "fc1", "bnb-nf4 A8")
    assert err.value.field == "a_bits"


def test_bulk_edit_keeps_unsaved_table_edits(tiny):
    base = PRESETS["w8a8-rtn"]
    table = recipe_editing.recipe_table(tiny, base)
    table.loc[table["name"] == "transformer_blocks.1.attn1.to_q", "a_bits"] = 6
    r = recipe_editing.bulk_edit(tiny, table, base, "fc2", "W4A8")
    assert r.resolve(models.list_linears(tiny.transformer))["transformer_blocks.1.attn1.to_q"].a_bits == 6


@pytest.mark.parametrize("target, setting, field", [("nope", "W8", "layer pattern"), ("fc2", "A3", "a_bits"), ("fc2", "W9", "w_bits"),
                                                    ("fc2", "banana", "setting"), ("block 99", "W8", "layer pattern")])
def test_bulk_edit_errors_name_the_field(tiny, target, setting, field):
    with pytest.raises(ConfigError) as err:
        recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, PRESETS["fp"]), PRESETS["fp"], target, setting)
    assert err.value.field == field


def test_parse_setting():
    assert recipe_editing.parse_setting("hadanorm W4A4 g64") == {"method": "hadanorm", "w_bits": 4, "a_bits": 4, "w_group_size": 64}
    assert recipe_editing.parse_setting("W8, per-tensor") == {"w_bits": 8, "a_granularity": "per-tensor"}
    assert recipe_editing.parse_setting("fp") == {"method": "fp"}


@pytest.mark.parametrize("text, field", [
    ('{"version": 1, "default": ', "recipe JSON"),  # truncated
    (json.dumps({"version": 1, "default": {"method": "rtn", "w_bits": 8, "a_bits": 3}}), "a_bits"),
    (json.dumps({"version": 1, "overrides": [{"pattern": "nothing.*", "set": {"w_bits": 4}}]}), "override pattern"),
    (json.dumps({"version": 1, "overrides": 5}), "overrides"),
    (json.dumps({"default": {}}), "version"),
    (b"\xff\xfe{", "recipe JSON"),
    ("[" * 100_000 + "]" * 100_000, "recipe JSON"),
    ("", "recipe JSON"),
    ("not-a-preset", "recipe JSON"),
    ("/etc/passwd", "recipe JSON"),  # a path is not read (the app's users may not read the server's files)
])
def test_parse_recipe_bad_input_is_one_clear_line(tiny, text, field):
    with pytest.raises(ConfigError) as err:
        recipe_editing.parse_recipe(text, tiny)
    assert err.value.field == field and "\n" not in str(err.value)


def test_parse_recipe_presets_and_round_trip(tiny):
    assert recipe_editing.parse_recipe("w4a8-hadanorm") is PRESETS["w4a8-hadanorm"]
    r = recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, PRESETS["w8a8-rtn"]), PRESETS["w8a8-rtn"], "adaLN", "FP")
    assert recipe_editing.parse_recipe(r.to_json(), tiny) == r
    assert recipe_editing.parse_recipe(r.to_json().encode(), tiny) == r
    # a byte-order mark (Windows Notepad saves one) is not part of the recipe, uploaded or pasted
    assert recipe_editing.parse_recipe(b"\xef\xbb\xbf" + r.to_json().encode(), tiny) == r
    assert recipe_editing.parse_recipe("\ufeff" + r.to_json(), tiny) == r
    assert recipe_editing.parse_recipe(" w8a8-rtn ") is PRESETS["w8a8-rtn"]
    for text in ("nope", "{bad json", "[1, 2]"):  # the input is named, whatever is wrong with the text as a whole
        with pytest.raises(ConfigError, match="^setting = "):
            recipe_editing.parse_recipe(text, field="setting")


def test_recipe_size_limit_and_public_mode(monkeypatch, tiny, tmp_path):
    monkeypatch.setenv("DITLAB_PUBLIC", "1")
    lim = public.limits()
    assert lim.public and lim.max_images <= 16
    with pytest.raises(ConfigError, match="at most"):
        recipe_editing.parse_recipe('{"version": 1, "name": "' + "x" * lim.max_recipe_bytes + '"}')
    with pytest.raises(ConfigError) as err:
        public.check_request(lim.max_images + 1, 10, 4.0)
    assert err.value.field == "images"
    with pytest.raises(ConfigError) as err:
        wb.model_source("local folder", str(tmp_path))
    assert err.value.field == "local folder"
    with pytest.raises(ConfigError):
        exports.unpack_qdir(tmp_path, tmp_path)  # server folders are not loadable in public mode
    monkeypatch.setenv("DITLAB_ALLOWED_DIRS", str(tmp_path))
    assert wb.model_source("local folder", str(tmp_path)) == str(tmp_path.resolve())


def test_public_mode_is_the_default_on_spaces(monkeypatch):
    monkeypatch.delenv("DITLAB_PUBLIC", raising=False)
    assert not public.limits().public
    monkeypatch.setenv("SPACE_ID", "someone/ditlab")
    assert public.limits().public
    monkeypatch.setenv("DITLAB_PUBLIC", "0")
    assert not public.limits().public


@pytest.mark.parametrize("n, steps, cfg, field", [(0, 10, 4.0, "images"), (4, 0, 4.0, "steps"), (4, 2.5, 4.0, "steps"),
                                                  (4, 10, float("nan"), "CFG scale"), (4, 10, 0.5, "CFG scale")])
def test_check_request(n, steps, cfg, field):
    with pytest.raises(ConfigError) as err:
        public.check_request(n, steps, cfg)
    assert err.value.field == field


def test_model_source_messages(tmp_path):
    assert wb.model_source("shipped", "") == "shipped"
    with pytest.raises(ModelLoadError, match="does not exist"):
        wb.model_source("local folder", str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        wb.model_source("hub id", "  ")
    assert wb.model_source("hub id", "facebook/DiT-XL-2-256") == "facebook/DiT-XL-2-256"
    for bad, says in (("/" + "a" * 5000, "255 per file"), ("/tmp/a\x00b", "without NUL")):  # were OSError / ValueError
        with pytest.raises(ConfigError, match=says):
            wb.model_source("local folder", bad)


def test_the_model_tab_refuses_a_qdir(tiny, tmp_path):
    """An export loaded as a 'local folder' showed 0.62 M parameters, every layer fp, and broke Sensitivity later."""
    from ditlab import api

    folder = api.save(api.quantize(tiny, "w8a8-rtn", progress=False), tiny, tmp_path / "q")
    with pytest.raises(ConfigError, match="QDIR .*Load export"):
        wb.model_source("local folder", str(folder))


def test_memory_and_layers_frames(tiny):
    mem = wb.memory_frame(tiny, PRESETS["w4a8-rtn"])
    fp32, fp16, ideal = mem["MB"]
    assert fp32 == pytest.approx(2 * fp16) and ideal < 0.5 * fp16
    layers = wb.layers_frame(tiny, PRESETS["w4a8-rtn"])
    assert set(layers.loc[layers["kind"] == "embedder", "setting"]) == {"fp (skipped)"}
    assert set(layers.loc[layers["kind"] == "fc1", "setting"]) == {"rtn W4A8 g64"}


def test_quant_cache_bounded_lru_and_quantizes_once(tiny):
    cache = jobs.QuantCache(max_entries=2)
    calls = []

    def slow_quantize(pipe, recipe):
        calls.append(recipe.name)
        time.sleep(0.2)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("s1", tiny, PRESETS["w8a8-rtn"], slow_quantize))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["w8a8-rtn"] and len({id(r) for r in results}) == 1  # concurrent requests: one quantization
    other = cache.get("s2", tiny, PRESETS["w8a8-rtn"], slow_quantize)  # another session: its own copy
    assert other is not results[0] and len(calls) == 2
    cache.get("s1", tiny, PRESETS["w4a8-rtn"], slow_quantize)
    assert len(cache) == 2  # bounded
    cache.drop_session("s1")
    assert len(cache) == 1


def test_session_notes_keep_sessions_apart_and_forget_one():
    notes = jobs.SessionNotes()
    notes.put("a", "sensitivity", 1)
    notes.put("b", "sensitivity", 2)
    assert (notes.get("a", "sensitivity"), notes.get("b", "sensitivity"), notes.get("a", "export", "none")) == (1, 2, "none")
    assert notes.swap("a", "table", "t1", "first") == "first" and notes.swap("a", "table", "t2") == "t1"
    notes.put(None, "export", 3)  # no session (a script without one): "local"
    assert notes.get("local", "export") == 3 and notes.sessions() == {"a", "b", "local"}
    notes.forget("a")
    assert notes.get("a", "table") is None and notes.get("b", "sensitivity") == 2 and notes.sessions() == {"b", "local"}
    counts = []  # swap is one step: 8 threads × 200 swaps see every earlier value exactly once
    threads = [threading.Thread(target=lambda: counts.extend(notes.swap("c", "n", object()) for _ in range(200))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in counts if c is not None}) == 8 * 200 - 1 and counts.count(None) == 1

def test_export_zip_and_load_back(tiny, tmp_path):
    from ditlab import api

    q = api.quantize(tiny, "w8a8-rtn", progress=False)
    folder = api.save(q, tiny, tmp_path / public.safe_name("../../evil name"))
    assert folder.parent == tmp_path and folder.name == "evil-name"
    archive = exports.export_zip(folder)
    back = exports.unpack_qdir(archive, tmp_path)
    loaded, source = exports.load_qdir(back)
    assert loaded.recipe == q.recipe and source == tiny.source
    for name, t in q.pipe.transformer.state_dict().items():
        assert loaded.pipe.transformer.state_dict()[name].equal(t)


def test_unsafe_or_bad_zips_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(ModelLoadError, match="unsafe path"):
        exports.unpack_qdir(evil, tmp_path)
    assert not (tmp_path.parent / "outside.txt").exists()
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(ModelLoadError, match="ditlab_qdir.json"):
        exports.unpack_qdir(empty, tmp_path)
    (tmp_path / "plain.zip").write_text("not a zip")
    with pytest.raises(DitlabError, match="not a zip"):
        exports.unpack_qdir(tmp_path / "plain.zip", tmp_path)


def test_compare_views():
    table = wb.compare_metrics({"psnr": 31.234, "ssim": 0.9, "class_agreement": 0.875, "weight_bytes": 1000, "seconds_fp": 1.0})
    assert dict(zip(table["metric"], table["value"]))["class agreement"] == "88%"
    fig = wb.divergence_figure([0.0, 0.1, 0.2], [999, 500, 1])
    assert list(fig.data[0].y) == [0.0, 0.1, 0.2]
    assert wb.grid_rows(8, 1) == 2 and wb.grid_rows(3, 4) == 3


def test_sensitivity_table_and_cell_target(tiny, monkeypatch, tmp_path):
    from ditlab.calibration import calibrate

    monkeypatch.setattr(wb, "SENSITIVITY_SETTINGS", {"n_images": 2, "steps": 4, "n_groups": 2, "unit": "layer"})
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path))
    res = wb.sensitivity_run(tiny, "w4a8-rtn", calibrate=None, progress=False)
    frame, styler = wb.sensitivity_table(res, "sqnr_db")
    assert list(frame["unit"]) == list(dict.fromkeys(res.frame["unit"])) and frame.shape[1] == 3
    assert "background-color" in styler.to_html()
    calib = calibrate(tiny, n_samples=2, steps=4, use_cache=False, progress=False)
    layer, t = wb.cell_target(tiny, res, calib.timesteps, 1, 2)
    assert layer == frame["unit"][1] and t in calib.timesteps
    alloc, fig, pareto = wb.allocation_views(tiny, 6.0, progress=False)
    assert alloc.avg_w_bits <= 6.0 and isinstance(alloc.recipe, Recipe)


def test_cancel_stops_a_running_job_at_the_next_layer(tiny):
    from ditlab.sampling import sample

    registry = jobs.Jobs()
    outcome = {}

    def job(session, steps):
        try:
            with registry.run(session):
                sample(tiny, [0, 1], steps=steps, progress=False)
            outcome[session] = "finished"
        except jobs.Cancelled as exc:
            outcome[session] = str(exc)

    long = threading.Thread(target=job, args=("a", 1000))
    other = threading.Thread(target=job, args=("b", 3))
    long.start()
    other.start()
    assert registry.cancel("zzz") == (0, 0)
    while (outcome_of_cancel := registry.cancel("a", wait=30)) == (0, 0):  # as soon as the job runs
        assert long.is_alive()
        time.sleep(0.01)
    assert outcome_of_cancel == (1, 0)  # signalled, and stopped within the wait
    t0 = time.perf_counter()
    long.join(timeout=30)
    other.join(timeout=60)
    assert not long.is_alive() and time.perf_counter() - t0 < 30
    assert outcome == {"a": "cancelled: the job stopped at your request", "b": "finished"}  # the other session ran on
    sample(tiny, [0], steps=2, progress=False)  # outside a job the hook does nothing


def test_cancel_waits_for_the_job_and_reports_one_still_in_its_layer():
    """``cancel(wait=…)`` returns once the signalled jobs have ended, or at the timeout with the count still running
    (a job between module forwards, e.g. quantizing a layer, cannot stop before its next forward)."""
    registry = jobs.Jobs()
    entered, release = threading.Event(), threading.Event()

    def job():
        with registry.run("s"):
            entered.set()
            release.wait(30)  # no module forward here: the job cannot stop yet

    worker = threading.Thread(target=job)
    worker.start()
    assert entered.wait(30)
    assert registry.names("s") == ["job"] and registry.names("other") == []
    assert registry.cancel("s", wait=0.2) == (1, 1)
    threading.Timer(0.3, release.set).start()
    assert registry.cancel("s", wait=30) == (1, 0)
    worker.join(timeout=30)
    assert registry.cancel("s") == (0, 0)


@pytest.mark.parametrize("text, clash", [("W4 W8", "w_bits"), ("W4A8 A4", "a_bits"), ("g64 per-channel", "w_group_size"), ("rtn hadanorm", "method")])
def test_a_bulk_setting_that_contradicts_itself_is_refused(text, clash):
    """'W4 W8' used to mean W8 (the last token won) while the status echoed 'W4 W8'."""
    with pytest.raises(ConfigError, match=f"both set {clash}"):
        recipe_editing.parse_setting(text)
    with pytest.raises(ConfigError, match="FP alone"):
        recipe_editing.parse_setting("fp W4")
    assert recipe_editing.parse_setting("hadanorm W4 A4 g64") == {"method": "hadanorm", "w_bits": 4, "a_bits": 4, "w_group_size": 64}


def test_a_plain_fp_default_needs_no_bits():
    """{"method": "fp"} is full precision (16/16); it was refused with the field default 'w_bits = 8'."""
    from ditlab.config import Recipe

    assert Recipe.from_json('{"version": 1, "default": {"method": "fp"}}').default.is_fp
    with pytest.raises(ConfigError, match="w_bits = 8"):
        Recipe.from_json('{"version": 1, "default": {"method": "fp", "w_bits": 8}}')


def test_a_method_change_drops_the_old_methods_hidden_settings(tiny):
    """w4a16-gptq's fc2 → rtn is plain rtn (GPTQ rounding came from the method), → bnb-nf4 is not refused for a
    weight_rounding the table does not show; params the user writes for the new method stay."""
    base = PRESETS["w4a16-gptq"]
    table = recipe_editing.recipe_table(tiny, base)
    infos = models.list_linears(tiny.transformer)
    plan = recipe_editing.bulk_edit(tiny, table, base, "fc2", "rtn").resolve(infos)
    assert {(plan[i.name].method, plan[i.name].weight_rounding) for i in infos if i.kind == "fc2"} == {("rtn", "nearest")}
    plan = recipe_editing.bulk_edit(tiny, table, base, "fc2", "bnb-nf4").resolve(infos)
    assert {plan[i.name].short() for i in infos if i.kind == "fc2"} == {"bnb-nf4 W4A16"}
    kept = PRESETS["w4a8-rtn"].replace(default=PRESETS["w4a8-rtn"].default.replace(weight_rounding="gptq"))
    plan = recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, kept), kept, "fc1", "hadanorm").resolve(infos)
    assert {plan[i.name].weight_rounding for i in infos if i.kind == "fc1"} == {"gptq"}  # composes: kept
    full = plan_table.plan_to_frame(PRESETS["w2-vq4dit"].resolve(infos), infos)
    name = "transformer_blocks.0.ff.net.0.proj"
    full.loc[full["name"] == name, ["method", "params"]] = ["kmeans", '{"seed": 3}']  # written with the change: kept
    assert plan_table.frame_to_recipe(full, PRESETS["w2-vq4dit"]).resolve(infos)[name].params == {"seed": 3}


def test_bulk_edit_on_fp_rows_under_a_bnb_default_uses_its_bits(tiny):
    base = PRESETS["bnb-nf4"]
    infos = models.list_linears(tiny.transformer)
    r1 = recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, base), base, "fc2", "FP")
    plan = recipe_editing.bulk_edit(tiny, recipe_editing.recipe_table(tiny, r1), r1, "fc2", "A16").resolve(infos)
    assert {plan[i.name].short() for i in infos if i.kind == "fc2"} == {"bnb-nf4 W4A16"}  # was: w_bits = 8 refused
