"""Training's per-timestep loss weights: Min-SNR-γ checked against its definition on x0 (an independent route)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditlab import train


def _weights(kind: str, gamma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = dataclasses.replace(train.TrainConfig(), loss_weighting=kind, min_snr_gamma=gamma)
    ac = train.build_scheduler().alphas_cumprod.float()
    return train.loss_weights(cfg, ac), ac


def test_plain_v_loss_weighs_every_step_the_same():
    w, _ = _weights("none")
    assert w.shape == (1000,) and torch.equal(w, torch.ones(1000))


def test_min_snr_weighted_v_loss_equals_min_snr_weighted_x0_loss():
    """Weighted v-MSE == min(SNR, γ)·(x0-MSE), with x̂0 = √ᾱ·x_t − √(1−ᾱ)·v̂ derived from a wrong v̂."""
    w, ac = _weights("min-snr", gamma=5.0)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 50, 200, 400, 600, 800, 999])
    a = ac[t].double().view(-1, 1)
    x0, noise, err = (torch.randn(len(t), 48, generator=g, dtype=torch.float64) for _ in range(3))
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    v_hat = v + 0.1 * err
    x0_hat = a.sqrt() * xt - (1 - a).sqrt() * v_hat
    snr = (a / (1 - a)).view(-1)
    lhs = w[t].double() * (v_hat - v).pow(2).mean(1)
    rhs = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).mean(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=0)


def test_low_noise_capped_keeps_full_weight_at_high_noise_only():
    w, ac = _weights("low-noise-capped", gamma=5.0)
    snr = ac / (1 - ac)
    high_noise = snr + 1 <= 5.0
    assert high_noise.any() and (~high_noise).any()
    assert torch.equal(w[high_noise], torch.ones(int(high_noise.sum())))
    assert (w[~high_noise] < 1).all() and w[0] < 0.05  # t = 0: SNR in the thousands


def test_unknown_weighting_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"loss_weighting = 'snr' is not allowed; allowed: none, min-snr, low-noise-capped"):
        _weights("snr")
