"""kmeans / vq4dit methods: soft reconstruction, hardening, params validation, calibration on a tiny DiT, QDIR."""

import pytest
import torch

from ditlab import vq
from ditlab.blockwise import block_mse, block_output_mse
from ditlab.config import PRESETS, LayerConfig, Recipe
from ditlab.errors import ConfigError
from ditlab.methods.kmeans import layer_params, quantize_kmeans
from ditlab.methods.vq4dit import SoftVQLinear, VQ4DiTSettings, needs_calibration, quantize_vq4dit, settings_for

TINY_PARAMS = {"iterations": 2, "samples": 2, "steps": 6, "k": 64, "kmeans_iters": 20}  # k-means kept cheap


def _soft(n_out=16, n_in=32, k=8, d=4, n=2, seed=0) -> SoftVQLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    codebook = vq.kmeans(vq.subvectors(w, d), k, seed=seed).codebook
    return SoftVQLinear(w, codebook, torch.randn(n_out, generator=g), n)


def test_soft_weight_is_the_ratio_mix_of_candidates_with_inverse_distance_init():
    layer = _soft()
    r = torch.softmax(layer.logits.detach(), 1)  # (M, n)
    x = vq.subvectors(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)), 4)
    dist = (x[:, None, :] - layer.codebook.detach()[layer.candidates]).norm(dim=-1)  # (M, n)
    torch.testing.assert_close(r[:, 0] / r[:, 1], dist[:, 1] / dist[:, 0], rtol=1e-4, atol=0)  # r ∝ 1/distance
    assert (dist[:, 0] <= dist[:, 1]).all() and (dist > 0).all()  # candidates sorted nearest first
    w = layer.weight().detach().reshape(-1, 4)
    ref = torch.stack([sum(r[i, j] * layer.codebook.detach()[layer.candidates[i, j]] for j in range(2)) for i in range(w.shape[0])])
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)


def test_hardening_makes_ratios_one_hot():
    layer = _soft(n=3)
    m = layer.logits.shape[0]  # 128 sub-vectors
    with torch.no_grad():
        layer.logits.zero_()
        layer.logits[:5, 2] = 10.0  # top ratio 0.9999 > 0.99 at slot 2
        layer.logits[5:10, 1] = 2.0  # top ratio 0.79: stays free
    assert layer.harden(0.99) == 5 and not layer.hard
    r = layer.ratios()
    assert torch.equal(r[:5], torch.tensor([[0.0, 0.0, 1.0]]).expand(5, 3))
    assert not (r[5:] == 1).any() and layer.fixed.sum() == 5
    w = layer.weight().detach().reshape(m, 4)
    assert torch.equal(w[:5], layer.codebook.detach()[layer.candidates[:5, 2]])  # fixed rows use the chosen codeword
    assert layer.harden(0.99, force=True) == m - 5 and layer.hard
    r = layer.ratios()
    assert torch.equal(r.sum(1), torch.ones(m)) and torch.equal(r.max(1).values, torch.ones(m))
    assert torch.equal(layer.weight().detach().reshape(m, 4), layer.codebook.detach()[layer.hard_index()])
    out = layer.to_vqlinear()
    assert torch.equal(out.dequantized_weight(), layer.codebook.detach().half().float()[layer.hard_index()].reshape(16, 32))


def test_layer_turns_hard_when_more_than_99_percent_is_fixed():
    layer = _soft(n_out=64, n_in=32, k=32)  # 512 sub-vectors
    with torch.no_grad():
        layer.logits.zero_()
        layer.logits[:508, 0] = 10.0  # 99.2 % above the threshold
    layer.harden(0.99)
    assert layer.hard and bool(layer.fixed.all())
    assert layer.regulariser()[1] == 0
    layer.weight().sum().backward()
    assert layer.logits.grad is None and layer.codebook.grad is not None  # only the codebook keeps learning


def test_regulariser_is_n_times_sum_of_r_one_minus_r_over_free_ratios():
    layer = _soft(n=2)
    with torch.no_grad():
        layer.logits[:3, 0] = 20.0
    layer.harden(0.99)
    value, count = layer.regulariser()
    r = torch.softmax(layer.logits.detach()[3:], 1)
    assert count == r.numel() and abs(float(value.detach()) - float(2 * (r * (1 - r)).sum())) < 1e-5


def test_block_mse_absolute_and_relative():
    teacher = [torch.full((1, 2, 3), 2.0), torch.ones(1, 2, 3)]
    student = [torch.full((1, 2, 3), 3.0), torch.zeros(1, 2, 3)]
    assert block_mse(teacher, student).item() == 1.0  # (1 + 1) / 2
    assert block_mse(teacher, student, relative=True).item() == 0.625  # (1/4 + 1/1) / 2


def test_params_validation_names_the_key():
    cfg = LayerConfig(method="vq4dit", w_bits=2, a_bits=16)
    p = layer_params(cfg, 192, 192)
    assert (p.k, p.d, p.n_candidates, p.kmeans_iters) == (256, 4, 2, 100)
    assert layer_params(LayerConfig(method="kmeans", w_bits=3, a_bits=16), 64, 64).k == 64
    assert layer_params(cfg, 16, 16).k == 16  # capped: 16·16/4 = 64 sub-vectors → ≤ 16
    for params, key in (({"n_candidates": 5}, "params.n_candidates"), ({"d": 3}, "params.d"), ({"k": 512}, "params.k"),
                        ({"steps": 0}, "params.steps"), ({"relative": 1}, "params.relative"), ({"colour": 1}, "params")):
        with pytest.raises(ConfigError, match=key):
            c = cfg.replace(params=params)
            layer_params(c, 192, 192)
            VQ4DiTSettings.from_params(c.params)
    with pytest.raises(ConfigError, match="n_candidates"):  # kmeans has no candidates
        layer_params(LayerConfig(method="kmeans", w_bits=2, a_bits=16, params={"n_candidates": 2}), 192, 192)


def test_presets():
    for name, method, bits in (("w2-vq4dit", "vq4dit", 2), ("w3-vq4dit", "vq4dit", 3), ("w2-kmeans", "kmeans", 2), ("w3-kmeans", "kmeans", 3)):
        d = PRESETS[name].default
        assert (d.method, d.w_bits, d.a_bits) == (method, bits, 16)


# ---- on a tiny random DiT ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ditlab.models import load_pipeline
    from ditlab.testing import tiny_dit_pipeline

    return load_pipeline(str(tiny_dit_pipeline(tmp_path_factory.mktemp("tiny") / "dit")))


def _recipe(method, **params):
    return Recipe(default=LayerConfig(method=method, w_bits=2, a_bits=16, params=params), name=f"w2-{method}")


def test_kmeans_handler_swaps_vqlinear_and_reports_bytes(tiny):
    from ditlab.quantize import quantize_

    model, report = quantize_(tiny.transformer, _recipe("kmeans", k=64, kmeans_iters=20), progress=False)
    layers = [m for m in model.modules() if isinstance(m, vq.VQLinear)]
    assert len(layers) == len(report.layers) == 14  # 2 blocks × (q, k, v, out, fc1, fc2, adaLN)
    assert report.bytes_packed == sum(m.weight_bytes() for m in layers)
    lin = tiny.transformer.transformer_blocks[0].attn1.to_q
    direct = quantize_kmeans(lin, _recipe("kmeans", k=64, kmeans_iters=20).default)
    assert torch.equal(direct.assignments, model.transformer_blocks[0].attn1.to_q.assignments)  # deterministic


def test_disagreeing_calibration_settings_are_rejected(tiny):
    recipe = Recipe(default=LayerConfig(method="vq4dit", w_bits=2, a_bits=16, params={"steps": 4}),
                    overrides=(("transformer_blocks.1.*", {"params": {"steps": 5}}),))
    with pytest.raises(ConfigError, match="params.steps"):
        settings_for(tiny.transformer, recipe)
    assert needs_calibration(tiny.transformer, _recipe("vq4dit")) and not needs_calibration(tiny.transformer, _recipe("kmeans"))


def test_calibration_lowers_block_output_loss_and_round_trips_through_qdir(tiny, tmp_path):
    from ditlab.qdir import load_quantized_transformer, save_quantized

    base, _ = quantize_vq4dit(tiny, _recipe("kmeans", k=64, kmeans_iters=20), progress=False)
    seen = []
    model, report = quantize_vq4dit(tiny, _recipe("vq4dit", **TINY_PARAMS), progress=lambda *a: seen.append(a))
    steps = model.ditlab_calibration.steps
    assert len(steps) == 12 and seen[-1][:2] == (12, 12)
    assert steps[5]["fixed"] < 1.0 and steps[-1]["fixed"] == 1.0 and steps[-1]["hard_layers"] == 14  # annealed to hard by 0.8·T
    assert all(isinstance(m, vq.VQLinear) and m.method == "vq4dit" for m in model.modules() if getattr(m, "is_quantized_linear", False))
    labels = [0, 3, 5, 9]
    loss_kmeans = block_output_mse(tiny, tiny.transformer, base, labels, seed=123, steps=6)
    loss_vq4dit = block_output_mse(tiny, tiny.transformer, model, labels, seed=123, steps=6)
    assert loss_vq4dit < 0.9 * loss_kmeans, (loss_vq4dit, loss_kmeans)
    x = torch.randn(2, 3, 16, 16)
    kw = dict(timestep=torch.tensor([500, 20]), class_labels=torch.tensor([1, 10]), return_dict=False)
    with torch.no_grad():
        ref = model(x, **kw)[0]
    loaded = load_quantized_transformer(save_quantized(model, None, tiny, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(loaded(x, **kw)[0], ref)


def test_3bit_kmeans_is_packed_and_round_trips_through_qdir(tiny, tmp_path):
    """3 bits (k = 64, d = 2): indices stored at 6 bits (four in three bytes); save → load gives identical outputs."""
    from ditlab.qdir import load_quantized_transformer, save_quantized
    from ditlab.quantize import quantize_

    recipe = Recipe(default=LayerConfig(method="kmeans", w_bits=3, a_bits=16, params={"kmeans_iters": 5}), name="w3-kmeans")
    model, report = quantize_(tiny.transformer, recipe, progress=False)
    layers = [m for m in model.modules() if isinstance(m, vq.VQLinear)]
    assert layers and all(m.index_bits == 6 and m.d == 2 and m.num_codes <= 64 for m in layers)
    for m in layers:
        assert m.assignments.shape == (m.out_features, 3 * m.in_features // 8)  # K/2 indices → 3K/8 bytes
    fp16_bytes = sum(2 * m.in_features * m.out_features for m in layers)
    assert report.bytes_packed == sum(m.weight_bytes() for m in layers) < 0.19 * fp16_bytes + sum(m.codebook.numel() * 2 for m in layers) + 1
    x = torch.randn(2, 3, 16, 16)
    kw = dict(timestep=torch.tensor([500, 20]), class_labels=torch.tensor([1, 10]), return_dict=False)
    with torch.no_grad():
        ref = model(x, **kw)[0]
    loaded = load_quantized_transformer(save_quantized(model, None, tiny, tmp_path / "q3"))
    again = [m for m in loaded.modules() if isinstance(m, vq.VQLinear)]
    assert all(a.index_bits == 6 and torch.equal(a.assignments, b.assignments) for a, b in zip(again, layers))
    with torch.no_grad():
        assert torch.equal(loaded(x, **kw)[0], ref)
