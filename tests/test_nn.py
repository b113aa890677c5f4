"""QuantLinear, InputTransform, block Hadamard and the execution paths: exact where integer, thresholds where lossy."""

import threading

import pytest
import torch

from ditlab import backends, hadamard_ops, primitives
from ditlab.config import LayerConfig
from ditlab.errors import ConfigError
from ditlab.metrics import sqnr
from ditlab.nn import InputTransform, QuantLinear


def _linear(n=96, k=192, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[:, 5] *= 8  # an outlier input channel, as in DiT activations/weights
    return lin


def _x(b=2, t=16, k=192, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, k, generator=g)
    x[..., 7] *= 10  # activation outlier channel
    return x + 0.5  # non-zero mean (what HadaNorm's centring removes)


# ---- Hadamard ops -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 128])
def test_hadamard_matrix_orthogonal_exactly(n):
    h = hadamard_ops.hadamard_matrix(n, normalised=False, dtype=torch.float64)
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("k", [192, 768, 1152, 24])
def test_fwht_equals_dense_block_hadamard_exactly_on_integers(k):
    b = hadamard_ops.block_size(k)
    assert k % b == 0 and (k // b) % 2 == 1  # the largest power of two
    x = torch.randint(-50, 50, (5, k)).float()
    dense = torch.block_diag(*[hadamard_ops.hadamard_matrix(b, normalised=False, dtype=torch.float64)] * (k // b))
    assert torch.equal(hadamard_ops.fwht(x, b, normalised=False).double(), x.double() @ dense)


def test_rotate_matches_q_matrix_and_inverts():
    k = 192
    signs = hadamard_ops.random_signs(k, 3)
    assert set(signs.tolist()) == {-1, 1} and torch.equal(signs, hadamard_ops.random_signs(k, 3))
    assert not torch.equal(signs, hadamard_ops.random_signs(k, 4))
    q = hadamard_ops.q_matrix(k, 3)
    assert torch.allclose(q @ q.t(), torch.eye(k, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, 7, k)
    y = hadamard_ops.rotate(x, signs, hadamard_ops.block_size(k))
    assert torch.allclose(y.double(), x.double() @ q, atol=1e-5)
    assert torch.allclose(hadamard_ops.rotate_inverse(y, signs, hadamard_ops.block_size(k)), x, atol=1e-5)


# ---- int4 layout ------------------------------------------------------------------------------------------------------
def test_int4_storage_layout_low_nibble_even_k():
    lin = _linear(n=4, k=8)
    cfg = LayerConfig(w_bits=4, a_bits=8, w_symmetric=True)
    layer = QuantLinear.from_float(lin, cfg)
    codes = layer.codes()
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (4, 4)
    lo = (layer.qweight & 0xF).to(torch.int16)
    hi = (layer.qweight >> 4).to(torch.int16)
    signed = lambda v: torch.where(v >= 8, v - 16, v)  # noqa: E731
    assert torch.equal(signed(lo), codes[:, 0::2].to(torch.int16)) and torch.equal(signed(hi), codes[:, 1::2].to(torch.int16))
    s, z = primitives.weight_qparams(lin.weight, 4, None, True)
    assert torch.equal(codes, primitives.quantize_weight(lin.weight, s, z, 4))


def test_unpack_in_module_equals_primitives_over_full_range():
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every nibble value at both positions
    q[1, :16] = torch.arange(-8, 8, dtype=torch.int8).flip(0)
    layer = QuantLinear(64, 16, w_bits=4)
    layer.set_weight(q, torch.ones(16, 1), None)
    assert torch.equal(layer.qweight, primitives.pack_int4(q))
    assert torch.equal(layer.codes(), q) and torch.equal(primitives.unpack_int4(layer.qweight), q)


# ---- the two paths agree ----------------------------------------------------------------------------------------------
CONFIGS = [
    dict(w_bits=8, a_bits=8),
    dict(w_bits=8, a_bits=8, w_symmetric=True),
    dict(w_bits=8, a_bits=8, w_group_size=64),
    dict(w_bits=4, a_bits=8, w_group_size=64),
    dict(w_bits=4, a_bits=8, w_symmetric=True),
    dict(w_bits=4, a_bits=4, w_group_size=32, w_symmetric=True),
    dict(w_bits=6, a_bits=6, w_group_size=48),
    dict(w_bits=8, a_bits=8, a_granularity="per-tensor"),
    dict(w_bits=4, a_bits=8, w_group_size=64, a_granularity="per-tensor"),
]


def _layer(cfg_kwargs, lin=None):
    lin = lin or _linear()
    cfg = LayerConfig(**cfg_kwargs)
    act = None
    if cfg.a_granularity == "per-tensor":  # static scale "from calibration": the absmax of the data used below
        act = float(_x().abs().max()) / (2 ** (cfg.a_bits - 1) - 1)
    return lin, cfg, QuantLinear.from_float(lin, cfg, act_scale=act)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda d: LayerConfig(**d).short())
def test_int32_accumulators_bit_exact(kw):
    lin, cfg, layer = _layer(kw)
    x = _x().reshape(-1, 192)
    codes, _ = backends.quantize_input(layer, x)
    acc_int = backends.cpu_int_accumulators(layer, codes)
    assert acc_int.dtype == torch.int32 and torch.equal(acc_int, backends.reference_accumulators(layer, codes))
    # an independent definition: Σ_k a_k (q_k − z_g) in int64 via einsum over (M, G, g) × (N, G, g)
    g = layer.w_scale.shape[1]
    q = layer.codes().to(torch.int64).reshape(96, g, -1)
    if layer.w_zero is not None:
        q = q - layer.w_zero.to(torch.int64)[..., None]
    plain = torch.einsum("mgk,ngk->mgn", codes.to(torch.int64).reshape(codes.shape[0], g, -1), q)
    assert torch.equal(acc_int.to(torch.int64), plain)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda d: LayerConfig(**d).short())
def test_paths_agree_and_match_fake_quant_definition(kw):
    lin, cfg, layer = _layer(kw)
    x = _x()
    with backends.use_backend("reference"):
        ref = layer(x)
    with backends.use_backend("cpu-int") as used:
        out = layer(x)
    assert used == "cpu-int"
    assert torch.equal(out, ref)  # same codes, same exact accumulators, same epilogue
    # the textbook definition from primitives alone (float32 on dequantized values): equal up to float rounding
    w_hat = primitives.dequantize_weight(*_grid(lin, cfg), cfg.w_group_size)
    a_hat = primitives.fake_quantize_act(x, cfg.a_bits, layer.a_scale)
    definition = a_hat @ w_hat.t() + lin.bias
    assert torch.allclose(ref, definition, rtol=1e-5, atol=1e-5) and not torch.equal(ref, torch.zeros_like(ref))
    assert torch.allclose(backends.dequant_linear(layer, x.reshape(-1, 192)).reshape(ref.shape), definition, rtol=1e-6, atol=1e-6)
    fp = lin(x)
    floor = {8: 30, 6: 20, 4: 6}[min(cfg.w_bits, cfg.a_bits)] - (8 if cfg.a_granularity == "per-tensor" else 0)  # dB, lossy
    assert sqnr(fp, out) > floor, sqnr(fp, out)


def _grid(lin, cfg):
    s, z = primitives.weight_qparams(lin.weight, cfg.w_bits, cfg.w_group_size, cfg.w_symmetric)
    return primitives.quantize_weight(lin.weight, s, z, cfg.w_bits, cfg.w_group_size), s, z


def test_weight_only_is_same_float_matmul_on_every_path():
    lin, cfg, layer = _layer(dict(w_bits=4, a_bits=16, w_group_size=64))
    x = _x()
    with backends.use_backend("reference"):
        ref = layer(x)
    with backends.use_backend("cpu-int"):
        out = layer(x)
    assert torch.equal(ref, out)
    assert torch.allclose(out, x @ layer.dequantized_weight().t() + lin.bias, atol=1e-5)


def test_static_scale_required_for_per_tensor():
    with pytest.raises(ConfigError) as info:
        QuantLinear.from_float(_linear(), LayerConfig(a_granularity="per-tensor"))
    assert info.value.field == "a_granularity"


# ---- transform, low-rank, mean correction ------------------------------------------------------------------------------
def _full_transform(k=192, seed=5):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(k, generator=g) + 0.5
    sigma = torch.rand(k, generator=g) + 0.5
    return InputTransform(k, smooth=smooth, center=True, sigma=sigma, hadamard_signs=hadamard_ops.random_signs(k, seed))


def test_input_transform_against_dense_definition():
    tr = _full_transform()
    x = _x()
    xt, mu = tr(x)
    q = hadamard_ops.q_matrix(192, 5).float()
    xs = x / tr.smooth
    m = xs.mean(1, keepdim=True)
    assert torch.allclose(xt, ((xs - m) / tr.sigma) @ q, atol=1e-4)
    assert torch.allclose(mu, (m / tr.sigma) @ q, atol=1e-4) and mu.shape == (2, 1, 192)


@pytest.mark.parametrize("a_bits", [16, 8])
def test_folded_transform_with_low_rank_and_mean_correction(a_bits):
    lin = _linear()
    tr = _full_transform()
    w_fold = tr.fold_weight(lin.weight)  # W · diag(smooth·sigma) · Q
    u, s, vh = torch.linalg.svd(w_fold.double(), full_matrices=False)
    up, down = (u[:, :8] * s[:8]).float(), vh[:8].float()
    cfg = LayerConfig(method="svd", w_bits=8, a_bits=a_bits, rank=8)
    layer = QuantLinear.from_float(lin, cfg, weight=w_fold - up @ down, transform=tr, lr_down=down, lr_up=up, lr_dtype=torch.float32)
    x = _x()
    out = layer(x)
    # definition: Q_a(X') Ŵᵀ + X' (up·down)ᵀ + T(μ)(Ŵ + up·down)ᵀ + b with X', T(μ) from the dense transform
    xt, mu = tr(x)
    w_hat = layer.dequantized_weight()
    a_hat = xt if a_bits == 16 else primitives.fake_quantize_act(xt, a_bits)
    expect = a_hat @ w_hat.t() + xt @ (up @ down).t() + mu @ (w_hat + up @ down).t() + lin.bias
    assert torch.allclose(out, expect, rtol=1e-4, atol=1e-4)
    assert sqnr(lin(x), out) > (40 if a_bits == 16 else 30)  # folding is exact in real arithmetic: only rounding error left


def test_spec_round_trip_rebuilds_identical_module():
    lin = _linear()
    layer = QuantLinear.from_float(lin, LayerConfig(w_bits=4, a_bits=8, w_group_size=64), transform=_full_transform())
    clone = QuantLinear.from_spec(layer.spec())
    clone.load_state_dict(layer.state_dict())
    x = _x()
    assert torch.equal(clone(x), layer(x)) and clone.spec() == layer.spec()


def test_weight_bytes_packed_sizes():
    lin = _linear(n=96, k=192)
    fp16 = 2 * 96 * 192
    w8 = QuantLinear.from_float(lin, LayerConfig(w_bits=8, a_bits=8))
    w4 = QuantLinear.from_float(lin, LayerConfig(w_bits=4, a_bits=8, w_group_size=64, w_symmetric=True))
    assert w8.weight_bytes() == 96 * 192 + 96 * (2 + 1)  # codes + fp16 scale + int8 zero per row
    assert w4.weight_bytes() == 96 * 96 + 96 * 3 * 2  # packed codes + one fp16 scale per group (symmetric: no zeros)
    assert w8.weight_bytes() / fp16 <= 0.55 and w4.weight_bytes() / fp16 <= 0.30


def test_bad_codes_rejected():
    layer = QuantLinear(8, 4, w_bits=4)
    with pytest.raises(ConfigError):
        layer.set_weight(torch.full((4, 8), 9, dtype=torch.int8), torch.ones(4, 1), None)


# ---- backend selection -------------------------------------------------------------------------------------------------
def test_backend_env_var_and_errors(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.current() == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "gpu-magic")
    with pytest.raises(ConfigError) as info:
        backends.current()
    assert "DITLAB_BACKEND" in str(info.value) and "cpu-int" in str(info.value)
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    if not torch.cuda.is_available():
        assert backends.current() == "cpu-int"
        with pytest.raises(ConfigError, match="CUDA"):
            with backends.use_backend("triton"):
                pass
    with pytest.raises(ConfigError) as info:  # an argument is named as the argument, not as the environment variable
        with backends.use_backend("gpu"):
            pass
    assert info.value.field == "backend" and "DITLAB_BACKEND" not in str(info.value)
    if "triton-interpret" not in backends.KERNELS:  # this process chose compiled kernels: say how to get the interpreter
        with pytest.raises(ConfigError, match="once per process.*DITLAB_BACKEND=triton-interpret"):
            with backends.use_backend("triton-interpret"):
                pass


def test_use_backend_is_thread_local(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpu-int")
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with backends.use_backend("reference"):
            seen["worker"] = backends.current()
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    seen["main"] = backends.requested()
    release.set()
    t.join()
    assert seen == {"worker": "reference", "main": "cpu-int"}
    assert backends.requested() == "cpu-int"
