"""``QuantLinear``: the module that replaces an ``nn.Linear`` — packed weight codes + scales, an online input
transform, activation quantization, and a matmul on one of the execution paths chosen by ``ditlab.backends``.

forward(X (…, K)):
    X', T(μ) = transform(X)                  # / smooth → − μ → / sigma → · Q   (float32)
    out = backend(Q_a(X'), codes, scales)    # reference: dequantize + float matmul; cpu-int: int8×int8→int32 + epilogue
    out += (X' lr_downᵀ) lr_upᵀ              # optional low-rank branch (SVD), full precision
    out += T(μ) (Ŵ + lr_up lr_down)ᵀ          # HadaNorm mean correction, (B, 1, N) broadcast over tokens
    out += (T(μ) mean_downᵀ) mean_upᵀ         # optional: its weight error on the calibrated mean subspace (HadaNorm)
Everything is built offline by a method handler (``QuantLinear.from_float``); nothing is initialised in forward.

MixDQ's BOS-aware text quantization (``bos_tokens`` = n > 0, set from ``LayerConfig.params["bos_tokens"]``, meant
for the cross-attention K/V projections of text-conditioned models, e.g. ``*.attn2.to_k`` / ``*.attn2.to_v``): the
first n tokens of every sample of a (B, T, K) input skip activation quantization — their rows are X' Ŵᵀ (+ the
low-rank and mean terms) in float32 — and the static activation range is calibrated without them
(``gptq.static_act_scale``), so their outliers neither clip nor widen the grid of the other tokens. MixDQ also keeps
the weight in full precision for those rows by precomputing them once, which relies on the first token being the
same for every prompt (CLIP's BOS); PixArt's T5 has no BOS and its first token depends on the prompt, so the rows
are computed on every call, with the stored (quantized) weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import hadamard_ops, primitives
from .errors import ConfigError

log = logging.getLogger(__name__)


class InputTransform(nn.Module):
    """The online part of a method: ``X / smooth → − μ (center) → / sigma → · Q`` (block Hadamard).

    smooth (K,), sigma (K,) float32; hadamard: signs (K,) int8 ±1 and a power-of-two block size. Any part may be
    absent (None / False). μ is the per-sample per-channel mean over tokens: ``x.mean(-2)`` of (B, T, K) → (B, 1, K);
    a 2-D input (M, K) counts as one sample (same convention as ``ditlab.transforms.transform_input``).
    """

    def __init__(self, in_features: int, *, smooth: torch.Tensor | None = None, center: bool = False, sigma: torch.Tensor | None = None,
                 hadamard_signs: torch.Tensor | None = None, hadamard_block: int | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.center = bool(center)
        for name, vec in (("smooth", smooth), ("sigma", sigma)):
            if vec is not None:
                vec = vec.detach().reshape(-1).to(torch.float32).clone()
                if vec.numel() != self.in_features or not torch.isfinite(vec).all() or (vec == 0).any():
                    raise ConfigError.invalid(name, f"tensor {tuple(vec.shape)}", f"finite non-zero ({self.in_features},)")
            self.register_buffer(name, vec)
        self.hadamard_block = 0
        signs = None
        if hadamard_signs is not None:
            signs = hadamard_signs.detach().reshape(-1).to(torch.int8).clone()
            block = hadamard_ops.block_size(self.in_features) if hadamard_block is None else int(hadamard_block)
            if signs.numel() != self.in_features or block < 1 or block & (block - 1) or self.in_features % block:
                raise ConfigError.invalid("hadamard", f"signs {tuple(signs.shape)}, block {block}", f"({self.in_features},) ±1 signs and a power-of-two block dividing {self.in_features}")
            self.hadamard_block = block
        self.register_buffer("had_signs", signs)

    @property
    def identity(self) -> bool:
        return self.smooth is None and self.sigma is None and not self.center and self.had_signs is None

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """Rows · Q (identity without a Hadamard part)."""
        return t if self.had_signs is None else hadamard_ops.rotate(t, self.had_signs, self.hadamard_block)

    def fold_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = (W · diag(smooth) · diag(sigma)) · Q (N, K) float32, so that forward(X) W'ᵀ = X Wᵀ (+ mean term)."""
        wt = w.detach().float()
        if self.smooth is not None:
            wt = wt * self.smooth
        if self.sigma is not None:
            wt = wt * self.sigma
        return self.rotate(wt) if self.had_signs is not None else wt.clone()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X (…, K) → (X' float32 (…, K), T(μ) (…, 1, K) or None)."""
        xt = x.float()
        if self.smooth is not None:
            xt = xt / self.smooth  # true division, as in the offline reference
        mu = None
        if self.center:
            mu = xt.mean(-2, keepdim=True)  # (B, 1, K)
            xt = xt - mu
        if self.sigma is not None:
            xt = xt / self.sigma
            mu = None if mu is None else mu / self.sigma
        if self.had_signs is not None:
            xt = self.rotate(xt)
            mu = None if mu is None else self.rotate(mu)
        return xt, mu

    def spec(self) -> dict:
        return {"smooth": self.smooth is not None, "center": self.center, "sigma": self.sigma is not None, "hadamard_block": self.hadamard_block}

    @classmethod
    def from_spec(cls, in_features: int, spec: dict) -> "InputTransform":
        """An InputTransform with placeholder buffers of the right shapes (filled by load_state_dict)."""
        ones = torch.ones(in_features)
        block = int(spec.get("hadamard_block", 0))
        return cls(in_features, smooth=ones if spec.get("smooth") else None, center=bool(spec.get("center")),
                   sigma=ones if spec.get("sigma") else None,
                   hadamard_signs=torch.ones(in_features, dtype=torch.int8) if block else None, hadamard_block=block or None)


class QuantLinear(nn.Module):
    """A quantized ``Y = X Wᵀ + b``: codes (int8 (N, K), or uint8 (N, K/2) packed for ≤ 4 bits), scales (N, G)
    float16, signed-shifted zero points (N, G) int8 (asymmetric only), optional static activation scale (1, 1)
    float32, optional low-rank branch.

    Stored bytes per layer: N·K (8-bit) or N·K/2 (≤ 4-bit) codes + 2·N·G scales + N·G zeros — e.g. W4 group 128:
    0.5 + 3/128 bytes per weight = 0.262× fp16; W8 per channel: 0.5× fp16 + 3 bytes per row. The scales are
    float16-exact by construction (``primitives.weight_qparams`` rounds Δ up to float16 before the codes are
    computed), so storing them in float16 changes no number; every path upcasts them to float32 exactly."""

    is_quantized_linear = True

    def __init__(self, in_features: int, out_features: int, *, w_bits: int, w_group_size: int | None = None, w_symmetric: bool = True,
                 a_bits: int = 16, a_static: bool = False, bias: bool = True, transform: InputTransform | None = None,
                 lr_rank: int = 0, lr_dtype: torch.dtype = torch.float16, method: str = "rtn", bos_tokens: int = 0, mean_rank: int = 0):
        super().__init__()
        k, n = int(in_features), int(out_features)
        if not 2 <= w_bits <= 8:
            raise ConfigError.invalid("w_bits", w_bits, "2 to 8 for a QuantLinear")
        if w_bits <= 4 and k % 2:
            raise ConfigError.invalid("in_features", k, "an even number for 4-bit packing")
        g = k if w_group_size is None else int(w_group_size)
        if g < 1 or k % g:
            raise ConfigError.invalid("w_group_size", w_group_size, f"None or a divisor of in_features={k}")
        self.in_features, self.out_features, self.method = k, n, method
        self.w_bits, self.w_group_size, self.w_symmetric = int(w_bits), (None if w_group_size is None else g), bool(w_symmetric)
        self.a_bits = int(a_bits)
        if not (isinstance(bos_tokens, int) and bos_tokens >= 0):
            raise ConfigError.invalid("bos_tokens", bos_tokens, "a non-negative integer (MixDQ: 1 = the first text token)")
        self.bos_tokens = int(bos_tokens)  # leading tokens per sample kept out of activation quantization
        groups = k // g
        packed = self.w_bits <= 4
        self.register_buffer("qweight", torch.zeros(n, k // 2 if packed else k, dtype=torch.uint8 if packed else torch.int8))
        self.register_buffer("w_scale", torch.ones(n, groups, dtype=torch.float16))  # (N, G)
        self.register_buffer("w_zero", None if self.w_symmetric else torch.zeros(n, groups, dtype=torch.int8))  # (N, G)
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32) if bias else None)
        self.register_buffer("a_scale", torch.ones(1, 1, dtype=torch.float32) if a_static and self.a_bits < 16 else None)
        self.register_buffer("lr_down", torch.zeros(lr_rank, k, dtype=lr_dtype) if lr_rank else None)
        self.register_buffer("lr_up", torch.zeros(n, lr_rank, dtype=lr_dtype) if lr_rank else None)
        self.register_buffer("mean_down", torch.zeros(mean_rank, k, dtype=torch.float16) if mean_rank else None)  # (r, K)
        self.register_buffer("mean_up", torch.zeros(n, mean_rank, dtype=torch.float16) if mean_rank else None)  # (N, r)
        self.transform = transform if transform is not None else InputTransform(k)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, cfg, *, weight: torch.Tensor | None = None, transform: InputTransform | None = None,
                   scale: torch.Tensor | None = None, zero: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                   act_scale: torch.Tensor | float | None = None, lr_down: torch.Tensor | None = None, lr_up: torch.Tensor | None = None,
                   lr_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Builds a QuantLinear from a float ``linear`` (not modified) and a LayerConfig ``cfg``.

        weight: the already-transformed W' (N, K) to quantize (default: ``linear.weight``). scale/zero (N, G): a
        precomputed grid (default: min–max ``primitives.weight_qparams``); codes: signed-shifted int8 (N, K) codes
        on that grid (e.g. from GPTQ; default: round-to-nearest). act_scale: the static per-tensor activation scale
        (required when ``cfg.a_granularity == 'per-tensor'`` and a_bits < 16). lr_down (r, K), lr_up (N, r): the
        low-rank branch, stored in ``lr_dtype``.
        """
        n, k = linear.out_features, linear.in_features
        static = cfg.a_bits < 16 and cfg.a_granularity == "per-tensor"
        if static and act_scale is None:
            raise ConfigError.invalid("a_granularity", "per-tensor", "per-token, or per-tensor with a static scale from calibration statistics")
        rank = 0 if lr_down is None else int(lr_down.shape[0])
        layer = cls(k, n, w_bits=cfg.w_bits, w_group_size=cfg.w_group_size, w_symmetric=cfg.w_symmetric, a_bits=cfg.a_bits,
                    a_static=static, bias=linear.bias is not None, transform=transform, lr_rank=rank, lr_dtype=lr_dtype, method=cfg.method,
                    bos_tokens=bos_tokens(cfg) if cfg.a_bits < 16 else 0)
        w = (linear.weight if weight is None else weight).detach().float()
        if w.shape != (n, k):
            raise ConfigError.invalid("weight", tuple(w.shape), f"({n}, {k})")
        if scale is None:
            scale, zero = primitives.weight_qparams(w, cfg.w_bits, cfg.w_group_size, cfg.w_symmetric)
        if codes is None:
            codes = primitives.quantize_weight(w, scale, zero, cfg.w_bits, cfg.w_group_size)
        layer.set_weight(codes, scale, zero)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        if static:
            s = torch.as_tensor(act_scale, dtype=torch.float32).reshape(1, 1)
            if not torch.isfinite(s).all() or (s <= 0).any():
                raise ConfigError.invalid("act_scale", float(s), "a finite positive number")
            layer.a_scale.copy_(s)
        if rank:
            if lr_up is None or lr_up.shape != (n, rank) or lr_down.shape != (rank, k):
                raise ConfigError.invalid("low-rank", f"{tuple(lr_down.shape)} / {None if lr_up is None else tuple(lr_up.shape)}", f"lr_down (r, {k}) and lr_up ({n}, r)")
            layer.lr_down.copy_(lr_down.detach())
            layer.lr_up.copy_(lr_up.detach())
        return layer

    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Stores signed-shifted int8 codes (N, K) (packed when ≤ 4 bits), scales (N, G) and zero points (N, G).

        The scales must be exactly representable in float16 (as ``primitives.weight_qparams`` makes them): the codes
        were rounded on that grid, and a silently rounded stored scale would dequantize them on another one."""
        n, k = self.out_features, self.in_features
        lo, hi = -(2 ** (self.w_bits - 1)), 2 ** (self.w_bits - 1) - 1
        if codes.shape != (n, k) or int(codes.min()) < lo or int(codes.max()) > hi:
            raise ConfigError.invalid("codes", f"{tuple(codes.shape)} in [{int(codes.min())}, {int(codes.max())}]", f"({n}, {k}) int8 in [{lo}, {hi}]")
        if scale.shape != self.w_scale.shape:
            raise ConfigError.invalid("w_scale", tuple(scale.shape), str(tuple(self.w_scale.shape)))
        if (zero is None) != self.w_symmetric:
            raise ConfigError.invalid("w_zero", None if zero is None else tuple(zero.shape), "absent for symmetric weights, (N, G) otherwise")
        s32 = scale.float()
        if not torch.equal(s32.half().float(), s32) or not torch.isfinite(s32).all() or (s32 <= 0).any():
            raise ConfigError.invalid("w_scale", "values not exactly representable in float16",
                                      "positive float16 values (round the grid with primitives.fp16_ceil before computing codes)")
        if zero is not None:
            lo_z, hi_z = -(2 ** (self.w_bits - 1)), 2 ** (self.w_bits - 1) - 1
            if int(zero.min()) < lo_z or int(zero.max()) > hi_z:
                raise ConfigError.invalid("w_zero", f"[{int(zero.min())}, {int(zero.max())}]", f"signed-shifted zero points in [{lo_z}, {hi_z}]")
        q = codes.to(torch.int8)
        self.qweight.copy_(primitives.pack_int4(q) if self.w_bits <= 4 else q)
        self.w_scale.copy_(s32)
        if zero is not None:
            self.w_zero.copy_(zero.to(torch.int8))

    def set_mean_lowrank(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Stores the mean term's low-rank weight-error correction: down (r, K) — an orthonormal basis of the
        transformed means T(μ) — and up (N, r) = (W̃ − Ŵ)·downᵀ, both as float16 (see ``methods/hadanorm.py``)."""
        r, k, n = int(down.shape[0]), self.in_features, self.out_features
        if down.shape != (r, k) or up.shape != (n, r) or r < 1:
            raise ConfigError.invalid("mean low-rank", f"{tuple(down.shape)} / {tuple(up.shape)}", f"down (r ≥ 1, {k}) and up ({n}, r)")
        self.register_buffer("mean_down", down.detach().to(torch.float16).contiguous())
        self.register_buffer("mean_up", up.detach().to(torch.float16).contiguous())

    def spec(self) -> dict:
        """JSON-able structure (no tensor values) from which ``from_spec`` rebuilds an empty module of this shape."""
        return {"type": "QuantLinear", "in_features": self.in_features, "out_features": self.out_features, "method": self.method,
                "w_bits": self.w_bits, "w_group_size": self.w_group_size, "w_symmetric": self.w_symmetric, "a_bits": self.a_bits,
                "a_static": self.a_scale is not None, "bias": self.bias is not None,
                "lr_rank": 0 if self.lr_down is None else int(self.lr_down.shape[0]),
                "lr_dtype": None if self.lr_down is None else str(self.lr_down.dtype).replace("torch.", ""),
                "bos_tokens": self.bos_tokens, "mean_rank": 0 if self.mean_down is None else int(self.mean_down.shape[0]),
                "transform": self.transform.spec()}

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantLinear":
        k = int(spec["in_features"])
        return cls(k, int(spec["out_features"]), w_bits=spec["w_bits"], w_group_size=spec["w_group_size"], w_symmetric=spec["w_symmetric"],
                   a_bits=spec["a_bits"], a_static=spec["a_static"], bias=spec["bias"], transform=InputTransform.from_spec(k, spec["transform"]),
                   lr_rank=spec["lr_rank"], lr_dtype=getattr(torch, spec["lr_dtype"] or "float16"), method=spec.get("method", "rtn"),
                   bos_tokens=int(spec.get("bos_tokens", 0)), mean_rank=int(spec.get("mean_rank", 0)))

    # ---- views of the stored weight -----------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Signed-shifted int8 codes (N, K) (unpacked from int4 when needed; same result as primitives.unpack_int4)."""
        if self.w_bits > 4:
            return self.qweight
        p8 = self.qweight.view(torch.int8)
        lo = (p8 << 4) >> 4  # low nibble to the top, arithmetic shift back: sign-extended two's-complement nibble
        hi = p8 >> 4  # arithmetic shift: sign-extended high nibble
        return torch.stack([lo, hi], dim=-1).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ = (q − z)·Δ (N, K) float32 — the weight the reference path multiplies by (excludes the low-rank part)."""
        return primitives.dequantize_weight(self.codes(), self.w_scale.float(), self.w_zero, self.w_group_size)

    def weight_bytes(self) -> int:
        """Stored bytes of everything but the bias: codes + scales + zeros + static scale + low-rank + transform."""
        skip = {"bias"}
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name not in skip)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import backends  # the one module that chooses an execution path

        shape = x.shape
        xt, mu = self.transform(x)
        n_bos = min(self.bos_tokens, shape[-2]) if x.dim() >= 3 else 0
        if n_bos:  # MixDQ: the first tokens of each sample (B, :n, K) in float, the rest (B, n:, K) quantized
            head = self._matmul(xt[..., :n_bos, :].reshape(-1, self.in_features), backends.weight_only_linear)
            rest = self._matmul(xt[..., n_bos:, :].reshape(-1, self.in_features), backends.linear)
            out = torch.cat([head.reshape(*shape[:-2], n_bos, self.out_features),
                             rest.reshape(*shape[:-2], shape[-2] - n_bos, self.out_features)], dim=-2)  # (…, T, N)
        else:
            out = self._matmul(xt.reshape(-1, self.in_features), backends.linear).reshape(*shape[:-1], self.out_features)
        if mu is not None:
            out = out + self.mean_correction(mu)
        return out.to(x.dtype)

    def _matmul(self, x2: torch.Tensor, linear_fn) -> torch.Tensor:
        """X' (M, K) → (M, N) float32 through ``linear_fn`` (a ``backends`` path, bias included) + the low-rank branch."""
        out = linear_fn(self, x2)
        if self.lr_down is not None:
            out = out + (x2 @ self.lr_down.float().t()) @ self.lr_up.float().t()  # full-precision low-rank branch
        return out

    def mean_correction(self, t_mu: torch.Tensor) -> torch.Tensor:
        """T(μ) (…, 1, K) · (Ŵ + lr_up lr_down)ᵀ [+ (T(μ) mean_downᵀ) mean_upᵀ] → (…, 1, N) in float32 (no FP
        copy of W is stored; the optional low-rank term restores W̃ on the subspace the calibration means span)."""
        w = self.dequantized_weight()
        if self.lr_down is not None:
            w = w + self.lr_up.float() @ self.lr_down.float()
        out = t_mu.float() @ w.t()
        if self.mean_down is not None:
            out = out + (t_mu.float() @ self.mean_down.float().t()) @ self.mean_up.float().t()
        return out

    def extra_repr(self) -> str:
        gran = "per-channel" if self.w_group_size is None else f"group {self.w_group_size}"
        act = "a16" if self.a_bits == 16 else f"a{self.a_bits} " + ("static" if self.a_scale is not None else "per-token")
        parts = [f"in={self.in_features}", f"out={self.out_features}", self.method, f"w{self.w_bits} {gran} {'sym' if self.w_symmetric else 'asym'}", act]
        if self.lr_down is not None:
            parts.append(f"rank {self.lr_down.shape[0]}")
        if self.bos_tokens:
            parts.append(f"bos {self.bos_tokens} in float")
        if self.mean_down is not None:
            parts.append(f"mean-term rank {self.mean_down.shape[0]}")
        if not self.transform.identity:
            parts.append("transform " + ",".join(k for k, v in self.transform.spec().items() if v))
        return ", ".join(parts)


def bos_tokens(cfg) -> int:
    """MixDQ's number of leading tokens kept out of activation quantization: ``cfg.params["bos_tokens"]`` (default 0;
    a LayerConfig checked the value when it was built)."""
    return cfg.params.get("bos_tokens", 0)


MODULE_TYPES: dict[str, type] = {"QuantLinear": QuantLinear}


def register_module_type(cls: type) -> type:
    """Registers a replacement-module class for QDIR save/load: it needs ``spec() -> dict`` (with "type": its
    name) and a ``from_spec(spec)`` classmethod returning an empty module that ``load_state_dict`` fills."""
    MODULE_TYPES[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class ModuleCodec:
    """How QDIR saves and rebuilds a replacement module of a class ditlab does not own (e.g. bitsandbytes), whose
    state is not plain parameters and buffers (quantization state objects, CPU-specific weight layouts).

    spec(module) -> JSON-able dict (the layer's shape and options); tensors(module) -> {local name: tensor}, the
    serialisable state (must not disturb the live module); build(spec, tensors) -> the finished module (CPU, eval,
    bit-identical outputs); nbytes(module) -> stored weight bytes (codes + scales, no bias) for ``weight_bytes``.
    """

    spec: Callable[[nn.Module], dict]
    tensors: Callable[[nn.Module], dict]
    build: Callable[[dict, dict], nn.Module]
    nbytes: Callable[[nn.Module], int]


MODULE_CODECS: dict[str, ModuleCodec] = {}  # class name → codec


def register_module_codec(type_name: str, codec: ModuleCodec) -> ModuleCodec:
    """Registers the QDIR codec of modules whose ``type(module).__name__`` is ``type_name``."""
    MODULE_CODECS[type_name] = codec
    return codec


def codec_for(module: nn.Module) -> ModuleCodec | None:
    """The registered codec of ``module``'s class, or None."""
    return MODULE_CODECS.get(type(module).__name__)
