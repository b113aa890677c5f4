"""SVD low-rank branch: the split is exact, the residual is the Eckart–Young tail, smoothing composes."""

from __future__ import annotations

import pytest
import torch

from ditlab import transforms
from ditlab.errors import ConfigError
from transform_cases import outlier_acts, stats_from_acts


def _w(n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a few strong directions on top of noise, as trained weights (and smoothed weights) have
    return torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g) + 0.05 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_svd_split_is_exact_and_residual_is_the_tail(rank):
    w = _w()
    l1, l2, r = transforms.svd_split(w, rank)
    assert l1.shape == (48, rank) and l2.shape == (rank, 64) and r.shape == w.shape
    assert torch.allclose(l1 @ l2 + r, w, atol=1e-5)
    s = torch.linalg.svdvals(w.double())
    tail = s[rank:].pow(2).sum()
    assert abs(r.double().pow(2).sum() / tail - 1) < 1e-4  # Eckart–Young: ‖R‖² = Σ_{i>r} σ_i²
    assert torch.allclose(torch.linalg.svdvals(r.double())[: 48 - rank], s[rank:], rtol=1e-4, atol=1e-6)


def test_svd_residual_is_easier_to_quantize():
    """Removing the strong directions shrinks the weight range: RTN error of R is far below that of W."""
    from ditlab import primitives

    w = _w(seed=1)
    _, _, r = transforms.svd_split(w, 4)
    err_w = (primitives.fake_quantize_weight(w, 4) - w).norm()
    err_r = (primitives.fake_quantize_weight(r, 4) - r).norm()
    assert err_r < 0.3 * err_w


def test_svd_after_smoothing_reconstructs_the_layer():
    x = outlier_acts(b=2, t=32, k=64, seed=2)
    w = _w(seed=2)
    smooth = transforms.smoothquant_scales(stats_from_acts(x).absmax, w, 0.5)
    l1, l2, r = transforms.svd_split(transforms.fold_weight(w, smooth), 8)
    xs, _ = transforms.transform_input(x, smooth)
    y = xs @ r.t() + (xs @ l2.t()) @ l1.t()
    ref = x @ w.t()
    assert ((y - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("rank", [0, 49, 2.5, True])
def test_svd_rank_validation(rank):
    with pytest.raises(ConfigError, match="rank"):
        transforms.svd_split(_w(), rank)


def test_svd_handler_matches_plain_reference_and_beats_smoothing_alone():
    from ditlab import backends, primitives
    from ditlab.config import LayerConfig
    from ditlab.methods import METHODS
    from ditlab.nn import QuantLinear
    from transform_cases import make_linear, rel_err

    x = outlier_acts(seed=3)
    lin = make_linear(seed=3)
    with torch.no_grad():  # give the weight a strong low-rank part, as smoothed DiT weights have
        lin.weight += 0.05 * torch.randn(96, 2, generator=torch.Generator().manual_seed(0)) @ torch.randn(2, 192, generator=torch.Generator().manual_seed(1))
    st = stats_from_acts(x)
    cfg = LayerConfig(method="svd", w_bits=4, a_bits=4, w_group_size=64, w_symmetric=False, rank=8, alpha=0.5)
    q = METHODS["svd"](lin, cfg, st)
    assert q.lr_down.shape == (8, 192) and q.lr_up.shape == (96, 8) and q.lr_down.dtype == torch.float16
    # plain reference: smooth, SVD in float64, factors rounded to fp16, residual quantized, branch in float
    s = st.absmax.clamp(min=1e-5) ** 0.5 / lin.weight.abs().amax(0).clamp(min=1e-5) ** 0.5
    ws = (lin.weight * s).double()
    u, sv, vh = torch.linalg.svd(ws, full_matrices=False)
    l1 = (u[:, :8] * sv[:8].sqrt()).half().float()
    l2 = (sv[:8].sqrt()[:, None] * vh[:8]).half().float()
    r_hat = primitives.fake_quantize_weight(ws.float() - l1 @ l2, 4, 64, False)
    xs = x / s
    ref = primitives.fake_quantize_act(xs, 4) @ r_hat.t() + (xs @ l2.t()) @ l1.t() + lin.bias
    with backends.use_backend("reference"):
        out = q(x)
    assert rel_err(ref, out) < 1e-4
    with backends.use_backend("cpu-int"):
        assert rel_err(out, q(x)) < 1e-5
    y = lin(x)
    err_sq = rel_err(y, METHODS["smoothquant"](lin, cfg.replace(method="smoothquant"), st)(x))
    assert rel_err(y, out) < 0.8 * err_sq
    clone = QuantLinear.from_spec(q.spec())
    clone.load_state_dict(q.state_dict())
    assert torch.equal(clone(x), q(x))
    with pytest.raises(ConfigError, match="rank"):
        METHODS["svd"](lin, cfg.replace(rank=100), st)
