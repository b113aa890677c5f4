"""HadaNorm: exact folding with the mean term, the handler against a plain reference, single-token layers,
and the error ordering HadaNorm < Hadamard < RTN at 4-bit activations."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from ditlab import backends, hadamard_ops, primitives, transforms
from ditlab.config import LayerConfig
from ditlab.methods import METHODS
from ditlab.errors import ConfigError
from ditlab.methods.hadanorm import DEFAULT_MEAN_RANK, hadanorm_sigma
from ditlab.nn import QuantLinear
from transform_cases import dense_hadamard, make_linear, outlier_acts, rel_err, stats_from_acts


def _cfg(**kw):
    base = dict(method="hadanorm", w_bits=8, a_bits=4, w_group_size=None, w_symmetric=False, hadamard_seed=5)
    base.update(kw)
    return LayerConfig(**base)


def test_folding_with_mean_term_is_exact():
    x = outlier_acts(seed=1)
    lin = make_linear(seed=1)
    st = stats_from_acts(x)
    rot = hadamard_ops.make_rotation(192, 5)
    xt, mu = transforms.transform_input(x, center=True, sigma=st.centered_std, rotate=rot)
    assert mu.shape == (4, 1, 192) and xt.mean(1).abs().max() < 1e-4 * xt.abs().max()  # centred per sample
    w_t = transforms.fold_weight(lin.weight, sigma=st.centered_std, rotate=rot)
    assert rel_err(x @ lin.weight.t(), (xt + mu) @ w_t.t()) < 1e-5  # fp32: the mean term is large


def _mean_projection(st, sigma, qm, rank: int) -> torch.Tensor:
    """P (K, K): projector onto the top-``rank`` right singular vectors of the calibration means' transformed
    deviations ((μ_s − μ̄)/σ)·Q (numpy's SVD: an implementation independent of the handler's)."""
    dev = ((st.sample_means - st.mean) / sigma) @ qm  # (S, K)
    r = min(rank, dev.shape[0] - 1)
    if r < 1:
        return torch.zeros(dev.shape[1], dev.shape[1])
    vt = torch.from_numpy(np.linalg.svd(dev.double().numpy(), full_matrices=False)[2][:r]).float()  # (r, K)
    return vt.t() @ vt


@pytest.mark.parametrize("kw", [{}, {"w_bits": 4, "w_group_size": 64, "a_bits": 8, "sigma": "absmax"},
                                {"w_bits": 4, "w_group_size": 64, "params": {"mean_bias_correction": False}},
                                {"w_bits": 4, "w_group_size": 64, "params": {"mean_rank": 0}},
                                {"w_bits": 4, "w_group_size": 64, "params": {"mean_rank": 2, "mean_bias_correction": False}}])
def test_handler_matches_plain_reference(kw):
    x = outlier_acts(b=8, seed=2)
    lin = make_linear(seed=2)
    st = stats_from_acts(x)
    cfg = _cfg(**kw)
    q = METHODS["hadanorm"](lin, cfg, st)
    sigma = (st.centered_std if cfg.sigma == "std" else st.centered_absmax).float()
    qm = dense_hadamard(192, 64, hadamard_ops.random_signs(192, 5).double()).float()
    mu = x.mean(1, keepdim=True)  # (B, 1, K) per-sample mean over tokens
    x_hat = primitives.fake_quantize_act((x - mu) / sigma @ qm, cfg.a_bits)
    w_tilde = (lin.weight * sigma) @ qm
    w_hat = primitives.fake_quantize_weight(w_tilde, cfg.w_bits, cfg.w_group_size, cfg.w_symmetric)
    err = w_tilde - w_hat  # (N, K)
    proj = _mean_projection(st, sigma, qm, cfg.params.get("mean_rank", DEFAULT_MEAN_RANK))
    # mean term: the stored W plus its error projected on the calibrated subspace of the means
    ref = x_hat @ w_hat.t() + (mu / sigma @ qm) @ (w_hat + err @ proj).t() + lin.bias
    if cfg.params.get("mean_bias_correction", True):
        ref = ref + (st.mean / sigma @ qm) @ (err - err @ proj).t()  # what is left of the error at the calibration mean
    with backends.use_backend("reference"):
        out_ref = q(x)
    with backends.use_backend("cpu-int"):
        out_int = q(x)
    assert rel_err(ref, out_ref) < 2e-3  # fp32 FWHT vs dense matmul may move a value across a rounding boundary
    assert rel_err(out_ref, out_int) < 1e-5


def test_mean_term_is_exact_for_means_in_the_calibrated_subspace():
    """With a rank that spans every calibration mean's deviation (S − 1), the mean term equals the specification's
    full-precision T(μ)·W̃ᵀ on the calibration inputs, up to the float16 storage of the correction."""
    x = outlier_acts(b=6, seed=4)
    lin = make_linear(seed=4)
    st = stats_from_acts(x)
    cfg = _cfg(w_bits=4, w_group_size=64, a_bits=8, params={"mean_rank": 5})
    q = METHODS["hadanorm"](lin, cfg, st)
    assert q.mean_down.shape == (5, 192) and q.mean_up.shape == (96, 5) and q.mean_down.dtype == torch.float16
    t_mu = q.transform(x)[1]  # (B, 1, K)
    exact = t_mu @ q.transform.fold_weight(lin.weight).t()
    assert rel_err(exact, q.mean_correction(t_mu) + (q.bias - lin.bias)) < 1e-3
    without = METHODS["hadanorm"](lin, cfg.replace(params={"mean_rank": 0}), st)
    assert rel_err(exact, without.mean_correction(t_mu) + (without.bias - lin.bias)) > 10 * rel_err(exact, q.mean_correction(t_mu) + (q.bias - lin.bias))


def test_full_mean_rank_gives_the_specifications_full_precision_mean_term_on_any_input():
    """mean_rank ≥ K: U = I, so the mean term is T(μ)·W̃ᵀ for every μ — held-out inputs and a mean far outside the
    calibration's — up to the float16 storage of the weight error; the bias correction has almost nothing left."""
    x = outlier_acts(b=16, seed=6)
    lin = make_linear(seed=6)
    st = stats_from_acts(x[:4])  # 4 calibration means: a rank-3 subspace at most
    q = METHODS["hadanorm"](lin, _cfg(w_bits=4, w_group_size=64, a_bits=8, params={"mean_rank": 192}), st)
    assert q.mean_down.shape == (192, 192) and torch.equal(q.mean_down.float(), torch.eye(192))
    held = torch.cat([x[4:], x[4:5] + 3.0 * torch.randn(1, 1, 192, generator=torch.Generator().manual_seed(0))])
    t_mu = q.transform(held)[1]  # (B, 1, K)
    exact = t_mu @ q.transform.fold_weight(lin.weight).t()
    assert rel_err(exact, q.mean_correction(t_mu)) < 2e-4  # measured 6e-5: float16 rounding of E only
    partial = METHODS["hadanorm"](lin, _cfg(w_bits=4, w_group_size=64, a_bits=8, params={"mean_rank": 3}), st)
    assert rel_err(exact, partial.mean_correction(t_mu) + (partial.bias - lin.bias)) > 20 * rel_err(exact, q.mean_correction(t_mu))
    rank0 = METHODS["hadanorm"](lin, _cfg(w_bits=4, w_group_size=64, a_bits=8, params={"mean_rank": 0}), st)
    assert (q.bias - lin.bias).norm() < 0.05 * (rank0.bias - lin.bias).norm()


def test_mean_rank_lowers_w4_error_on_held_out_samples():
    """Calibrate on 12 samples, evaluate on 4 others: the low-rank mean term lowers the W4A8 output error below the
    bias correction alone, and below RTN. The massive channels' per-sample means vary by ±10 %: a few directions."""
    ratios = []
    for seed in range(3):
        x = outlier_acts(b=16, seed=seed)
        lin = make_linear(seed=seed)
        st = stats_from_acts(x[:12])
        held = x[12:]
        y = lin(held)
        cfg = _cfg(w_bits=4, w_group_size=64, a_bits=8)
        errs = {r: rel_err(y, METHODS["hadanorm"](lin, cfg.replace(params={"mean_rank": r}), st)(held)) for r in (0, 4)}
        rtn = rel_err(y, METHODS["rtn"](lin, cfg.replace(method="rtn"), st)(held))
        assert errs[4] < errs[0] and errs[4] < rtn, (seed, errs, rtn)
        ratios.append(errs[4] / errs[0])
    assert statistics.median(ratios) < 0.9, ratios  # measured 0.65–0.89: the isotropic 0.5·randn part of the means stays


def test_mean_rank_is_validated_and_skipped_without_sample_means(caplog):
    with pytest.raises(ConfigError, match="params.mean_rank.*non-negative integer"):
        _cfg(params={"mean_rank": -1})
    x = outlier_acts(seed=5)
    lin = make_linear(seed=5)
    st = stats_from_acts(x)
    del st.sample_means  # statistics from an older calibration
    q = METHODS["hadanorm"](lin, _cfg(w_bits=4, w_group_size=64, a_bits=8), st)
    assert q.mean_down is None and "no per-sample means" in caplog.text


def test_single_token_layer_is_not_centred_and_is_batch_independent():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 192, generator=g) * 2 + torch.randn(192, generator=g) * 5  # (B, K): adaLN-like input
    lin = make_linear(seed=3)
    st = stats_from_acts(x)
    sigma, center = hadanorm_sigma(st, "std")
    assert not center
    assert torch.allclose(sigma, (st.std.square() + st.mean.square()).sqrt())
    q = METHODS["hadanorm"](lin, _cfg(a_bits=8), st)
    assert not q.transform.center
    y = lin(x)
    out = q(x)
    assert 0 < rel_err(y, out) < 0.05  # really quantized (not a float pass-through), and accurate at A8
    assert torch.allclose(q(x[:1]), out[:1], rtol=1e-5, atol=1e-5)  # a sample's output ignores the rest of the batch


def test_ordering_hadanorm_below_hadamard_below_rtn_at_a4():
    """Median over layers (seeds) of the activation-only output error at A4: HadaNorm < Hadamard < RTN."""
    errs = {"rtn": [], "hadamard": [], "hadanorm": []}
    for seed in range(5):
        x = outlier_acts(seed=seed)
        lin = make_linear(seed=seed)
        st = stats_from_acts(x)
        rot = hadamard_ops.make_rotation(192, seed)
        sigma, center = hadanorm_sigma(st, "std")
        errs["rtn"].append(transforms.act_quant_error(x, lin.weight, 4))
        errs["hadamard"].append(transforms.act_quant_error(x, lin.weight, 4, rotate=rot))
        errs["hadanorm"].append(transforms.act_quant_error(x, lin.weight, 4, center=center, sigma=sigma, rotate=rot))
    med = {k: statistics.median(v) for k, v in errs.items()}
    assert med["hadanorm"] < 0.9 * med["hadamard"] < 0.9 * 0.9 * med["rtn"], med


def test_handler_error_ordering_and_state_round_trip():
    """Whole-layer W8A4 output error, median over three inputs: HadaNorm < Hadamard < RTN; QDIR-style round trip."""
    errs = {"rtn": [], "hadamard": [], "hadanorm": []}
    cfg = _cfg()
    for seed in range(3):
        x = outlier_acts(seed=seed)
        lin = make_linear(seed=seed)
        st = stats_from_acts(x)
        y = lin(x)
        for m in errs:
            errs[m].append(rel_err(y, METHODS[m](lin, cfg.replace(method=m), st)(x)))
    med = {k: statistics.median(v) for k, v in errs.items()}
    assert med["hadanorm"] < med["hadamard"] < med["rtn"], med
    hn = METHODS["hadanorm"](lin, cfg, st)
    clone = QuantLinear.from_spec(hn.spec())
    clone.load_state_dict(hn.state_dict())
    assert torch.equal(clone(x), hn(x))
