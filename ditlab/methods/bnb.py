"""bitsandbytes baselines: LLM.int8 (``Linear8bitLt``) and 4-bit NF4 / FP4 (``Linear4bit``), weight-only.

So that users can compare ditlab's methods against the library people already use, these handlers build the
bitsandbytes module from a float ``nn.Linear`` (never modifying it). bitsandbytes quantizes a weight when the
parameter is moved to a device, so the module is built on the CPU copy and then ``.to('cpu')`` triggers it:

* ``bnb-int8``: ``Linear8bitLt(has_fp16_weights=False, threshold=6.0)`` — row-wise absmax int8 weights (scale per
  output channel, ``SCB``); at run time LLM.int8 decomposes input columns whose magnitude exceeds the threshold
  into a separate full-precision matmul.
* ``bnb-nf4`` / ``bnb-fp4``: ``Linear4bit`` — blocks of 64 weights share one absmax scale, codes index a 16-entry
  NF4 (normal-quantile) or FP4 table; the absmax values themselves are quantized to 8 bits in blocks of 256
  ("compress_statistics", bitsandbytes' default).

Compute dtype of the 4-bit layers: ``COMPUTE_DTYPE`` (see its comment for the measurement that chose it).
bitsandbytes finishes its own set-up in the *first forward* (on AVX-512-BF16 CPUs it repacks the 4-bit weight into a
CPU layout; Linear8bitLt moves its codes into its state): the constructors here run one tiny forward so that the
returned module is final — no lazy initialisation racing between sessions that share a quantized model.
bitsandbytes is imported lazily (importing it costs seconds) and its warning about the optional ``kernels``
package (which would fetch code from a hub at run time and is never installed) is filtered out.

The built modules carry ``is_quantized_linear = True`` (like ``QuantLinear``), and a ``ModuleCodec`` per class
(``ditlab.nn.register_module_codec``) lets QDIR save them (their serialised ``state_dict``: codes, scales, the
4-bit quant state) and rebuild them bit-identically, and lets ``quantize.weight_bytes`` count them with
``bnb_weight_bytes``.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import ModuleCodec, register_module_codec
from . import register

log = logging.getLogger(__name__)

INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (its published default)
# Linear4bit compute dtype. Measured here (`python -m benchmarks.bnb_speed --threads 1`, best of 20, tiny-DiT and
# DiT-XL shapes, M = 4…1024 rows): float32 and bf16 run at the same speed within ±15 % noise either way (e.g. tiny
# fc2 768→192 ×1024: 1.12 vs 1.13 ms; XL qkv 1152² ×1024: 115 vs 97 ms, then 87 vs 138 ms on a rerun) because on
# this AVX-512-BF16 CPU both go through bitsandbytes' fused 4-bit kernel; output errors agree to 3 digits. bf16
# compute, however, permanently casts the layer's bias to bf16 in forward. So: float32.
COMPUTE_DTYPE = torch.float32
CPU_PACK_BLOCK_N = 32  # bitsandbytes' CPU 4-bit layout packs output channels in blocks of 32
_METADATA_KEYS = ("quant_state.", "weight_format")  # state_dict entries that are format flags, not stored numbers


class _DropKernelsWarning(logging.Filter):
    """Drops bitsandbytes' one-time warning that the optional 'kernels' package is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels" not in record.getMessage()


for _name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops"):  # filters apply only to the logger they sit on
    logging.getLogger(_name).addFilter(_DropKernelsWarning())


def _bnb():
    import bitsandbytes

    return bitsandbytes


def _float_copies(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Detached float32 copies of W (N, K) and b (N,) on the CPU: bitsandbytes replaces its parameter's data when
    quantizing, so it must never hold the original tensor."""
    w = linear.weight.detach().to("cpu", torch.float32).clone()
    b = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32).clone()
    return w, b


def _finish(module: nn.Module) -> nn.Module:
    """eval mode, no gradients, and one forward on a zero row so bitsandbytes' first-call set-up is done now."""
    module = module.eval().requires_grad_(False)
    module.is_quantized_linear = True  # a replacement layer: counted and saved as quantized, never re-quantized
    if hasattr(module, "support_avx512bf16_for_cpu") and module.out_features % CPU_PACK_BLOCK_N:
        # bitsandbytes 0.50's CPU repacking asserts out_features % 32 == 0 (e.g. the tiny DiT's proj_out_2 has 48):
        # such layers take its generic path (dequantize, then a float matmul).
        module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        module(torch.zeros(1, module.in_features))
    return module


def to_int8(linear: nn.Linear, threshold: float = INT8_THRESHOLD) -> nn.Module:
    """``Linear8bitLt`` (int8 weights (N, K), SCB (N,) float32) equivalent to ``linear``; the input layer is untouched."""
    bnb = _bnb()
    w, b = _float_copies(linear)
    module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=b is not None, has_fp16_weights=False, threshold=threshold)
    module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if b is not None:
        module.bias = nn.Parameter(b, requires_grad=False)
    module = module.to("cpu")  # ← the quantization happens here
    if module.weight.dtype != torch.int8:
        raise ConfigError(f"bitsandbytes did not quantize the weight to int8 (got {module.weight.dtype}); bitsandbytes version?")
    return _finish(module)


def to_4bit(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype = COMPUTE_DTYPE) -> nn.Module:
    """``Linear4bit`` (``quant_type`` "nf4" or "fp4", packed uint8 (N·K/2, 1) + block absmax) equivalent to ``linear``."""
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError.invalid("quant_type", quant_type, "nf4 or fp4")
    bnb = _bnb()
    w, b = _float_copies(linear)
    module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=b is not None, compute_dtype=compute_dtype, quant_type=quant_type)
    module.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type)
    if b is not None:
        module.bias = nn.Parameter(b, requires_grad=False)
    module = module.to("cpu")  # ← the quantization happens here
    if module.weight.dtype != torch.uint8 or module.weight.quant_state is None:
        raise ConfigError(f"bitsandbytes did not quantize the weight to 4 bits (got {module.weight.dtype}); bitsandbytes version?")
    return _finish(module)


@register("bnb-int8")
def quantize_bnb_int8(linear: nn.Linear, cfg, stats=None) -> nn.Module:
    """Handler: LLM.int8 weights (threshold from ``cfg.params['threshold']``, default 6.0); no calibration."""
    threshold = float((getattr(cfg, "params", None) or {}).get("threshold", INT8_THRESHOLD))
    return to_int8(linear, threshold)


@register("bnb-nf4")
def quantize_bnb_nf4(linear: nn.Linear, cfg, stats=None) -> nn.Module:
    """Handler: NF4 4-bit weights, blocks of 64; no calibration."""
    return to_4bit(linear, "nf4")


@register("bnb-fp4")
def quantize_bnb_fp4(linear: nn.Linear, cfg, stats=None) -> nn.Module:
    """Handler: FP4 4-bit weights, blocks of 64; no calibration."""
    return to_4bit(linear, "fp4")


def bnb_weight_bytes(module: nn.Module) -> int:
    """Stored bytes of a bitsandbytes layer's weight: what its state_dict holds except the bias and format flags.

    int8: codes N·K + SCB 4·N. 4-bit: packed codes N·K/2 + 8-bit block absmax (one per 64 weights) + the 16-entry
    code table + the nested (float32) absmax and its 256-entry table. Counted on a copy: bitsandbytes' state_dict
    un-does its CPU weight layout in place (the next forward would redo it), and the in-memory CPU layout keeps the
    block absmax as bf16, so the serialised form is the meaningful size.
    """
    total = 0
    for key, tensor in copy.deepcopy(module).state_dict().items():
        if key == "bias" or key.endswith(".bias") or any(m in key for m in _METADATA_KEYS):
            continue
        total += tensor.numel() * tensor.element_size()
    return total


# ---- QDIR codec: save / rebuild / count ------------------------------------------------------------------------------
def bnb_spec(module: nn.Module) -> dict:
    """JSON-able shape and options of a bitsandbytes layer (what ``bnb_build`` needs besides the tensors)."""
    spec = {"in_features": int(module.in_features), "out_features": int(module.out_features), "bias": module.bias is not None}
    if type(module).__name__ == "Linear8bitLt":
        return {**spec, "method": "bnb-int8", "threshold": float(module.state.threshold)}
    qtype = module.weight.quant_state.quant_type
    return {**spec, "method": f"bnb-{qtype}", "quant_type": qtype, "compute_dtype": str(module.compute_dtype).replace("torch.", "")}


CPU_ABSMAX_KEY = "ditlab_cpu_absmax"  # not under "weight.": bitsandbytes' from_prequantized must not see it


def _cpu_packed(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def bnb_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The serialised state of a bitsandbytes layer (int8: weight (N, K) int8, SCB (N,), weight_format; 4-bit: weight
    (N·K/2, 1) uint8 in bitsandbytes' portable layout, block absmax, code tables, packed quant-state JSON; bias).
    Taken on a copy: bitsandbytes' state_dict un-does its CPU weight layout in place.

    A 4-bit layer in bitsandbytes' CPU layout keeps its block absmax as bfloat16 (1, N·K/64), and the portable form
    re-quantizes those (8-bit nested statistics), which does not round-trip: so that a reload is bit-identical the
    in-memory bfloat16 absmax is saved too (``CPU_ABSMAX_KEY``) and restored by ``bnb_build``."""
    out = {k: v.detach().contiguous().clone() for k, v in copy.deepcopy(module).state_dict().items()}
    if _cpu_packed(module):
        out[CPU_ABSMAX_KEY] = module.weight.quant_state.absmax.detach().contiguous().clone()
    return out


def bnb_build(spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuilds the finished bitsandbytes layer from ``bnb_spec`` + ``bnb_tensors`` (no re-quantization: the stored
    codes and scales are used as they are, so outputs are bit-identical to the saved layer's)."""
    bnb = _bnb()
    k, n, bias = int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"])
    if spec["method"] == "bnb-int8":
        module = bnb.nn.Linear8bitLt(k, n, bias=bias, has_fp16_weights=False, threshold=float(spec["threshold"]))
        module.weight = bnb.nn.Int8Params(torch.zeros(n, k), requires_grad=False, has_fp16_weights=False)
        module = module.to("cpu")  # creates the int8 state (of zeros) that load_state_dict then overwrites
        module.load_state_dict(tensors, strict=True)
        return _finish(module)
    if spec["method"] not in ("bnb-nf4", "bnb-fp4"):
        raise ConfigError.invalid("method", spec["method"], "bnb-int8, bnb-nf4, bnb-fp4 (a saved bitsandbytes layer)")
    dtype = getattr(torch, spec.get("compute_dtype", "float32"))
    module = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=dtype, quant_type=spec["quant_type"])
    stats = {key[len("weight."):]: t for key, t in tensors.items() if key.startswith("weight.")}
    module.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False, device="cpu", module=module)
    if bias:
        module.bias = nn.Parameter(tensors["bias"].float(), requires_grad=False)
    module = _finish(module)  # its first forward converts to the CPU layout where this CPU supports it
    cpu_absmax = tensors.get(CPU_ABSMAX_KEY)
    if cpu_absmax is not None and _cpu_packed(module):
        state = module.weight.quant_state
        if state.absmax.shape != cpu_absmax.shape:
            raise ConfigError.invalid(CPU_ABSMAX_KEY, tuple(cpu_absmax.shape), str(tuple(state.absmax.shape)))
        state.absmax = cpu_absmax.to(state.absmax.dtype).clone()
    return module


for _cls in ("Linear8bitLt", "Linear4bit"):
    register_module_codec(_cls, ModuleCodec(spec=bnb_spec, tensors=bnb_tensors, build=bnb_build, nbytes=bnb_weight_bytes))
