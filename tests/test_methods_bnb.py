"""bitsandbytes baselines: layers run on the CPU, error vs the FP layer, the source layer untouched, byte counts."""

import math

import pytest
import torch
from torch import nn

from ditlab.config import LayerConfig
from ditlab.methods import get_handler
from ditlab.methods.bnb import bnb_weight_bytes

MAX_REL_ERR = {"bnb-int8": 0.01, "bnb-nf4": 0.15, "bnb-fp4": 0.15}
MIN_REL_ERR = {"bnb-int8": 1e-4, "bnb-nf4": 0.02, "bnb-fp4": 0.02}  # it really quantized (not a float passthrough)


def _layer(k=192, n=768, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).requires_grad_(False)


def _quantize(linear, method):
    bits = 8 if method == "bnb-int8" else 4
    return get_handler(method)(linear, LayerConfig(method=method, w_bits=bits, a_bits=16), None)


def _rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def errors():
    """Relative output error of each method on a 192→768 layer (tokens from a N(0, 1) input)."""
    linear = _layer()
    x = torch.randn(256, 192, generator=torch.Generator().manual_seed(1))
    ref = linear(x)
    return {m: _rel(_quantize(linear, m)(x), ref) for m in MAX_REL_ERR}


@pytest.mark.parametrize("method", list(MAX_REL_ERR))
def test_output_error_bounds(errors, method):
    assert MIN_REL_ERR[method] < errors[method] < MAX_REL_ERR[method], errors


def test_nf4_beats_fp4_on_gaussian_weights(errors):
    # NF4's levels are normal quantiles: the better grid for bell-shaped weights (QLoRA's claim, and here a check that
    # the two handlers really build different formats).
    assert errors["bnb-nf4"] < errors["bnb-fp4"]


@pytest.mark.parametrize("method", list(MAX_REL_ERR))
def test_source_layer_untouched_and_module_on_cpu(method):
    linear = _layer(bias=method != "bnb-fp4")  # one case without bias
    w, b = linear.weight.clone(), None if linear.bias is None else linear.bias.clone()
    ptr = linear.weight.data_ptr()
    x = torch.randn(3, 5, 192)  # (B, T, K): token-layer input
    before = linear(x)
    q = _quantize(linear, method)
    assert torch.equal(linear.weight, w) and linear.weight.dtype == torch.float32 and linear.weight.data_ptr() == ptr
    assert (b is None and linear.bias is None) or torch.equal(linear.bias, b)
    assert torch.equal(linear(x), before)
    q_ptr, q_shape = q.weight.data_ptr(), q.weight.shape
    nbytes = bnb_weight_bytes(q)  # must not disturb the module either
    y = q(x)
    assert y.shape == (3, 5, 768) and y.dtype == torch.float32 and y.device.type == "cpu"
    assert q_ptr != ptr
    # no lazy set-up in the first real forward (bitsandbytes repacks / moves state on its first call: done at build)
    assert q.weight.data_ptr() == q_ptr and q.weight.shape == q_shape
    assert q.bias is None or q.bias.dtype == torch.float32
    assert torch.equal(q(x), y) and bnb_weight_bytes(q) == nbytes
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4"])
def test_4bit_layer_with_out_features_not_a_multiple_of_32(method):
    """bitsandbytes' CPU 4-bit repacking asserts N % 32 == 0; such layers (tiny DiT proj_out_2: 48) must still work."""
    linear = _layer(192, 48)
    x = torch.randn(64, 192)
    assert _rel(_quantize(linear, method)(x), linear(x)) < MAX_REL_ERR[method]


def test_weight_bytes_exact():
    n, k = 768, 192
    linear = _layer(k, n)
    int8 = _quantize(linear, "bnb-int8")
    assert bnb_weight_bytes(int8) == n * k + 4 * n  # int8 codes + one float32 scale per row
    blocks = n * k // 64
    expected_4bit = n * k // 2 + blocks + 16 * 4 + 4 * math.ceil(blocks / 256) + 256 * 4  # codes, 8-bit absmax, table, nested
    for method in ("bnb-nf4", "bnb-fp4"):
        assert bnb_weight_bytes(_quantize(linear, method)) == expected_4bit
    assert expected_4bit / (2 * n * k) < 0.27  # vs fp16


def test_int8_threshold_is_read_from_params():
    linear = _layer(64, 32)
    cfg = LayerConfig(method="bnb-int8", w_bits=8, a_bits=16, params={"threshold": 3.5})
    assert get_handler("bnb-int8")(linear, cfg, None).state.threshold == 3.5
    assert _quantize(linear, "bnb-int8").state.threshold == 6.0


def test_quantize_model_with_bnb_preset(tmp_path):
    """End to end through quantize_: every planned linear becomes a bitsandbytes module; outputs stay close."""
    import bitsandbytes as bnb

    from ditlab.models import load_pipeline
    from ditlab.quantize import quantize_
    from ditlab.testing import tiny_dit_pipeline

    pipe = load_pipeline(tiny_dit_pipeline(tmp_path / "dit"))
    model, report = quantize_(pipe.transformer, "bnb-nf4")
    kinds = {type(m) for n, m in model.named_modules() if n in {r.name for r in report.layers}}
    assert kinds == {bnb.nn.Linear4bit} and len(report.layers) > 0
    assert all(type(m) is nn.Linear for m in pipe.transformer.modules() if isinstance(m, nn.Linear))  # FP model intact
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 10]), return_dict=False)
    ref = pipe.transformer(x, **kwargs)[0]
    assert _rel(model(x, **kwargs)[0], ref) < 0.15


# ---- QDIR save → load, and byte counts through api.weight_bytes ---------------------------------------------------------
def test_codec_rebuild_bit_identical_without_requantizing():
    from ditlab.methods.bnb import bnb_build, bnb_spec, bnb_tensors

    # N = 48: bitsandbytes' portable 4-bit path; N = 64 with N(0, 0.05²) weights: its CPU layout, whose bfloat16 block
    # absmax does not survive bitsandbytes' own state_dict round trip (the codec saves it: this case caught that)
    for n, std in ((48, None), (64, 0.05)):
        linear = _layer(192, n)
        if std is not None:
            torch.nn.init.normal_(linear.weight, std=std)
        x = torch.randn(2, 9, 192)
        for method in MAX_REL_ERR:
            q = _quantize(linear, method)
            y = q(x)
            clone = bnb_build(bnb_spec(q), bnb_tensors(q))
            assert type(clone) is type(q) and torch.equal(clone(x), y), (n, method)
            assert torch.equal(q(x), y)  # taking the tensors did not disturb the live module
            assert getattr(clone, "is_quantized_linear", False) and bnb_weight_bytes(clone) == bnb_weight_bytes(q)


@pytest.mark.parametrize("preset", ["bnb-int8", "bnb-nf4", "bnb-fp4"])
def test_qdir_save_load_identical_and_weight_bytes(preset, tmp_path):
    """A bitsandbytes-quantized tiny DiT (one layer overridden to a ditlab QuantLinear, so both kinds share one
    QDIR) saves, loads standalone and gives identical outputs; api.weight_bytes counts the bitsandbytes layers with
    their stored bytes (codes + block scales), not as fp16."""
    import dataclasses

    from ditlab import api, qdir
    from ditlab.config import get_preset
    from ditlab.models import load_pipeline
    from ditlab.quantize import quantize_
    from ditlab.testing import tiny_dit_pipeline

    pipe = load_pipeline(tiny_dit_pipeline(tmp_path / "dit"))
    recipe = dataclasses.replace(get_preset(preset), overrides=(("transformer_blocks.0.attn1.to_q", {"method": "rtn", "w_bits": 4, "a_bits": 8, "w_group_size": 32}),))
    model, report = quantize_(pipe.transformer, recipe, progress=False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(timestep=torch.tensor([500, 20]), class_labels=torch.tensor([1, 7]), return_dict=False)
    with torch.no_grad():
        ref = model(x, **kwargs)[0]
    path = qdir.save_quantized(model, recipe, pipe, tmp_path / "q")
    loaded, loaded_recipe = qdir.load_quantized(path)
    kinds = {type(m).__name__ for m in loaded.transformer.modules()}
    assert {"QuantLinear", "Linear8bitLt" if preset == "bnb-int8" else "Linear4bit"} <= kinds
    with torch.no_grad():
        assert torch.equal(loaded.transformer(x, **kwargs)[0], ref)
    # byte counts: api.weight_bytes = Σ of the per-layer stored bytes the quantize report measured
    from dataclasses import replace as dc_replace

    packed, fp16 = api.weight_bytes(dc_replace(pipe, transformer=model))
    assert packed == sum(r.bytes_packed for r in report.layers) and fp16 == sum(r.bytes_fp16 for r in report.layers)
    assert api.weight_bytes(loaded) == (packed, fp16)
    ratio = packed / fp16
    assert (0.5 < ratio < 0.55) if preset == "bnb-int8" else (0.25 < ratio < 0.35), ratio
