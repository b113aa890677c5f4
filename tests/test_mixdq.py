"""MixDQ's BOS-aware text quantization: the first text token's K/V rows skip activation quantization and are left out
of the static activation range (QuantLinear.bos_tokens, LayerConfig.params["bos_tokens"]), on a layer and on the tiny
random PixArt."""

from types import SimpleNamespace

import pytest
import torch

from ditlab import backends
from ditlab.config import LayerConfig, Recipe
from ditlab.errors import ConfigError
from ditlab.methods import get_handler
from ditlab.nn import QuantLinear
from transform_cases import make_linear, rel_err

STATIC = dict(method="rtn", w_bits=8, a_bits=8, w_symmetric=True, a_granularity="per-tensor")


def _text_acts(b=3, t=10, k=64, boost=50.0, seed=0):
    """(B, T, K) text-like activations whose first token carries huge outliers (MixDQ's observation on BOS)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, k, generator=g)
    x[:, 0] *= boost
    return x


def _stats(x):
    """The fields the static range reads: per-channel absmax (all tokens) and a reservoir with token indices."""
    b, t, k = x.shape
    rows = x.reshape(-1, k)
    info = torch.stack([torch.zeros(b * t, dtype=torch.int32), torch.zeros(b * t, dtype=torch.int32),
                        torch.arange(t, dtype=torch.int32).repeat(b)], dim=1)  # (R, 3): timestep, branch, token index
    return SimpleNamespace(absmax=rows.abs().amax(0), rows=rows, row_info=info, mean=rows.mean(0))


def test_bos_rows_float_rest_quantized_and_range_without_bos():
    lin = make_linear(n=48, k=64)
    x = _text_acts()
    plain = get_handler("rtn")(lin, LayerConfig(**STATIC), _stats(x))
    bos = get_handler("rtn")(lin, LayerConfig(**STATIC, params={"bos_tokens": 1}), _stats(x))
    assert bos.bos_tokens == 1 and plain.bos_tokens == 0
    assert torch.equal(plain.a_scale, torch.tensor([[float(x.abs().max()) / 127]]))
    assert torch.equal(bos.a_scale, torch.tensor([[float(x[:, 1:].abs().max()) / 127]]))  # the BOS outliers left out
    assert float(bos.a_scale) < float(plain.a_scale) / 20
    assert torch.equal(bos.qweight, plain.qweight) and torch.equal(bos.w_scale, plain.w_scale)  # same weights
    with torch.no_grad():
        y = bos(x)  # (B, T, N)
        head = backends.weight_only_linear(bos, x[:, :1].reshape(-1, 64)).reshape(3, 1, 48)
        rest = backends.linear(bos, x[:, 1:].reshape(-1, 64)).reshape(3, 9, 48)
    assert torch.equal(y[:, :1], head) and torch.equal(y[:, 1:], rest)  # exactly the two paths, token by token
    ref = lin(x)
    # the tokens after BOS: a 20× finer grid; the BOS rows: no activation error at all
    assert rel_err(ref[:, 1:], y[:, 1:]) < 0.1 * rel_err(ref[:, 1:], plain(x)[:, 1:])
    assert rel_err(ref, y) < 0.5 * rel_err(ref, plain(x))


def test_per_token_bos_only_changes_the_bos_rows_and_2d_inputs_unchanged():
    lin = make_linear(n=48, k=64)
    x = _text_acts()
    cfg = LayerConfig(method="rtn", w_bits=8, a_bits=8)
    plain = get_handler("rtn")(lin, cfg, None)
    bos = get_handler("rtn")(lin, cfg.replace(params={"bos_tokens": 2}), None)
    y, y0 = bos(x), plain(x)
    assert torch.equal(y[:, 2:], y0[:, 2:])  # per-token scales: other tokens never saw the BOS range anyway
    assert not torch.equal(y[:, :2], y0[:, :2])
    assert torch.equal(y[:, :2], backends.weight_only_linear(bos, x[:, :2].reshape(-1, 64)).reshape(3, 2, 48))
    x2 = x[:, 3]  # (B, K): one token per sample, nothing to split
    assert torch.equal(bos(x2), plain(x2))
    short = x[:, :1]  # fewer tokens than bos_tokens: all in float
    assert torch.equal(bos(short), backends.weight_only_linear(bos, short.reshape(-1, 64)).reshape(3, 1, 48))


def test_spec_round_trip_and_validation():
    lin = make_linear(n=48, k=64)
    layer = get_handler("rtn")(lin, LayerConfig(method="rtn", w_bits=4, a_bits=8, w_group_size=32, params={"bos_tokens": 1}), None)
    clone = QuantLinear.from_spec(layer.spec())
    clone.load_state_dict(layer.state_dict())
    x = _text_acts()
    assert clone.bos_tokens == 1 and torch.equal(clone(x), layer(x))
    with pytest.raises(ConfigError, match="bos_tokens"):
        get_handler("rtn")(lin, LayerConfig(method="rtn", w_bits=8, a_bits=8, params={"bos_tokens": -1}), None)
    with pytest.raises(ConfigError, match="bos_tokens"):  # static range without BOS needs reservoir rows with token indices
        get_handler("rtn")(lin, LayerConfig(**STATIC, params={"bos_tokens": 1}), SimpleNamespace(absmax=torch.ones(64), rows=None, row_info=None))
    assert get_handler("rtn")(lin, LayerConfig(method="rtn", w_bits=8, a_bits=16, params={"bos_tokens": 1}), None).bos_tokens == 0  # A16: nothing to skip


@pytest.mark.slow
def test_tiny_pixart_bos_aware_cross_attention(tmp_path):
    """Tiny random PixArt, static per-tensor W8A8 everywhere, with a BOS-like outlier on the first caption token
    (×40 after caption_projection, in calibration and evaluation alike). BOS-aware K/V (override on *.attn2.to_k/v)
    beats the plain static recipe on the cross-attention K/V outputs and on the model output."""
    from ditlab import qdir
    from ditlab.calibration import calibrate
    from ditlab.models import load_pipeline
    from ditlab.quantize import quantize_
    from ditlab.sampling import _encode_prompts
    from ditlab.testing import tiny_pixart_pipeline

    pipe = load_pipeline(tiny_pixart_pipeline(tmp_path / "pixart"))

    def boost_first_token(module, args, out):
        out = out.clone()
        out[:, 0] *= 40.0
        return out

    pipe.transformer.caption_projection.register_forward_hook(boost_first_token)
    prompts = ["a red circle", "a big blue square", "a green star on the square"]
    calib = calibrate(pipe, labels=prompts, n_samples=3, steps=2, progress=False, use_cache=False)
    base = Recipe(default=LayerConfig(**STATIC), name="w8a8-static")
    bos = base.replace(overrides=(("*.attn2.to_[kv]", {"params": {"bos_tokens": 1}}),), name="w8a8-static-bos")
    q_plain, _ = quantize_(pipe.transformer, base, calib, progress=False)
    q_bos, report = quantize_(pipe.transformer, bos, calib, progress=False)
    kv = [n for n, m in q_bos.named_modules() if isinstance(m, QuantLinear) and m.bos_tokens]
    assert sorted(kv) == sorted(f"transformer_blocks.{i}.attn2.to_{p}" for i in range(2) for p in "kv")

    embeds, mask = _encode_prompts(pipe, ["a small red star", "a blue circle"])
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=embeds, encoder_attention_mask=mask,
                  timestep=torch.tensor([600, 600]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    captured = {}

    def grab(tag):
        def hook(module, args, out):
            captured[tag] = out.detach().float()
        return hook

    outs = {}
    for tag, model in (("fp", pipe.transformer), ("plain", q_plain), ("bos", q_bos)):
        hk = model.get_submodule("transformer_blocks.1.attn2.to_k").register_forward_hook(grab(tag))
        with torch.no_grad():
            outs[tag] = model(**kwargs)[0].float()
        hk.remove()
    k_err = {t: rel_err(captured["fp"], captured[t]) for t in ("plain", "bos")}
    out_err = {t: rel_err(outs["fp"], outs[t]) for t in ("plain", "bos")}
    assert k_err["bos"] < 0.5 * k_err["plain"], k_err
    assert out_err["bos"] < out_err["plain"], out_err
    # saved and loaded: the BOS handling is part of the layer spec
    path = qdir.save_quantized(q_bos, bos, pipe, tmp_path / "q")
    loaded = qdir.load_quantized_transformer(path)
    loaded.caption_projection.register_forward_hook(boost_first_token)  # hooks are not saved (the deep copies kept it)
    assert loaded.get_submodule(kv[0]).bos_tokens == 1
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0].float(), outs["bos"])
