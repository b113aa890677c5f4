"""Sensitivity cells against a direct computation (quantize the layer by hand, swap it in per step, sample, compare);
the cache (second run, incremental cells); group units; measure(); errors."""

import copy
import json

import pytest
import torch

from ditlab import metrics
from ditlab.config import FP, Recipe
from ditlab.errors import ConfigError
from ditlab.models import load_pipeline
from ditlab.quantize import quantize_
from ditlab.sampling import sample
from ditlab.sensitivity import SensitivitySettings, default_classifier, measure, run_sensitivity
from ditlab.testing import tiny_dit_pipeline

ST = SensitivitySettings(n_images=2, steps=4, n_groups=2, guidance=3.0, seed=3)
LAYER = "transformer_blocks.1.ff.net.0.proj"
OTHER = "transformer_blocks.0.attn1.to_v"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_pipeline(tiny_dit_pipeline(tmp_path_factory.mktemp("sens") / "dit"))


@pytest.fixture(scope="module")
def first(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("sens-cache")
    return cache, run_sensitivity(tiny, "w4a8-rtn", settings=ST, layers=[LAYER], cache_dir=cache, progress=False)


def by_hand(pipe, layer, steps_on, recipe="w4a8-rtn"):
    """Quantize ``layer`` with quantize_, swap it into a copy of the FP model only at ``steps_on``, sample."""
    qmodel, _ = quantize_(pipe.transformer, Recipe(default=FP, overrides=((layer, load_recipe_fields(recipe, layer)),)), progress=False)
    qmod = qmodel.get_submodule(layer)
    model = copy.deepcopy(pipe.transformer)
    parent, _, leaf = layer.rpartition(".")
    fp_mod = model.get_submodule(layer)
    eps = {}

    class Swap:
        def before(self, ctx):
            setattr(model.get_submodule(parent), leaf, qmod if ctx.index in steps_on else fp_mod)

        def after(self, ctx, latents, e):
            eps[ctx.index] = e.clone()

    labels = ST.label_list(pipe.num_classes)
    out = sample(pipe, labels, guidance=ST.guidance, steps=ST.steps, seed=ST.seed, transformer=model, hooks=[Swap()], progress=False)
    return out, eps


def load_recipe_fields(recipe, layer):
    from ditlab.config import load_recipe

    return {k: v for k, v in load_recipe(recipe).config_for(layer).to_dict().items() if k in ("method", "w_bits", "a_bits", "w_group_size")}


def test_cells_equal_direct_computation(tiny, first):
    _, res = first
    assert res.groups == [[0, 1], [2, 3]] and len(res.frame) == 2 and res.n_computed == 2
    fp_eps = {}

    class Rec:
        def before(self, ctx):
            pass

        def after(self, ctx, latents, e):
            fp_eps[ctx.index] = e.clone()

    labels = ST.label_list(tiny.num_classes)
    fp = sample(tiny, labels, guidance=ST.guidance, steps=ST.steps, seed=ST.seed, hooks=[Rec()], progress=False)
    for g, steps in enumerate(res.groups):
        out, eps = by_hand(tiny, LAYER, set(steps))
        cell = res.frame[res.frame.group == g].iloc[0]
        noise = sum(float((eps[s].double() - fp_eps[s].double()).pow(2).sum()) for s in steps)
        signal = sum(float(fp_eps[s].double().pow(2).sum()) for s in steps)
        assert cell.sqnr_db == pytest.approx(10 * torch.log10(torch.tensor(signal / noise, dtype=torch.float64)).item(), rel=1e-9)
        assert cell.ssim == pytest.approx(metrics.ssim(fp.images, out.images), abs=1e-12)
        assert cell.psnr == pytest.approx(metrics.psnr(fp.images, out.images), abs=1e-9)
        pred, fp_pred = default_classifier(out.images), default_classifier(fp.images)
        assert cell.agreement == pytest.approx(float((pred == fp_pred).double().mean()))
        assert 10 < cell.sqnr_db < 200  # a real, finite error: the cell did quantize something
    assert res.frame.iloc[0].w_bits == 4 and res.frame.iloc[0].a_bits == 8 and res.frame.iloc[0].params == 64 * 256


def test_cache_second_run_and_incremental(tiny, first):
    cache, res = first
    again = run_sensitivity(tiny, "w4a8-rtn", settings=ST, layers=[LAYER], cache_dir=cache, progress=False)
    assert again.n_computed == 0 and again.n_cached == 2 and again.key == res.key
    assert again.frame.drop(columns="seconds").equals(res.frame.drop(columns="seconds"))
    # drop one cell from the file: only that one is recomputed, with the same values (sampling is deterministic)
    path = next((cache / "sensitivity").glob("*.json"))
    data = json.loads(path.read_text())
    data["cells"].pop(f"{LAYER}|1")
    path.write_text(json.dumps(data))
    seen = []
    third = run_sensitivity(tiny, "w4a8-rtn", settings=ST, layers=[LAYER], cache_dir=cache, progress=lambda d, t, u: seen.append((d, t, u)))
    assert third.n_computed == 1 and seen == [(1, 1, LAYER)]
    assert third.frame.sqnr_db.tolist() == res.frame.sqnr_db.tolist()
    # another setting is another key
    other = run_sensitivity(tiny, "w8a8-rtn", settings=ST, layers=[LAYER], cache_dir=cache, progress=False)
    assert other.key != res.key and (other.frame.sqnr_db.to_numpy() > res.frame.sqnr_db.to_numpy()).all()  # 8 bits hurt less


def test_group_units_and_measure_agree(tiny, tmp_path):
    st = SensitivitySettings(n_images=2, steps=4, n_groups=1, guidance=3.0, seed=3, unit="group")
    res = run_sensitivity(tiny, "w4a8-rtn", settings=st, layers=["transformer_blocks.0.attn"], cache_dir=tmp_path, progress=False)
    row = res.frame.iloc[0]
    assert row.unit == "transformer_blocks.0.attn" and row.kind == "attn"
    assert row.layers.split(",") == [f"transformer_blocks.0.attn1.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
    # one group over all steps = the measured recipe quantizing the same four layers
    recipe = Recipe(default=FP, overrides=tuple((n, {"method": "rtn", "w_bits": 4, "a_bits": 8, "w_group_size": 64}) for n in row.layers.split(",")))
    m = measure(tiny, recipe, settings=st)
    assert m["psnr"] == pytest.approx(row.psnr, abs=1e-9) and m["ssim"] == pytest.approx(row.ssim, abs=1e-12)
    assert m["agreement"] == pytest.approx(row.agreement)
    # per-group recipes: FP in group 0, quantized in group 1 = the sensitivity cell of group 1
    st2 = SensitivitySettings(n_images=2, steps=4, n_groups=2, guidance=3.0, seed=3)
    cell = run_sensitivity(tiny, "w4a8-rtn", settings=st2, layers=[OTHER], cache_dir=tmp_path, progress=False).frame.iloc[1]
    one = Recipe(default=FP, overrides=((OTHER, {"method": "rtn", "w_bits": 4, "a_bits": 8, "w_group_size": 64}),))
    m2 = measure(tiny, [Recipe(default=FP), one], settings=st2)
    assert m2["psnr"] == pytest.approx(cell.psnr, abs=1e-9)


def test_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(ConfigError, match="n_groups"):
        SensitivitySettings(n_groups=0)
    with pytest.raises(ConfigError, match=r"n_groups = 5 .*at most steps \(4\)"):  # was silently clamped to 4 groups
        SensitivitySettings(steps=4, n_groups=5)
    with pytest.raises(ConfigError, match="unit"):
        SensitivitySettings(unit="block")
    with pytest.raises(ConfigError, match="setting"):
        run_sensitivity(tiny, "fp", settings=ST, cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="calib"):
        run_sensitivity(tiny, "w4a8-hadanorm", settings=ST, layers=[LAYER], cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="layers"):
        run_sensitivity(tiny, "w4a8-rtn", settings=ST, layers=["nope"], cache_dir=tmp_path, progress=False)
