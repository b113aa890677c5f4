"""RTN against a plain reference: min–max grid, clipping search, static activations, fp passthrough, registry."""

from types import SimpleNamespace

import pytest
import torch

from ditlab import primitives
from ditlab.config import LayerConfig
from ditlab.errors import ConfigError
from ditlab.methods import METHODS, get_handler, register
from ditlab.methods.rtn import CLIP_RATIOS, clip_search, quantize_rtn, static_act_scale
from ditlab.nn import QuantLinear


def _linear(n=64, k=128, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[torch.arange(n), torch.randint(0, k, (n,))] *= 12  # one outlier per row: clipping has work to do
    return lin


def _fp16_up(delta):
    """Δ rounded up to the next float16 value (the stored scale dtype), written with numpy's float16."""
    import numpy as np

    d = delta.double().numpy()
    h = d.astype(np.float16)
    h = np.where(h.astype(np.float64) < d, np.nextafter(h, np.float16(np.inf)), h)
    return torch.from_numpy(h.astype(np.float32))


def _plain_rtn(w, bits, group, symmetric, ratio=1.0):
    """Textbook min–max RTN written out from METHODS.md (no ditlab helpers), float32, with Δ stored in float16
    (rounded up, so the range stays covered): returns Ŵ (N, K)."""
    n, k = w.shape
    g = k if group is None else group
    wg = w.reshape(n, k // g, g).float()
    if symmetric:
        delta = _fp16_up(wg.abs().amax(-1, keepdim=True) * ratio / (2 ** (bits - 1) - 1))
        q = torch.round(wg / delta).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return (q * delta).reshape(n, k)
    lo = wg.amin(-1, keepdim=True).clamp(max=0) * ratio
    hi = wg.amax(-1, keepdim=True).clamp(min=0) * ratio
    delta = _fp16_up((hi - lo) / (2**bits - 1))
    z = torch.round(-lo / delta)
    q = (torch.round(wg / delta) + z).clamp(0, 2**bits - 1)
    return ((q - z) * delta).reshape(n, k)


@pytest.mark.parametrize("bits,group,sym", [(8, None, False), (8, None, True), (4, 32, False), (4, None, True), (3, 64, False)])
def test_rtn_matches_plain_reference(bits, group, sym):
    lin = _linear()
    cfg = LayerConfig(w_bits=bits, a_bits=16, w_group_size=group, w_symmetric=sym)
    layer = quantize_rtn(lin, cfg, None)
    ref = _plain_rtn(lin.weight.detach(), bits, group, sym)
    assert torch.equal(layer.dequantized_weight(), ref)  # same float32 operations in the same order: exact


def test_handler_does_not_modify_linear_and_bias_copied():
    lin = _linear()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    layer = get_handler("rtn")(lin, LayerConfig(w_bits=4, a_bits=8, w_group_size=64), None)
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())
    assert isinstance(layer, QuantLinear) and torch.equal(layer.bias, lin.bias.detach())


_F32_RATIOS = {float(torch.tensor(r, dtype=torch.float32)) for r in CLIP_RATIOS}


@pytest.mark.parametrize("bits,group,sym", [(4, None, False), (4, 32, True), (3, 64, False)])
def test_clip_search_never_worse_and_helps_with_outliers(bits, group, sym):
    lin = _linear()
    w = lin.weight.detach()
    plain = quantize_rtn(lin, LayerConfig(w_bits=bits, a_bits=16, w_group_size=group, w_symmetric=sym), None)
    clipped = quantize_rtn(lin, LayerConfig(w_bits=bits, a_bits=16, w_group_size=group, w_symmetric=sym, clip_search=True), None)
    g = plain.w_scale.shape[1]
    err = lambda layer: (layer.dequantized_weight() - w).reshape(64, g, -1).pow(2).sum(-1)  # noqa: E731 (N, G)
    assert (err(clipped) <= err(plain) * (1 + 1e-6)).all()  # per row/group: ratio 1.0 is a candidate
    assert err(clipped).sum() < 0.95 * err(plain).sum()  # outliers: clipping pays off
    ratios = clip_search(w, bits, group, sym)
    assert ratios.shape == (64, g) and set(ratios.unique().tolist()) <= _F32_RATIOS and ratios.min() < 1.0


def test_clip_search_is_exhaustive_argmin():
    w = _linear(n=4, k=32).weight.detach()
    best = clip_search(w, 4, None, False)
    for row in range(4):
        errs = {r: (_plain_rtn(w[row:row + 1], 4, None, False, r) - w[row:row + 1]).pow(2).sum().item() for r in _F32_RATIOS}
        assert errs[best[row, 0].item()] <= min(errs.values()) * (1 + 1e-4)


def _stats(k, absmax):
    """Only the field RTN reads (LayerStats.absmax); the rest of LayerStats is the calibration tests' business."""
    return SimpleNamespace(absmax=absmax)


def test_static_per_tensor_uses_calibration_absmax():
    lin = _linear()
    absmax = torch.linspace(0.1, 6.35, 128)
    cfg = LayerConfig(w_bits=8, a_bits=8, a_granularity="per-tensor")
    layer = quantize_rtn(lin, cfg, _stats(128, absmax))
    assert torch.equal(layer.a_scale, torch.tensor([[6.35 / 127]], dtype=torch.float32)) or torch.allclose(layer.a_scale, static_act_scale(absmax, 8))
    x = torch.randn(3, 5, 128)
    codes = primitives.quantize_act(x.reshape(-1, 128), layer.a_scale, 8)
    assert torch.allclose(layer(x), ((codes.float() * layer.a_scale) @ layer.dequantized_weight().t() + lin.bias).reshape(3, 5, 64), atol=1e-5)
    with pytest.raises(ConfigError, match="calibration statistics"):
        quantize_rtn(lin, cfg, None)


def test_fp_passthrough_and_registry():
    lin = _linear()
    copy = get_handler("fp")(lin, LayerConfig(method="fp", w_bits=16, a_bits=16), None)
    assert type(copy) is torch.nn.Linear and copy is not lin and torch.equal(copy.weight, lin.weight)
    assert {"fp", "rtn"} <= set(METHODS)
    with pytest.raises(ConfigError) as info:
        get_handler("no-such-method")
    assert info.value.field == "method" and "rtn" in str(info.value)
    with pytest.raises(ValueError, match="twice"):
        register("rtn")(lambda linear, cfg, stats: linear)


# ---- weight_rounding="gptq": RTN's grid family, GPTQ's codes -----------------------------------------------------------
def _correlated_acts(m=512, k=128, seed=0):
    """X (M, K) with strongly correlated channels (a random mixing of 16 latent factors + small noise): the case
    where GPTQ's error propagation pays off over independent rounding."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, 16, generator=g)
    mix = torch.randn(16, k, generator=g)
    return z @ mix + 0.1 * torch.randn(m, k, generator=g)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, None, True), (3, 64, False)])
def test_rtn_gptq_rounding_beats_nearest_and_equals_gptq(bits, group, sym):
    from ditlab.methods.gptq import gptq_quantize, hessian_from_stats
    from transform_cases import stats_from_acts

    lin = _linear(n=64, k=128)
    x = _correlated_acts()
    stats = stats_from_acts(x)
    base = dict(w_bits=bits, a_bits=16, w_group_size=group, w_symmetric=sym)
    nearest = quantize_rtn(lin, LayerConfig(**base), stats)
    rounded = quantize_rtn(lin, LayerConfig(**base, weight_rounding="gptq"), stats)
    ref = x @ lin.weight.detach().t()
    err = lambda layer: float((x @ layer.dequantized_weight().t() - ref).norm() / ref.norm())  # noqa: E731
    assert err(rounded) < 0.8 * err(nearest), (err(rounded), err(nearest))
    # exactly GPTQ: same codes and grid as calling the routine directly, and as the "gptq" method
    codes, scale, zero = gptq_quantize(lin.weight.detach(), hessian_from_stats(stats), bits, group, sym, 0.01)
    assert torch.equal(rounded.codes(), codes) and torch.equal(rounded.w_scale.float(), scale)
    assert (zero is None and rounded.w_zero is None) or torch.equal(rounded.w_zero.int(), zero)
    direct = get_handler("gptq")(lin, LayerConfig(method="gptq", **base), stats)
    assert torch.equal(rounded.qweight, direct.qweight) and torch.equal(rounded.w_scale, direct.w_scale)
    assert torch.equal(rounded(x), direct(x))
    with pytest.raises(ConfigError, match="calibration statistics"):
        quantize_rtn(lin, LayerConfig(**base, weight_rounding="gptq"), None)
