"""Triton kernels of ditlab's quantized formats, each with a plain-torch ``*_ref`` twin in the same file.

Importing this package decides once per process whether the kernels are compiled (CUDA) or interpreted: to run
them on CPU tensors set ``TRITON_INTERPRET=1`` before triton is first imported (diffusers and bitsandbytes import
it), i.e. at process start; a late setting is refused at import with an explanation. Only ``ditlab.backends``
imports this package; it never imports ``ditlab``.

``KERNELS`` maps a name to ``KernelEntry(wrapper, ref, example_inputs)``: ``wrapper(**kw)`` and ``ref(**kw)`` take the
same keyword arguments, and ``example_inputs(shape, seed=0, device="cpu", **variant)`` makes them — shape (M, N, K)
for the GEMMs, (M, K) for ``act_quant`` and ``hadamard``. Wrappers also accept ``block_*`` overrides.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from . import act_quant as _aq
from . import hadamard as _had
from . import vq_gemm as _vq
from . import w4a8_gemm as _w4a8
from . import w4a16_gemm as _w4a16
from . import w8a8_gemm as _w8a8
from .act_quant import act_quant, act_quant_ref
from .hadamard import fwht_ref, hadamard_matrix, hadamard_ref, hadamard_transform
from .vq_gemm import vq_gemm, vq_gemm_ref
from .w4a8_gemm import w4a8_gemm, w4a8_gemm_int32, w4a8_gemm_int32_ref, w4a8_gemm_ref
from .w4a16_gemm import w4a16_gemm, w4a16_gemm_ref
from .w8a8_gemm import w8a8_gemm, w8a8_gemm_int32, w8a8_gemm_int32_ref, w8a8_gemm_ref
from ._launch import check_mode as _check_mode

_check_mode(_w8a8._w8a8_kernel)


class KernelEntry(NamedTuple):
    """A kernel wrapper, its torch twin and the maker of their common keyword arguments."""

    wrapper: Callable
    ref: Callable
    example_inputs: Callable[..., dict]


KERNELS: dict[str, KernelEntry] = {
    "w8a8_gemm": KernelEntry(w8a8_gemm, w8a8_gemm_ref, _w8a8.example_inputs),
    "w8a8_gemm_int32": KernelEntry(w8a8_gemm_int32, w8a8_gemm_int32_ref, _w8a8.example_inputs_int32),
    "w4a8_gemm": KernelEntry(w4a8_gemm, w4a8_gemm_ref, _w4a8.example_inputs),
    "w4a8_gemm_int32": KernelEntry(w4a8_gemm_int32, w4a8_gemm_int32_ref, _w4a8.example_inputs_int32),
    "w4a16_gemm": KernelEntry(w4a16_gemm, w4a16_gemm_ref, _w4a16.example_inputs),
    "vq_gemm": KernelEntry(vq_gemm, vq_gemm_ref, _vq.example_inputs),
    "act_quant": KernelEntry(act_quant, act_quant_ref, _aq.example_inputs),
    "hadamard": KernelEntry(hadamard_transform, fwht_ref, _had.example_inputs),
}


def interpreted() -> bool:
    """True if this process runs the kernels under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from ._launch import is_interpreted

    return is_interpreted(_w8a8._w8a8_kernel)


__all__ = [
    "KERNELS", "KernelEntry", "interpreted",
    "w8a8_gemm", "w8a8_gemm_int32", "w8a8_gemm_ref", "w8a8_gemm_int32_ref",
    "w4a8_gemm", "w4a8_gemm_int32", "w4a8_gemm_ref", "w4a8_gemm_int32_ref",
    "w4a16_gemm", "w4a16_gemm_ref", "vq_gemm", "vq_gemm_ref", "act_quant", "act_quant_ref",
    "hadamard_transform", "hadamard_ref", "fwht_ref", "hadamard_matrix",
]
