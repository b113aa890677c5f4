"""Vector quantization of weights: batched deterministic k-means, candidate sets, encode/decode, and ``VQLinear``.

A weight W (N, K) is cut along its rows into sub-vectors of d consecutive input channels, ``X = W.reshape(N·K/d, d)``.
A codebook C (k, d) and one index per sub-vector, A (N, K/d) uint8 (k ≤ 256), represent it: ``Ŵ[n, j·d:(j+1)·d] =
C[A[n, j]]``. Bits per weight = log2(k)/d plus the codebook (k·d fp16 values per layer).

k-means (Lloyd, k-means++ seeding) works on any number of sub-vectors: squared distances are computed chunk by chunk
as ``‖x‖² + ‖c‖² − 2 x·c`` (one float32 matmul per block of rows), so a DiT-XL/2 layer of 2 M sub-vectors never
materialises the full (M, k) distance matrix; the argmin uses a keyed ``amin`` (exact, ~3× faster than torch's
index-tracking ``min``), and Lloyd's assignment step is pruned by Hamerly's bounds (exact: only rows whose nearest
centre may have changed are recomputed — ~20–30 % of them per update on DiT-like weights). Centroid sums are
accumulated in float64 (millions of float32 additions would drift). Everything is deterministic for a given seed:
the only randomness is the k-means++ draws from a seeded generator.

``VQLinear`` stores exactly the layout of the fused Triton kernel (``kernels/vq_gemm.py``): an fp16 codebook (k, d),
a float32 bias, and the assignments either one uint8 per index (N, K/d) (k > 64, e.g. 2 bits: k = 256, d = 4) or,
for k ≤ 64 (3 bits: k = 64, d = 2), packed at 6 bits — four indices in three bytes, (N, 3·⌈(K/d)/4⌉) uint8
(``pack_index6``: indices a0…a3 of a group form the 24-bit little-endian word a0 | a1 << 6 | a2 << 12 | a3 << 18).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .nn import register_module_type

log = logging.getLogger(__name__)

SUBVECTOR_LENGTHS = (1, 2, 4, 8)  # what the fused kernel decodes
MAX_CODES = 256  # one uint8 index per sub-vector
PACKED_CODES = 64  # k ≤ 64: indices stored at 6 bits, four in three bytes
CHUNK_ELEMS = 1 << 18  # rows × k of one distance block: 256 K floats = 1 MB stays in L2 (measured 2× faster than 8 MB)


# ---- settings ------------------------------------------------------------------------------------------------------
def default_k_d(bits: int) -> tuple[int, int]:
    """(k, d) for b bits per weight: the longest sub-vector with b·d ≤ 8 index bits, k = 2^(b·d).

    2 bits → (256, 4) and 3 bits → (64, 2) as in VQ4DiT; 4 → (256, 2); 5–8 → (2^b, 1).
    """
    if not 2 <= int(bits) <= 8:
        raise ConfigError.invalid("w_bits", bits, "2 to 8 for vector quantization")
    d = max(v for v in SUBVECTOR_LENGTHS if bits * v <= 8)
    return 2 ** (bits * d), d


def cap_k(k: int, n_subvectors: int) -> int:
    """min(k, largest power of two ≤ n_subvectors / 4), at least 1: every codeword keeps ≥ 4 sub-vectors on average."""
    limit = max(1, n_subvectors // 4)
    return max(1, min(int(k), 1 << (limit.bit_length() - 1)))


def subvectors(w: torch.Tensor, d: int) -> torch.Tensor:
    """W (N, K) → (N·K/d, d) float32 rows of d consecutive input channels (row-major, matching A (N, K/d))."""
    n, k = w.shape
    if k % d:
        raise ConfigError.invalid("params.d", d, f"a sub-vector length dividing in_features={k}")
    return w.detach().float().reshape(n * k // d, d)


# ---- distances -------------------------------------------------------------------------------------------------------
def _chunk_rows(k: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(1, k))


def _argmin_nonneg(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index of the minimum of every row of ``bits`` (R, k) int32 — float32 values ≥ 0 viewed as int32.

    Returns (indices (R,) int64, minimum bits (R,) int32). Same result as ``torch.min(dim=1)`` (lowest index among
    exact ties), about 3× faster: torch's index-tracking min reduction is slow on CPU while ``amin`` is vectorised.
    For non-negative IEEE floats, int32 order is float order. A key replaces the low ⌈log2 k⌉ bits of each value by
    its column index, so ``amin`` of the keys finds the lowest index among values equal in their high bits; a row
    whose winner is not an exact minimum (another value within 2^(lane bits − 23) relative is smaller) is redone
    with ``torch.min``.
    """
    r, k = bits.shape
    lane_bits = max(1, (k - 1).bit_length())
    best = bits.amin(1)  # (R,) exact minimum
    if lane_bits > 16:  # keys would lose too much of the value: plain index reduction
        return bits.min(1).indices, best
    mask = (1 << lane_bits) - 1
    lanes = torch.arange(k, dtype=torch.int32)
    idx = (bits & ~mask).bitwise_or_(lanes).amin(1).bitwise_and_(mask).long()  # (R,)
    bad = (bits.gather(1, idx[:, None])[:, 0] != best).nonzero().flatten()
    if bad.numel():
        idx[bad] = bits[bad].min(1).indices
    return idx, best


def _distance_bits(xc: torch.Tensor, c: torch.Tensor, cn: torch.Tensor) -> torch.Tensor:
    """Squared distances (R, k) of rows xc (R, d) to codewords c (k, d) as ``‖x‖² + ‖c‖² − 2x·c`` in float32,
    clamped at +0.0 (cancellation can dip below 0; −0.0 too) and returned as their int32 bit patterns."""
    s = torch.addmm(cn, xc, c.t(), alpha=-2.0).add_((xc * xc).sum(1, keepdim=True))  # (R, k)
    return s.view(torch.int32).clamp_min_(0)  # negative floats (sign bit set) are negative ints → +0.0


def assign(x: torch.Tensor, codebook: torch.Tensor, chunk_elems: int = CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every row: indices (M,) int64 and squared distances (M,) float32 (≥ 0).

    x (M, d), codebook (k, d). Ties go to the lowest index. Distances are ``‖x‖² + ‖c‖² − 2x·c`` in float32, chunk
    by chunk (a (rows, k) block of ``chunk_elems`` values at a time), so memory does not grow with M.
    """
    c = codebook.float()
    cn = (c * c).sum(1)  # (k,)
    rows = _chunk_rows(c.shape[0], chunk_elems)
    idx = torch.empty(x.shape[0], dtype=torch.long)
    d2 = torch.empty(x.shape[0], dtype=torch.int32)
    for s in range(0, x.shape[0], rows):
        idx[s : s + rows], d2[s : s + rows] = _argmin_nonneg(_distance_bits(x[s : s + rows].float(), c, cn))
    return idx, d2.view(torch.float32)


def _assign_two(x: torch.Tensor, c: torch.Tensor, chunk_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword (M,) int64 and the squared distance to the second nearest (M,) float32 of rows x (M, d)."""
    cn = (c * c).sum(1)
    rows = _chunk_rows(c.shape[0], chunk_elems)
    idx = torch.empty(x.shape[0], dtype=torch.long)
    second = torch.empty(x.shape[0], dtype=torch.int32)
    for s in range(0, x.shape[0], rows):
        bits = _distance_bits(x[s : s + rows], c, cn)  # (R, k)
        i, _ = _argmin_nonneg(bits)
        idx[s : s + rows] = i
        second[s : s + rows] = bits.scatter_(1, i[:, None], torch.iinfo(torch.int32).max).amin(1) if c.shape[0] > 1 else 0
    return idx, second.view(torch.float32)


def nearest_codewords(x: torch.Tensor, codebook: torch.Tensor, n: int, chunk_elems: int = CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """The n nearest codewords of every row, nearest first: indices (M, n) int64, squared distances (M, n) float32."""
    c = codebook.float()
    if not 1 <= n <= c.shape[0]:
        raise ConfigError.invalid("params.n_candidates", n, f"1 to the number of codewords ({c.shape[0]})")
    cn = (c * c).sum(1)
    rows = _chunk_rows(c.shape[0], chunk_elems)
    idx = torch.empty(x.shape[0], n, dtype=torch.long)
    d2 = torch.empty(x.shape[0], n, dtype=torch.float32)
    for s in range(0, x.shape[0], rows):
        xc = x[s : s + rows].float()
        scores = torch.addmm(cn, xc, c.t(), alpha=-2.0)  # (rows, k)
        best, arg = scores.topk(n, dim=1, largest=False, sorted=True)
        idx[s : s + rows] = arg
        d2[s : s + rows] = (best + (xc * xc).sum(1, keepdim=True)).clamp_min(0.0)
    return idx, d2


# ---- k-means ---------------------------------------------------------------------------------------------------------
@dataclass
class KMeansResult:
    """codebook (k, d) float32, assignments (M,) int64, inertia = Σ‖x − C[a]‖² (float), Lloyd updates run,
    rows whose distances were recomputed in the updates (the rest were proven unchanged by the bounds)."""

    codebook: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    iterations: int
    recomputed: int = 0


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): (k, d) float32 centres drawn from the rows of x (M, d).

    The first centre is uniform; each next one is drawn with probability ∝ D(x)², the squared distance to the
    nearest centre so far (inverse-CDF sampling on a float64 cumulative sum). If every D² is 0 (fewer distinct rows
    than k), the draw is uniform, so the codebook repeats a row (harmless: duplicates stay empty and are re-seeded).
    """
    x = x.float()
    m = x.shape[0]
    centers = torch.empty(k, x.shape[1], dtype=torch.float32)
    centers[0] = x[int(torch.randint(m, (1,), generator=generator))]
    d2 = (x - centers[0]).pow(2).sum(1)  # (M,)
    for j in range(1, k):
        cum = torch.cumsum(d2, 0, dtype=torch.float64)
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        if cum[-1] > 0:
            i = min(int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=torch.float64), right=True)), m - 1)
        else:
            i = min(int(u * m), m - 1)
        centers[j] = x[i]
        d2 = torch.minimum(d2, (x - centers[j]).pow(2).sum(1))
    return centers


def _update(x64: torch.Tensor, idx: torch.Tensor, d2: torch.Tensor | Callable[[], torch.Tensor], centers: torch.Tensor) -> torch.Tensor:
    """One Lloyd update: centres = means of their members; an empty cluster takes the row farthest from its centre.

    x64 (M, d) float64 rows, idx (M,) their clusters, centers (k, d) float32; d2 (M,) the squared distance of each row
    to its centre, or a callable computing it (called only if a cluster is empty).
    Several empty clusters take distinct rows in order of decreasing distance (deterministic: topk, then index order).
    """
    k, d = centers.shape
    sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, x64)  # (k, d) float64: exact enough for 2 M rows
    counts = torch.bincount(idx, minlength=k)  # (k,)
    new = centers.clone()
    full = counts > 0
    new[full] = (sums[full] / counts[full, None]).float()
    empty = (~full).nonzero().flatten()
    if empty.numel():
        far = (d2() if callable(d2) else d2).topk(int(empty.numel())).indices
        new[empty] = x64[far].float()
    return new


# Safety margins of the pruning bounds: float32 distances carry a relative error of a few 2^-24; the bounds are
# loosened by far more than that, so a row is skipped only when its own centre is nearest by a clear margin.
_REL_SLACK = 1e-5


class _Bounds:
    """Hamerly's (2010) pruning for Lloyd's assignment step, exact (it only skips rows whose nearest centre provably
    did not change).

    Per row: the assigned centre a, and ``lower`` ≤ the distance to every other centre. After the centres move by
    δ_j, ``lower`` drops by max δ; the distance to the own centre is recomputed directly (‖x − c_a‖, O(d) a row). A row
    whose own distance is ≤ max(lower, half the distance from c_a to its nearest other centre) keeps its centre;
    only the other rows get the full (rows, k) distance block. In low dimensions (d = 2, 4) most rows are skipped
    after the first updates: the cost of a Lloyd update falls from O(M·k·d) towards O(M·d).
    """

    def __init__(self, x: torch.Tensor, centers: torch.Tensor, chunk_elems: int):
        self.x, self.chunk_elems = x, chunk_elems
        self.xn = (x * x).sum(1)  # (M,) for the rounding margins
        self.idx, second = _assign_two(x, centers, chunk_elems)
        self.lower = self._lower(second, torch.arange(x.shape[0]), centers)
        self.recomputed = x.shape[0]

    def _lower(self, second_d2: torch.Tensor, rows: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """sqrt of a second-nearest squared distance, lowered by its worst-case float32 error (a true lower bound)."""
        err = 2.0**-20 * (self.xn[rows] + (centers * centers).sum(1).max())  # ≥ |error| of ‖x‖² + ‖c‖² − 2x·c (d ≤ 8)
        return (second_d2 - err).clamp_min(0.0).sqrt() * (1 - _REL_SLACK)

    def own_d2(self, centers: torch.Tensor) -> torch.Tensor:
        """Squared distance of every row to its assigned centre, computed directly (M,) float32."""
        return (self.x - centers[self.idx]).pow_(2).sum(1)

    def step(self, old: torch.Tensor, new: torch.Tensor) -> int:
        """Re-assign after the centres moved from ``old`` to ``new`` (k, d); returns how many rows changed centre."""
        moved = (new.double() - old.double()).norm(dim=1).float()  # (k,) δ_j
        self.lower -= float(moved.max()) * (1 + _REL_SLACK)
        own = self.own_d2(new).sqrt_() * (1 + _REL_SLACK)  # (M,) an upper bound of ‖x − c_a‖
        if new.shape[0] > 1:
            cc = torch.cdist(new.double(), new.double()).fill_diagonal_(float("inf"))  # (k, k)
            half = (0.5 * cc.amin(1)).float() * (1 - _REL_SLACK)  # (k,) ‖x − c_a‖ ≤ half_a ⇒ c_a is nearest
            bound = torch.maximum(self.lower, half[self.idx])
        else:
            bound = torch.full_like(own, float("inf"))
        rows = (own > bound).nonzero().flatten()  # (R,) rows that may have a nearer centre now
        self.recomputed += int(rows.numel())
        if not rows.numel():
            return 0
        idx, second = _assign_two(self.x[rows], new, self.chunk_elems)
        changed = int((idx != self.idx[rows]).sum())
        self.idx[rows] = idx
        self.lower[rows] = self._lower(second, rows, new)
        return changed


def kmeans(x: torch.Tensor, k: int, *, iters: int = 100, seed: int = 0, tol: float = 1e-4, init: torch.Tensor | None = None,
           max_points: int | None = None, chunk_elems: int = CHUNK_ELEMS, codebook_dtype: torch.dtype | None = None,
           progress: bool | None = None, desc: str = "k-means") -> KMeansResult:
    """Lloyd's k-means on rows x (M, d) with k-means++ seeding; ≤ ``iters`` updates, deterministic from ``seed``.

    Stops early when at most ``tol``·M rows change cluster in an update (tol = 0: only at a fixed point).
    The assignment step is Lloyd's, pruned exactly by Hamerly's bounds (``_Bounds``): the same assignments as a
    full recomputation, at a fraction of the cost once the centres settle.
    ``init`` (k, d) replaces the k-means++ seeding (used by tests against a reference with the same start).
    max_points: if M is larger, seeding and Lloyd run on that many rows drawn without replacement (seeded), and
    only the final assignment (and the returned inertia) covers all M rows — the usual way to make k-means on
    millions of points affordable (faiss trains on 256 points per centroid by default).
    codebook_dtype: round the final centres to this dtype (e.g. float16, the stored codebook) before the final
    assignment, so the returned assignments and inertia are those of the stored codebook (returned as float32).
    progress: None → a tqdm bar only for big problems (M·k ≥ 2^26), True/False → always / never.
    """
    full = x.detach().float().contiguous()
    if not 1 <= k <= full.shape[0]:
        raise ConfigError.invalid("params.k", k, f"1 to the number of sub-vectors ({full.shape[0]})")
    gen = torch.Generator().manual_seed(int(seed))
    x = full
    if max_points is not None and full.shape[0] > max(int(max_points), k):
        rows = torch.randperm(full.shape[0], generator=gen)[: max(int(max_points), k)].sort().values  # sorted: memory order
        x = full[rows]
    m = x.shape[0]
    if init is None:
        centers = kmeans_plusplus(x, k, gen)
    else:
        centers = init.detach().float().clone()
    x64 = x.double()
    bounds = _Bounds(x, centers, chunk_elems)
    show = (m * k >= 1 << 26) if progress is None else bool(progress)
    done = 0
    with tqdm(range(iters), desc=desc, disable=not show, leave=False) as bar:  # closed on the early break: gradio's
        for _ in bar:  # progress tracking (track_tqdm) would otherwise feed the caller's next loop from this range
            new = _update(x64, bounds.idx, lambda: bounds.own_d2(centers), centers)
            changed = bounds.step(centers, new)
            centers = new
            done += 1
            if changed <= tol * m:
                break
    if codebook_dtype is not None:
        rounded = centers.to(codebook_dtype).float()
        if x is full:  # rounding moved the centres a little: one more pruned re-assignment
            bounds.step(centers, rounded)
        centers = rounded
    if x is not full:  # trained on a sample: assign every row once
        idx, _ = assign(full, centers, chunk_elems)
    else:
        idx = bounds.idx
    inertia = float((full - centers[idx]).pow_(2).sum(dtype=torch.float64))  # Σ‖x − C[a]‖², summed in float64
    log.debug("%s: M=%d (fit on %d) k=%d d=%d, %d updates (%d row re-assignments), inertia %.6g",
              desc, full.shape[0], m, k, x.shape[1], done, bounds.recomputed, inertia)
    return KMeansResult(centers, idx, inertia, done, bounds.recomputed)


# ---- encode / decode -------------------------------------------------------------------------------------------------
def encode(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest-codeword assignments (N, K/d) uint8 of W (N, K) for a codebook (k ≤ 256, d)."""
    k, d = codebook.shape
    if k > MAX_CODES:
        raise ConfigError.invalid("params.k", k, f"at most {MAX_CODES} codewords (uint8 assignments)")
    idx, _ = assign(subvectors(w, d), codebook)
    return idx.to(torch.uint8).reshape(w.shape[0], w.shape[1] // d)


def index_bits_for(num_codes: int) -> int:
    """Stored bits per index: 6 (packed, four in three bytes) for k ≤ 64, else 8 (one uint8)."""
    return 6 if num_codes <= PACKED_CODES else 8


def packed_columns(j: int, index_bits: int) -> int:
    """Bytes per row of J indices stored at ``index_bits`` (6: 3·⌈J/4⌉, the last group zero-padded; 8: J)."""
    return 3 * (-(-j // 4)) if index_bits == 6 else j


def pack_index6(a: torch.Tensor) -> torch.Tensor:
    """Indices (N, J) (integers in [0, 64)) → (N, 3·⌈J/4⌉) uint8, four indices in three bytes.

    Group g holds indices 4g … 4g+3 (zeros past J) as the 24-bit word w = a0 | a1 << 6 | a2 << 12 | a3 << 18, stored
    little-endian: bytes 3g, 3g+1, 3g+2 = w & 255, (w >> 8) & 255, w >> 16.
    """
    n, j = a.shape
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= 64):
        raise ConfigError.invalid("assignments", f"range [{int(a.min())}, {int(a.max())}]", "indices in [0, 64) for 6-bit packing")
    g = -(-j // 4)
    q = torch.zeros(n, 4 * g, dtype=torch.int32)
    q[:, :j] = a.to(torch.int32)
    q = q.reshape(n, g, 4)
    word = q[..., 0] | (q[..., 1] << 6) | (q[..., 2] << 12) | (q[..., 3] << 18)  # (N, G) 24-bit
    return torch.stack([word & 255, (word >> 8) & 255, word >> 16], dim=-1).reshape(n, 3 * g).to(torch.uint8)


def unpack_index6(p: torch.Tensor, j: int) -> torch.Tensor:
    """Inverse of ``pack_index6``: (N, 3·⌈J/4⌉) uint8 → indices (N, J) uint8."""
    n = p.shape[0]
    b = p.to(torch.int32).reshape(n, -1, 3)  # (N, G, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (N, G)
    q = torch.stack([(word >> s) & 63 for s in (0, 6, 12, 18)], dim=-1).reshape(n, -1)  # (N, 4G)
    return q[:, :j].to(torch.uint8)


def decode(assignments: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Ŵ (N, K) float32 = C[A] for assignments (N, K/d) (any integer dtype) and a codebook (k, d) of any float dtype."""
    n, j = assignments.shape
    return codebook.float()[assignments.long()].reshape(n, j * codebook.shape[1])


# ---- the module ------------------------------------------------------------------------------------------------------
@register_module_type
class VQLinear(nn.Module):
    """A vector-quantized ``Y = X Ŵᵀ + b``: assignments (N, K/d) uint8 or 6-bit packed (N, 3·⌈K/4d⌉) uint8 (k ≤ 64),
    codebook fp16 (k, d), bias float32 (N,)."""

    is_quantized_linear = True
    a_bits = 16  # weight-only: activations stay in float

    def __init__(self, in_features: int, out_features: int, *, num_codes: int, d: int, bias: bool = True, method: str = "kmeans",
                 index_bits: int | None = None):
        super().__init__()
        k, n = int(in_features), int(out_features)
        if d not in SUBVECTOR_LENGTHS or k % d:
            raise ConfigError.invalid("params.d", d, f"one of {SUBVECTOR_LENGTHS} dividing in_features={k}")
        if not 1 <= num_codes <= MAX_CODES:
            raise ConfigError.invalid("params.k", num_codes, f"1 to {MAX_CODES} (uint8 assignments)")
        bits = index_bits_for(num_codes) if index_bits is None else int(index_bits)
        if bits not in (6, 8) or (bits == 6 and num_codes > PACKED_CODES):
            raise ConfigError.invalid("index_bits", bits, f"8, or 6 when k ≤ {PACKED_CODES}")
        self.in_features, self.out_features, self.d, self.num_codes, self.method = k, n, int(d), int(num_codes), method
        self.index_bits = bits
        self.register_buffer("assignments", torch.zeros(n, packed_columns(k // d, bits), dtype=torch.uint8))
        self.register_buffer("codebook", torch.zeros(num_codes, d, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32) if bias else None)

    @classmethod
    def from_parts(cls, assignments: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None, method: str = "kmeans") -> "VQLinear":
        """From assignments (N, K/d) (integers < k), a codebook (k, d) (rounded to fp16) and an optional bias (N,)."""
        n, j = assignments.shape
        k, d = codebook.shape
        if int(assignments.min()) < 0 or int(assignments.max()) >= k:
            raise ConfigError.invalid("assignments", f"range [{int(assignments.min())}, {int(assignments.max())}]", f"indices in [0, {k})")
        layer = cls(j * d, n, num_codes=k, d=d, bias=bias is not None, method=method)
        layer.assignments.copy_(pack_index6(assignments) if layer.index_bits == 6 else assignments.to(torch.uint8))
        layer.codebook.copy_(codebook.detach().to(torch.float16))
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight, log2(k)/d (the codebook is extra; see ``weight_bytes``)."""
        return math.log2(self.num_codes) / self.d

    def indices(self) -> torch.Tensor:
        """The codeword index of every sub-vector, (N, K/d) uint8 (unpacked if stored at 6 bits)."""
        j = self.in_features // self.d
        return unpack_index6(self.assignments, j) if self.index_bits == 6 else self.assignments

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ = C[A] (N, K) float32 — what every path multiplies by."""
        return decode(self.indices(), self.codebook)

    def weight_bytes(self) -> int:
        """Stored bytes of the weight: assignments (1 byte per sub-vector, or 3 bytes per 4 when packed at 6 bits) +
        fp16 codebook; the bias is not counted (the same convention as ``QuantLinear.weight_bytes`` and the fp16
        reference 2·N·K)."""
        return self.assignments.numel() * self.assignments.element_size() + self.codebook.numel() * self.codebook.element_size()

    def spec(self) -> dict:
        """JSON-able structure from which ``from_spec`` rebuilds an empty module of this shape (QDIR)."""
        return {"type": "VQLinear", "in_features": self.in_features, "out_features": self.out_features, "num_codes": self.num_codes,
                "d": self.d, "bias": self.bias is not None, "method": self.method, "index_bits": self.index_bits}

    @classmethod
    def from_spec(cls, spec: dict) -> "VQLinear":
        """An empty module of the spec's shape (a spec without ``index_bits``, written before packing existed: 8)."""
        return cls(int(spec["in_features"]), int(spec["out_features"]), num_codes=int(spec["num_codes"]), d=int(spec["d"]),
                   bias=bool(spec["bias"]), method=spec.get("method", "kmeans"), index_bits=int(spec.get("index_bits", 8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import backends  # the one module that may route to the fused Triton VQ kernel

        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        out = backends.vq_linear(self, x2)  # (M, N): fused Triton decode on a Triton path, else C[A] + one fp32 matmul
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.method}, k={self.num_codes}, d={self.d} "
                f"({self.bits_per_weight:g} bits/weight + codebook, {self.index_bits}-bit indices)")
