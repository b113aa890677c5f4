"""Teacher–student runs over the FP teacher's own sampling trajectory, comparing transformer block outputs.

``run_teacher_student`` drives ``ditlab.sampling.sample`` with a stand-in transformer: every model call first runs
the teacher (its output continues the trajectory, so x_t is always the teacher's, CFG halves included), then hands
``step_fn`` a closure that runs the student on the very same inputs plus the two lists of block outputs
(one (B, T, C) tensor per entry of ``transformer_blocks``). VQ4DiT's calibration takes an optimiser step there;
``block_output_mse`` only measures.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DitlabError

StepFn = Callable[[Callable[[], object], list, list], None]  # (run_student, teacher block outputs, student block outputs)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """``model.transformer_blocks`` (DiT and PixArt), or DitlabError."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise DitlabError(f"block-wise calibration needs a transformer with `transformer_blocks`; {type(model).__name__} has none")
    return blocks


class _Capture:
    """Forward hooks that record every block's output (B, T, C) of one model call."""

    def __init__(self, blocks: nn.ModuleList):
        self.outputs: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(lambda _m, _i, out: self.outputs.append(out[0] if isinstance(out, tuple) else out)) for b in blocks]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def block_mse(teacher_out: Sequence[torch.Tensor], student_out: Sequence[torch.Tensor], relative: bool = False) -> torch.Tensor:
    """Mean over blocks of the MSE between student and teacher block outputs (scalar, differentiable in the student).

    relative: each block's MSE is divided by the teacher output's mean square (so high-noise steps, whose block
    outputs are orders of magnitude larger, do not dominate)."""
    if len(teacher_out) != len(student_out) or not teacher_out:
        raise DitlabError(f"block outputs disagree: teacher {len(teacher_out)}, student {len(student_out)} blocks")
    terms = [F.mse_loss(s.float(), t.float()) / (t.float().pow(2).mean().clamp_min(1e-12) if relative else 1.0)
             for s, t in zip(student_out, teacher_out)]
    return torch.stack(terms).mean()


class _TeacherStudent(nn.Module):
    """Stands in for the transformer in the sampler (see the module docstring)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, step_fn: StepFn):
        super().__init__()
        self.teacher, self.step_fn = teacher, step_fn
        self._student = [student]  # not a submodule: parameters() must yield the teacher's dtype first (sampler reads it)
        self.cap_t, self.cap_s = _Capture(transformer_blocks(teacher)), _Capture(transformer_blocks(student))

    def forward(self, *args, **kwargs):
        self.cap_t.outputs.clear()
        self.cap_s.outputs.clear()
        with torch.no_grad():
            out = self.teacher(*args, **kwargs)
        self.step_fn(lambda: self._student[0](*args, **kwargs), self.cap_t.outputs, self.cap_s.outputs)
        return out

    def remove(self) -> None:
        self.cap_t.remove()
        self.cap_s.remove()


def run_teacher_student(pipe, teacher: nn.Module, student: nn.Module, labels: Sequence[int], step_fn: StepFn, *, seed: int,
                        steps: int, guidance: float, scheduler: str | None = None) -> None:
    """One teacher sampling run (``len(labels)`` images, noise from ``seed``); ``step_fn`` is called at every step."""
    from .sampling import DEFAULT_SCHEDULER, sample

    scheduler = scheduler or DEFAULT_SCHEDULER

    runner = _TeacherStudent(teacher, student, step_fn)
    try:
        sample(pipe, list(labels), guidance=guidance, steps=steps, scheduler=scheduler, seed=seed, transformer=runner,
               decode_images=False, progress=False)
    finally:
        runner.remove()


def block_output_mse(pipe, teacher: nn.Module, student: nn.Module, labels: Sequence[int], *, seed: int = 0, steps: int = 10,
                     guidance: float = 4.0) -> float:
    """Mean over the teacher's sampling steps of ``block_mse`` (student fed the teacher's x_t); no training."""
    values = []

    def measure(run_student, t_out, s_out):
        with torch.no_grad():
            run_student()
        values.append(float(block_mse(t_out, s_out)))

    run_teacher_student(pipe, teacher, student, labels, measure, seed=seed, steps=steps, guidance=guidance)
    return sum(values) / len(values)
