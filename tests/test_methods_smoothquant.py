"""SmoothQuant: the scales, exact folding, the handler against a plain reference, and its effect on error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ditlab import backends, primitives, transforms
from ditlab.config import LayerConfig
from ditlab.errors import ConfigError
from ditlab.methods import METHODS
from transform_cases import make_linear, outlier_acts, rel_err, stats_from_acts


def test_scales_follow_the_formula():
    x = outlier_acts(seed=1)
    lin = make_linear(seed=1)
    st = stats_from_acts(x)
    for alpha in (0.0, 0.25, 0.5, 1.0):
        s = transforms.smoothquant_scales(st.absmax, lin.weight, alpha)
        a = st.absmax.double().numpy()
        wmax = lin.weight.abs().amax(0).double().numpy()
        ref = a**alpha / wmax ** (1 - alpha)
        np.testing.assert_allclose(s.double().numpy(), ref, rtol=2e-6)
    with pytest.raises(ConfigError, match="alpha"):
        transforms.smoothquant_scales(st.absmax, lin.weight, 1.5)


def test_folding_is_exact_before_quantization():
    x = outlier_acts(seed=2)
    lin = make_linear(seed=2)
    s = transforms.smoothquant_scales(stats_from_acts(x).absmax, lin.weight, 0.5)
    xs, mu = transforms.transform_input(x, smooth=s)
    assert mu is None
    assert rel_err(x @ lin.weight.t(), xs @ transforms.fold_weight(lin.weight, smooth=s).t()) < 1e-6
    # smoothing flattens the activation ranges: the largest channel shrinks relative to the median one
    ratio = lambda t: float(t.abs().amax((0, 1)).max() / t.abs().amax((0, 1)).median())  # noqa: E731
    assert ratio(xs) < 0.3 * ratio(x)


def _cfg(**kw):
    base = dict(method="smoothquant", w_bits=8, a_bits=8, w_symmetric=True, alpha=0.5)
    base.update(kw)
    return LayerConfig(**base)


@pytest.mark.parametrize("kw", [{}, {"a_bits": 4, "w_bits": 4, "w_group_size": 64, "w_symmetric": False}, {"a_granularity": "per-tensor"}])
def test_handler_matches_plain_reference(kw):
    x = outlier_acts(seed=3)
    lin = make_linear(seed=3)
    before = copy.deepcopy(lin.state_dict())
    st = stats_from_acts(x)
    cfg = _cfg(**kw)
    q = METHODS["smoothquant"](lin, cfg, st)
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())  # the float layer is untouched
    # the plain definition: s from the formula, X/s quantized, W·diag(s) quantized on its min–max grid
    s = st.absmax.clamp(min=1e-5) ** 0.5 / lin.weight.abs().amax(0).clamp(min=1e-5) ** 0.5
    xs = x / s
    w_hat = primitives.fake_quantize_weight(lin.weight * s, cfg.w_bits, cfg.w_group_size, cfg.w_symmetric)
    if cfg.a_granularity == "per-tensor":
        a_scale = (st.absmax / s).max() / (2 ** (cfg.a_bits - 1) - 1)
        x_hat = primitives.fake_quantize_act(xs, cfg.a_bits, a_scale.reshape(1, 1))
    else:
        x_hat = primitives.fake_quantize_act(xs, cfg.a_bits)
    ref = x_hat @ w_hat.t() + lin.bias
    with backends.use_backend("reference"):
        out_ref = q(x)
    with backends.use_backend("cpu-int"):
        out_int = q(x)
    assert rel_err(ref, out_ref) < 1e-4
    assert rel_err(out_ref, out_int) < 1e-5


def test_smoothing_beats_rtn_on_outlier_activations():
    x = outlier_acts(seed=4)
    lin = make_linear(seed=4)
    st = stats_from_acts(x)
    y = lin(x)
    cfg = _cfg(a_bits=6)
    err_sq = rel_err(y, METHODS["smoothquant"](lin, cfg, st)(x))
    err_rtn = rel_err(y, METHODS["rtn"](lin, cfg.replace(method="rtn"), None)(x))
    assert err_sq < 0.6 * err_rtn, (err_sq, err_rtn)


def test_needs_statistics_and_composes_with_gptq():
    x = outlier_acts(seed=5)
    lin = make_linear(seed=5)
    st = stats_from_acts(x)
    with pytest.raises(ConfigError, match="calibration statistics"):
        METHODS["smoothquant"](lin, _cfg(), None)
    y = lin(x)
    cfg = _cfg(w_bits=3, a_bits=16)  # weight-only, so the comparison isolates the weight rounding
    err_nearest = rel_err(y, METHODS["smoothquant"](lin, cfg, st)(x))
    err_gptq = rel_err(y, METHODS["smoothquant"](lin, cfg.replace(weight_rounding="gptq"), st)(x))
    assert err_gptq < 0.85 * err_nearest, (err_gptq, err_nearest)
