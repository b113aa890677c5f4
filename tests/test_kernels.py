"""Triton kernels vs their torch twins and vs ditlab's own integer path, under the Triton interpreter.

The kernels must be interpreted (TRITON_INTERPRET=1 before triton decorates them), which must not leak into the
other test files of the session. So in the normal pytest process only ``test_interpreter_suite`` is collected: it
re-runs this file in a subprocess with TRITON_INTERPRET=1, where (as when you run ``TRITON_INTERPRET=1 pytest
tests/test_kernels.py`` yourself) every test below is collected and run, and it fails with their report if any does.

Equality is exact for integer accumulators, packed data, activation codes/scales and the Hadamard butterflies;
float epilogues are compared within the rounding of their dtype. Shapes are small (the interpreter pays per
program and k-step) and include sizes that are not multiples of the block sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parent.parent


def interpreted_only(test):
    """Collect ``test`` only where the kernels are interpreted (elsewhere test_interpreter_suite runs it)."""
    test.__test__ = INTERPRETED
    return test


if INTERPRETED:  # import the kernels only where they are interpreted
    import importlib

    import kernels
    from ditlab import hadamard_ops, primitives

    E = kernels.KERNELS

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
RAGGED = {"block_m": 32, "block_n": 32, "block_k": 64}  # 50×70×200 is a multiple of none of them


def test_interpreter_suite():
    """Run this file's interpreted tests in a child process with TRITON_INTERPRET=1 (they are not collected here)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                           str(Path(__file__))], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]


test_interpreter_suite.__test__ = not INTERPRETED  # the child process runs the tests themselves


def test_late_interpret_setting_is_refused():
    """TRITON_INTERPRET=1 set after triton was imported would fail at the first launch: the import says why."""
    code = "import os, triton; os.environ['TRITON_INTERPRET'] = '1'; import kernels"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "set TRITON_INTERPRET=1 at process start" in proc.stderr, proc.stderr[-2000:]


test_late_interpret_setting_is_refused.__test__ = not INTERPRETED


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(want.double().abs().max()) or 1.0
    err = float((got.double() - want.double()).abs().max())
    assert err <= RTOL[got.dtype] * scale, f"max error {err:.3g} vs max |ref| {scale:.3g}"


# ---------------------------------------------------------------------------------------------- integer GEMMs


@interpreted_only
@pytest.mark.parametrize("name", ["w8a8_gemm", "w4a8_gemm"])
@pytest.mark.parametrize("shape,variant,blocks", [
    ((64, 64, 128), {}, {}),  # multiples of the blocks, per-channel asymmetric, bias, mean correction
    ((50, 70, 200), {"out_dtype": torch.bfloat16}, RAGGED),
    ((40, 48, 192), {"group_size": 64, "zero": False, "samples": None, "out_dtype": torch.float16}, {"block_m": 32}),
])
def test_int_gemm_float_output(name, shape, variant, blocks):
    kw = E[name].example_inputs(shape, **variant)
    _close(E[name].wrapper(**kw, **blocks), E[name].ref(**kw))


@interpreted_only
@pytest.mark.parametrize("name", ["w8a8_gemm_int32", "w4a8_gemm_int32"])
@pytest.mark.parametrize("shape,variant,blocks", [
    ((50, 70, 200), {}, RAGGED),
    ((40, 48, 192), {"group_size": 32}, {}),
    ((16, 16, 64), {"zero": False}, {}),
])
def test_int_gemm_accumulators_exact(name, shape, variant, blocks):
    kw = E[name].example_inputs(shape, **variant)
    got = E[name].wrapper(**kw, **blocks)
    assert got.dtype == torch.int32 and got.shape == (shape[0], kw["num_groups"], shape[1])
    assert torch.equal(got, E[name].ref(**kw))


@interpreted_only
def test_int_accumulators_equal_torch_int_mm():
    """Against the CPU integer path's primitive (torch._int_mm), extreme codes included: no int32 overflow."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (33, 576), generator=g, dtype=torch.int8)
    a[0] = -128  # largest |Σ a·w| of this K
    w = torch.randint(-128, 128, (40, 576), generator=g, dtype=torch.int8)
    w[0] = -128
    acc = kernels.w8a8_gemm_int32(a, w)[:, 0, :]
    assert torch.equal(acc, primitives.int_matmul(a, w))
    assert int(acc[0, 0]) == 576 * 128 * 128
    # int4: the codes QuantLinear stores packed, with zero points, per group
    q = torch.randint(-8, 8, (40, 576), generator=g, dtype=torch.int8)
    z = torch.randint(-8, 8, (40, 9), generator=g, dtype=torch.int32)
    acc4 = kernels.w4a8_gemm_int32(a, primitives.pack_int4(q), z, num_groups=9)  # (M, G, N)
    for gi in range(9):
        ag, qg = a[:, gi * 64:(gi + 1) * 64], q[:, gi * 64:(gi + 1) * 64]
        want = primitives.int_matmul(ag, qg) - ag.sum(1, dtype=torch.int32)[:, None] * z[:, gi][None, :]
        assert torch.equal(acc4[:, gi, :], want)


@interpreted_only
def test_int_gemm_epilogue_matches_dequantized_matmul():
    """The float output is the dequantized product: (codes·s_a)(q − z)·s_w + b + corr, per-tensor scale too."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 96, generator=g)
    w = torch.randn(20, 96, generator=g)
    scale, zero = primitives.weight_qparams(w, 8, None, symmetric=False)
    q = primitives.quantize_weight(w, scale, zero, 8)
    a, s_a = primitives.quantize_per_token(x, 8)
    bias, corr = torch.randn(20, generator=g), torch.randn(3, 20, generator=g)
    y = kernels.w8a8_gemm(a, s_a, q, scale, zero, bias, corr, 8)
    want = (a.float() * s_a) @ primitives.dequantize_weight(q, scale, zero).t() + bias + corr.repeat_interleave(8, 0)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    y_t = kernels.w8a8_gemm(a, torch.tensor([[0.01]]), q, scale, zero)  # static per-tensor activation scale
    torch.testing.assert_close(y_t, (a.float() * 0.01) @ primitives.dequantize_weight(q, scale, zero).t(),
                               rtol=1e-5, atol=1e-4)


@interpreted_only
def test_int4_layout_is_primitives_pack_int4():
    p = torch.arange(256, dtype=torch.uint8).reshape(8, 32)  # every byte value
    unpack_int4_ref = importlib.import_module("kernels.w4a8_gemm").unpack_int4_ref
    assert torch.equal(unpack_int4_ref(p), primitives.unpack_int4(p))
    eye = torch.eye(64, dtype=torch.int8)  # a × I picks the weight codes out one by one
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    assert torch.equal(kernels.w4a8_gemm_int32(eye, primitives.pack_int4(q))[:, 0, :], q.t().int())


# ---------------------------------------------------------------------------------------------- float GEMMs


@interpreted_only
@pytest.mark.parametrize("shape,variant,blocks", [
    ((64, 64, 128), {}, {}),
    ((50, 70, 200), {"dtype": torch.bfloat16}, RAGGED),
    ((40, 48, 192), {"group_size": 64, "dtype": torch.float16, "zero": False}, {}),
])
def test_w4a16(shape, variant, blocks):
    kw = E["w4a16_gemm"].example_inputs(shape, **variant)
    _close(E["w4a16_gemm"].wrapper(**kw, **blocks), E["w4a16_gemm"].ref(**kw))


@interpreted_only
def test_w4a16_is_the_dequantized_weight():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(24, 128, generator=g), torch.randn(10, 128, generator=g)
    scale, zero = primitives.weight_qparams(w, 4, 32, symmetric=False)
    q = primitives.quantize_weight(w, scale, zero, 4, 32)
    y = kernels.w4a16_gemm(x, primitives.pack_int4(q), scale, zero)
    torch.testing.assert_close(y, x @ primitives.dequantize_weight(q, scale, zero, 32).t(), rtol=1e-5, atol=1e-5)


@interpreted_only
@pytest.mark.parametrize("shape,variant,blocks", [
    ((64, 64, 128), {"d": 4}, {}),
    ((50, 70, 200), {"d": 8, "dtype": torch.bfloat16}, RAGGED),
    ((40, 48, 192), {"d": 2, "codes": 64, "dtype": torch.float16, "codebook_dtype": torch.float32}, {}),
    ((20, 24, 64), {"d": 1, "codes": 16, "bias": False}, {}),
    ((50, 70, 200), {"d": 2, "codes": 64, "index_bits": 6}, RAGGED),  # 3-bit: 100 indices a row → 75 packed bytes
    ((33, 40, 96), {"d": 4, "codes": 64, "index_bits": 6, "dtype": torch.bfloat16}, {}),  # J = 24
    ((16, 16, 48), {"d": 8, "codes": 64, "index_bits": 6}, {}),  # J = 6: the last group is half padding
])
def test_vq(shape, variant, blocks):
    kw = E["vq_gemm"].example_inputs(shape, **variant)
    _close(E["vq_gemm"].wrapper(**kw, **blocks), E["vq_gemm"].ref(**kw))


# ---------------------------------------------------------------------------------------------- act_quant, hadamard


@interpreted_only
@pytest.mark.parametrize("bits,dtype", [(8, torch.float32), (4, torch.bfloat16), (8, torch.float16)])
def test_act_quant_is_primitives_quantize_per_token(bits, dtype):
    kw = E["act_quant"].example_inputs((37, 200), bits=bits, dtype=dtype)
    codes, scales = kernels.act_quant(**kw)
    want_codes, want_scales = primitives.quantize_per_token(kw["x"], bits)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    codes2, scales2 = kernels.act_quant(**kw, block_m=16, block_k=64)  # two passes over four K tiles
    assert torch.equal(codes2, want_codes) and torch.equal(scales2, want_scales)


@interpreted_only
@pytest.mark.parametrize("shape,variant,blocks", [
    ((16, 1152), {"fused": True, "hadamard_block": 128}, {}),
    ((40, 256), {"fused": True, "hadamard_block": 64, "bits": 4}, {"block_m": 16, "block_k": 128}),
    ((30, 96), {"static": True}, {}),
])
def test_act_quant_fused_exact(shape, variant, blocks):
    kw = E["act_quant"].example_inputs(shape, **variant)
    codes, scales = kernels.act_quant(**kw, **blocks)
    want_codes, want_scales = E["act_quant"].ref(**kw)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)


@interpreted_only
@pytest.mark.parametrize("signed", [False, True])
def test_act_quant_fusion_equals_ditlab_transform_then_quantize(signed):
    """HadaNorm order (x − μ) / σ, then ditlab.hadamard_ops.rotate (Q = H·diag(s)), then quantize: same bits."""
    kw = E["act_quant"].example_inputs((32, 384), fused=True)
    signs = hadamard_ops.random_signs(384, 7) if signed else None
    y = (kw["x"] - kw["mean"].repeat_interleave(16, 0)) / kw["sigma"]
    rotated = hadamard_ops.rotate(y, signs, 128) if signed else hadamard_ops.fwht(y, 128)
    want = primitives.quantize_per_token(rotated, 8)
    got = kernels.act_quant(**kw, hadamard_block=128, signs=signs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if signed:  # the convention matters: signs applied before the transform (diag(s)·H) give other codes
        wrong = primitives.quantize_per_token(hadamard_ops.fwht(y * signs, 128), 8)
        assert not torch.equal(got[0], wrong[0])


@interpreted_only
@pytest.mark.parametrize("shape,block,dtype,blocks", [
    ((16, 1152), 128, torch.bfloat16, {}),
    ((37, 96), 32, torch.float32, {"block_m": 16, "block_k": 32}),
    ((5, 64), 64, torch.float16, {}),
])
def test_hadamard_exact_and_dense(shape, block, dtype, blocks):
    kw = E["hadamard"].example_inputs(shape, block=block, dtype=dtype)
    y = kernels.hadamard_transform(**kw, **blocks)
    assert torch.equal(y, kernels.fwht_ref(**kw))  # same butterflies: identical bits (bf16 rounding included)
    dense = kernels.hadamard_ref(**kw, out_dtype=torch.float32)
    _close(y.float(), dense) if dtype == torch.float32 else _close(y, dense.to(dtype))


@interpreted_only
@pytest.mark.parametrize("k,block", [(256, 64), (1152, 128)])
def test_hadamard_is_ditlab_rotation(k, block):
    """x' = (FWHT(x)/√d) ⊙ s = x·Q with Q = blockdiag(H/√d)·diag(s): the kernel equals ditlab.hadamard_ops.rotate
    bit for bit, its matrix is hadamard_ops.q_matrix exactly, and rotate_inverse undoes it."""
    signs = hadamard_ops.random_signs(k, 5)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(6))
    y = kernels.hadamard_transform(x, block, signs)
    assert torch.equal(y, hadamard_ops.rotate(x, signs, block))
    assert torch.equal(y, kernels.fwht_ref(x, block, signs))
    torch.testing.assert_close(hadamard_ops.rotate_inverse(y, signs, block), x, rtol=0, atol=1e-5)
    q = kernels.hadamard_transform(torch.eye(k), block, signs)  # rows of I times Q = Q
    assert torch.equal(q.double(), hadamard_ops.q_matrix(k, 5, block).float().double())
    assert not torch.equal(q, kernels.hadamard_transform(torch.eye(k) * signs.float()[:, None], block))  # not diag(s)·H


@interpreted_only
def test_hadamard_orthogonal_exactly():
    """For d = 4^j the entries ±2^−j are exact, so Q Qᵀ = I exactly in float32 (and H H = d·I for the ±1 matrix)."""
    signs = hadamard_ops.random_signs(256, 9)
    q = kernels.hadamard_transform(torch.eye(256), 64, signs)  # (256, 256), entries 0 or ±1/8
    assert torch.equal(q @ q.t(), torch.eye(256)) and torch.equal(q.t() @ q, torch.eye(256))
    h = kernels.hadamard_matrix(64)
    assert torch.equal(h @ h, 64 * torch.eye(64)) and torch.equal(h, hadamard_ops.hadamard_matrix(64, normalised=False))


# ---------------------------------------------------------------------------------------------- with ditlab's layers


@interpreted_only
@pytest.mark.parametrize("w_bits,a_bits,group,symmetric", [(8, 8, None, False), (4, 8, 64, False), (4, 4, None, True),
                                                           (4, 16, 32, False)])
def test_quantlinear_on_kernels_equals_cpu_int_path(w_bits, a_bits, group, symmetric):
    """The stored QuantLinear buffers fed to the kernels: the same codes, accumulators and outputs as ``cpu-int``."""
    from torch import nn

    from ditlab import backends
    from ditlab.config import LayerConfig
    from ditlab.nn import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(192, 96), LayerConfig(w_bits=w_bits, a_bits=a_bits, w_group_size=group,
                                                                   w_symmetric=symmetric))
    x = torch.randn(40, 192) * torch.exp(torch.randn(192))  # outlier channels
    want = backends.cpu_int_linear(layer, x)
    if a_bits == 16:
        got = kernels.w4a16_gemm(x, layer.qweight, layer.w_scale, layer.w_zero, layer.bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    codes, scale = kernels.act_quant(x, a_bits)
    want_codes, want_scale = backends.quantize_input(layer, x)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    int32 = kernels.w4a8_gemm_int32 if w_bits <= 4 else kernels.w8a8_gemm_int32
    acc = int32(codes, layer.qweight, layer.w_zero, num_groups=layer.w_scale.shape[1])
    assert torch.equal(acc, backends.cpu_int_accumulators(layer, codes))
    gemm = kernels.w4a8_gemm if w_bits <= 4 else kernels.w8a8_gemm
    torch.testing.assert_close(gemm(codes, scale, layer.qweight, layer.w_scale, layer.w_zero, layer.bias), want,
                               rtol=1e-5, atol=1e-5)


@interpreted_only
def test_static_activation_scale_is_primitives_quantize_act():
    x = torch.randn(30, 96) * 3
    codes, scale = kernels.act_quant(x, 8, scale=torch.tensor([[0.02]]))
    assert torch.equal(codes, primitives.quantize_act(x, torch.tensor([[0.02]]), 8))
    assert torch.equal(scale, torch.full((30, 1), 0.02))


@interpreted_only
@pytest.mark.parametrize("codes,d", [(256, 4), (64, 2)])  # 2-bit uint8 indices, 3-bit 6-bit packed indices
def test_vqlinear_on_kernel(codes, d):
    from ditlab.vq import VQLinear

    g = torch.Generator().manual_seed(4)
    layer = VQLinear.from_parts(torch.randint(0, codes, (48, 128 // d), generator=g), torch.randn(codes, d, generator=g),
                                torch.randn(48, generator=g))
    assert layer.index_bits == (6 if codes == 64 else 8)
    x = torch.randn(20, 128, generator=g)
    got = kernels.vq_gemm(x, layer.assignments, layer.codebook, layer.bias, index_bits=layer.index_bits)
    torch.testing.assert_close(got, x @ layer.dequantized_weight().t() + layer.bias, rtol=1e-5, atol=1e-5)


@interpreted_only
def test_vq_index6_layout_is_ditlab_pack_index6():
    """The kernel twin's unpacking is ditlab.vq's packing inverted, and the kernel decodes every index at every slot:
    with x = I (one-hot rows) and d = 1, y = Wᵀ is the decoded codebook column itself."""
    from ditlab import vq

    unpack_index6_ref = importlib.import_module("kernels.vq_gemm").unpack_index6_ref
    a = torch.randint(0, 64, (16, 20), generator=torch.Generator().manual_seed(8))
    a[0, :16] = torch.arange(16) * 4 + 3  # high values at every slot
    p = vq.pack_index6(a)
    assert torch.equal(unpack_index6_ref(p, 20), a.long())
    codebook = torch.arange(64, dtype=torch.float32)[:, None]  # C[i] = i: the output is the index itself
    got = kernels.vq_gemm(torch.eye(20), p, codebook, index_bits=6)
    assert torch.equal(got, a.t().float())


# ---------------------------------------------------------------------------------------------- input checks


@interpreted_only
def test_wrappers_reject_bad_inputs():
    a = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(TypeError):
        kernels.w8a8_gemm(a.float(), torch.ones(4, 1), a, torch.ones(4, 1))
    with pytest.raises(ValueError, match="group size"):
        kernels.w8a8_gemm(a, torch.ones(4, 1), a, torch.ones(4, 8))  # groups of 8 < the 16-deep dot
    with pytest.raises(ValueError, match="w_packed"):
        kernels.w4a8_gemm(a, torch.ones(4, 1), a.to(torch.uint8), torch.ones(4, 1))  # K/2 columns expected
    with pytest.raises(ValueError, match="tokens_per_sample"):
        kernels.w8a8_gemm(a, torch.ones(4, 1), a, torch.ones(4, 1), mean_corr=torch.zeros(3, 4), tokens_per_sample=2)
    with pytest.raises(ValueError, match="hadamard_block"):
        kernels.act_quant(torch.zeros(4, 96), hadamard_block=64)
    with pytest.raises(ValueError, match="codebook"):
        kernels.vq_gemm(torch.zeros(4, 96), torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(16, 3))
    with pytest.raises(ValueError, match="6-bit assignments"):  # 48 indices a row pack to 36 bytes, not 48
        kernels.vq_gemm(torch.zeros(4, 96), torch.zeros(4, 48, dtype=torch.uint8), torch.zeros(64, 2), index_bits=6)
    with pytest.raises(ValueError, match="codebook"):  # 6-bit indices address at most 64 codewords
        kernels.vq_gemm(torch.zeros(4, 96), torch.zeros(4, 36, dtype=torch.uint8), torch.zeros(128, 2), index_bits=6)


@interpreted_only
def test_compiled_kernels_refuse_cpu_tensors_clearly():
    """Outside the interpreter a CPU launch raises a clear error instead of crashing in the driver."""
    from kernels._launch import launch

    class Compiled:  # stands in for a compiled JITFunction
        pass

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        launch(Compiled(), (1,), {"x": torch.zeros(2)})
