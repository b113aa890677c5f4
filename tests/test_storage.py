"""Packed size of QuantLinear: float16 scales, int8 zero points, lossless storage of the grid, and the issue's ratios
(W8 per channel ≤ 0.55×, W4 group 128 ≤ 0.30× the fp16 bytes) on DiT-XL/2-sized layers."""

import numpy as np
import pytest
import torch
from torch import nn

from ditlab import primitives
from ditlab.config import LayerConfig
from ditlab.methods import get_handler
from ditlab.methods.hadanorm import DEFAULT_MEAN_RANK
from ditlab.nn import QuantLinear
from transform_cases import stats_from_acts

# DiT-XL/2 linears: qkv/out/adaLN-chunk 1152→1152, fc1 1152→4608, fc2 4608→1152
XL_SHAPES = [(1152, 1152), (4608, 1152), (1152, 4608)]  # (out, in)


def _linear(n, k, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    nn.init.normal_(lin.weight, std=0.02)
    return lin.requires_grad_(False)


def _ratio(layer: QuantLinear) -> float:
    return layer.weight_bytes() / (2 * layer.out_features * layer.in_features)


@pytest.mark.parametrize("n,k", XL_SHAPES)
def test_packed_ratio_w8_per_channel_and_w4_group128(n, k):
    lin = _linear(n, k)
    w8 = get_handler("rtn")(lin, LayerConfig(w_bits=8, a_bits=8), None)  # asymmetric: codes + fp16 scale + int8 zero
    w4 = get_handler("rtn")(lin, LayerConfig(w_bits=4, a_bits=8, w_group_size=128), None)
    w4_64 = get_handler("rtn")(lin, LayerConfig(w_bits=4, a_bits=8, w_group_size=64), None)
    assert w8.weight_bytes() == n * k + n * (2 + 1)
    assert w4.weight_bytes() == n * k // 2 + n * (k // 128) * (2 + 1)
    assert _ratio(w8) <= 0.55 and _ratio(w4) <= 0.30
    assert abs(_ratio(w4) - (0.5 + 3 / 128) / 2) < 1e-12  # 0.2617
    assert abs(_ratio(w4_64) - (0.5 + 3 / 64) / 2) < 1e-12  # 0.2734 (was 0.3125 with float32 scales and int32 zeros)


def test_ratio_with_hadanorm_transform_buffers():
    """HadaNorm adds σ (K,) float32, the Hadamard signs (K,) int8 and the mean term's low-rank correction
    ((K + N)·r float16, r = DEFAULT_MEAN_RANK): 0.56 % of an XL layer's fp16 bytes together."""
    n, k = 1152, 1152
    lin = _linear(n, k)
    x = torch.randn(8, 64, k) * torch.linspace(0.1, 3, k) + torch.randn(8, 1, k)  # 8 samples: their means span 7 directions
    q = get_handler("hadanorm")(lin, LayerConfig(method="hadanorm", w_bits=4, a_bits=8, w_group_size=128), stats_from_acts(x))
    assert q.mean_down.shape[0] == DEFAULT_MEAN_RANK
    assert q.weight_bytes() == n * k // 2 + n * (k // 128) * 3 + 4 * k + k + 2 * (k + n) * DEFAULT_MEAN_RANK
    assert _ratio(q) <= 0.30 and _ratio(q) - (0.5 + 3 / 128) / 2 < 0.006


def test_buffer_dtypes_and_lossless_grid():
    lin = _linear(96, 256)
    for cfg in (LayerConfig(w_bits=8, a_bits=8), LayerConfig(w_bits=4, a_bits=8, w_group_size=64), LayerConfig(w_bits=3, a_bits=16, w_group_size=32)):
        q = get_handler("rtn")(lin, cfg, None)
        assert q.w_scale.dtype == torch.float16 and q.w_zero.dtype == torch.int8
        scale, zero = primitives.weight_qparams(lin.weight, cfg.w_bits, cfg.w_group_size, cfg.w_symmetric)
        assert torch.equal(q.w_scale.float(), scale) and torch.equal(q.w_zero.int(), zero)  # storing changed no number
        codes = primitives.quantize_weight(lin.weight, scale, zero, cfg.w_bits, cfg.w_group_size)
        assert torch.equal(q.codes(), codes)
    q = get_handler("rtn")(lin, LayerConfig(w_bits=4, a_bits=8, w_symmetric=True), None)
    assert q.w_zero is None and q.w_scale.dtype == torch.float16


def test_fp16_ceil_is_the_smallest_float16_not_below():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=g) * 10.0 ** torch.randint(-9, 5, (4000,), generator=g).float(),
                   torch.tensor([1.0, 0.5, 65504.0, 1e6, 1e-9, 6e-8, 2.0 ** -24, 2.0 ** -14])])
    up = primitives.fp16_ceil(x)
    assert up.dtype == torch.float32 and torch.equal(up.half().float(), up)  # exact in float16
    x16 = np.minimum(x.double().numpy(), 65504.0)
    below = np.nextafter(up.numpy().astype(np.float16), np.float16(-np.inf)).astype(np.float64)
    assert (up.double().numpy() >= x16).all() and (below < x16).all()  # ≥ x, and the float16 below is < x
    assert float(up[-8]) == 1.0 and float(up[-6]) == 65504.0 and float(up[-5]) == 65504.0  # exact; overflow clamps
    assert float(up[-4]) == 2.0 ** -24 and float(up[-1]) == 2.0 ** -14  # below the smallest subnormal: never 0


def test_set_weight_rejects_scales_float16_cannot_hold():
    layer = QuantLinear(8, 4, w_bits=8)
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(Exception, match="float16"):
        layer.set_weight(codes, torch.full((4, 1), 0.1), None)  # 0.1 is not a float16 value: the codes' grid would move
    layer.set_weight(codes, primitives.fp16_ceil(torch.full((4, 1), 0.1)), None)
