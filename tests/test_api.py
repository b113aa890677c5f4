"""The public entry points end to end on a tiny random DiT: quantize (with calibration), save/load, compare."""

import pytest
import torch

from ditlab import api
from ditlab.errors import ConfigError, DitlabError
from ditlab.evaluation import SampleSettings
from ditlab.testing import tiny_dit_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return api.load(str(tiny_dit_pipeline(tmp_path_factory.mktemp("api") / "dit")))


def test_quantize_calibrates_when_needed_and_shares_components(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    assert api.needs_calibration(tiny, "w8a8-smoothquant") and not api.needs_calibration(tiny, "w8a8-rtn")
    q = api.quantize(tiny, "w8a8-smoothquant", progress=False, calib_settings={"n_samples": 2, "steps": 3})
    assert q.seconds_calibrate > 0 and q.pipe.scheduler_config is tiny.scheduler_config
    assert q.pipe.transformer is not tiny.transformer
    assert not any(getattr(m, "is_quantized_linear", False) for m in tiny.transformer.modules())  # FP model untouched
    packed, fp16 = api.weight_bytes(q.pipe)
    assert 0.4 < packed / fp16 < 0.6


@pytest.mark.parametrize("preset", ["w4a8-hadanorm", "bnb-nf4"])
def test_model_info_counts_the_same_weights_for_a_quantized_pipeline(tiny, preset):
    fp, q = api.model_info(tiny), api.model_info(api.quantize(tiny, preset, progress=False).pipe)
    assert (fp["quantized"], q["quantized"]) == (False, True)
    assert q["params"] == fp["params"] == sum(p.numel() for p in tiny.transformer.parameters()) and q["linear_params"] == fp["linear_params"]


def test_save_then_load_gives_identical_images(tiny, tmp_path):
    q = api.quantize(tiny, "w4a8-rtn", progress=False)
    out = api.save(q, tiny, tmp_path / "qdir")
    loaded = api.load(str(out))
    a = api.generate(q.pipe, [1, 2], steps=3, progress=False).latents
    b = api.generate(loaded, [1, 2], steps=3, progress=False).latents
    assert torch.equal(a, b)
    assert api.qdir_source(out) == tiny.source


def test_load_follows_the_folder_not_the_text_that_names_it(tiny, tmp_path, monkeypatch):
    """A QDIR saved over loads the new model; "q" in two working directories is two models; a deleted folder is not
    served from the cache; the shipped model's aliases are one cached model."""
    q8, q4 = api.quantize(tiny, "w8a8-rtn", progress=False), api.quantize(tiny, "w4a8-rtn", progress=False)
    out = api.save(q8, tiny, tmp_path / "qdir")
    assert api.load(str(out)).transformer.ditlab_recipe.name == "w8a8-rtn"
    api.save(q4, tiny, out, overwrite=True)
    assert api.load(str(out)).transformer.ditlab_recipe.name == "w4a8-rtn"
    for sub, q in (("d1", q8), ("d2", q4)):
        (tmp_path / sub).mkdir()
        monkeypatch.chdir(tmp_path / sub)
        api.save(q, tiny, "q")
    assert api.load("q").transformer.ditlab_recipe.name == "w4a8-rtn"  # d2's, the working directory's
    monkeypatch.chdir(tmp_path / "d1")
    assert api.load("q").transformer.ditlab_recipe.name == "w8a8-rtn"
    import shutil

    shutil.rmtree(out)
    with pytest.raises(DitlabError, match="qdir"):
        api.load(str(out))
    from ditlab.models import SHIPPED_MODEL

    assert api.load() is api.load("shipped") is api.load(str(SHIPPED_MODEL))


def test_compare_reports_images_metrics_and_divergence(tiny):
    q = api.quantize(tiny, "w8a8-rtn", progress=False)
    c = api.compare(tiny, q, [0, 3, 5], steps=4, seed=2, progress=False)
    assert c.fp_images.shape == c.q_images.shape == c.diff.shape == (3, 3, 16, 16)
    assert len(c.divergence) == len(c.timesteps) == 4 and all(d >= 0 for d in c.divergence)
    assert c.metrics["psnr"] > 20 and 0 < c.metrics["ssim"] <= 1 and c.backend == "cpu-int"
    fp_again = api.generate(tiny, [0, 3, 5], steps=4, seed=2, progress=False).images
    assert torch.equal(c.fp_images, fp_again)


def test_compare_on_the_reference_path_matches_the_integer_path(tiny):
    q = api.quantize(tiny, "w8a8-rtn", progress=False)
    ref = api.compare(tiny, q, [4], steps=3, backend="reference", progress=False)
    fast = api.compare(tiny, q, [4], steps=3, backend="cpu-int", progress=False)
    assert ref.backend == "reference" and fast.backend == "cpu-int"
    assert (ref.q_images.int() - fast.q_images.int()).abs().max() <= 1  # float rounding of the epilogue only


def test_heat_map_is_black_for_no_difference():
    h = api.heat(torch.zeros(1, 4, 4))
    assert h.shape == (1, 3, 4, 4) and int(h.max()) == 0
    assert api.heat(torch.full((1, 2, 2), 255.0))[0, :, 0, 0].tolist() == [255, 255, 255]


def test_evaluate_refuses_models_the_classifier_cannot_score(tiny):
    with pytest.raises(ConfigError) as info:
        api.evaluate(tiny, "fp", settings=SampleSettings(n_per_label=1, steps=2), progress=False)
    assert info.value.field == "model"


def test_fp_grids_are_cached_whether_or_not_a_progress_bar_ran(tiny, monkeypatch):
    """The app's warm-up samples the first screen without a tqdm bar; the first visitor (with a bar) gets that grid."""
    calls = []
    real = api.generate
    monkeypatch.setattr(api, "generate", lambda *a, **k: (calls.append(k["progress"]), real(*a, **k))[1])
    grid, info = api.generate_grid(tiny, [0, 1], 2, steps=2, seed=5, progress=False)
    again, info2 = api.generate_grid(tiny, [0, 1], 2, steps=2, seed=5)
    assert calls == [False] and again is grid and info2 == {**info, "cached": True} and grid.shape[0] > grid.shape[1] / 2
    api.generate_grid(tiny, [0, 1], 2, steps=2, seed=6)  # another seed: sampled again, with its bar
    assert calls == [False, True]


def test_a_cached_grid_never_waits_and_one_grid_is_sampled_once(tiny, monkeypatch):
    """One session's long Generate held a global lock that every page load (a cached first screen) waited behind."""
    import threading

    api.generate_grid(tiny, [0], 1, steps=1, seed=5, progress=False)  # cached
    real, release, started, calls = api.generate, threading.Event(), threading.Event(), []

    def slow(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        started.set()
        assert release.wait(60), "never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "generate", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(api.generate_grid(tiny, [1], 1, steps=1, seed=6, progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    assert started.wait(60)
    grid, info = api.generate_grid(tiny, [0], 1, steps=1, seed=5, progress=False)  # while seed 6 is being sampled
    assert info["cached"]
    release.set()
    for t in threads:
        t.join(60)
    assert calls == [6] and len(results) == 2 and (results[0][0] == results[1][0]).all()  # sampled once, shared


def test_class_ids_take_numbers_or_their_text_and_name_the_field_otherwise():
    assert api.class_ids(["0", "3", 9], 10) == (0, 3, 9)
    assert api.class_ids(" 4 ", 10) == (4,)
    for bad in (["x"], ["10"], [-1], [True], ["1.5"], [], None):
        with pytest.raises(ConfigError, match="labels") as info:
            api.class_ids(bad, 10)
        assert "class" in str(info.value)


def test_evaluate_scores_what_it_names_and_refuses_a_quantized_reference(shipped, tmp_path):
    """The recipe reported is the one scored (a quantized copy's own); whether to quantize follows the plan, not the
    recipe's name; a quantized pipeline is never taken as the FP reference."""
    small = SampleSettings(n_per_label=1, steps=2)
    q = api.quantize(shipped, "w8a8-rtn", progress=False)
    given = api.evaluate(shipped, quantized=q, settings=small, progress=False)
    assert given["recipe"] == "w8a8-rtn" and given["weight_bytes"] < 0.6 * given["weight_bytes_fp16"]
    with pytest.raises(ConfigError, match="recipe = 'w4a8-rtn'.*w8a8-rtn"):
        api.evaluate(shipped, "w4a8-rtn", quantized=q, settings=small)
    named_fp = api.load_recipe("w4a8-rtn").replace(name="fp")  # quantizes every layer, whatever its name says
    res = api.evaluate(shipped, named_fp, settings=small, progress=False)
    assert res["weight_bytes"] < 0.3 * res["weight_bytes_fp16"] and res["psnr"] < 60
    assert api.evaluate(shipped, "fp", settings=small, progress=False)["weight_bytes"] == res["weight_bytes_fp16"]
    out = api.save(q, shipped, tmp_path / "q")
    with pytest.raises(ConfigError, match="pipe = .*full-precision.*load_qdir"):
        api.evaluate(api.load(str(out)), settings=small)
    loaded, fp_source = api.load_qdir(out)
    again = api.evaluate(api.load(fp_source), quantized=loaded, settings=small, progress=False)
    assert (again["recipe"], again["psnr"]) == ("w8a8-rtn", given["psnr"])


def test_grid_helpers_and_sample_settings_refuse_what_they_would_bend(tiny, tmp_path):
    """Values that were silently rounded or crashed deep inside are refused by name: steps 1.7, rows 0, a .txt or
    folder path, SampleSettings(n_per_label=0) (it used to say 'labels = []')."""
    for kwargs, field in (({"steps": 1.7}, "steps"), ({"seed": 1.9}, "seed"), ({"scale": -3}, "scale"), ({"guidance": "4"}, "guidance")):
        with pytest.raises(ConfigError) as info:
            api.generate_grid(tiny, [0], 1, progress=False, **kwargs)
        assert info.value.field == field
    with pytest.raises(ConfigError, match="n_per_label"):
        api.generate_grid(tiny, [0], 0)
    grid, _ = api.generate_grid(tiny, [0], 2.0, steps=2.0, progress=False)  # a UI slider's 2.0 is 2
    assert grid.shape[0] > 0
    images = api.generate(tiny, [0, 1], steps=1, progress=False).images
    for path, rows, field in ((tmp_path / "g.png", 0, "rows"), (tmp_path / "g.txt", 1, "path"), (tmp_path, 1, "path")):
        with pytest.raises(ConfigError) as info:
            api.save_grid(images, path, rows=rows)
        assert info.value.field == field
    assert api.save_grid(images, tmp_path / "g.webp", rows=1).stat().st_size > 0
    for kwargs, field in (({"n_per_label": 0}, "n_per_label"), ({"steps": "x"}, "steps"), ({"guidance": None}, "guidance"),
                          ({"seed": -1}, "seed"), ({"scheduler": "euler"}, "scheduler")):
        with pytest.raises(ConfigError) as info:
            SampleSettings(**kwargs)
        assert info.value.field == field


def test_a_progress_callable_gets_every_layer_and_no_bar_is_drawn(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    calls = []
    q = api.quantize(tiny, "w8a8-smoothquant", progress=lambda done, total, name: calls.append((done, total, name)),
                     calib_settings={"n_samples": 2, "steps": 2})
    assert q.seconds_calibrate > 0 and len(calls) == len(q.report.layers) and calls[-1][0] == calls[-1][1]
    assert "calibration" not in capsys.readouterr().err  # the calibration bar is not drawn either


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """README's "Python library" example, as written, on the shipped model (so the README stays true)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python library", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "out" / "w4a8-first-block-fp" / "recipe.json").is_file()


def test_evaluate_and_compare_check_what_they_are_given(shipped, tmp_path):
    """A recipe that contradicts quantized= is refused even when named 'fp'; load_qdir's tuple or a Pipeline as
    quantized= is named; compare refuses a quantized reference as evaluate does; numpy settings stay JSON-ready."""
    import json

    import numpy as np

    from ditlab.config import LayerConfig, Recipe

    small = SampleSettings(n_per_label=np.int64(1), steps=np.int64(2), guidance=np.float32(4.0))
    q = api.quantize(shipped, "w8a8-rtn", progress=False)
    with pytest.raises(ConfigError, match="recipe = 'fp'"):
        api.evaluate(shipped, Recipe(name="fp", default=LayerConfig(method="rtn", w_bits=8, a_bits=8)), quantized=q, settings=small)
    folder = api.save(q, shipped, tmp_path / "q")
    for wrong in (api.load_qdir(folder), shipped):
        with pytest.raises(ConfigError, match="quantized = .*load_qdir"):
            api.evaluate(shipped, quantized=wrong, settings=small)
    with pytest.raises(ConfigError, match="pipe = .*full-precision"):
        api.compare(q.pipe, q, [0], steps=2, progress=False)
    json.dumps(api.evaluate(shipped, quantized=q, settings=small, progress=False))  # numpy ints became Python ints
    from ditlab import calibration

    calib = calibration.calibrate(shipped, n_samples=np.int64(1), steps=torch.tensor(2), progress=False, use_cache=False)
    assert calib.settings["n_samples"] == 1 and calib.settings["steps"] == 2
    grid, _ = api.generate_grid(shipped, [0], 1, steps=torch.tensor(1), progress=False)
    assert grid.shape[0] > 0
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile is a file"):
        api.save_grid(grid_images := api.generate(shipped, [0], steps=1, progress=False).images, tmp_path / "afile" / "g.png", rows=1)
    assert grid_images.shape[0] == 1
