"""Launch plumbing shared by the kernel wrappers (no kernels here).

Every wrapper ends with ``launch(kernel, grid, params, num_warps=..., num_stages=...)`` where ``params`` maps each
kernel parameter name to its value (tensors, ints, floats, ``None`` and constexprs alike). Normally that launches the
kernel. Inside ``recording()`` it only records the launch instead: ``kernels.aot`` runs each wrapper on tiny CPU
tensors that way and compiles exactly the signatures and constexprs the wrapper would launch, for GPUs this machine
does not have.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass
class Launch:
    """One recorded launch: the @triton.jit function, its grid, its parameters by name and the compile options."""

    kernel: Any
    grid: tuple[int, ...]
    params: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)


_recorder: list[Launch] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, wrappers record their launches into the yielded list instead of running them."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def is_interpreted(kernel: Any) -> bool:
    """True if ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (it then runs on CPU tensors through numpy)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_mode(kernel: Any) -> None:
    """Refuse a process where ``kernel`` and ``triton.language`` disagree on interpretation.

    Triton decides at decoration time: ``triton.language``'s own helpers (``tl.zeros``, ``tl.max``, …) when triton
    is first imported, our kernels when this package is. Setting TRITON_INTERPRET=1 in between (diffusers and
    bitsandbytes import triton) gives interpreted kernels calling compiled helpers, which fails at the first launch.
    """
    import triton.language as tl

    if is_interpreted(kernel) != is_interpreted(tl.zeros):
        raise ImportError(
            "TRITON_INTERPRET changed after triton was first imported (diffusers and bitsandbytes import it): set "
            "TRITON_INTERPRET=1 at process start, before anything imports triton, to interpret the kernels "
            f"(triton.language is {'interpreted' if is_interpreted(tl.zeros) else 'compiled'}, "
            f"the kernels would be {'interpreted' if is_interpreted(kernel) else 'compiled'})")


def launch(kernel: Any, grid: tuple[int, ...], params: dict[str, Any], *, num_warps: int = 4, num_stages: int = 3) -> None:
    """Launch ``kernel[grid](**params)``, or record it inside ``recording()``.

    Raises a clear error for CPU tensors when the kernel is compiled (not interpreted): compiled Triton needs a GPU.
    """
    if _recorder is not None:
        _recorder.append(Launch(kernel, tuple(grid), dict(params), {"num_warps": num_warps, "num_stages": num_stages}))
        return
    tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors of a kernel launch must be on one device, got {sorted(map(str, devices))}")
    if not is_interpreted(kernel) and any(d.type != "cuda" for d in devices):
        raise RuntimeError(
            "compiled Triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
            "before triton is first imported (the Triton interpreter)")
    if any(g == 0 for g in grid):
        return  # nothing to compute (an empty dimension)
    kernel[tuple(grid)](**params, num_warps=num_warps, num_stages=num_stages)


def next_pow2(x: int) -> int:
    """Smallest power of two ≥ x (≥ 1)."""
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)

