"""Recipes: the per-layer quantization configuration as data (frozen, validated, versioned JSON, presets).

A ``LayerConfig`` says how one linear is quantized. A ``Recipe`` = version + a default ``LayerConfig`` + ordered
overrides keyed by glob patterns over fully-qualified layer names (``fnmatch``; later overrides win) + a skip list
(glob patterns of layers kept in full precision). ``recipe.resolve(layers)`` turns it into a plan
``{name: LayerConfig | None}`` (None = skipped, kept FP) for one model, validating every layer against its shape.
The DataFrame round-trip (``plan_to_frame`` / ``frame_to_recipe``) is implemented in ``ditlab.plan_table``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .errors import ConfigError
from .frozen import FrozenParams, freeze, thaw

RECIPE_VERSION = 1

METHOD_NAMES = ("fp", "rtn", "smoothquant", "hadamard", "hadanorm", "viditq", "gptq", "svd",
                "bnb-int8", "bnb-nf4", "bnb-fp4", "vq4dit", "kmeans")
WEIGHT_ONLY_METHODS = ("bnb-int8", "bnb-nf4", "bnb-fp4", "vq4dit", "kmeans")  # these run with a_bits = 16 only
FIXED_WEIGHT_BITS = {"bnb-int8": 8, "bnb-nf4": 4, "bnb-fp4": 4}
GPTQ_COMPOSABLE = ("rtn", "smoothquant", "hadamard", "hadanorm", "viditq", "gptq", "svd")
# Methods with their own weight blocks: a w_group_size would be ignored (and shown in reports), so it is refused.
OWN_BLOCK_METHODS = {
    **dict.fromkeys(("bnb-nf4", "bnb-fp4"), "bitsandbytes uses its own blocks of 64 weights"),
    "bnb-int8": "bitsandbytes uses one scale per output channel",
    **dict.fromkeys(("kmeans", "vq4dit"), "one codebook per layer; the sub-vector length is params.d"),
}
STATS_METHODS = ("smoothquant", "hadanorm", "viditq", "gptq", "svd")  # need calibration statistics
A_GRANULARITIES = ("per-token", "per-tensor")
SIGMAS = ("std", "absmax")
ROUNDINGS = ("nearest", "gptq")

# LayerConfig.params: the keys each method reads (anything else is a typo and is rejected by name). The values of
# the k-means / VQ4DiT keys are checked against the layer's shape by ditlab.methods.kmeans / vq4dit.
KMEANS_KEYS = ("k", "d", "seed", "kmeans_iters", "kmeans_fit")
VQ4DIT_KEYS = ("n_candidates", "iterations", "samples", "steps", "guidance", "reg", "lr_logits", "lr_codebook", "harden", "anneal", "relative")
METHOD_PARAM_KEYS = {"bnb-int8": ("threshold",), "hadanorm": ("mean_bias_correction", "mean_rank"), "kmeans": KMEANS_KEYS,
                     "vq4dit": KMEANS_KEYS + VQ4DIT_KEYS}
ACT_PARAM_KEYS = ("bos_tokens",)  # MixDQ: leading (BOS) tokens kept out of activation quantization (any method; unused at A16)

# Generic patterns for the default skip list (models.default_skip_kinds(): embedders and the final layer) over
# DiT and PixArt naming. They may match nothing in a given model (e.g. no caption projection in a class-conditional
# DiT), which is the one case where resolve() does not reject an unmatched pattern.
DEFAULT_SKIP = ("*embedder*", "*.emb.*", "emb.*", "caption_projection*", "proj_out*")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _frozen_params(v, layer: str | None = None) -> FrozenParams:
    """``params`` validated as a JSON object and frozen; ConfigError naming ``params`` otherwise."""
    check_field("params", v, layer)
    try:
        return freeze(v)
    except RecursionError:
        raise ConfigError.invalid("params", "nested too deeply", _FIELD_RULES["params"][1], layer) from None


def _json_able(v) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return isinstance(v, dict) and all(isinstance(k, str) for k in v)
    except (TypeError, ValueError, RecursionError):
        return False


# field → (check(value) -> bool, allowed text). Single-field domains; cross-field rules live in LayerConfig.validate.
_FIELD_RULES = {
    "method": (lambda v: v in METHOD_NAMES, ", ".join(METHOD_NAMES)),
    "w_bits": (lambda v: _is_int(v) and (2 <= v <= 8 or v == 16), "an integer from 2 to 8, or 16 (full precision)"),
    "a_bits": (lambda v: _is_int(v) and (4 <= v <= 8 or v == 16), "an integer from 4 to 8, or 16 (full precision)"),
    "w_group_size": (lambda v: v is None or (_is_int(v) and v >= 2), "None (per-output-channel) or an integer ≥ 2 dividing in_features"),
    "w_symmetric": (lambda v: isinstance(v, bool), "true or false"),
    "a_granularity": (lambda v: v in A_GRANULARITIES, ", ".join(A_GRANULARITIES) + " (per-tensor = static scale from calibration)"),
    "clip_search": (lambda v: isinstance(v, bool), "true or false"),
    "alpha": (lambda v: _is_num(v) and 0.0 <= v <= 1.0, "a number from 0 to 1"),
    "hadamard_seed": (lambda v: _is_int(v) and 0 <= v < 2**63, "a non-negative integer"),
    "sigma": (lambda v: v in SIGMAS, ", ".join(SIGMAS)),
    "rank": (lambda v: _is_int(v) and v >= 1, "a positive integer (≤ min(out_features, in_features))"),
    "weight_rounding": (lambda v: v in ROUNDINGS, ", ".join(ROUNDINGS)),
    "gptq_damp": (lambda v: _is_num(v) and 0.0 < v <= 1.0, "a number in (0, 1] (fraction of the mean Hessian diagonal)"),
    "params": (_json_able, "a JSON object with string keys"),
}


# params key → (check(value) -> bool, allowed text) for the keys not tied to a layer's shape (k-means/VQ4DiT keys are
# checked by their methods against the layer).
_PARAM_RULES = {
    "bos_tokens": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (MixDQ: 1 = the first text token)"),
    "threshold": (lambda v: _is_num(v) and v > 0, "a positive number (LLM.int8 outlier threshold, default 6.0)"),
    "mean_bias_correction": (lambda v: isinstance(v, bool), "true or false"),
    "mean_rank": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (HadaNorm: rank of the mean term's weight-error correction; 0 = off)"),
}


def allowed_values(name: str) -> str:
    """What a LayerConfig field accepts, in words (the text its ConfigError quotes)."""
    return _FIELD_RULES[name][1]


def check_field(name: str, value, layer: str | None = None) -> None:
    """Raises ConfigError if ``name`` is not a LayerConfig field or ``value`` is outside its domain."""
    if name not in _FIELD_RULES:
        raise ConfigError.invalid("field", name, ", ".join(_FIELD_RULES), layer=layer)
    ok, allowed = _FIELD_RULES[name]
    if not ok(value):
        raise ConfigError.invalid(name, value, allowed, layer=layer)


@dataclass(frozen=True)
class LayerConfig:
    """How one linear layer is quantized (see METHODS.md); validated on construction, JSON-able via ``to_dict``."""

    method: str = "rtn"
    w_bits: int = 8
    a_bits: int = 8
    w_group_size: int | None = None  # None = one scale per output channel; else g consecutive input channels
    w_symmetric: bool = False  # False = min–max asymmetric with a zero point
    a_granularity: str = "per-token"  # per-token dynamic, or per-tensor static (from calibration absmax)
    clip_search: bool = False  # RTN: search a clipping ratio in [0.7, 1] per row/group
    alpha: float = 0.5  # SmoothQuant / ViDiT-Q migration strength
    hadamard_seed: int = 0
    sigma: str = "std"  # HadaNorm per-channel scale: std of the mean-centred input, or its absmax
    rank: int = 32  # SVD low-rank branch
    weight_rounding: str = "nearest"  # or "gptq" (composes after any transform)
    gptq_damp: float = 0.01
    params: dict = field(default_factory=dict, hash=False)  # method-specific extras, JSON-able; stored read-only (FrozenParams)

    def __post_init__(self):
        if _FIELD_RULES["params"][0](self.params):  # (otherwise validate() refuses it, in field order)
            object.__setattr__(self, "params", _frozen_params(self.params))  # a copy: the caller's dict stays theirs
        if self.method == "gptq":  # the GPTQ method *is* GPTQ rounding on the plain weight
            object.__setattr__(self, "weight_rounding", "gptq")
        if _is_int(self.alpha):
            object.__setattr__(self, "alpha", float(self.alpha))
        if _is_int(self.gptq_damp):
            object.__setattr__(self, "gptq_damp", float(self.gptq_damp))
        self.validate()

    @property
    def weight_only(self) -> bool:
        return self.a_bits == 16

    @property
    def is_fp(self) -> bool:
        return self.method == "fp"

    @property
    def needs_stats(self) -> bool:
        """True when the handler needs calibration statistics (LayerStats) for this layer."""
        static_act = self.a_bits < 16 and self.a_granularity == "per-tensor"
        return self.method in STATS_METHODS or self.weight_rounding == "gptq" or (static_act and not self.is_fp)

    def validate(self, layer: str | None = None, in_features: int | None = None, out_features: int | None = None) -> "LayerConfig":
        """Checks every field and the cross-field rules (optionally against the layer's shape); returns self.

        Raises ConfigError naming the layer, the field, the value and what is allowed.
        """
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name), layer)
        m = self.method
        self._validate_params(layer)
        if m == "fp":
            if self.w_bits != 16 or self.a_bits != 16:
                bad = "w_bits" if self.w_bits != 16 else "a_bits"
                raise ConfigError.invalid(bad, getattr(self, bad), "16 for method 'fp' (full precision)", layer)
            return self
        if self.w_bits == 16:
            raise ConfigError.invalid("w_bits", 16, f"2 to 8 for method {m!r} (use method 'fp' to keep a layer in full precision)", layer)
        if m in FIXED_WEIGHT_BITS and self.w_bits != FIXED_WEIGHT_BITS[m]:
            raise ConfigError.invalid("w_bits", self.w_bits, f"{FIXED_WEIGHT_BITS[m]} for method {m!r}", layer)
        if m in WEIGHT_ONLY_METHODS and self.a_bits != 16:
            raise ConfigError.invalid("a_bits", self.a_bits, f"16 for method {m!r} (weight-only: it cannot quantize activations)", layer)
        if m in OWN_BLOCK_METHODS and self.w_group_size is not None:
            raise ConfigError.invalid("w_group_size", self.w_group_size, f"None for method {m!r} ({OWN_BLOCK_METHODS[m]})", layer)
        if self.weight_rounding == "gptq" and m not in GPTQ_COMPOSABLE:
            raise ConfigError.invalid("weight_rounding", "gptq", f"'nearest' for method {m!r} (gptq composes with {', '.join(GPTQ_COMPOSABLE)})", layer)
        if in_features is not None:
            g = self.w_group_size
            if g is not None and in_features % g:
                raise ConfigError.invalid("w_group_size", g, f"None or a divisor of in_features={in_features}", layer)
            if self.w_bits <= 4 and in_features % 2 and m not in WEIGHT_ONLY_METHODS:
                raise ConfigError.invalid("w_bits", self.w_bits, f"5 to 8 here: 4-bit packing needs an even in_features (got {in_features})", layer)
        if m == "svd" and in_features is not None and out_features is not None and self.rank > min(in_features, out_features):
            raise ConfigError.invalid("rank", self.rank, f"1 to min(out_features, in_features) = {min(in_features, out_features)}", layer)
        return self

    def _validate_params(self, layer: str | None) -> None:
        """Rejects ``params`` keys the method does not read, and checks the values of the method-independent ones."""
        allowed = METHOD_PARAM_KEYS.get(self.method, ()) + ACT_PARAM_KEYS
        for key in self.params:
            if key not in allowed:
                raise ConfigError.invalid("params", key, f"keys of method {self.method!r}: {', '.join(allowed)}", layer)
        for key, (ok, text) in _PARAM_RULES.items():
            if key in self.params and not ok(self.params[key]):
                raise ConfigError.invalid(f"params.{key}", self.params[key], text, layer)

    def replace(self, **changes) -> "LayerConfig":
        """A copy with some fields changed (validated)."""
        for k in changes:
            if k not in _FIELD_RULES:
                raise ConfigError.invalid("field", k, ", ".join(_FIELD_RULES))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able field values (``params`` as a new, mutable dict)."""
        return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping, layer: str | None = None) -> "LayerConfig":
        """From a mapping of field values; unknown fields are rejected by name."""
        if not isinstance(data, Mapping):
            raise ConfigError.invalid("layer config", data, "a JSON object of LayerConfig fields", layer)
        for k in data:
            if k not in _FIELD_RULES:
                raise ConfigError.invalid("field", k, ", ".join(_FIELD_RULES), layer)
        values = dict(data)
        if values.get("method") == "fp":  # full precision: 16/16 unless the user wrote other bits (then they are refused)
            values.setdefault("w_bits", 16)
            values.setdefault("a_bits", 16)
        try:
            return cls(**values)
        except ConfigError as exc:
            if layer is None or exc.layer:
                raise
            raise ConfigError.invalid(exc.field, exc.value, exc.allowed, layer) from None

    def short(self) -> str:
        """A compact label, e.g. ``rtn W4A8 g64``."""
        if self.is_fp:
            return "fp"
        gran = f" g{self.w_group_size}" if self.w_group_size else ""
        act = "A16" if self.weight_only else f"A{self.a_bits}" + ("s" if self.a_granularity == "per-tensor" else "")
        return f"{self.method} W{self.w_bits}{act}{gran}"


FP = LayerConfig(method="fp", w_bits=16, a_bits=16)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def _few(names: list[str], n: int = 3) -> str:
    """Up to ``n`` names, then how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass(frozen=True)
class Recipe:
    """Version + default LayerConfig + ordered glob overrides + skip patterns. See the module docstring.

    ``name`` is a string; ``skip`` a list of glob patterns (``()`` = skip nothing; None is refused, as it could mean
    either "no skip" or "the default skip"). Override field maps are stored read-only (FrozenParams).
    """

    version: int = RECIPE_VERSION
    default: LayerConfig = FP
    overrides: tuple = ()  # ((glob pattern, {field: value}), …) — later entries win
    skip: tuple = DEFAULT_SKIP
    name: str = "custom"

    def __post_init__(self):
        if not _is_int(self.version) or self.version != RECIPE_VERSION:
            raise ConfigError.invalid("version", self.version, f"{RECIPE_VERSION}")
        if not isinstance(self.default, LayerConfig):
            raise ConfigError.invalid("default", self.default, "a LayerConfig")
        norm = []
        for item in self.overrides:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping)):
                raise ConfigError.invalid("overrides", item, "(glob pattern, {field: value}) pairs")
            pattern, fields = item
            for k, v in fields.items():
                check_field(k, v, layer=f"override {pattern}")
            try:
                norm.append((pattern, freeze(fields)))  # a copy: the caller's dict stays theirs
            except RecursionError:
                raise ConfigError.invalid("params", "nested too deeply", _FIELD_RULES["params"][1], f"override {pattern}") from None
        object.__setattr__(self, "overrides", tuple(norm))
        if not isinstance(self.skip, (list, tuple)) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigError.invalid("skip", self.skip, "a list of glob patterns (() or [] = skip nothing)")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.name, str):
            raise ConfigError.invalid("name", self.name, "a string (the recipe's name)")

    def config_for(self, name: str, in_features: int | None = None, out_features: int | None = None) -> LayerConfig | None:
        """The validated LayerConfig of one layer (None if a skip pattern matches it)."""
        if any(_matches(name, p) for p in self.skip):
            return None
        merged: dict = {}
        since_fp: dict | None = None  # the fields of the last override that set method 'fp', and of those after it
        for pattern, fields in self.overrides:
            if _matches(name, pattern):
                merged.update(fields)
                if fields.get("method") == "fp":
                    since_fp = {}
                if since_fp is not None:
                    since_fp.update(fields)
        if merged.get("method") == "fp" and since_fp is not None:
            # an override to full precision does not inherit the default's (or earlier overrides') bits: 16/16 unless
            # it (or a later override) sets other bits, which are then refused
            cfg = LayerConfig.from_dict(since_fp, layer=name)
        else:
            cfg = self.default if not merged else LayerConfig.from_dict({**self.default.to_dict(), **merged}, layer=name)
        if cfg.is_fp:
            return FP  # one canonical full-precision config (other fields are irrelevant to it)
        try:
            return cfg.validate(layer=name, in_features=in_features, out_features=out_features)
        except ConfigError as exc:
            if exc.layer:
                raise
            raise ConfigError.invalid(exc.field, exc.value, exc.allowed, name) from None

    def resolve(self, layers: Iterable) -> dict[str, LayerConfig | None]:
        """Plan ``{name: LayerConfig | None}`` for layers (``LayerInfo``s or names), in the given order.

        Rejects an override or skip pattern that matches no layer (except the generic DEFAULT_SKIP patterns), and an
        override whose layers are all skipped (it would have no effect).
        """
        infos = [(x, None, None) if isinstance(x, str) else (x.name, x.in_features, x.out_features) for x in layers]
        names = [n for n, _, _ in infos]
        for pattern, fields in self.overrides:
            hits = [n for n in names if _matches(n, pattern)]
            if not hits:
                raise ConfigError.invalid("override pattern", pattern, "a glob matching at least one layer name (e.g. 'transformer_blocks.*.attn1.to_q')")
            keeps_fp = fields.get("method") == "fp"  # keeping skipped layers in full precision says what skip does: harmless
            if not keeps_fp and all(any(_matches(n, p) for p in self.skip) for n in hits):
                skips = sorted({p for n in hits for p in self.skip if _matches(n, p)})
                raise ConfigError.invalid("override pattern", pattern, f"a glob matching a layer that is not skipped: it matches only skipped "
                                          f"layers ({_few(hits)}); remove them from skip (pattern(s) {', '.join(map(repr, skips))}) to quantize them")
        for pattern in self.skip:
            if pattern not in DEFAULT_SKIP and not any(_matches(n, pattern) for n in names):
                raise ConfigError.invalid("skip pattern", pattern, "a glob matching at least one layer name")
        return {n: self.config_for(n, k, o) for n, k, o in infos}

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed (validated); an unknown field is a ConfigError naming it."""
        known = [f.name for f in dataclasses.fields(self)]
        for k in changes:
            if k not in known:
                raise ConfigError.invalid("recipe field", k, ", ".join(known))
        return dataclasses.replace(self, **changes)

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": self.version, "name": self.name, "default": self.default.to_dict(),
                "overrides": [{"pattern": p, "set": thaw(f)} for p, f in self.overrides], "skip": list(self.skip)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Recipe":
        """From the ``to_dict`` layout; unknown keys are rejected by name; a missing version is an error."""
        if not isinstance(data, Mapping):
            raise ConfigError.invalid("recipe", type(data).__name__, "a JSON object")
        known = ("version", "name", "default", "overrides", "skip")
        for k in data:
            if k not in known:
                raise ConfigError.invalid("recipe key", k, ", ".join(known))
        if "version" not in data:
            raise ConfigError.invalid("version", None, f"{RECIPE_VERSION} (every recipe file carries a version)")
        if not isinstance(data.get("overrides", []), (list, tuple)):
            raise ConfigError.invalid("overrides", data["overrides"], 'a list of {"pattern": glob, "set": {field: value}} objects')
        if not isinstance(data.get("skip", []), (list, tuple)) or not all(isinstance(p, str) for p in data.get("skip", [])):
            raise ConfigError.invalid("skip", data["skip"], "a list of glob patterns (strings)")
        if not isinstance(data.get("default", {}), Mapping):
            raise ConfigError.invalid("default", data["default"], "a JSON object of LayerConfig fields")
        overrides = []
        for item in data.get("overrides", []):
            if not isinstance(item, Mapping) or set(item) != {"pattern", "set"}:
                raise ConfigError.invalid("overrides", item, 'objects {"pattern": glob, "set": {field: value}}')
            overrides.append((item["pattern"], item["set"]))
        default = LayerConfig.from_dict(data.get("default", {}), layer=None)
        return cls(version=data["version"], default=default, overrides=tuple(overrides),
                   skip=tuple(data.get("skip", DEFAULT_SKIP)), name=data.get("name", "custom"))

    @classmethod
    def from_json(cls, text: "str | bytes") -> "Recipe":
        """From JSON text (or UTF-8 bytes); malformed, non-UTF-8 or too deeply nested input is a ConfigError. A leading
        byte-order mark (Windows Notepad writes one) is ignored."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ConfigError.invalid("recipe JSON", f"non-UTF-8 byte at offset {exc.start}", "UTF-8 text") from None
        if not isinstance(text, str):
            raise ConfigError.invalid("recipe JSON", type(text).__name__, "JSON text (str) or UTF-8 bytes")
        try:
            data = json.loads(text.removeprefix("\ufeff"))
        except json.JSONDecodeError as exc:
            raise ConfigError.invalid("recipe JSON", f"{exc.msg} at line {exc.lineno} col {exc.colno}", "valid JSON") from None
        except RecursionError:
            raise ConfigError.invalid("recipe JSON", "nested too deeply", "a recipe object {version, name, default, overrides, skip}") from None
        return cls.from_dict(data)


def _preset(name: str, **fields) -> Recipe:
    return Recipe(default=LayerConfig(**fields), name=name)


W4_GROUP = 64
PRESETS: dict[str, Recipe] = {
    "fp": Recipe(default=FP, skip=(), name="fp"),
    "w8a8-rtn": _preset("w8a8-rtn", method="rtn", w_bits=8, a_bits=8),
    "w8a8-rtn-static": _preset("w8a8-rtn-static", method="rtn", w_bits=8, a_bits=8, w_symmetric=True, a_granularity="per-tensor"),
    "w8a8-smoothquant": _preset("w8a8-smoothquant", method="smoothquant", w_bits=8, a_bits=8, w_symmetric=True, alpha=0.5),
    "w8a8-viditq": _preset("w8a8-viditq", method="viditq", w_bits=8, a_bits=8, alpha=0.5),
    "w4a8-rtn": _preset("w4a8-rtn", method="rtn", w_bits=4, a_bits=8, w_group_size=W4_GROUP),
    "w4a8-hadamard": _preset("w4a8-hadamard", method="hadamard", w_bits=4, a_bits=8, w_group_size=W4_GROUP),
    "w4a8-hadanorm": _preset("w4a8-hadanorm", method="hadanorm", w_bits=4, a_bits=8, w_group_size=W4_GROUP),
    "w4a8-viditq": _preset("w4a8-viditq", method="viditq", w_bits=4, a_bits=8, w_group_size=W4_GROUP, alpha=0.5),
    "w4a4-hadanorm": _preset("w4a4-hadanorm", method="hadanorm", w_bits=4, a_bits=4, w_group_size=W4_GROUP),
    "w4a16-rtn": _preset("w4a16-rtn", method="rtn", w_bits=4, a_bits=16, w_group_size=W4_GROUP),
    "w4a16-gptq": _preset("w4a16-gptq", method="gptq", w_bits=4, a_bits=16, w_group_size=W4_GROUP),
    "w4a4-svd": _preset("w4a4-svd", method="svd", w_bits=4, a_bits=4, w_group_size=W4_GROUP, rank=32, alpha=0.5),
    "bnb-int8": _preset("bnb-int8", method="bnb-int8", w_bits=8, a_bits=16),
    "bnb-nf4": _preset("bnb-nf4", method="bnb-nf4", w_bits=4, a_bits=16),
    "bnb-fp4": _preset("bnb-fp4", method="bnb-fp4", w_bits=4, a_bits=16),
    # vector quantization (ditlab.methods.kmeans / vq4dit): k, d from w_bits (2 → k=256, d=4; 3 → k=64, d=2)
    "w2-vq4dit": _preset("w2-vq4dit", method="vq4dit", w_bits=2, a_bits=16),
    "w3-vq4dit": _preset("w3-vq4dit", method="vq4dit", w_bits=3, a_bits=16),
    "w2-kmeans": _preset("w2-kmeans", method="kmeans", w_bits=2, a_bits=16),
    "w3-kmeans": _preset("w3-kmeans", method="kmeans", w_bits=3, a_bits=16),
}
PRESETS_DOC = """Presets (all keep embedders and the final layer in FP via DEFAULT_SKIP; activations per-token dynamic unless noted):

W8 presets quantize weights per output channel (asymmetric min–max, except SmoothQuant and the static baseline which
are symmetric). W4 presets use groups of 64 input channels: 64 divides every in_features of the shipped tiny DiT
(192 for attention/adaLN/fc1, 768 for fc2; 256 only in the skipped timestep embedder) and of DiT-XL/2 (1152, 4608),
so every quantized layer of both is per-group 64; a model whose in_features is not a multiple of 64 needs an
override ``{"w_group_size": None}`` (resolve() names the layer). ``w8a8-rtn-static`` is naive per-tensor static
W8A8 (activation scale from calibration absmax) — the baseline ViDiT-Q's dynamic per-token quantization fixes.
"""


def get_preset(name: str) -> Recipe:
    """A named preset (see ``PRESETS_DOC``)."""
    if name not in PRESETS:
        raise ConfigError.invalid("recipe", name, "a preset name (" + ", ".join(PRESETS) + ") or a recipe .json file")
    return PRESETS[name]


def load_recipe(spec: "str | Path | Recipe | Mapping") -> Recipe:
    """A Recipe from a preset name, a path to a recipe JSON file, a dict, or a Recipe (returned as is)."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return Recipe.from_dict(spec)
    text = str(spec)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError.invalid("recipe", text, "an existing recipe .json file or a preset name (" + ", ".join(PRESETS) + ")")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError.invalid("recipe", text, f"a readable recipe .json file ({exc.strerror or type(exc).__name__})") from None
        return Recipe.from_json(data)
    return get_preset(text)


def save_recipe(recipe: Recipe, path: "str | Path") -> Path:
    """Writes ``recipe.to_json()`` to ``path`` atomically (the old file or the complete new one); returns the path."""
    from .atomic import write_text_atomic

    path = Path(path)
    write_text_atomic(path, recipe.to_json() + "\n")
    return path


def plan_to_frame(plan: "dict | Recipe | str", layers):
    """One row per layer (pandas DataFrame) of a resolved plan (or of a Recipe / preset name); see ``ditlab.plan_table``."""
    from .plan_table import plan_to_frame as impl

    return impl(plan, layers)


def frame_to_recipe(df, base_recipe: "Recipe | str") -> Recipe:
    """An edited plan table back to a Recipe (one override per changed layer; base may be a preset name); see ``ditlab.plan_table``."""
    from .plan_table import frame_to_recipe as impl

    return impl(df, base_recipe)
