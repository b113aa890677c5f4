"""Recipes: validation (one bad value per field), glob resolution, skip list, JSON and DataFrame round-trips, presets."""

import json

import pytest

from ditlab.config import (DEFAULT_SKIP, FP, PRESETS, LayerConfig, Recipe, frame_to_recipe, get_preset, load_recipe,
                           plan_to_frame, save_recipe)
from ditlab.errors import ConfigError, DitlabError
from ditlab.models import LayerInfo, layer_kind


def _layers(blocks: int = 2, hidden: int = 192, ff: int = 768) -> list[LayerInfo]:
    """The linears of a shipped-like DiT (names as diffusers writes them)."""
    out = []

    def add(name, n, k):
        out.append(LayerInfo(name, layer_kind(name), n, k, n * k, None))

    for b in range(blocks):
        p = f"transformer_blocks.{b}."
        add(p + "norm1.emb.timestep_embedder.linear_1", hidden, 256)
        add(p + "norm1.emb.timestep_embedder.linear_2", hidden, hidden)
        add(p + "norm1.linear", 6 * hidden, hidden)
        for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
            add(p + "attn1." + leaf, hidden, hidden)
        add(p + "ff.net.0.proj", ff, hidden)
        add(p + "ff.net.2", hidden, ff)
    add("proj_out_1", 2 * hidden, hidden)
    add("proj_out_2", 48, hidden)
    return out


BAD_VALUES = [  # (field, bad value) — one per LayerConfig field
    ("method", "awq"), ("w_bits", 1), ("w_bits", 9), ("w_bits", True), ("a_bits", 3), ("a_bits", 12), ("w_group_size", 1),
    ("w_group_size", 64.0), ("w_symmetric", "yes"), ("a_granularity", "per-channel"), ("clip_search", 1), ("alpha", 1.5),
    ("hadamard_seed", -1), ("sigma", "mad"), ("rank", 0), ("weight_rounding", "adaround"), ("gptq_damp", 0.0),
    ("params", {"x": object()}), ("params", [1, 2]),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_value_names_field_value_and_allowed(field, value):
    with pytest.raises(ConfigError) as info:
        LayerConfig(**{field: value})
    err = info.value
    assert err.field == field and err.allowed and isinstance(err, DitlabError)
    assert field in str(err) and "allowed" in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="fp", w_bits=8, a_bits=16), "w_bits"),
    (dict(method="rtn", w_bits=16, a_bits=16), "w_bits"),
    (dict(method="bnb-nf4", w_bits=4, a_bits=4), "a_bits"),  # weight-only method cannot run with a4
    (dict(method="bnb-int8", w_bits=4, a_bits=16), "w_bits"),
    (dict(method="kmeans", w_bits=2, a_bits=16, weight_rounding="gptq"), "weight_rounding"),
])
def test_cross_field_rules(kwargs, field):
    with pytest.raises(ConfigError) as info:
        LayerConfig(**kwargs)
    assert info.value.field == field


def test_shape_rules_name_the_layer():
    with pytest.raises(ConfigError) as info:
        LayerConfig(w_group_size=128).validate(layer="blk.to_q", in_features=192)
    assert info.value.layer == "blk.to_q" and info.value.field == "w_group_size" and "192" in str(info.value)
    with pytest.raises(ConfigError, match="even in_features") as info:
        LayerConfig(w_bits=4).validate(layer="odd", in_features=15)
    assert info.value.field == "w_bits"
    with pytest.raises(ConfigError) as info:
        LayerConfig(method="svd", rank=300).validate("x", in_features=192, out_features=256)
    assert info.value.field == "rank"
    LayerConfig(w_bits=4, w_group_size=64).validate("ok", in_features=192)  # valid: no error


def test_gptq_method_implies_gptq_rounding_and_needs_stats():
    cfg = LayerConfig(method="gptq", w_bits=4, a_bits=16)
    assert cfg.weight_rounding == "gptq" and cfg.needs_stats
    assert not LayerConfig().needs_stats and LayerConfig(a_granularity="per-tensor").needs_stats
    assert not LayerConfig(a_bits=16, a_granularity="per-tensor").needs_stats


def test_resolve_overrides_later_win_and_skip():
    layers = _layers()
    recipe = Recipe(default=LayerConfig(w_bits=8), overrides=(("*.ff.*", {"w_bits": 4, "w_group_size": 64}),
                                                              ("*.1.ff.net.2", {"w_bits": 6, "w_group_size": None})))
    plan = recipe.resolve(layers)
    assert list(plan) == [layer.name for layer in layers]
    assert plan["transformer_blocks.0.ff.net.0.proj"].w_bits == 4 and plan["transformer_blocks.0.ff.net.0.proj"].w_group_size == 64
    assert plan["transformer_blocks.1.ff.net.2"].w_bits == 6 and plan["transformer_blocks.1.ff.net.2"].w_group_size is None
    assert plan["transformer_blocks.0.attn1.to_q"].w_bits == 8
    skipped = {n for n, c in plan.items() if c is None}
    assert skipped == {l.name for l in layers if l.kind in ("embedder", "final")}  # DEFAULT_SKIP = the default skip kinds


def test_resolve_rejects_patterns_that_match_nothing():
    with pytest.raises(ConfigError, match="to_qkv") as info:
        Recipe(default=LayerConfig(), overrides=(("*.to_qkv", {"w_bits": 4}),)).resolve(_layers())
    assert info.value.value == "*.to_qkv"
    with pytest.raises(ConfigError, match="final_layer"):
        Recipe(default=LayerConfig(), skip=("final_layer*",)).resolve(_layers())
    Recipe(default=LayerConfig(), skip=DEFAULT_SKIP).resolve(_layers())  # generic defaults may match nothing (caption_projection)


def test_resolve_names_layer_of_invalid_combination():
    with pytest.raises(ConfigError) as info:
        Recipe(default=LayerConfig(w_bits=4, w_group_size=64), overrides=(("*.ff.net.0.proj", {"w_group_size": 128}),)).resolve(_layers())
    assert info.value.layer == "transformer_blocks.0.ff.net.0.proj" and info.value.field == "w_group_size"


def test_override_unknown_field_rejected_by_name():
    with pytest.raises(ConfigError) as info:
        Recipe(default=LayerConfig(), overrides=(("*", {"wbits": 4}),))
    assert info.value.value == "wbits"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_json_round_trip_and_resolve(name):
    recipe = get_preset(name)
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe and again.to_json() == recipe.to_json()
    plan = recipe.resolve(_layers())
    quantized = [c for c in plan.values() if c is not None and not c.is_fp]
    assert (len(quantized) == 0) == (name == "fp")
    if name.startswith("w4"):
        assert all(c.w_bits == 4 and c.w_group_size == 64 for c in quantized)


def test_required_presets_exist():
    required = {"fp", "w8a8-rtn", "w8a8-smoothquant", "w8a8-viditq", "w4a8-rtn", "w4a8-hadamard", "w4a8-hadanorm", "w4a8-viditq",
                "w4a4-hadanorm", "w4a16-rtn", "w4a16-gptq", "w4a4-svd", "bnb-int8", "bnb-nf4", "w8a8-rtn-static"}
    assert required <= set(PRESETS)
    assert PRESETS["w8a8-rtn-static"].default.a_granularity == "per-tensor"


def test_from_json_rejects_unknown_keys_and_versions():
    base = json.loads(PRESETS["w8a8-rtn"].to_json())
    with pytest.raises(ConfigError, match="colour"):
        Recipe.from_dict({**base, "colour": "red"})
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({**base, "default": {**base["default"], "bits": 4}})
    assert info.value.value == "bits"
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({**base, "version": 99})
    assert info.value.field == "version"
    with pytest.raises(ConfigError):
        Recipe.from_dict({k: v for k, v in base.items() if k != "version"})
    with pytest.raises(ConfigError, match="JSON"):
        Recipe.from_json("{not json")


def test_a_byte_order_mark_is_not_part_of_the_recipe(tmp_path):
    """Windows Notepad saves UTF-8 with a byte-order mark: such a file loads (it was refused, "Unexpected UTF-8 BOM")."""
    text = PRESETS["w4a8-hadanorm"].to_json()
    path = tmp_path / "notepad.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_recipe(str(path)) == PRESETS["w4a8-hadanorm"]
    assert Recipe.from_json("\ufeff" + text) == PRESETS["w4a8-hadanorm"]


def test_load_recipe_from_file_and_preset(tmp_path):
    recipe = Recipe(default=LayerConfig(w_bits=6), overrides=(("*.to_q", {"a_bits": 16}),), name="mine")
    path = save_recipe(recipe, tmp_path / "r.json")
    assert load_recipe(str(path)) == recipe and load_recipe("w4a8-rtn") is PRESETS["w4a8-rtn"]
    with pytest.raises(ConfigError, match="preset"):
        load_recipe("w3a3-magic")
    with pytest.raises(ConfigError):
        load_recipe(str(tmp_path / "missing.json"))


def test_frame_round_trip_unchanged_is_identity():
    layers = _layers()
    base = get_preset("w4a8-rtn")
    df = plan_to_frame(base.resolve(layers), layers)
    assert len(df) == len(layers) and {"name", "kind", "shape", "method", "w_bits", "a_bits", "w_group_size", "a_granularity"} <= set(df.columns)
    again = frame_to_recipe(df, base)
    assert again.overrides == () and again.skip == base.skip
    assert again.resolve(layers) == base.resolve(layers)


def test_frame_edits_become_one_override_per_changed_layer():
    layers = _layers()
    base = get_preset("w4a8-rtn")
    df = plan_to_frame(base.resolve(layers), layers).astype({"w_bits": object, "w_group_size": object})
    i_fc2 = df.index[df.name == "transformer_blocks.1.ff.net.2"][0]
    i_q = df.index[df.name == "transformer_blocks.0.attn1.to_q"][0]
    i_emb = df.index[df.name == "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"][0]
    df.loc[i_fc2, ["w_bits", "w_group_size"]] = ["8", ""]  # strings, as an edited table may send them
    df.loc[i_q, "method"] = "fp"
    df.loc[i_emb, ["method", "w_bits", "a_bits", "w_group_size"]] = ["rtn", 8, 8, None]  # un-skip one embedder
    edited = frame_to_recipe(df, base)
    assert len(edited.overrides) == 3
    plan = edited.resolve(layers)
    expected = base.resolve(layers)
    expected["transformer_blocks.1.ff.net.2"] = expected["transformer_blocks.1.ff.net.2"].replace(w_bits=8, w_group_size=None)
    expected["transformer_blocks.0.attn1.to_q"] = FP
    expected["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"] = base.default.replace(w_bits=8, w_group_size=None)
    assert plan == expected
    again = frame_to_recipe(plan_to_frame(plan, layers), edited)  # editing nothing further adds nothing
    assert again.overrides == edited.overrides and Recipe.from_json(edited.to_json()) == edited


def test_frame_bad_cell_names_layer_and_field():
    layers = _layers()
    base = get_preset("w8a8-rtn")
    df = plan_to_frame(base.resolve(layers), layers).astype({"w_bits": object})
    df.loc[df.name == "transformer_blocks.0.ff.net.2", "w_bits"] = "eight"
    with pytest.raises(ConfigError) as info:
        frame_to_recipe(df, base)
    assert info.value.layer == "transformer_blocks.0.ff.net.2" and info.value.field == "w_bits"


@pytest.mark.parametrize("kwargs,field,needle", [
    (dict(method="rtn", params={"thresold": 6.0}), "params", "bos_tokens"),  # a typo is named, with what is read
    (dict(method="kmeans", w_bits=2, a_bits=16, params={"iterations": 1}), "params", "kmeans_fit"),  # a vq4dit-only key
    (dict(method="hadanorm", w_bits=4, params={"iterations": 3}), "params", "mean_bias_correction"),
    (dict(method="rtn", params={"bos_tokens": -1}), "params.bos_tokens", "non-negative"),
    (dict(method="bnb-int8", w_bits=8, a_bits=16, params={"threshold": 0}), "params.threshold", "positive"),
    (dict(method="hadanorm", w_bits=4, params={"mean_bias_correction": "no"}), "params.mean_bias_correction", "true or false"),
])
def test_params_keys_are_checked_for_every_method(kwargs, field, needle):
    with pytest.raises(ConfigError) as err:
        LayerConfig(**kwargs)
    assert err.value.field == field and needle in str(err.value)


def test_params_the_methods_read_are_accepted():
    assert LayerConfig(method="rtn", params={"bos_tokens": 1}).params == {"bos_tokens": 1}
    assert LayerConfig(method="bnb-int8", w_bits=8, a_bits=16, params={"threshold": 4.5}).params["threshold"] == 4.5
    assert LayerConfig(method="vq4dit", w_bits=2, a_bits=16, params={"k": 8, "iterations": 2}).params["k"] == 8


# ---------------------------------------------------------------- audit: params are read-only and never shared
def test_params_are_a_read_only_copy_not_shared_with_caller_or_presets():
    import copy
    import pickle

    for mutate in (lambda p: p.__setitem__("bos_tokens", 3), lambda p: p.update(k="oops"), lambda p: p.pop("bos_tokens", None),
                   lambda p: p.clear(), lambda p: p.setdefault("k", 1), lambda p: p.popitem(), lambda p: p.__delitem__("x"),
                   lambda p: p.__ior__({"k": 1})):
        with pytest.raises(TypeError, match="read-only"):
            mutate(load_recipe("w4a8-rtn").default.params)
        with pytest.raises(TypeError, match="read-only"):
            mutate(load_recipe("fp").default.params)
    assert PRESETS["w4a8-rtn"].default.params == {} and FP.params == {}
    p = {"bos_tokens": 1}
    cfg = LayerConfig(params=p)
    p["bos_tokens"] = -5  # the caller's dict stays theirs: the validated config does not change
    assert cfg.params == {"bos_tokens": 1}
    data = {"method": "vq4dit", "w_bits": 2, "a_bits": 16, "params": {"k": 8}}
    via_dict = LayerConfig.from_dict(data)
    data["params"]["k"] = 0
    assert via_dict.params == {"k": 8}
    nested = {"k": [1, 2]}  # refused later by the method, but never shared in the meantime
    kcfg = LayerConfig(method="kmeans", w_bits=2, a_bits=16, params=nested)
    nested["k"].append(3)
    assert kcfg.to_dict()["params"] == {"k": [1, 2]}
    fields = {"params": {"bos_tokens": 1}}  # the same for an override's field map
    recipe = Recipe(default=LayerConfig(), overrides=(("*", fields),))
    fields["params"]["bos_tokens"] = 7
    with pytest.raises(TypeError):
        recipe.overrides[0][1]["w_bits"] = 2
    assert recipe.resolve(["a"])["a"].params == {"bos_tokens": 1}
    # still data: deep copy (models are deep-copied with their recipe), pickle, JSON, plain dicts out
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg and pickle.loads(pickle.dumps(recipe)) == recipe
    assert copy.deepcopy(recipe) == recipe and Recipe.from_json(recipe.to_json()) == recipe
    out = cfg.to_dict()
    assert type(out["params"]) is dict and json.loads(json.dumps(out)) == out
    out["params"]["bos_tokens"] = 2  # to_dict gives the caller a mutable copy
    assert cfg.params == {"bos_tokens": 1} and cfg.replace(params={**cfg.params, "bos_tokens": 2}).params == {"bos_tokens": 2}


# ---------------------------------------------------------------- audit: an override to full precision
def test_override_to_fp_does_not_inherit_the_default_bits():
    default = LayerConfig(method="rtn", w_bits=4, a_bits=8, w_group_size=64)
    recipe = Recipe(default=default, overrides=(("*attn1.to_q", {"method": "fp"}),))
    plan = recipe.resolve(_layers())
    assert plan["transformer_blocks.0.attn1.to_q"] is FP and plan["transformer_blocks.0.attn1.to_k"] == default
    assert Recipe.from_json(recipe.to_json()).resolve(_layers()) == plan  # the JSON path too
    assert load_recipe(json.loads(recipe.to_json())).resolve(_layers()) == plan
    later = Recipe(default=default, overrides=(("*", {"w_bits": 8}), ("*attn1.to_q", {"method": "fp"})))  # later wins
    assert later.resolve(_layers())["transformer_blocks.0.attn1.to_q"] is FP
    back = Recipe(default=default, overrides=(("*attn1.*", {"method": "fp"}), ("*attn1.to_q", {"method": "rtn"})))
    assert back.resolve(_layers())["transformer_blocks.0.attn1.to_q"] == default
    for fields in ({"method": "fp", "w_bits": 4}, {"method": "fp", "a_bits": 8}):  # fp with explicit other bits: refused
        with pytest.raises(ConfigError) as info:
            Recipe(default=default, overrides=(("*attn1.to_q", fields),)).resolve(_layers())
        assert info.value.field in ("w_bits", "a_bits") and "fp" in str(info.value) and "attn1.to_q" in info.value.layer


# ---------------------------------------------------------------- audit: an override of skipped layers only
def test_override_matching_only_skipped_layers_is_refused():
    with pytest.raises(ConfigError, match="only skipped layers") as info:
        Recipe(default=LayerConfig(), overrides=(("proj_out_*", {"w_bits": 4}),)).resolve(_layers())
    assert info.value.field == "override pattern" and info.value.value == "proj_out_*" and "proj_out*" in str(info.value)
    Recipe(default=LayerConfig(), overrides=(("proj_out_*", {"w_bits": 4}),), skip=()).resolve(_layers())  # unskipped: fine
    Recipe(default=LayerConfig(), overrides=(("*", {"w_bits": 4}),)).resolve(_layers())  # some layers not skipped: fine
    plan = Recipe(default=LayerConfig(), overrides=(("proj_out_*", {"method": "fp"}),)).resolve(_layers())  # says what skip does
    assert all(plan[n] is None for n in plan if n.startswith("proj_out"))


# ---------------------------------------------------------------- audit: fields a method ignores
@pytest.mark.parametrize("method,w_bits,group", [("bnb-nf4", 4, 32), ("bnb-fp4", 4, 64), ("bnb-int8", 8, 64), ("kmeans", 2, 64),
                                                 ("vq4dit", 3, 64)])
def test_group_size_refused_for_methods_with_their_own_blocks(method, w_bits, group):
    with pytest.raises(ConfigError) as info:
        LayerConfig(method=method, w_bits=w_bits, a_bits=16, w_group_size=group)
    assert info.value.field == "w_group_size" and info.value.value == group and method in str(info.value)
    with pytest.raises(ConfigError) as info:
        Recipe(default=LayerConfig(method=method, w_bits=w_bits, a_bits=16), overrides=(("*.ff.*", {"w_group_size": group}),)).resolve(_layers())
    assert info.value.field == "w_group_size" and "ff" in info.value.layer
    LayerConfig(method=method, w_bits=w_bits, a_bits=16)  # without a group size: valid


def test_every_preset_still_validates():
    for recipe in PRESETS.values():
        assert recipe.default.validate() is recipe.default


# ---------------------------------------------------------------- audit: Recipe loose ends
@pytest.mark.parametrize("kwargs,field", [(dict(name=5), "name"), (dict(name=None), "name"), (dict(skip=None), "skip"),
                                          (dict(skip=5), "skip"), (dict(skip="proj_out*"), "skip")])
def test_recipe_refuses_bad_name_and_skip(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Recipe(**kwargs)
    assert info.value.field == field
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({"version": 1, **kwargs})
    assert info.value.field == field
    assert Recipe(skip=[], name="x").skip == ()  # an empty list = skip nothing


def test_recipe_replace_and_from_json_errors_are_config_errors():
    with pytest.raises(ConfigError) as info:
        Recipe().replace(foo=1)
    assert info.value.value == "foo" and "skip" in info.value.allowed
    assert Recipe().replace(name="x").name == "x"
    for bad in (None, 5, ["{}"]):
        with pytest.raises(ConfigError) as info:
            Recipe.from_json(bad)
        assert info.value.field == "recipe JSON"


def test_plan_table_accepts_a_preset_name_or_recipe_and_names_the_expected_type():
    layers = _layers()
    base = get_preset("w4a8-rtn")
    df = plan_to_frame(base.resolve(layers), layers)
    assert frame_to_recipe(df, "w4a8-rtn") is base
    assert plan_to_frame(base, layers).equals(df) and plan_to_frame("w4a8-rtn", layers).equals(df)
    for call, field in ((lambda: frame_to_recipe(df, 5), "base recipe"), (lambda: frame_to_recipe(df, "w3a3-magic"), "base recipe"),
                        (lambda: frame_to_recipe({"name": []}, base), "table"), (lambda: plan_to_frame(5, layers), "plan"),
                        (lambda: plan_to_frame("w3a3-magic", layers), "plan")):
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == field
