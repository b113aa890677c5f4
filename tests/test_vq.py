"""ditlab.vq: k-means against scipy, determinism, chunking, empty clusters, encode/decode, VQLinear."""

import pytest
import torch
from torch.nn import functional as F

from ditlab import vq
from ditlab.errors import ConfigError


def _blobs(n_per: int, centers: torch.Tensor, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(centers.shape[0]).repeat_interleave(n_per)
    return centers[labels] + spread * torch.randn(labels.numel(), centers.shape[1], generator=g), labels


def _inertia(x, c, a) -> float:
    return float(((x.double() - c.double()[a]) ** 2).sum())


def test_kmeans_no_worse_than_scipy_from_the_same_start():
    kmeans2 = pytest.importorskip("scipy.cluster.vq").kmeans2
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 0.5, 2.0, 0.1])
    init = vq.kmeans_plusplus(x, 24, torch.Generator().manual_seed(3))
    mine = vq.kmeans(x, 24, init=init, tol=0.0)
    c_ref, a_ref = kmeans2(x.double().numpy(), init.double().numpy(), iter=100, minit="matrix", missing="raise")
    ref = _inertia(x, torch.from_numpy(c_ref), torch.from_numpy(a_ref).long())
    assert mine.iterations < 100  # reached a fixed point
    assert mine.inertia <= ref * (1 + 1e-6)
    assert abs(mine.inertia - _inertia(x, mine.codebook, mine.assignments)) <= 1e-4 * mine.inertia  # reported = actual
    assert mine.inertia < 0.8 * _inertia(x, init, vq.assign(x, init)[0])  # Lloyd improved on the seeding (2515 → 1618)


def test_kmeans_plusplus_recovers_separated_blobs_at_least_as_well_as_scipy():
    kmeans2 = pytest.importorskip("scipy.cluster.vq").kmeans2
    centers = torch.tensor([[s0 * 10.0, s1 * 10.0, s2 * 10.0] for s0 in (0, 1) for s1 in (0, 1) for s2 in (0, 1)])
    x, labels = _blobs(60, centers, 0.3, seed=2)
    mine = vq.kmeans(x, 8, seed=5)
    c_ref, a_ref = kmeans2(x.double().numpy(), 8, iter=100, minit="++", seed=5)
    assert mine.inertia <= _inertia(x, torch.from_numpy(c_ref), torch.from_numpy(a_ref).long()) * (1 + 1e-6)
    # every blob is exactly one cluster: the assignment is a relabelling of the truth
    pairs = set(zip(labels.tolist(), mine.assignments.tolist()))
    assert len(pairs) == 8 and len({a for _, a in pairs}) == 8


def test_kmeans_is_deterministic_and_chunk_independent():
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    a = vq.kmeans(x, 16, seed=7, iters=20)
    b = vq.kmeans(x, 16, seed=7, iters=20, chunk_elems=16 * 333)  # 333-row distance blocks
    c = vq.kmeans(x, 16, seed=8, iters=20)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.assignments, b.assignments)
    assert not torch.equal(a.codebook, c.codebook)


def test_empty_cluster_takes_the_farthest_point():
    x = torch.cat([torch.zeros(50, 2), torch.full((50, 2), 4.0), torch.tensor([[100.0, 100.0]])])
    init = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0]])  # centre 1 ties with centre 0 and loses: empty
    result = vq.kmeans(x, 3, init=init, tol=0.0)
    assert torch.bincount(result.assignments, minlength=3).min() > 0
    assert result.inertia == 0.0 and result.codebook[1].tolist() == [100.0, 100.0]


def test_kmeans_with_fewer_distinct_rows_than_k_is_finite():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).repeat(20, 1)
    result = vq.kmeans(x, 8, seed=0)
    assert torch.isfinite(result.codebook).all() and result.inertia == 0.0


def test_nearest_codewords_match_brute_force():
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(300, 4, generator=g), torch.randn(20, 4, generator=g)
    idx, d2 = vq.nearest_codewords(x, c, 3, chunk_elems=20 * 64)
    full = ((x[:, None, :] - c[None]) ** 2).sum(-1)  # (M, k)
    ref_d2, ref_idx = full.topk(3, dim=1, largest=False)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(d2, ref_d2, rtol=1e-5, atol=1e-5)
    assert torch.equal(vq.assign(x, c)[0], ref_idx[:, 0])


def test_encode_decode_shapes_dtypes_and_exact_round_trip():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 4, generator=g).half()
    assignments = torch.randint(0, 16, (24, 8), generator=g, dtype=torch.uint8)
    w = vq.decode(assignments, codebook)
    assert w.shape == (24, 32) and w.dtype == torch.float32
    assert torch.equal(w[3, 8:12], codebook[assignments[3, 2].long()].float())
    again = vq.encode(w, codebook)
    assert again.dtype == torch.uint8 and again.shape == (24, 8)
    assert torch.equal(again, assignments)  # a weight made of codewords encodes back to them exactly
    noisy = vq.decode(vq.encode(torch.randn(24, 32, generator=g), codebook), codebook)
    assert noisy.shape == (24, 32) and noisy.dtype == torch.float32


def test_default_k_d_and_cap():
    assert vq.default_k_d(2) == (256, 4) and vq.default_k_d(3) == (64, 2) and vq.default_k_d(4) == (256, 2)
    assert vq.default_k_d(8) == (256, 1)
    assert vq.cap_k(256, 192 * 192 // 4) == 256
    assert vq.cap_k(256, 100) == 16  # ≤ 100/4 = 25 → 16
    assert vq.cap_k(64, 3) == 1
    with pytest.raises(ConfigError, match="params.d"):
        vq.subvectors(torch.zeros(4, 6), 4)


def _layer(n=12, k=16, codes=32, d=4, bias=True, seed=0) -> vq.VQLinear:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, codes, (n, k // d), generator=g)
    return vq.VQLinear.from_parts(a, torch.randn(codes, d, generator=g), torch.randn(n, generator=g) if bias else None)


def test_vqlinear_forward_equals_dense_matmul_on_decoded_weight():
    layer = _layer()
    assert layer.assignments.dtype == torch.uint8 and layer.codebook.dtype == torch.float16
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    w = vq.decode(layer.indices(), layer.codebook)
    ref = (x.reshape(-1, 16) @ w.t() + layer.bias).reshape(2, 5, 12)
    assert torch.equal(layer(x), ref)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
    assert torch.equal(_layer(bias=False)(x), (x.reshape(-1, 16) @ _layer(bias=False).dequantized_weight().t()).reshape(2, 5, 12))


def test_vqlinear_matches_the_kernel_twin():
    pytest.importorskip("triton")
    from kernels.vq_gemm import vq_gemm_ref

    for codes, d in ((64, 2), (256, 4)):  # 6-bit packed and uint8 indices
        layer = _layer(n=20, k=32, codes=codes, d=d)
        x = torch.randn(7, 32, generator=torch.Generator().manual_seed(2))
        assert layer.index_bits == (6 if codes == 64 else 8)
        assert torch.equal(layer(x), vq_gemm_ref(x, layer.assignments, layer.codebook, layer.bias, index_bits=layer.index_bits))


def test_vqlinear_bytes_spec_and_validation():
    layer = _layer(n=12, k=16, codes=32, d=4)
    assert layer.weight_bytes() == 12 * 3 * 1 + 32 * 4 * 2  # 4 six-bit indices in 3 bytes + fp16 codebook; bias not counted
    layer256 = _layer(n=12, k=16, codes=256, d=4)
    assert layer256.index_bits == 8 and layer256.weight_bytes() == 12 * 4 * 1 + 256 * 4 * 2  # uint8 indices
    assert layer.bits_per_weight == 5 / 4
    empty = vq.VQLinear.from_spec(layer.spec())
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(empty(x), layer(x))
    with pytest.raises(ConfigError, match="assignments"):
        vq.VQLinear.from_parts(torch.full((2, 2), 40), torch.zeros(32, 4), None)
    with pytest.raises(ConfigError, match="params.k"):
        vq.VQLinear(16, 4, num_codes=300, d=4)


def test_kmeans_fitted_on_a_sample_assigns_every_row_and_stays_close():
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(9))
    full = vq.kmeans(x, 8, seed=1)
    sampled = vq.kmeans(x, 8, seed=1, max_points=500)
    assert sampled.assignments.shape == (3000,) and torch.equal(sampled.assignments, vq.assign(x, sampled.codebook)[0])
    assert abs(sampled.inertia - _inertia(x, sampled.codebook, sampled.assignments)) <= 1e-4 * sampled.inertia
    assert full.inertia <= sampled.inertia <= 1.05 * full.inertia
    assert not torch.equal(sampled.codebook, full.codebook)  # the sample really was used


def test_keyed_argmin_is_torch_min_exactly_ties_and_negative_zero_included():
    g = torch.Generator().manual_seed(11)
    d2 = torch.rand(500, 256, generator=g)
    d2[:50, 200] = d2[:50].amin(1) * (1 + 2e-6)  # within the key's truncation of the minimum: must be redone exactly
    d2[50:60, 7] = d2[50:60, 3] = d2[50:60].amin(1) / 2  # exact ties: lowest index
    d2[60, :] = 1.0
    d2[61, 100:] = -0.0
    d2[61, :100] = 0.5
    bits = d2.view(torch.int32).clamp_min(0)  # what assign() feeds it: -0.0 → +0.0
    idx, best = vq._argmin_nonneg(bits)
    ref = bits.view(torch.float32).min(1)
    assert torch.equal(idx, ref.indices) and torch.equal(best.view(torch.float32), ref.values)
    assert idx[50:60].eq(3).all() and int(idx[60]) == 0 and int(idx[61]) == 100


def test_pruned_lloyd_equals_full_lloyd():
    """Hamerly's bounds only skip rows whose centre provably did not change: same centres and assignments as
    Lloyd with a full assignment at every update, from the same start."""
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(5)) * torch.tensor([1.0, 0.3, 2.0, 0.7])
    init = vq.kmeans_plusplus(x, 32, torch.Generator().manual_seed(2))
    mine = vq.kmeans(x, 32, init=init, iters=25, tol=0.0)
    centers, x64 = init.clone(), x.double()
    idx, d2 = vq.assign(x, centers)
    for _ in range(25):
        centers = vq._update(x64, idx, d2, centers)
        idx, d2 = vq.assign(x, centers)
    assert torch.equal(mine.codebook, centers) and torch.equal(mine.assignments, idx)
    assert mine.recomputed < 0.6 * 26 * 4000  # and the bounds did skip work


def test_codebook_dtype_rounds_before_the_final_assignment():
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(3))
    for max_points in (None, 500):
        r = vq.kmeans(x, 16, seed=0, codebook_dtype=torch.float16, max_points=max_points)
        assert torch.equal(r.codebook, r.codebook.half().float())  # representable in fp16
        assert torch.equal(r.assignments, vq.assign(x, r.codebook)[0])  # optimal for the stored codebook
        assert abs(r.inertia - _inertia(x, r.codebook, r.assignments)) <= 1e-6 * r.inertia


@pytest.mark.parametrize("j", [1, 2, 3, 4, 5, 7, 8, 288])
def test_pack_index6_round_trip_is_exact(j):
    g = torch.Generator().manual_seed(j)
    a = torch.randint(0, 64, (33, j), generator=g, dtype=torch.uint8)
    a[0] = 63  # all bits set
    a[1] = 0
    p = vq.pack_index6(a)
    assert p.dtype == torch.uint8 and p.shape == (33, 3 * ((j + 3) // 4)) == (33, vq.packed_columns(j, 6))
    assert torch.equal(vq.unpack_index6(p, j), a)
    assert torch.equal(vq.pack_index6(vq.unpack_index6(p, j)), p)  # padding bits are zero, so packing is canonical


def test_pack_index6_layout():
    """Four indices a0..a3 → the little-endian bytes of a0 | a1 << 6 | a2 << 12 | a3 << 18, every value at every slot."""
    v = torch.arange(64, dtype=torch.uint8)
    for slot in range(4):
        a = torch.zeros(64, 4, dtype=torch.uint8)
        a[:, slot] = v
        word = v.int() << (6 * slot)
        want = torch.stack([word & 255, (word >> 8) & 255, word >> 16], 1).to(torch.uint8)
        assert torch.equal(vq.pack_index6(a), want)
    with pytest.raises(ConfigError, match="assignments"):
        vq.pack_index6(torch.full((1, 4), 64))


def test_3bit_vqlinear_is_packed_and_round_trips():
    layer = _layer(n=12, k=40, codes=64, d=2)  # J = 20 indices per row → 15 bytes
    assert layer.index_bits == 6 and layer.assignments.shape == (12, 15)
    assert layer.weight_bytes() == 12 * 15 + 64 * 2 * 2
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 64, (12, 20), generator=g)
    cb = torch.randn(64, 2, generator=g)
    layer = vq.VQLinear.from_parts(a, cb, None)
    assert torch.equal(layer.indices(), a.to(torch.uint8))
    assert torch.equal(layer.dequantized_weight(), vq.decode(a, cb.half()))
    empty = vq.VQLinear.from_spec(layer.spec())
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(3, 40)
    assert layer.spec()["index_bits"] == 6 and torch.equal(empty(x), layer(x))
    # a spec written before packing existed (no index_bits) keeps one byte per index
    old = {k: v for k, v in layer.spec().items() if k != "index_bits"}
    assert vq.VQLinear.from_spec(old).assignments.shape == (12, 20)
    # 3-bit on a DiT-XL/2 layer shape: index bytes are 3/8 of fp16's 2 bytes per weight... i.e. 0.1875× plus the codebook
    big = vq.VQLinear(1152, 1152, num_codes=64, d=2)
    assert big.weight_bytes() / (2 * 1152 * 1152) == pytest.approx(0.1875 + 256 / (2 * 1152 * 1152))
