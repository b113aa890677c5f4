"""Streaming statistics of one linear layer's input, accumulated call by call during calibration sampling.

A layer input X is (B, T, K) for token layers (attention, MLP, final projection) and (B, K) for adaLN and the
timestep embedders (treated as T = 1). Every call is folded into running accumulators so that memory does not grow
with the number of steps:

* absmax / min / max per channel: running max/min (exact).
* mean / std per channel: Chan's parallel merge of (count, mean, M2) — each call's moments in float32 around its
  own mean, the running merge in float64 — numerically stable where the textbook ``E[x²] − E[x]²`` cancels
  catastrophically for channels with a large mean. Population std (ddof = 0).
* centered std / absmax (HadaNorm's σ): X minus its per-sample, per-channel mean over tokens, same merge. For T = 1
  the centered input is exactly 0 (the sample mean *is* the row), so both are 0 for adaLN/embedder layers.
* XᵀX: per-call product in float32 (one GEMM at the fp32 rate; relative error ~1e-6 per call, far below GPTQ's 1 %
  damping), summed across calls in float64 so the sum does not lose precision as calls accumulate.
* a reservoir of R raw rows, uniform over all rows seen: every row gets an i.i.d. uniform key from a seeded
  generator and the R smallest keys are kept ("reservoir sampling by random priorities") — exactly uniform sampling
  without replacement, deterministic for a given seed, mergeable call by call with one ``topk``.
* a reservoir of per-sample means: for token layers (T > 1), each call's B per-sample channel means over tokens
  (B, K), sampled the same way (its own seeded generator, the same cap R). HadaNorm's mean term uses them to learn
  the subspace in which a sample's mean varies (``methods/hadanorm.py``). Empty for T = 1.
* per (timestep, CFG branch): channel absmax, tensor absmax and percentiles of the per-token absmax.
"""

from __future__ import annotations

import zlib

import torch

from .errors import CalibrationError

BRANCHES = ("cond", "uncond")  # rows [0, n) / [n, 2n) of a CFG batch (see sampling.StepContext)
ALL_BRANCH = "all"  # a layer whose batch is not 2n rows (cannot be split by branch)
TOKEN_PERCENTILES = (50.0, 90.0, 99.0, 100.0)  # of the per-token absmax, per (timestep, branch)
BRANCH_ID = {"cond": 0, "uncond": 1, ALL_BRANCH: 2}


def layer_seed(seed: int, name: str) -> int:
    """A per-layer generator seed derived from the run seed and the layer name (independent of layer order)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF


def _merge_moments(n_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan et al.: merge running (n, mean (K,), M2 (K,)) float64 with the rows of x (M, K) float32.

    The call's own mean and M2 are computed in float32 *around the call's mean* (two passes, so no cancellation;
    relative error ~1e-6), and only the (K,) merge is float64: the (M, K) work stays at the fp32 rate.
    """
    n_b = x.shape[0]
    mean_b32 = x.mean(0)
    d = x - mean_b32
    m2_b = (d * d).sum(0).double()
    mean_b = mean_b32.double()
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)


class LayerAccumulator:
    """Running statistics of one layer's input; ``update`` per forward call, ``result`` at the end."""

    def __init__(self, name: str, in_features: int, *, seed: int, reservoir: int, collect_xtx: bool):
        k = int(in_features)
        self.name, self.k, self.reservoir = name, k, int(reservoir)
        self.absmax = torch.zeros(k)
        self.minimum = torch.full((k,), float("inf"))
        self.maximum = torch.full((k,), float("-inf"))
        self.n = 0
        self.mean, self.m2 = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        self.cmean, self.cm2 = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        self.centered_absmax = torch.zeros(k)
        self.xtx = torch.zeros(k, k, dtype=torch.float64) if collect_xtx else None
        self.gen = torch.Generator().manual_seed(layer_seed(seed, name))
        self.rows = torch.zeros(0, k)  # (R', K) float32
        self.keys = torch.zeros(0)  # (R',) reservoir priorities
        self.row_info = torch.zeros(0, 3, dtype=torch.int32)  # (R', 3): timestep, branch id, token index
        self.mean_gen = torch.Generator().manual_seed(layer_seed(seed, name + "#sample-means"))
        self.sample_means = torch.zeros(0, k)  # (S', K) float32 per-sample token means
        self.mean_keys = torch.zeros(0)  # (S',) their reservoir priorities
        self.per_timestep: dict[int, dict[str, dict]] = {}

    def update(self, x: torch.Tensor, *, timestep: int, step: int, batch_size: int, cfg: bool) -> None:
        """Folds one input X (B, T, K) or (B, K) of the layer at diffusion ``timestep`` into the statistics."""
        if x.shape[-1] != self.k:
            return  # not a (…, K) linear input (defensive: never happens for nn.Linear)
        x = x.detach().float()
        x = x.reshape(x.shape[0], -1, self.k) if x.dim() >= 3 else x.reshape(-1, 1, self.k)  # (B, T, K)
        b, t, k = x.shape
        flat = x.reshape(-1, k)  # (B·T, K)
        mag = x.abs()  # (B, T, K), reused by the per-timestep statistics
        batch_absmax = mag.amax((0, 1))  # (K,); amax propagates NaN and Inf, so this checks every element
        if not bool(torch.isfinite(batch_absmax).all()):
            bad = "NaN" if bool(torch.isnan(batch_absmax).any()) else "Inf"
            raise CalibrationError(f"{bad} in the input of layer {self.name!r} at timestep {timestep} (step {step}); the FP model produces non-finite activations")
        self.absmax = torch.maximum(self.absmax, batch_absmax)
        self.minimum = torch.minimum(self.minimum, flat.amin(0))
        self.maximum = torch.maximum(self.maximum, flat.amax(0))
        n_before = self.n
        self.n, self.mean, self.m2 = _merge_moments(n_before, self.mean, self.m2, flat)
        centered = x - x.mean(1, keepdim=True)  # per-sample, per-channel mean over tokens removed (exactly 0 if T = 1)
        _, self.cmean, self.cm2 = _merge_moments(n_before, self.cmean, self.cm2, centered.reshape(-1, k))
        self.centered_absmax = torch.maximum(self.centered_absmax, centered.abs().amax((0, 1)))
        if self.xtx is not None:
            self.xtx += (flat.t() @ flat).double()  # fp32 GEMM per call, float64 running sum (see module docstring)
        branches = self._branches(b, batch_size, cfg)
        self._reservoir(flat, timestep, branches, b, t)
        if t > 1:
            self._mean_reservoir(x.mean(1))
        self._per_timestep(mag, timestep, branches)

    @staticmethod
    def _branches(b: int, n: int, cfg: bool) -> list[tuple[str, slice]]:
        """Batch-row slices of each CFG branch: [0, n) cond, [n, 2n) uncond; no CFG → all cond; other sizes → all."""
        if cfg and b == 2 * n:
            return [("cond", slice(0, n)), ("uncond", slice(n, 2 * n))]
        if not cfg and b == n:
            return [("cond", slice(0, n))]
        return [(ALL_BRANCH, slice(0, b))]

    def _reservoir(self, flat: torch.Tensor, timestep: int, branches, b: int, t: int) -> None:
        """Keeps the R rows with the smallest random keys among the reservoir and the new rows flat (B·T, K)."""
        if self.reservoir <= 0:
            return
        keys = torch.rand(flat.shape[0], generator=self.gen)
        branch_of_row = torch.empty(b, dtype=torch.int32)
        for name, sl in branches:
            branch_of_row[sl] = BRANCH_ID[name]
        info = torch.stack([torch.full((b, t), int(timestep), dtype=torch.int32), branch_of_row[:, None].expand(b, t),
                            torch.arange(t, dtype=torch.int32)[None, :].expand(b, t)], -1).reshape(-1, 3)
        if self.keys.numel() >= self.reservoir:  # full: only rows that beat the worst kept key can enter (same result)
            cand = (keys < self.keys[-1]).nonzero().squeeze(1)
            keys, flat, info = keys[cand], flat[cand], info[cand]
        all_keys = torch.cat([self.keys, keys])
        keep = min(self.reservoir, all_keys.numel())
        idx = torch.topk(all_keys, keep, largest=False, sorted=True).indices  # ascending key order: deterministic
        self.keys = all_keys[idx]
        self.rows = torch.cat([self.rows, flat])[idx]
        self.row_info = torch.cat([self.row_info, info])[idx]

    def _mean_reservoir(self, means: torch.Tensor) -> None:
        """Keeps the R per-sample means (B, K) with the smallest random keys (own generator: the row reservoir's draws
        are unchanged)."""
        if self.reservoir <= 0:
            return
        keys = torch.cat([self.mean_keys, torch.rand(means.shape[0], generator=self.mean_gen)])
        idx = torch.topk(keys, min(self.reservoir, keys.numel()), largest=False, sorted=True).indices
        self.mean_keys = keys[idx]
        self.sample_means = torch.cat([self.sample_means, means])[idx]

    def _per_timestep(self, mag: torch.Tensor, timestep: int, branches) -> None:
        """Per (timestep, branch): channel absmax (K,) and the per-token absmax values (kept until ``result``).

        mag: |X| (B, T, K)."""
        slot = self.per_timestep.setdefault(int(timestep), {})
        token_absmax = mag.amax(-1)  # (B, T)
        for name, sl in branches:
            chan = mag[sl].amax((0, 1))  # (K,)
            tokens = token_absmax[sl].reshape(-1)  # (b·T,) per-token absmax
            if name in slot:  # the same layer called twice in one step: merge
                chan = torch.maximum(chan, slot[name]["absmax"])
                tokens = torch.cat([slot[name]["_tokens"], tokens])
            slot[name] = {"absmax": chan, "_tokens": tokens}

    def result(self) -> dict:
        """The finished statistics as a dict of LayerStats fields (see ``calibration.LayerStats``)."""
        n = max(self.n, 1)
        per_timestep = {}
        for ts, slot in self.per_timestep.items():
            per_timestep[ts] = {}
            for name, d in slot.items():
                tokens = d["_tokens"]
                q = torch.tensor(TOKEN_PERCENTILES, dtype=torch.float64) / 100.0
                per_timestep[ts][name] = {
                    "absmax": d["absmax"],
                    "tensor_absmax": d["absmax"].max(),
                    "token_absmax_pct": torch.quantile(tokens.double(), q).float(),
                    "n_tokens": torch.tensor(tokens.numel(), dtype=torch.int64),
                }
        return {
            "absmax": self.absmax, "minimum": self.minimum, "maximum": self.maximum,
            "mean": self.mean.float(), "std": (self.m2 / n).sqrt().float(),
            "centered_std": (self.cm2 / n).sqrt().float(), "centered_absmax": self.centered_absmax,
            "xtx": self.xtx, "n_rows": int(self.n), "rows": self.rows, "row_info": self.row_info, "sample_means": self.sample_means,
            "per_timestep": per_timestep,
        }
