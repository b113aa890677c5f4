"""Step-level module switching for sensitivity runs (``ditlab.sensitivity``).

``Replay`` wraps a transformer and is the sampler's StepHook: it records every step's raw output in an FP run and
replays those outputs for the steps before a cell's timestep group, so the sampler reproduces the FP latents bit for
bit and a cell costs only the steps from its group's start. ``Switch`` swaps one linear between its FP and quantized
version per step; ``PerGroup`` sends each step to the model of its timestep group (a per-step precision schedule).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .sampling import StepContext


class Switch(nn.Module):
    """Calls the FP or the quantized module (``active``); set per step by ``Replay.before``."""

    def __init__(self, fp: nn.Module, q: nn.Module):
        super().__init__()
        self.fp, self.q, self.active = fp, q, False

    def forward(self, x):
        return self.q(x) if self.active else self.fp(x)


class Replay(nn.Module):
    """Wraps the transformer and is the run's StepHook: records the raw output of every step (FP run), or replays
    the recorded outputs for the steps before ``start``; switches the quantized modules on during ``active`` steps
    and keeps the guided ε of those steps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.step, self.record, self.start = model, 0, False, 0
        self.outputs: dict[int, torch.Tensor] = {}
        self.switches: list[Switch] = []
        self.active: set[int] = set()
        self.eps: dict[int, torch.Tensor] = {}

    def forward(self, *args, **kwargs):
        if self.step < self.start:
            return (self.outputs[self.step].clone(),)  # the identical tensor → the identical scheduler update
        out = self.model(*args, **kwargs)
        if self.record:
            self.outputs[self.step] = out[0].detach().clone()
        return out

    def watch(self, switches: Sequence[Switch], active: Sequence[int], record: bool = False) -> dict[int, torch.Tensor]:
        """Arms the next sampling run; returns the dict that will receive ε (step → (B, C, H, W))."""
        self.switches, self.active, self.record = list(switches), set(active), record
        self.start = 0 if record or not self.active else min(self.active)
        self.eps = {}
        return self.eps

    def before(self, ctx: StepContext) -> None:
        self.step = ctx.index
        for sw in self.switches:
            sw.active = ctx.index in self.active

    def after(self, ctx: StepContext, latents: torch.Tensor, model_output: torch.Tensor) -> None:
        if ctx.index in self.active or self.record:
            self.eps[ctx.index] = model_output.detach().clone()


class PerGroup(nn.Module):
    """Dispatches every step to the model of its timestep group (a per-step precision switch)."""

    def __init__(self, models: Sequence[nn.Module], groups: list[list[int]]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.group_of = {s: g for g, steps in enumerate(groups) for s in steps}
        self.step = 0

    def forward(self, *args, **kwargs):
        return self.models[self.group_of[self.step]](*args, **kwargs)

    def before(self, ctx: StepContext) -> None:  # StepHook
        self.step = ctx.index

    def after(self, ctx: StepContext, latents, model_output) -> None:
        pass


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
