"""VQ4DiT (AAAI 2025): k-means codebooks, candidate assignments with learnable ratios, zero-data block-wise calibration.

Per layer (the registered handler, inside ``quantize_``): k-means init exactly as the ``kmeans`` method
(``kmeans.kmeans_init``) → a ``VQLinear`` tagged ``method="vq4dit"``.

Model-wide (``calibrate_vq4dit``, after ``quantize_`` swapped the layers): each vq4dit layer becomes a
``SoftVQLinear``: for sub-vector i its n nearest codewords A_c(i, ·) (candidates), logits z_i (n,) initialised to
−log‖w_i − C[A_c(i,j)]‖ (so r ∝ 1/distance), ratios r_i = softmax(z_i) and ``ŵ_i = Σ_j r_ij C[A_c(i,j)]``. With no
data, random class labels and Gaussian noise drive the FP teacher's own sampler (DDIM, CFG as the model uses); at
every denoising step the teacher's model input x_t (both CFG halves) also goes into the student and

    loss = mean over blocks b of MSE(student block b output, teacher block b output) + reg · n · mean_free(r(1 − r))

(mean_free: over the ratios of sub-vectors not yet fixed). One RMSprop(α = 0.9) step per denoising step: logits
lr 5e-2, codebook and bias lr 1e-4. Hardening after every step: a sub-vector whose top ratio exceeds 0.99 is fixed
to its argmax; when more than 99 % of a layer is fixed the whole layer switches to hard assignments and only its
codebook (and bias) keep calibrating. At the end every layer is hardened and turned back into a ``VQLinear``.

Annealed hardening (ditlab's addition, ``anneal``): with 0.99 alone, 200 steps on the shipped tiny DiT fix only
~35 % of the sub-vectors, and the final forced argmax then destroys what the soft model learned (measured: FD 65 vs
25 for plain k-means). So from ``anneal``·T of the T optimiser steps the fixing threshold falls linearly from 0.99
to 0 at 0.8·T: every sub-vector is fixed at its current argmax by then, every layer is hard, and the last 20 % of
the steps calibrate the codebooks (and biases) of the hard model that is actually stored. ``anneal = 1`` turns
this off (pure METHODS.md).

Calibration settings live in ``LayerConfig.params`` of the vq4dit layers (all must agree): iterations (sampler runs),
samples (images per run), steps (denoising steps = optimiser steps per run), seed, guidance, reg, lr_logits,
lr_codebook, harden. ``quantize_vq4dit(pipe, recipe)`` does quantize_ + calibration in one call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import vq
from ..blockwise import block_mse, run_teacher_student
from ..errors import ConfigError
from . import register
from .kmeans import kmeans_init, layer_params

log = logging.getLogger(__name__)

QUICK_PARAMS = {"iterations": 2, "samples": 4, "steps": 10}  # the app's quick calibration (merge into params)


@dataclass(frozen=True)
class VQ4DiTSettings:
    """Model-wide calibration settings (from ``LayerConfig.params``; defaults = METHODS.md + the measured default length)."""

    iterations: int = 8  # sampler runs (each: new random labels and noise)
    samples: int = 8  # images per run (the model batch is 2× with CFG)
    steps: int = 25  # denoising steps per run = optimiser steps per run
    seed: int = 0
    guidance: float = 4.0
    reg: float = 1.0  # weight of the ratio regulariser n·mean(r(1−r)) (1 = as specified)
    lr_logits: float = 5e-2
    lr_codebook: float = 1e-4
    harden: float = 0.99  # top-ratio threshold that fixes a sub-vector; also the fixed fraction that hardens a layer
    anneal: float = 0.5  # fraction of the steps after which the threshold decays to 0 (at 0.8); 1 = never
    relative: bool = False  # divide each block's MSE by the teacher output's mean square (not in METHODS.md)
    scheduler: str = "ddim"

    @classmethod
    def from_params(cls, params: dict, layer: str | None = None) -> "VQ4DiTSettings":
        """Validated settings from a params dict (other keys are ignored here; ``layer_params`` checks them)."""
        values = {}
        for key, lo, hi in _RULES:
            if key in params:
                v, integer = params[key], isinstance(getattr(cls, key), int)
                if not (isinstance(v, int if integer else (int, float)) and not isinstance(v, bool) and lo <= v <= hi):
                    raise ConfigError.invalid(f"params.{key}", v, f"{'an integer' if integer else 'a number'} from {lo} to {hi}", layer)
                values[key] = v if integer else float(v)
        if "relative" in params:
            if not isinstance(params["relative"], bool):
                raise ConfigError.invalid("params.relative", params["relative"], "true or false", layer)
            values["relative"] = params["relative"]
        return cls(**values)


_RULES = (("iterations", 1, 1000), ("samples", 1, 256), ("steps", 1, 1000), ("seed", 0, 2**31 - 1), ("guidance", 0.0, 50.0),
          ("reg", 0.0, 1e6), ("lr_logits", 1e-8, 10.0), ("lr_codebook", 0.0, 1.0), ("harden", 0.5, 1.0), ("anneal", 0.0, 1.0))  # (key, min, max)


@register("vq4dit")
def quantize_vq4dit_layer(linear: nn.Linear, cfg, stats=None) -> vq.VQLinear:
    """Layer-local part of VQ4DiT: the k-means initialisation (calibration follows in ``calibrate_vq4dit``)."""
    p = layer_params(cfg, linear.out_features, linear.in_features)
    codebook, assignments = kmeans_init(linear.weight, p)
    return vq.VQLinear.from_parts(assignments, codebook, linear.bias, method="vq4dit")


class SoftVQLinear(nn.Module):
    """A VQ layer under calibration: Ŵ (N, K) from n candidate codewords per sub-vector mixed by softmax ratios."""

    def __init__(self, weight: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None, n_candidates: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.d = codebook.shape[1]
        x = vq.subvectors(weight, self.d)  # (M, d) the FP sub-vectors
        cand, d2 = vq.nearest_codewords(x, codebook.float(), n_candidates)  # (M, n), nearest first
        # r ∝ 1/distance ⇔ z = −log distance; the clamp keeps an exact hit finite (it then fixes at once)
        self.logits = nn.Parameter(-0.5 * d2.clamp_min(1e-24).log())  # (M, n)
        self.codebook = nn.Parameter(codebook.detach().float().clone())  # (k, d)
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        self.register_buffer("candidates", cand)  # (M, n) int64 codeword indices
        self.register_buffer("fixed", torch.zeros(cand.shape[0], dtype=torch.bool))  # (M,)
        self.register_buffer("hard_pos", torch.zeros(cand.shape[0], dtype=torch.long))  # (M,) chosen candidate slot
        self.hard = False  # the whole layer uses hard assignments (only codebook and bias still learn)

    @property
    def n_candidates(self) -> int:
        return self.candidates.shape[1]

    def hard_index(self) -> torch.Tensor:
        """(M,) codeword index of each sub-vector's chosen candidate (meaningful where ``fixed``)."""
        return self.candidates.gather(1, self.hard_pos[:, None]).squeeze(1)

    def ratios(self) -> torch.Tensor:
        """Effective ratios (M, n): softmax(z) for free sub-vectors, one-hot at the chosen slot for fixed ones."""
        r = torch.softmax(self.logits.detach(), dim=1)
        one_hot = F.one_hot(self.hard_pos, self.n_candidates).to(r.dtype)
        return torch.where(self.fixed[:, None], one_hot, r)

    def weight(self) -> torch.Tensor:
        """Ŵ (N, K) float32, differentiable in the logits (free sub-vectors), the codebook and nothing else."""
        hard_w = self.codebook[self.hard_index()]  # (M, d)
        if self.hard:
            w = hard_w
        else:
            r = torch.softmax(self.logits, dim=1)  # (M, n)
            soft_w = (r.unsqueeze(-1) * self.codebook[self.candidates]).sum(1)  # (M, d) = Σ_j r_ij C[A_c(i,j)]
            w = torch.where(self.fixed[:, None], hard_w, soft_w)  # fixed rows pass no gradient to their logits
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight(), self.bias).to(x.dtype)

    def regulariser(self) -> tuple[torch.Tensor, int]:
        """(n · Σ r(1−r) over the free sub-vectors' ratios, number of those ratio entries)."""
        if self.hard:
            return self.logits.new_zeros(()), 0
        r = torch.softmax(self.logits, dim=1)[~self.fixed]  # (M_free, n)
        return self.n_candidates * (r * (1 - r)).sum(), r.numel()

    @torch.no_grad()
    def harden(self, threshold: float = 0.99, force: bool = False, layer_threshold: float | None = None) -> int:
        """Fixes free sub-vectors whose top ratio exceeds ``threshold`` (all of them if ``force``); when more than
        ``layer_threshold`` (default: ``threshold``) of the layer is fixed, fixes the rest at their argmax and
        switches the layer to hard. Returns the number of sub-vectors fixed now."""
        if self.hard:
            return 0
        top, pos = torch.softmax(self.logits, dim=1).max(1)
        new = ~self.fixed & ((top > threshold) | force)
        self.hard_pos[new] = pos[new]
        self.fixed |= new
        count = int(new.sum())
        if float(self.fixed.float().mean()) > (threshold if layer_threshold is None else layer_threshold) or force:
            rest = ~self.fixed
            self.hard_pos[rest] = pos[rest]
            self.fixed[:] = True
            count += int(rest.sum())
            self.hard = True
        return count

    def to_vqlinear(self) -> vq.VQLinear:
        """Hardens everything and returns the stored form (indices (N, K/d): uint8, or packed at 6 bits when k ≤ 64;
        fp16 codebook; bias)."""
        self.harden(force=True)
        assignments = self.hard_index().reshape(self.out_features, self.in_features // self.d)
        return vq.VQLinear.from_parts(assignments, self.codebook.detach(), None if self.bias is None else self.bias.detach(), method="vq4dit")


@dataclass
class CalibrationLog:
    """Per optimiser step: loss terms and the fixed fraction; totals at the end."""

    steps: list[dict] = field(default_factory=list)  # {"step", "timestep", "mse", "reg", "fixed"}
    layers: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _vq4dit_plan(teacher: nn.Module, recipe) -> dict:
    """{layer name: VQLayerParams} of the vq4dit layers of a recipe over ``teacher`` (validated)."""
    from ..quantize import plan_for

    plan = plan_for(teacher, recipe)
    shapes = {n: m.weight.shape for n, m in teacher.named_modules() if isinstance(m, nn.Linear)}
    return {n: (c, layer_params(c, *shapes[n], layer=n)) for n, c in plan.items() if c is not None and c.method in ("vq4dit", "kmeans")}


def settings_for(teacher: nn.Module, recipe) -> VQ4DiTSettings | None:
    """The calibration settings shared by the recipe's vq4dit layers (None if it has none); every layer's params
    are validated, and layers that disagree on a calibration key raise ConfigError naming it."""
    found = None
    for name, (cfg, _) in _vq4dit_plan(teacher, recipe).items():
        if cfg.method != "vq4dit":
            continue
        s = VQ4DiTSettings.from_params(cfg.params, layer=name)
        if found is not None and s != found[1]:
            key = next(f.name for f in fields(s) if getattr(s, f.name) != getattr(found[1], f.name))
            raise ConfigError.invalid(f"params.{key}", getattr(s, key), f"{getattr(found[1], key)!r} as in layer {found[0]!r} "
                                      "(calibration is model-wide: every vq4dit layer needs the same value)", name)
        found = found or (name, s)
    return None if found is None else found[1]


def calibrate_vq4dit(pipe, model_q: nn.Module, teacher: nn.Module, settings: VQ4DiTSettings, progress=None,
                     n_candidates: dict[str, int] | None = None) -> CalibrationLog:
    """Zero-data block-wise calibration of every ``VQLinear`` with method "vq4dit" in ``model_q`` (in place).

    teacher: the FP transformer with the same layer names (read-only; its weights give the candidate sets).
    n_candidates: layer name → n (default 2). progress: None/True → tqdm bar, False → silent, or a callable
    ``(done, total, text)``. Returns the per-step log. Needs a class-conditional DiT (random labels).
    """
    if pipe.family != "dit" or pipe.num_classes < 1:
        raise ConfigError.invalid("model", pipe.family, "a class-conditional DiT (VQ4DiT calibrates with random class labels)")
    t0 = time.perf_counter()
    model_q.eval().requires_grad_(False)
    soft: dict[str, SoftVQLinear] = {}
    for name, module in list(model_q.named_modules()):
        if isinstance(module, vq.VQLinear) and module.method == "vq4dit":
            n = (n_candidates or {}).get(name, 2)
            layer = SoftVQLinear(teacher.get_submodule(name).weight, module.codebook, module.bias, min(n, module.num_codes))
            soft[name] = layer
            _set_module(model_q, name, layer)
    result = CalibrationLog(layers=len(soft), settings=asdict(settings))
    if not soft:
        return result
    opt = torch.optim.RMSprop([{"params": [s.logits for s in soft.values()], "lr": settings.lr_logits},
                               {"params": [p for s in soft.values() for p in (s.codebook, s.bias) if p is not None], "lr": settings.lr_codebook}],
                              alpha=0.9)
    total = settings.iterations * settings.steps
    callback = progress if callable(progress) else None
    bar = tqdm(total=total, desc="VQ4DiT calibration", disable=progress is False or callback is not None, leave=False)

    def step(run_student, t_out, s_out):
        with torch.enable_grad():
            run_student()
            mse = block_mse(t_out, s_out, relative=settings.relative)
            parts = [s.regulariser() for s in soft.values()]
            count = sum(c for _, c in parts)
            reg = sum(v for v, _ in parts) / count if count else mse.new_zeros(())  # n · mean(r(1−r)) over free ratios
            loss = mse + settings.reg * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        frac = len(result.steps) / total  # annealed threshold: 0.99 until `anneal`, then linearly to 0 at 0.8 (see top)
        span = max(0.8 - settings.anneal, 1e-9)
        threshold = settings.harden if frac < settings.anneal else settings.harden * max(0.0, 1 - (frac - settings.anneal) / span)
        for s in soft.values():
            s.harden(threshold, layer_threshold=settings.harden)
        fixed = sum(int(s.fixed.sum()) for s in soft.values()) / sum(s.fixed.numel() for s in soft.values())
        result.steps.append({"step": len(result.steps), "mse": float(mse), "reg": float(reg), "fixed": fixed,
                             "hard_layers": sum(s.hard for s in soft.values())})
        bar.update(1)
        bar.set_postfix(mse=f"{float(mse):.3g}", fixed=f"{fixed:.1%}")
        if callback is not None:
            callback(len(result.steps), total, f"VQ4DiT calibration step {len(result.steps)}/{total}")

    gen = torch.Generator().manual_seed(settings.seed)
    try:
        for it in range(settings.iterations):
            labels = torch.randint(pipe.num_classes, (settings.samples,), generator=gen).tolist()
            run_teacher_student(pipe, teacher, model_q, labels, step, seed=settings.seed * 1000 + it + 1, steps=settings.steps,
                                guidance=settings.guidance, scheduler=settings.scheduler)
    finally:
        bar.close()
        for name, s in soft.items():  # hardened, stored form (also after an interruption)
            _set_module(model_q, name, s.to_vqlinear())
        model_q.eval().requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    last = result.steps[-1]
    log.info("VQ4DiT: calibrated %d layers in %d steps, %.1fs; last block MSE %.4g, %.1f%% fixed before the final hardening",
             len(soft), len(result.steps), result.seconds, last["mse"], 100 * last["fixed"])
    return result


def needs_calibration(transformer: nn.Module, recipe) -> bool:
    """True if ``recipe`` puts any layer of ``transformer`` on method vq4dit (then use ``quantize_vq4dit``)."""
    return any(cfg.method == "vq4dit" for cfg, _ in _vq4dit_plan(transformer, recipe).values())


def quantize_vq4dit(pipe, recipe, progress=None):
    """``quantize_`` of ``pipe.transformer`` with ``recipe`` followed by the VQ4DiT calibration of its vq4dit layers.

    Returns ``(quantized transformer, QuantReport)``; ``report.seconds`` includes the calibration and the
    calibration log is kept on the model as ``model.ditlab_calibration`` (a ``CalibrationLog``). Works for any
    recipe (no vq4dit layer → no calibration). progress: as in ``quantize_`` (True/None bar, False, or a callable).
    """
    from ..config import load_recipe
    from ..quantize import quantize_

    recipe = load_recipe(recipe)
    teacher = pipe.transformer
    settings = settings_for(teacher, recipe)  # validates every VQ layer's params before any work
    plan = _vq4dit_plan(teacher, recipe)
    model, report = quantize_(teacher, recipe, progress=progress)
    calib = CalibrationLog()
    if settings is not None:
        n_cand = {name: p.n_candidates for name, (cfg, p) in plan.items() if cfg.method == "vq4dit"}
        calib = calibrate_vq4dit(pipe, model, teacher, settings, progress, n_candidates=n_cand)
        report.seconds += calib.seconds
    model.ditlab_calibration = calib
    return model, report
