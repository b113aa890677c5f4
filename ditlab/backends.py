"""The one place that chooses how a ``QuantLinear`` multiplies: the execution paths and their selection.

Every path computes the same integers and the same epilogue:
    acc_g = Σ_{k∈g} a_k (q_k − z_g)  (int32, exact)       out = s_a · Σ_g s_w,g · acc_g + b  (float32, group order)
  * ``reference``  — the accumulators from plain float64 matmuls of the integer codes (exact: every product is
                     ≤ 2^15 and every sum < 2^53), no integer kernel involved. Slow; the verification oracle.
  * ``cpu-int``    — ``torch._int_mm`` int8 × int8 → int32 (int4 unpacked to int8), one GEMM per group.
  * ``triton`` / ``triton-interpret`` — filled in by the kernels (``register_kernel``); ``triton`` needs CUDA.
Because reference and cpu-int share codes, accumulators and epilogue, their outputs are bit-identical (so are the
images). ``dequant_linear`` is the textbook float32 definition (Q_a(X')·Ŵᵀ on dequantized values); tests check
every path against it within float rounding. Weight-only layers (a_bits = 16) use one float matmul on the
dequantized weight on ``reference`` and ``cpu-int``; the Triton paths run the fused W4A16 dequantize-and-multiply
kernel (the same numbers within float rounding, ~1e-7 relative).

Selection: ``use_backend(name)`` (thread-local, so concurrent app sessions do not interfere) overrides the
``DITLAB_BACKEND`` environment variable (read on every call); ``auto`` = ``triton`` on CUDA when registered, else
``cpu-int``. Activation codes come from ``quantize_input`` on every path, so paths differ only in the GEMM.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import torch

from . import primitives
from .errors import ConfigError

ENV_VAR = "DITLAB_BACKEND"
BACKENDS = ("auto", "reference", "cpu-int", "triton", "triton-interpret")
_ALLOWED = "auto, reference, cpu-int, triton (CUDA GPU only), triton-interpret"

LinearFn = Callable[["object", torch.Tensor], torch.Tensor]  # (QuantLinear, X' (M, K) f32) → (M, N) f32 incl. bias
AccFn = Callable[["object", torch.Tensor], torch.Tensor]  # (QuantLinear, codes (M, K) int8) → (M, G, N) int32

_local = threading.local()


# ---- shared pieces -------------------------------------------------------------------------------------------------
def quantize_input(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation codes int8 (M, K) and scales (M, 1) (per-token dynamic) or (1, 1) (static per-tensor)."""
    if layer.a_scale is not None:
        return primitives.quantize_act(x, layer.a_scale, layer.a_bits), layer.a_scale
    return primitives.quantize_per_token(x, layer.a_bits)


def _add_bias(layer, out: torch.Tensor) -> torch.Tensor:
    return out if layer.bias is None else out + layer.bias


def weight_only_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """A16: X' (M, K) float32 @ Ŵᵀ (the same float matmul on every path)."""
    return _add_bias(layer, x @ layer.dequantized_weight().t())


def _grouped_codes(layer, codes: torch.Tensor):
    """(G, M, g) activation codes, (G, N, g) weight codes and (G, N) zero points (or None), all contiguous."""
    m, k = codes.shape
    groups = layer.w_scale.shape[1]
    g = k // groups
    a = codes.reshape(m, groups, g).transpose(0, 1).contiguous()
    q = layer.codes().reshape(layer.out_features, groups, g).transpose(0, 1).contiguous()
    z = None if layer.w_zero is None else layer.w_zero.t().to(torch.int32).contiguous()  # stored int8
    return a, q, z


def _accumulators(layer, codes: torch.Tensor, matmul) -> Iterator[torch.Tensor]:
    """Per group g: acc_g = Σ_{k∈g} a_k (q_k − z_g) (M, N) int32, exact (|acc| ≤ 127·255·K < 2³¹ for K < 66000)."""
    a, q, z = _grouped_codes(layer, codes)
    for gi in range(a.shape[0]):
        acc = matmul(a[gi], q[gi])  # (M, N) int32
        if z is not None:  # zero-point term −z_s · Σ_k a_k, in int32
            acc = acc - a[gi].sum(1, dtype=torch.int32)[:, None] * z[gi][None, :]
        yield acc


def exact_matmul(a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A (M, g) int8 · Q (N, g)ᵀ int8 → (M, N) int32 through float64 BLAS: integer-valued, hence exact."""
    return (a.double() @ q.double().t()).to(torch.int32)


def reference_accumulators(layer, codes: torch.Tensor) -> torch.Tensor:
    """(M, G, N) int32 accumulators without any integer kernel (the oracle the integer paths must equal)."""
    return torch.stack(list(_accumulators(layer, codes, exact_matmul)), dim=1)


def cpu_int_accumulators(layer, codes: torch.Tensor) -> torch.Tensor:
    """(M, G, N) int32 accumulators from ``torch._int_mm`` (what the cpu-int path computes)."""
    return torch.stack(list(_accumulators(layer, codes, primitives.int_matmul)), dim=1)


def epilogue(layer, accs: Iterator[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """out = s_a · Σ_g s_w,g · acc_g + b (M, N) float32, groups summed in order (every path uses this order)."""
    w_scale = layer.w_scale.t().float().contiguous()  # (G, N) float32 (stored float16: the upcast is exact)
    out = None
    for gi, acc in enumerate(accs):
        # int32 → float32 is exact below 2^24; beyond, rounding only. Multiply then add as two roundings (no fused
        # multiply-add), the order the kernels' epilogue_ref uses. In place: the epilogue is memory-bound.
        part = acc.float().mul_(w_scale[gi])
        out = part if out is None else out.add_(part)
    out.mul_(scale)
    return out if layer.bias is None else out.add_(layer.bias)


# ---- the torch paths -----------------------------------------------------------------------------------------------
def dequant_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Textbook definition in float32: X̂' = codes·s_a, Ŵ = (q − z)·Δ, out = X̂' Ŵᵀ + b (not a selectable path)."""
    if layer.a_bits == 16:
        return weight_only_linear(layer, x)
    codes, scale = quantize_input(layer, x)
    return _add_bias(layer, (codes.float() * scale) @ layer.dequantized_weight().t())


def reference_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Reference path: exact accumulators from float64 matmuls of the codes, then the shared epilogue."""
    if layer.a_bits == 16:
        return weight_only_linear(layer, x)
    codes, scale = quantize_input(layer, x)
    return epilogue(layer, _accumulators(layer, codes, exact_matmul), scale)


def cpu_int_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Integer path: int32 accumulators per group from torch._int_mm, then the shared epilogue."""
    if layer.a_bits == 16:
        return weight_only_linear(layer, x)
    codes, scale = quantize_input(layer, x)
    return epilogue(layer, _accumulators(layer, codes, primitives.int_matmul), scale)


# ---- registry and selection ----------------------------------------------------------------------------------------
KERNELS: dict[str, LinearFn] = {"reference": reference_linear, "cpu-int": cpu_int_linear}
ACCUMULATORS: dict[str, AccFn] = {"reference": reference_accumulators, "cpu-int": cpu_int_accumulators}


def register_kernel(name: str, linear_fn: LinearFn, accumulate_fn: AccFn | None = None) -> None:
    """Hook for the kernels: installs the ``triton`` / ``triton-interpret`` path (and its accumulator twin)."""
    if name not in ("triton", "triton-interpret"):
        raise ConfigError.invalid("backend", name, "triton, triton-interpret")
    KERNELS[name] = linear_fn
    if accumulate_fn is not None:
        ACCUMULATORS[name] = accumulate_fn


def _check(name: str, field: str = ENV_VAR) -> str:
    """``name`` if this process can run that path; else ConfigError naming ``field`` (the environment variable, or
    the argument that asked for it) and what it can run."""
    usable = ", ".join(b for b in BACKENDS if b == "auto" or b in KERNELS)
    if name not in BACKENDS:
        raise ConfigError.invalid(field, name, _ALLOWED)
    if name == "triton" and not torch.cuda.is_available():
        raise ConfigError.invalid(field, name, f"{usable} (triton needs a CUDA GPU; none found)")
    if name == "triton-interpret" and name not in KERNELS:
        raise ConfigError.invalid(field, name, f"{usable} in this process (the Triton interpreter is chosen once per process, before "
                                  "triton is imported: start Python with DITLAB_BACKEND=triton-interpret, or TRITON_INTERPRET=1)")
    if name == "triton" and name not in KERNELS:
        raise ConfigError.invalid(field, name, f"{usable} (the Triton kernels could not be loaded: is the triton package installed?)")
    return name


def requested() -> str:
    """The backend asked for: the innermost ``use_backend`` of this thread, else $DITLAB_BACKEND, else auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return os.environ.get(ENV_VAR, "auto").strip() or "auto"


def current() -> str:
    """The concrete path that will run (``auto`` resolved); raises ConfigError for an unusable request."""
    name = _check(requested())
    if name == "auto":
        return "triton" if torch.cuda.is_available() and "triton" in KERNELS else "cpu-int"
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager selecting the path for this thread only: ``with use_backend("reference"): model(x)``."""
    _check(name, "backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield current()
    finally:
        stack.pop()


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Dispatch: X' (M, K) float32 → (M, N) float32 (bias included) on the current path."""
    return KERNELS[current()](layer, x)


def available() -> list[str]:
    """Concrete paths usable on this machine now."""
    names = ["reference", "cpu-int"]
    if "triton" in KERNELS and torch.cuda.is_available():
        names.append("triton")
    if "triton-interpret" in KERNELS:
        names.append("triton-interpret")
    return names


# ---- the Triton paths (kernels/) -----------------------------------------------------------------------------------
# Triton compiles (CUDA) or interprets (TRITON_INTERPRET=1, set at process start — see ditlab/__init__.py) for a whole
# process, so which of the two paths exists is decided once, here. The InputTransform has already run in torch, so the
# kernels see X' and only quantize activations and multiply.
def _triton_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """X' (M, K) float32 → (M, N) float32 with the Triton kernels (act_quant + W8A8 / W4A8 / W4A16 GEMM)."""
    import kernels

    group = layer.w_group_size
    if group is not None and group % 16:  # the kernels tile a group in multiples of 16 channels
        return cpu_int_linear(layer, x)
    if layer.a_bits == 16:
        if layer.w_bits <= 4:
            return kernels.w4a16_gemm(x, layer.qweight, layer.w_scale, layer.w_zero, layer.bias)
        return weight_only_linear(layer, x)
    codes, scale = kernels.act_quant(x, layer.a_bits, scale=layer.a_scale)
    gemm = kernels.w4a8_gemm if layer.w_bits <= 4 else kernels.w8a8_gemm
    return gemm(codes, scale, layer.qweight, layer.w_scale, layer.w_zero, layer.bias)


def _triton_accumulators(layer, codes: torch.Tensor) -> torch.Tensor:
    """(M, G, N) int32 accumulators from the Triton integer GEMMs (exact; compared with the other paths in tests)."""
    import kernels

    fn = kernels.w4a8_gemm_int32 if layer.w_bits <= 4 else kernels.w8a8_gemm_int32
    return fn(codes, layer.qweight, layer.w_zero, num_groups=layer.w_scale.shape[1])


def vq_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """VQLinear: the fused Triton decode-and-multiply on a Triton path, else decode W = C[A] and one float matmul."""
    if current() in ("triton", "triton-interpret"):
        import kernels

        return kernels.vq_gemm(x, layer.assignments, layer.codebook, layer.bias, index_bits=layer.index_bits)
    out = x @ layer.dequantized_weight().t()
    return out if layer.bias is None else out + layer.bias


def _install_triton() -> None:
    interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
    if not (interpret or torch.cuda.is_available()):
        return
    try:
        import kernels  # noqa: F401 - needs triton; refuses a late TRITON_INTERPRET with a clear error
    except Exception:  # noqa: BLE001 - no triton, or a mode mismatch: the torch paths remain
        return
    register_kernel("triton-interpret" if interpret else "triton", _triton_linear, _triton_accumulators)


_install_triton()
