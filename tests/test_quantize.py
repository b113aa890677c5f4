"""quantize_ on a tiny randomly initialised DiTTransformer2DModel built from config (no files, fast)."""

from types import SimpleNamespace

import pytest
import torch

from ditlab import backends
from ditlab.config import LayerConfig, Recipe
from ditlab.errors import ConfigError
from ditlab.metrics import sqnr
from ditlab.models import list_linears
from ditlab.nn import QuantLinear
from ditlab.quantize import QuantReport, quantize_, weight_bytes


@pytest.fixture(scope="module")
def tiny():
    """(model, inputs, FP output): 2 blocks, hidden 64 (2 heads × 32), 16×16×3 pixels, patch 2 → 64 tokens."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=3, out_channels=3, num_layers=2,
                                  sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval().requires_grad_(False)
    for p in model.parameters():  # adaLN-zero starts at zero; perturb so the output depends on every weight
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(4, 3, 16, 16, generator=g), timestep=torch.tensor([10, 300, 600, 900]),
                  class_labels=torch.tensor([0, 3, 7, 10]))
    with torch.no_grad():
        ref = model(**inputs).sample
    return model, inputs, ref


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_w8a8_close_to_fp_and_skip_list_respected(tiny):
    model, inputs, ref = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, report = quantize_(model, "w8a8-rtn", progress=False)
    assert sqnr(ref, _run(qmodel, inputs)) > 30  # dB
    kinds = {info.name: info.kind for info in list_linears(model)}
    for name, kind in kinds.items():
        module = qmodel.get_submodule(name)
        if kind in ("embedder", "final"):
            original = model.get_submodule(name).weight
            assert type(module) is torch.nn.Linear and torch.equal(module.weight, original)
            assert module.weight.data_ptr() != original.data_ptr()  # a real copy: editing it cannot touch the FP model
        else:
            assert isinstance(module, QuantLinear) and module.w_bits == 8
    # the input model is untouched (it is the shared read-only FP model)
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in kinds)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_run(model, inputs), ref)
    assert isinstance(report, QuantReport) and len(report.layers) == sum(k not in ("embedder", "final") for k in kinds.values())
    assert set(report.skipped) == {n for n, k in kinds.items() if k in ("embedder", "final")}


def test_w4a8_groups_and_report_frame(tiny):
    model, inputs, ref = tiny
    qmodel, report = quantize_(model, "w4a8-rtn", progress=False)
    assert sqnr(ref, _run(qmodel, inputs)) > 15
    df = report.to_frame()
    assert list(df.name) == [r.name for r in report.layers] and {"method", "w_bits", "a_bits", "bytes_packed", "bytes_fp16", "seconds"} <= set(df.columns)
    # packed bytes: 0.5 byte per weight + fp16 scale + int8 zero per group of 64 → (0.5 + 3/64) / 2 = 0.2734 of fp16
    assert report.ratio == pytest.approx(0.2734375) and report.bytes_fp16 == sum(2 * r.out_features * r.in_features for r in report.layers)
    assert all(r.bytes_packed == weight_bytes(qmodel.get_submodule(r.name)) for r in report.layers)
    totals = report.totals()
    assert totals["n_quantized"] == len(report.layers) and totals["bytes_packed"] == report.bytes_packed


def test_model_paths_agree_within_float_rounding(tiny):
    model, inputs, _ = tiny
    qmodel, _ = quantize_(model, "w4a8-rtn", progress=False)
    with backends.use_backend("reference"):
        ref = _run(qmodel, inputs)
    with backends.use_backend("cpu-int"):
        out = _run(qmodel, inputs)
    # identical codes, exact accumulators and one shared epilogue at every layer: bit-identical model output
    assert torch.equal(ref, out)
    assert sqnr(_run(model, inputs), out) > 15


def test_overrides_and_fp_layers(tiny):
    model, _, _ = tiny
    recipe = Recipe(default=LayerConfig(w_bits=8, a_bits=8),
                    overrides=(("*.ff.*", {"w_bits": 4, "w_group_size": 32}), ("*.attn1.to_v", {"method": "fp", "w_bits": 16, "a_bits": 16})))
    qmodel, report = quantize_(model, recipe, progress=False)
    assert qmodel.get_submodule("transformer_blocks.1.ff.net.2").w_bits == 4
    assert qmodel.get_submodule("transformer_blocks.1.ff.net.2").w_group_size == 32
    assert type(qmodel.get_submodule("transformer_blocks.0.attn1.to_v")) is torch.nn.Linear
    assert "transformer_blocks.0.attn1.to_v" in report.skipped and qmodel.ditlab_recipe is recipe


def test_needs_stats_error_before_work_and_static_with_stats(tiny):
    model, inputs, ref = tiny
    with pytest.raises(ConfigError, match="calibration statistics") as info:
        quantize_(model, "w8a8-rtn-static", progress=False)
    assert info.value.layer is not None
    # any mapping name → object with .absmax works as calibration data (CalibStats is such a mapping)
    with torch.no_grad():
        calib = {}
        hooks = []
        for info_ in list_linears(model):
            mod = model.get_submodule(info_.name)
            hooks.append(mod.register_forward_hook(
                lambda m, args, out, name=info_.name: calib.__setitem__(name, SimpleNamespace(absmax=args[0].reshape(-1, m.in_features).abs().amax(0)))))
        model(**inputs)
        for h in hooks:
            h.remove()
    calls = []
    qmodel, report = quantize_(model, "w8a8-rtn-static", calib=calib, progress=lambda i, n, name: calls.append((i, n, name)))
    assert sqnr(ref, _run(qmodel, inputs)) > 20
    assert all(qmodel.get_submodule(r.name).a_scale is not None for r in report.layers)
    assert [c[0] for c in calls] == list(range(1, len(report.layers) + 1)) and calls[-1][1] == len(report.layers)


def test_rejects_quantized_input_and_bad_patterns(tiny):
    model, _, _ = tiny
    qmodel, _ = quantize_(model, "w8a8-rtn", progress=False)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_(qmodel, "w8a8-rtn", progress=False)
    with pytest.raises(ConfigError, match="attn2"):
        quantize_(model, Recipe(default=LayerConfig(), overrides=(("*.attn2.*", {"w_bits": 4}),)), progress=False)


def test_weight_bytes_of_plain_and_foreign_modules():
    lin = torch.nn.Linear(32, 16)
    assert weight_bytes(lin) == 32 * 16 * 4

    class Foreign(torch.nn.Module):  # e.g. a bitsandbytes layer: int8 weight + a scale buffer, bias not counted
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(16, 32, dtype=torch.int8), requires_grad=False)
            self.register_buffer("SCB", torch.zeros(16))
            self.bias = torch.nn.Parameter(torch.zeros(16))

    assert weight_bytes(Foreign()) == 16 * 32 + 16 * 4
