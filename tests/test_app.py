"""The app's handlers called directly, then every named endpoint through gradio_client against a server started here.

Heavy work runs on a tiny random DiT loaded as a "local folder" (the handlers take the session's model source), with
the app's sensitivity and calibration settings shrunk, so the whole module takes well under two minutes.
"""

import json
import re
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ditlab import models, workbench
from ditlab.config import PRESETS
from ditlab.testing import tiny_dit_pipeline

app = pytest.importorskip("app")

LABELS = ["0", "1"]  # the class pickers take class ids as text, as the API description advertises
BAD_JSON = '{"version": 1, "default": {'
BAD_ABITS = json.dumps({"version": 1, "default": {"method": "rtn", "w_bits": 8, "a_bits": 3}})
BAD_PATTERN = json.dumps({"version": 1, "default": {"method": "rtn", "w_bits": 8, "a_bits": 8},
                          "overrides": [{"pattern": "no_such_block.*", "set": {"w_bits": 4}}]})


@pytest.fixture(scope="module", autouse=True)
def small_settings(tmp_path_factory):
    """Small analysis settings and a private cache for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DITLAB_CACHE", str(tmp_path_factory.mktemp("app-cache")))
        mp.setattr(workbench, "SENSITIVITY_SETTINGS", {"n_images": 2, "steps": 4, "n_groups": 2, "unit": "layer"})
        mp.setitem(workbench.APP_CALIBRATION, "n_samples", 2)
        mp.setitem(workbench.APP_CALIBRATION, "steps", 4)
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_dit_pipeline(tmp_path_factory.mktemp("app") / "tiny-dit"))


def _msg(outputs) -> str:
    return str(outputs[-1])


# ---------------------------------------------------------------- handlers, called directly
def test_generate_on_the_shipped_model():
    grid, status = app.generate([0, 1], 1, 0, 2, 4.0)
    assert grid.shape[2] == 3 and "2 images" in status
    assert _msg(app.generate([], 1, 0, 2, 4.0)).startswith("⚠️ labels")
    for cleared in (None, 0, 2.5):  # a cleared or odd "images per class" names the field, no internal error
        assert _msg(app.generate([0], cleared, 0, 2, 4.0)).startswith("⚠️ images per class")
    assert _msg(app.generate([], 1, 0, None, 4.0)).startswith("⚠️ steps")
    for seed in (-1, 2**32, 2**70):  # 32-bit seeds: a larger one would silently give another seed's images
        assert _msg(app.generate([0], 1, seed, 2, 4.0)).startswith("⚠️ seed")


def test_generate_uses_the_session_model_and_says_when_it_is_cached(tiny):
    grid, status = app.generate([0, 1], 1, 0, 2, 4.0, "dpm++", tiny)
    assert f"of `{tiny}`" in status and "cached" not in status
    again, status2 = app.generate([0, 1], 1, 0, 2, 4.0, "dpm++", tiny)
    assert (again == grid).all() and "cached" in status2
    shipped, _ = app.generate([0, 1], 1, 0, 2, 4.0, "dpm++")
    assert shipped.shape != grid.shape or not (shipped == grid).all()  # another model, other images


def test_sampler_choice_changes_the_images_and_is_named():
    """The default sampler is DPM-Solver++ (the first choice); DDIM gives other images for the same seed; a sampler
    that does not exist is refused by name."""
    assert [v for _, v in app.SCHEDULER_CHOICES] == ["dpm++", "ddim"]
    default, status = app.generate([0, 1], 1, 0, 3, 4.0)
    dpm, _ = app.generate([0, 1], 1, 0, 3, 4.0, "dpm++")
    ddim, ddim_status = app.generate([0, 1], 1, 0, 3, 4.0, "ddim")
    assert (default == dpm).all() and not (ddim == dpm).all()
    assert "DPM-Solver++(2M)" in status and "DDIM" in ddim_status
    assert _msg(app.generate([0], 1, 0, 3, 4.0, "euler")).startswith("⚠️ sampler")


def test_load_model_shipped_local_and_bad_sources(tiny):
    out = app.load_model("local folder", tiny)
    assert out[0] == tiny and "DiTTransformer2DModel" in out[1] and _msg(out).startswith("✓")
    assert out[8] == "fp" and "reset to **fp**" in out[-2]  # the Recipe tab's preset and status follow the reset
    assert len(out[4]) == len(models.list_linears(app.api.load(tiny).transformer))
    assert app.load_model("shipped", "")[0] == "shipped"
    assert "does not exist" in _msg(app.load_model("local folder", "/no/such/folder"))
    for bad in ("x" * 500, "a/b/c", "../etc", "some one/dit"):  # not a hub id: refused by name before any lookup
        assert _msg(app.load_model("hub id", bad)).startswith("⚠️ hub id"), bad
    hub = _msg(app.load_model("hub id", "someone/not-cached-dit"))
    assert hub.startswith("⚠️") and "\n" not in hub


def test_apply_preset_and_table_edit(tiny):
    table, text, layers, memory, msg = app.apply_preset("w4a8-rtn", tiny)
    assert "w4a8-rtn" in msg and json.loads(text)["name"] == "w4a8-rtn"
    assert set(layers.loc[layers["kind"] == "fc1", "setting"]) == {"rtn W4A8 g64"}
    edited = table.astype(object)
    edited.loc[edited["name"] == "transformer_blocks.1.ff.net.2", "w_bits"] = 8
    shown, text2, layers2, _, msg2 = app.table_edited(edited, text, tiny)
    assert msg2.startswith("✓") and layers2.loc[layers2["name"] == "transformer_blocks.1.ff.net.2", "setting"].item() == "rtn W8A8 g64"
    assert isinstance(shown, dict)  # the table reads as typed: not redrawn (an edit in progress elsewhere survives)
    as_text = edited.astype(object)  # a number typed as " 8" is read as 8 and the table is left alone
    as_text.loc[as_text["name"] == "transformer_blocks.1.ff.net.2", "w_bits"] = " 8"
    assert isinstance(app.table_edited(as_text, text, tiny)[0], dict)
    to_fp = edited.astype(object)  # method fp typed on a W4A8 row: the recipe makes it 16/16 and the table shows it
    to_fp.loc[to_fp["name"] == "transformer_blocks.0.attn1.to_q", "method"] = "fp"
    shown, fp_text, *_, fp_msg = app.table_edited(to_fp, text2, tiny)
    assert fp_msg.startswith("✓") and isinstance(shown, pd.DataFrame)
    row = shown.loc[shown["name"] == "transformer_blocks.0.attn1.to_q"].iloc[0]
    assert (row["method"], row["w_bits"], row["a_bits"]) == ("fp", 16, 16)
    override = [o for o in json.loads(fp_text)["overrides"] if o["pattern"] == "transformer_blocks.0.attn1.to_q"]
    assert [o["set"]["method"] for o in override] == ["fp"]
    edited.loc[edited["name"] == "transformer_blocks.1.ff.net.2", "a_bits"] = 3
    out = app.table_edited(edited, text2, tiny)
    assert "a_bits = 3" in _msg(out) and "transformer_blocks.1.ff.net.2" in _msg(out)
    assert all(isinstance(o, dict) for o in out[:-1])  # gr.update(): the table and recipe stay as they were
    fp_row = edited.astype(object)  # a method typed on a full-precision row (16/16 bits): said, not dropped silently
    fp_row.loc[fp_row["name"] == "transformer_blocks.1.ff.net.2", ["method", "w_bits", "a_bits"]] = ["hadanorm", 16, 16]
    out = app.table_edited(fp_row, text2, tiny)
    assert "w_bits = 16" in _msg(out) and "hadanorm" in _msg(out) and "transformer_blocks.1.ff.net.2" in _msg(out)
    back = shown.astype(object)  # a method typed on a full-precision row: 8-bit weights, as bulk edit gives, redrawn
    back.loc[back["name"] == "transformer_blocks.0.attn1.to_q", "method"] = "hadanorm"
    shown_back, back_text, *_, back_msg = app.table_edited(back, fp_text, tiny)
    row = shown_back.loc[shown_back["name"] == "transformer_blocks.0.attn1.to_q"].iloc[0]
    assert back_msg.startswith("✓") and (row["method"], row["w_bits"], row["a_bits"]) == ("hadanorm", 8, 16)
    assert [o["set"] for o in json.loads(back_text)["overrides"] if o["pattern"] == "transformer_blocks.0.attn1.to_q"] \
        == [{"method": "hadanorm", "w_bits": 8, "a_bits": 16, "w_group_size": None}]  # vs the preset's rtn W4A8 g64
    zero = edited.astype(object)  # group size 0 is refused as in recipe JSON (it used to mean per-channel here only)
    zero.loc[zero["name"] == "transformer_blocks.1.ff.net.2", ["a_bits", "w_group_size"]] = [8, "0"]
    assert "w_group_size" in _msg(app.table_edited(zero, text2, tiny))
    assert "preset name" in _msg(app.apply_preset("no-such-preset", tiny))


@pytest.mark.parametrize("public, per_class", [("1", 1), ("0", 5)])
def test_first_screen_and_sliders_fit_the_request_limit(monkeypatch, public, per_class):
    """The first screen's request is one the server accepts in both modes (in public mode, e.g. on Spaces, it asked
    for 10 × 5 images where 16 are allowed, so the page opened on a warning), and the images-per-class sliders offer
    only what the limit allows for the chosen classes."""
    monkeypatch.setenv("DITLAB_PUBLIC", public)
    screen = app.first_screen()
    assert screen["n_per_label"] == per_class and len(screen["labels"]) == 10
    app.api.check_request(len(screen["labels"]) * screen["n_per_label"], screen["steps"], screen["guidance"], screen["seed"])
    limit = app.api.limits().max_images
    for n_labels in (1, 3, 7, 10):
        update = app.images_per_class([str(i) for i in range(n_labels)], 16, cap=16)
        top = min(16, limit // n_labels)
        assert update["value"] == top and update["interactive"] == (top > 1)  # 16 came down to the top
        assert update["maximum"] == max(top, 2)  # gradio refuses a slider whose top is its bottom: locked at 1 instead
        app.api.check_request(n_labels * top, 10, 4.0, 0)  # the top is a request the server accepts
        if top < 16:
            assert f"at most {top}" in update["info"] and f"{limit} images per request" in update["info"]
        else:
            assert update["info"] == ""  # clears the note (None would leave the last one standing)
    assert app.images_per_class([], 3, cap=8)["value"] == 3  # no class chosen: generate names that field


def test_every_preset_quantizes_and_compares_under_gradio_progress_tracking(tiny):
    """The app's handlers run with gradio's tqdm tracking; every preset the picker offers must work under it (the
    VQ4DiT and k-means ones did not)."""
    from types import SimpleNamespace as NS

    from gradio.context import LocalContext

    pipe = app.api.load(tiny)
    for var, value in ((LocalContext.progress, app.gr.Progress(track_tqdm=True)), (LocalContext.event_id, "event"),
                       (LocalContext.blocks, NS(_queue=NS(set_progress=lambda *a, **k: None)))):
        var.set(value)
    try:
        for name in app.PRESET_NAMES:
            q = app.api.quantize(pipe, name, calib_settings=app.api.APP_CALIBRATION)
            assert app.api.compare(pipe, q, [0, 1], steps=2, guidance=4.0, seed=0).metrics["psnr"] > 20, name
    finally:
        for var in (LocalContext.progress, LocalContext.event_id, LocalContext.blocks):
            var.set(None)


def test_gradio_progress_tracking_survives_a_loop_that_stops_early():
    """Under gradio's tqdm tracking (what the app's handlers run with), a bar left open by a loop that breaks early
    (k-means on convergence) fed the caller's next loop from its range: every VQ4DiT and k-means preset failed in
    Compare and Export with "TypeError: cannot unpack non-iterable int object"."""
    from types import SimpleNamespace as NS

    from gradio.context import LocalContext
    from tqdm.auto import tqdm

    from ditlab import vq

    for var, value in ((LocalContext.progress, app.gr.Progress(track_tqdm=True)), (LocalContext.event_id, "event"),
                       (LocalContext.blocks, NS(_queue=NS(set_progress=lambda *a, **k: None)))):
        var.set(value)
    try:
        seen = []
        for name, cfg in tqdm([("a", 1), ("b", 2), ("c", 3)], desc="outer"):
            vq.kmeans(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), 4, iters=50, progress=True)  # converges early
            seen.append(name)
        assert seen == ["a", "b", "c"]
    finally:
        for var in (LocalContext.progress, LocalContext.event_id, LocalContext.blocks):
            var.set(None)


def test_user_text_in_a_status_is_plain_text():
    assert app._shown("a\n# HEAD **b**") == "a # HEAD \\*\\*b\\*\\*"  # one line: no heading; no bold
    assert app._shown("<img src=x onerror=alert(1)>").startswith("&lt;img")
    assert "\\://" in app._shown("see http://evil.example/x") and "www\\." in app._shown("www.evil.example")  # no links
    assert app._shown("x" * 200).endswith("…") and len(app._shown("x" * 200)) == 81 and app._shown("  ") == "(unnamed)"
    assert app._shown("w4a8-rtn-edited") == "w4a8-rtn-edited"


def test_one_edit_sent_twice_warns_once(tiny, monkeypatch):
    """The browser sends one table edit twice: the copy within a second changes nothing (one warning for one
    mistake); the same table later, or in another session, is checked again."""
    clock = [100.0]
    monkeypatch.setattr(app, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    table, text, *_ = app.apply_preset("w4a8-rtn", tiny)
    bad = table.astype(object)
    bad.loc[bad["name"] == "transformer_blocks.0.attn1.to_q", "a_bits"] = 3
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")
    assert "a_bits = 3" in _msg(app.table_edited(bad, text, tiny, request=alice))
    clock[0] += 0.2
    assert all(isinstance(o, dict) for o in app.table_edited(bad, text, tiny, request=alice))  # the copy: no-op
    assert "a_bits = 3" in _msg(app.table_edited(bad, text, tiny, request=bob))  # another session: checked
    clock[0] += 1.5  # e.g. a preset reloaded the same table meanwhile: the status must say it again
    assert "a_bits = 3" in _msg(app.table_edited(bad, text, tiny, request=alice))
    assert _msg(app.table_edited(table, text, tiny, request=alice)).startswith("✓")  # a different table: checked


def test_bulk_edit_import_and_download(tiny):
    table, text, *_ = app.apply_preset("w8a8-rtn", tiny)
    out = app.bulk_edit(table, text, "fc2", "W4A8 g32", tiny)
    assert out[-1].startswith("✓") and set(out[2].loc[out[2]["kind"] == "fc2", "setting"]) == {"rtn W4A8 g32"}
    assert "layer pattern" in _msg(app.bulk_edit(table, text, "nothing_like_this", "W8", tiny))
    assert "a_bits = 3" in _msg(app.bulk_edit(table, text, "fc1", "A3", tiny))
    imported = app.import_recipe(out[1], None, tiny)
    assert json.loads(imported[1]) == json.loads(out[1])
    for bad, field in ((BAD_JSON, "recipe JSON"), (BAD_ABITS, "a_bits"), (BAD_PATTERN, "override pattern")):
        assert field in _msg(app.import_recipe(bad, None, tiny))
    # the Download button's file follows the recipe (it is set on each change: a click serves what the button holds)
    first = app.download_recipe(text)
    assert json.loads(Path(first).read_text()) == json.loads(text)
    second = app.download_recipe(out[1])
    assert json.loads(Path(second).read_text()) == json.loads(out[1])
    assert not Path(first).exists()  # a session keeps its newest file only (they piled up for the life of the process)
    assert isinstance(app.download_recipe("{not json"), dict) and Path(second).exists()  # an invalid recipe keeps the last


def test_recipe_for_run_stops_on_an_invalid_table(tiny):
    table, text, *_ = app.apply_preset("w8a8-rtn", tiny)
    assert json.loads(app.recipe_for_run(table, text, tiny))["name"] == "w8a8-rtn"
    bad = table.astype(object)
    bad.loc[0, "method"] = "magic"
    with pytest.raises(app.gr.Error, match="method"):
        app.recipe_for_run(bad, text, tiny)


def test_compare_outputs_and_bad_recipes(tiny):
    fp, q, diff, metrics, fig, status = app.compare(PRESETS["w8a8-rtn"].to_json(), LABELS, 1, 0, 3, 4.0, "cpu-int", tiny)
    assert fp.shape == q.shape == diff.shape and "cpu-int" not in status or "CPU integer path" in status
    assert "PSNR (dB)" in list(metrics["metric"]) and len(fig.data[0].y) == 3
    ref = app.compare(PRESETS["w8a8-rtn"].to_json(), LABELS, 1, 0, 3, 4.0, "reference", tiny)
    assert (ref[1] == q).all() and "reference path" in ref[-1]  # same numbers on both paths
    for bad, field in ((BAD_JSON, "recipe JSON"), (BAD_ABITS, "a_bits"), (BAD_PATTERN, "override pattern")):
        assert field in _msg(app.compare(bad, LABELS, 1, 0, 3, 4.0, "cpu-int", tiny))
    assert "steps" in _msg(app.compare(PRESETS["fp"].to_json(), LABELS, 1, 0, 10_000, 4.0, "cpu-int", tiny))
    assert _msg(app.compare(PRESETS["fp"].to_json(), LABELS, None, 0, 3, 4.0, "cpu-int", tiny)).startswith("⚠️ images per class")
    assert "backend = 'gpu-magic'" in _msg(app.compare(PRESETS["fp"].to_json(), LABELS, 1, 0, 3, 4.0, "gpu-magic", tiny))
    assert "no layer is quantized" in _msg(app.compare(PRESETS["fp"].to_json(), LABELS, 1, 0, 3, 4.0, "cpu-int", tiny))
    ddim = app.compare(PRESETS["w8a8-rtn"].to_json(), LABELS, 1, 0, 3, 4.0, "cpu-int", tiny, "ddim")
    assert "DDIM" in ddim[-1] and "DPM-Solver++(2M)" in status and not (ddim[0] == fp).all()  # FP images follow the sampler too
    assert _msg(app.compare(PRESETS["fp"].to_json(), LABELS, 1, 0, 3, 4.0, "cpu-int", tiny, "euler")).startswith("⚠️ sampler")


def test_outliers_sensitivity_cell_click_and_allocate(tiny):
    layer = "transformer_blocks.0.ff.net.2"
    timesteps = app.api.calibration_timesteps(app.api.load(tiny))
    fig, table, omap, msg = app.outliers(layer, timesteps[1], "cond", tiny)
    assert layer in msg and set(table["transform"]) >= {"HadaNorm", "SmoothQuant"} and len(fig.data) > 5
    assert "layer" in _msg(app.outliers("nope", timesteps[1], "cond", tiny))
    s_fig, styled, s_msg = app.sensitivity("w4a8-rtn", "sqnr_db", tiny)
    assert "cells computed" in s_msg and "background-color" in styled.to_html()

    class Click:  # what gr.SelectData carries
        index = [2, 1]

    other = app.sensitivity_metric("w4a8-rtn", "psnr", tiny)  # a new metric re-draws the last result, computes nothing
    assert "shown as psnr" in other[-1] and "psnr" in other[0].layout.title.text.lower()
    redrawn = app.sensitivity_metric("w8a8-rtn", "ssim", tiny)  # the picker names another setting: the table shown follows
    assert "w4a8-rtn: shown as ssim" in redrawn[-1] and "Run sensitivity" in redrawn[-1] and "w8a8-rtn" in redrawn[-1]
    assert "ssim" in redrawn[0].layout.title.text.lower()
    fresh = app.sensitivity_metric("w8a8-rtn", "psnr", tiny, request=SimpleNamespace(session_hash="nobody-yet"))
    assert "Run sensitivity" in fresh[-1] and isinstance(fresh[0], dict)  # nothing measured in that session

    with pytest.raises(app.gr.Error, match="Run sensitivity first"):  # another session has no table to click
        app.open_cell(tiny, Click(), request=SimpleNamespace(session_hash="someone-else"))
    calls = []
    real_run = app.api.sensitivity_run
    app.api.sensitivity_run = lambda *a, **k: calls.append(a) or real_run(*a, **k)
    try:  # the cell of the table shown (the last result), whatever the setting picker names now: nothing is measured
        tabs, o_layer, o_t, note = app.open_cell(tiny, Click())
    finally:
        app.api.sensitivity_run = real_run
    assert o_layer == styled.data["unit"][2] and o_t in timesteps and "opened" in note and "w4a8-rtn" in note and not calls
    # the setting is a preset or recipe JSON text, never a file on the server (public mode must not read them)
    assert "preset name" in _msg(app.sensitivity("/etc/passwd", "sqnr_db", tiny))
    assert "preset name" in _msg(app.sensitivity("x" * 5000 + ".json", "sqnr_db", tiny))
    out = app.allocate(6.0, tiny)
    name = json.loads(out[1])["name"]
    assert out[-1].startswith("✓") and json.loads(out[1])["overrides"]
    assert out[4] is None and name in out[5]  # the preset picker is cleared and the Recipe tab's status names the recipe


def test_the_budget_slider_alone_never_replaces_the_table():
    """Only the Allocate button runs the allocator: no event of the budget slider writes the recipe table."""
    config = app.demo.config
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    for dep in config["dependencies"]:
        triggers = {component for component, _ in dep["targets"]}
        if ids["budget"] in triggers:
            assert ids["recipe_table"] not in dep["outputs"], dep


def test_every_long_job_has_a_cancel_button_on_its_tab():
    """Generate had none (a 64-image, 100-step run could only be waited out); each tab's Cancel stops the session's
    jobs of every tab, Generate's included."""
    config = app.demo.config
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    deps = config["dependencies"]

    def triggered_by(elem_id):
        return [d for d in deps if (ids[elem_id], "click") in [tuple(t) for t in d["targets"]]]

    heavy = {fn_id for fn_id, fn in app.demo.fns.items() if fn.concurrency_id == "heavy"}  # the long jobs
    assert {"generate", "compare", "outliers", "sensitivity", "allocate", "export"} <= {app.demo.fns[i].name for i in heavy}
    for button in ("g_cancel", "cancel", "o_cancel", "s_cancel", "e_cancel"):
        cancels = {i for d in triggered_by(button) for i in d["cancels"]}
        assert heavy <= cancels, button


def test_the_preset_picker_and_the_download_follow_the_recipe():
    """Whatever changes the recipe (table, bulk edit, import, Allocate, Load export), the picker names the preset it
    is (empty otherwise; it kept showing the old preset) and Download serves it."""
    assert app.preset_shown(PRESETS["w4a8-rtn"].to_json()) == "w4a8-rtn"
    assert app.preset_shown(PRESETS["w4a8-rtn"].replace(name="mine").to_json()) is None
    edited = PRESETS["w4a8-rtn"].replace(name="w4a8-rtn", overrides=(("*.to_q", {"w_bits": 8}),))
    assert app.preset_shown(edited.to_json()) is None  # named like the preset, but not the preset
    config = app.demo.config
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    followers = {out for dep in config["dependencies"] if (ids["recipe_json"], "change") in [tuple(t) for t in dep["targets"]]
                 for out in dep["outputs"]}
    assert {ids["preset"], ids["recipe_download"]} <= followers


def test_export_and_load_back(tiny, tmp_path):
    text = PRESETS["w8a8-rtn"].to_json()
    zip_path, recipe_path, msg = app.export(text, tiny)
    assert zip_path.endswith(".zip") and json.loads(open(recipe_path).read())["name"] == "w8a8-rtn" and msg.startswith("✓")
    out = app.load_export(zip_path, "")
    assert out[0] == tiny and json.loads(out[2])["name"] == "w8a8-rtn" and out[-1].startswith("✓")
    assert out[5] is None and "w8a8-rtn" in out[6] and Path(zip_path).name in out[-1]  # names the uploaded file
    status = app.compare(text, ["0"], 1, 0, 2, 4.0, "cpu-int", tiny)[-1]  # says whose weights it used
    assert "weights of the loaded export" in status and Path(zip_path).name in status, status  # the name the user knows
    other = app.compare(text, ["0"], 1, 0, 2, 4.0, "cpu-int", tiny, request=SimpleNamespace(session_hash="another"))[-1]
    assert "loaded export" not in other, other
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"nope")
    assert "not a zip" in _msg(app.load_export(str(bad), ""))
    for nothing in ("", None, "  "):
        assert _msg(app.load_export(None, nothing)).startswith("⚠️ export")
    parent = tmp_path / "parent"  # a server folder must be the QDIR itself: its subfolders are not searched
    shutil.copytree(Path(out[0]), parent / "not-a-qdir")
    app.api.save(app.api.quantize(app.api.load(tiny), "w8a8-rtn", progress=False), app.api.load(tiny), parent / "qdir")
    assert app.load_export(None, str(parent / "qdir"))[-1].startswith("✓")
    assert "no ditlab_qdir.json" in _msg(app.load_export(None, str(parent)))


@pytest.mark.parametrize("call, field", [
    (lambda t, text: app.bulk_edit(app.apply_preset("w8a8-rtn", t)[0], text, 3, "W8", t), "layer pattern"),
    (lambda t, text: app.load_export(None, "/" + "a" * 5000), "export"),
    (lambda t, text: app.load_model("local folder", "/" + "a" * 5000), "local folder"),
    (lambda t, text: app.load_model("local folder", "/tmp/a\x00b"), "local folder"),
    (lambda t, text: app.sensitivity("x" * 100_000, "sqnr_db", t), "setting"),
])
def test_odd_inputs_get_a_message_not_an_internal_error(tiny, call, field):
    """Each of these answered "internal error …" with a traceback in the server log."""
    assert _msg(call(tiny, PRESETS["w8a8-rtn"].to_json())).startswith(f"⚠️ {field}")


def test_uploads_and_exports_do_not_pile_up_on_disk(tiny, tmp_path):
    """A session keeps only its newest export and its loaded upload; a refused upload leaves nothing; the session's
    folders go when it ends (they grew by every upload and export, 149 MB in one review)."""
    alice = SimpleNamespace(session_hash="alice-disk", client=SimpleNamespace(host="10.0.0.1"), headers={})
    base = app.WORKDIR / "sessions" / "alice-disk"

    def folders(kind):
        return sorted(p.name for p in (base / kind).iterdir()) if (base / kind).is_dir() else []

    first = app.export(PRESETS["w8a8-rtn"].to_json(), tiny, request=alice)[0]
    second = app.export(PRESETS["w4a8-rtn"].to_json(), tiny, request=alice)[0]
    assert len(folders("export")) == 1 and not Path(first).exists() and Path(second).is_file()
    assert not [p for p in (base / "export").rglob("ditlab_qdir.json")]  # the zip holds the QDIR: the folder is gone
    ok = app.load_export(second, "", request=alice)
    assert ok[-1].startswith("✓") and len(folders("upload")) == 1
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"nope")
    assert "not a zip" in _msg(app.load_export(str(bad), "", request=alice))
    assert len(folders("upload")) == 1  # the refused upload left nothing; the loaded one stays in use
    both = app.load_export(second, "/somewhere/else", request=alice)
    assert "the server path was not used" in both[-1] and len(folders("upload")) == 1
    app.forget_session(alice)
    assert not base.exists()


def test_a_refused_upload_is_named_not_the_server_folder(tiny, tmp_path):
    """A tampered export: the message names the uploaded zip, never the server folder it was unpacked into."""
    import zipfile

    zip_path = app.export(PRESETS["w8a8-rtn"].to_json(), tiny)[0]
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.writestr(item, data)
    message = _msg(app.load_export(str(tampered), ""))
    assert message.startswith("⚠️ tampered.zip: transformer/") and "checksum" in message and "qdir-" not in message, message


def test_app_workdir_removes_what_dead_processes_left(tmp_path):
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
    (tmp_path / f"ditlab-app-{dead}-abc").mkdir()
    (tmp_path / f"ditlab-app-{os.getppid()}-live").mkdir()  # a live process's folder stays
    (tmp_path / "ditlab-app-oldstyle").mkdir()  # no pid in the name: not ours to judge
    mine = app.api.app_workdir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, f"ditlab-app-{os.getppid()}-live", "ditlab-app-oldstyle"])
    assert mine.name.startswith(f"ditlab-app-{os.getpid()}-")


def test_a_loaded_export_is_read_back_not_requantized_after_eviction(tiny, monkeypatch):
    """Other sessions' Compares push the loaded export out of the shared cache; the next Compare reads its QDIR again."""
    text = PRESETS["w4a8-rtn"].to_json()
    zip_path, _, _ = app.export(text, tiny)
    assert app.load_export(zip_path, "")[-1].startswith("✓")
    loaded = app._quantized(tiny, PRESETS["w4a8-rtn"], None)
    for n in range(app.QUANTIZED.max_entries):  # evict it
        app.QUANTIZED.put(f"other-{n}", app.api.load(tiny), PRESETS["w8a8-rtn"], object())

    def no_quantize(*args, **kwargs):
        raise AssertionError("the loaded export was re-quantized")

    monkeypatch.setattr(app.api, "quantize", no_quantize)
    again = app._quantized(tiny, PRESETS["w4a8-rtn"], None)
    assert again is not loaded
    for name, buffer in loaded.pipe.transformer.state_dict().items():
        assert torch.equal(buffer, again.pipe.transformer.state_dict()[name]), name
    for n in range(app.QUANTIZED.max_entries):
        app.QUANTIZED.drop_session(f"other-{n}")
    app.forget_session(None)
    assert app.NOTES.get(None, "export") is None and "local" not in app.NOTES.sessions()


# ---------------------------------------------------------------- the named API through gradio_client
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client

    port = _free_port()
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.demo.close()


@pytest.mark.parametrize("api_name, args, field", [
    ("/generate", (["0"], None, 0, 4, 4.0), "images per class"),
    ("/generate", (["0"], 1, 0, 0, 4.0), "steps"),
    ("/generate", (["0"], 1, 0, "x", 4.0), "steps"),
    ("/generate", (["99"], 1, 0, 4, 4.0), "labels"),
    ("/generate", (["0"], 1, 0, 4, 4.0, "euler"), "sampler"),
    ("/generate", (["0"], 1, "abc", 4, 4.0), "seed"),
    ("/compare", (PRESETS["fp"].to_json(), ["0"], 1, 0, 3, 100.0, "cpu-int"), "CFG scale"),
    ("/allocate", (None,), "budget"),
    ("/allocate", ("x",), "budget"),
    ("/apply_preset", ("nonexistent",), "preset"),
    ("/apply_preset", (None,), "preset"),
    ("/sensitivity", ("w4a8-rtn", "nope"), "metric"),  # refused before the run (it came after 27 s of work)
    ("/outliers", ("transformer_blocks.0.ff.net.2", "999", "sideways"), "CFG branch"),
])
def test_values_no_widget_sends_are_refused_by_field_name(client, api_name, args, field):
    """Out of range, None, not a choice: gradio's own check would answer with a generic error naming no field; the
    inputs pass such values on, and the handler's status names the field."""
    status = client.predict(*args, api_name=api_name)[-1]
    assert status.startswith(f"⚠️ {field}"), status


@pytest.mark.parametrize("table, says", [
    (None, "table = None"),
    ([["a", "b"]], "table = [['a', 'b']]"),  # rows without headers
    ("hello", "table = 'hello'"),
    ({"headers": ["name", "kind"], "data": "x"}, "table = "),
    ({"headers": ["name", "kind", "shape"], "data": [["a", "b"]]}, "table = "),  # a row shorter than the headers
])
def test_unreadable_tables_and_files_are_refused_by_field_name(client, table, says):
    """Shapes gradio cannot read failed inside gradio (generic error, server traceback); now refused by name."""
    from gradio_client.exceptions import AppError

    text = PRESETS["fp"].to_json()
    with pytest.raises(AppError, match=re.escape(says) + ".*allowed: a table as"):
        client.predict(table, text, "fc2", "W8", api_name="/bulk_edit")
    with pytest.raises(AppError, match="upload = 'hello' is not allowed; allowed: a file sent with gradio_client's handle_file"):
        client.predict(None, "hello", api_name="/import_recipe")


def test_files_that_are_not_uploads_or_of_the_wrong_type_are_refused_by_field_name(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    text = PRESETS["fp"].to_json()
    table = client.predict("fp", api_name="/apply_preset")[0]
    with pytest.raises(AppError, match="table = .*allowed: a table as"):  # metadata gradio cannot read
        client.predict({**table, "metadata": "x"}, text, "fc2", "W8", api_name="/bulk_edit")
    wrong = tmp_path / "recipe.txt"
    wrong.write_text(text)
    with pytest.raises(AppError, match="upload = 'recipe.txt' is not allowed; allowed: a .json file"):
        client.predict(None, handle_file(str(wrong)), api_name="/import_recipe")
    with pytest.raises(AppError, match="upload = .* is not allowed; allowed: a .zip file"):
        client.predict(handle_file(str(wrong)), "", api_name="/load_export")
    with pytest.raises(AppError, match="upload = .* is not allowed; allowed: a file sent with gradio_client's handle_file"):
        client.predict(None, {"path": "/etc/hostname"}, api_name="/import_recipe")  # no file description
    # a raw HTTP client naming a server file as if uploaded (gradio_client would upload its own copy first)
    upload_box = next(b for b in app.demo.blocks.values() if getattr(b, "elem_id", None) == "recipe_upload")
    server_file = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}, "orig_name": "x.json"}
    assert "handle_file" in app.api_inputs._payload_problem(upload_box, server_file, app.PAYLOAD_FIELDS)
    good = tmp_path / "good.json"
    good.write_text(text)
    assert client.predict(None, handle_file(str(good)), api_name="/import_recipe")[-1].startswith("✓")


def test_class_pickers_accept_what_the_api_description_advertises(client):
    """A script author reads view_api() and passes those values; the server must accept them."""
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for endpoint, position in (("/generate", 0), ("/compare", 1)):
        param = endpoints[endpoint]["parameters"][position]
        assert param["parameter_name"] == "labels" and param["type"]["items"]["type"] == "string"
        assert param["type"]["items"]["enum"] == [str(i) for i in range(10)]
    grid, status = client.predict(endpoints["/generate"]["parameters"][0]["type"]["items"]["enum"][:2], 1, 0, 2, 4.0, api_name="/generate")
    assert status.startswith("2 images"), status
    for endpoint in ("/generate", "/compare"):  # the sampler: advertised with its choices, optional (scripts written before it still work)
        param = endpoints[endpoint]["parameters"][-1]
        assert param["parameter_name"] == "scheduler" and param["parameter_has_default"] and param["parameter_default"] == "dpm++"
        assert param["type"]["enum"] == ["dpm++", "ddim"]
    grid, status = client.predict(["0"], 1, 0, 2, 4.0, "ddim", api_name="/generate")
    assert "DDIM" in status


def test_every_named_endpoint_over_http(client, tiny):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/load_model", "/apply_preset", "/compare", "/outliers", "/sensitivity", "/allocate", "/export"} <= names
    out = client.predict("local folder", tiny, api_name="/load_model")
    assert out[-1].startswith("✓")  # the session now uses the tiny model
    table, text, layers, memory, msg = client.predict("w8a8-rtn", api_name="/apply_preset")
    assert msg.startswith("✓") and len(table["data"]) == len(layers["data"]) == len(app.api.layers(app.api.load(tiny)))
    fp, q, diff, metrics, plot, status = client.predict(text, LABELS, 1, 0, 3, 4.0, "cpu-int", api_name="/compare")
    assert all(str(p).endswith((".png", ".webp")) for p in (fp, q, diff)) and "CPU integer path" in status
    assert "PSNR (dB)" in [row[0] for row in metrics["data"]]
    for bad, field in ((BAD_JSON, "recipe JSON"), (BAD_ABITS, "a_bits"), (BAD_PATTERN, "override pattern")):
        result = client.predict(bad, LABELS, 1, 0, 3, 4.0, "cpu-int", api_name="/compare")
        assert result[-1].startswith("⚠️") and field in result[-1]
    timesteps = app.api.calibration_timesteps(app.api.load(tiny))
    assert "transformer_blocks.0.attn1.to_q" in client.predict("transformer_blocks.0.attn1.to_q", str(timesteps[0]), "uncond", api_name="/outliers")[-1]  # as view_api advertises it
    assert "cells computed" in client.predict("w4a8-rtn", "sqnr_db", api_name="/sensitivity")[-1]
    assert client.predict(5.0, api_name="/allocate")[-1].startswith("✓")
    zip_path, recipe_path, msg = client.predict(text, api_name="/export")
    assert str(zip_path).endswith(".zip") and msg.startswith("✓")
    # a k-means preset under gradio's real progress tracking (VQ4DiT shares the k-means loop; both used to fail)
    kmeans = client.predict("w2-kmeans", api_name="/apply_preset")[1]
    status = client.predict(kmeans, ["0"], 1, 0, 2, 4.0, "cpu-int", api_name="/compare")[-1]
    assert status.startswith("recipe **w2-kmeans**"), status


def test_sessions_do_not_share_the_model_source(client, tiny):
    from gradio_client import Client

    other = Client(client.src, verbose=False)  # a fresh session: still the shipped model
    table = other.predict("fp", api_name="/apply_preset")[0]
    assert len(table["data"]) == len(app.api.layers(app.PIPE))
    assert isinstance(pd.DataFrame(table["data"], columns=table["headers"]), pd.DataFrame)


def test_cancel_over_http_frees_the_worker(client):
    """/cancel is not queued: a plain POST to /gradio_api/run/cancel (what a script can send while the queue is full)
    reaches the session's job, and through gradio_client it works as any endpoint."""
    import requests
    from gradio_client import Client

    session = Client(client.src, verbose=False)  # shipped model: 64 images × 100 steps runs for minutes unless cancelled
    assert session.predict(api_name="/cancel") == "nothing to cancel: no job of yours is running"
    job = session.submit(PRESETS["fp"].to_json(), [str(i) for i in range(8)], 8, 0, 100, 4.0, "cpu-int", api_name="/compare")

    def direct_cancel() -> str:
        reply = requests.post(f"{client.src.rstrip('/')}/gradio_api/run/cancel", json={"data": [], "session_hash": session.session_hash}, timeout=30)
        reply.raise_for_status()
        return reply.json()["data"][0]

    deadline = time.time() + 120
    while (reply := direct_cancel()).startswith("nothing to cancel"):
        assert not job.done(), f"the job ended before it could be cancelled: {job.result()[-1]}"
        assert time.time() < deadline, "the job never started"
        time.sleep(0.5)
    assert reply == "cancelled 1 job(s) (Compare); the worker is free"  # Cancel waited for the job to stop, and names it
    t0 = time.time()
    assert "cancelled" in job.result(timeout=60)[-1]
    assert time.time() - t0 < 30


def test_an_unexpected_error_is_one_line_not_a_traceback(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(app.api, "recipe_table", broken)
    out = app.apply_preset("w8a8-rtn", tiny)
    assert out[-1] == "⚠️ internal error in apply_preset (RuntimeError: boom)"
    assert all(isinstance(o, dict) for o in out[:-1])
