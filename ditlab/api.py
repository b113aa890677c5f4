"""The few entry points that the app, the CLI and users call: load, sample, evaluate (quantize comes next).

Everything here returns plain data (tensors, dicts, dataclasses); nothing imports gradio.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from . import data, metrics
from .classifier import ShapeClassifier, classify
from .models import SHIPPED_CLASSIFIER, LayerInfo, Pipeline, list_linears, load_pipeline
from .sampling import SampleResult, image_grid, sample

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 25
REAL_SEED = 1  # the classifier's held-out data seed: the reference set for the Fréchet distance
N_REAL = 2000

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "LayerInfo",
    "Pipeline",
    "SampleResult",
    "evaluate",
    "generate",
    "image_grid",
    "layers",
    "load",
    "load_classifier",
    "model_info",
]


@functools.lru_cache(maxsize=4)
def load(source: str | None = None) -> Pipeline:
    """Loads (and caches per process) a pipeline; see ``models.load_pipeline``. Treat the result as read-only."""
    return load_pipeline(source)


@functools.lru_cache(maxsize=1)
def load_classifier(folder: str | None = None) -> ShapeClassifier:
    """The shipped Shapes-10 classifier (eval mode)."""
    return ShapeClassifier.load(folder or SHIPPED_CLASSIFIER)


def layers(pipe: Pipeline) -> list[LayerInfo]:
    """The quantizable linear layers of the pipeline's transformer, in module order."""
    return list_linears(pipe.transformer)


def model_info(pipe: Pipeline) -> dict:
    """A JSON-ready summary: family, config, parameter counts, labels and the linear layers."""
    cfg = pipe.transformer.config
    linears = layers(pipe)
    return {
        "source": pipe.source,
        "family": pipe.family,
        "transformer": type(pipe.transformer).__name__,
        "params": sum(p.numel() for p in pipe.transformer.parameters()),
        "linear_params": sum(layer.params for layer in linears),
        "num_linears": len(linears),
        "sample_size": int(cfg.sample_size),
        "in_channels": int(cfg.in_channels),
        "patch_size": int(cfg.patch_size),
        "num_layers": int(cfg.num_layers),
        "hidden_size": int(cfg.num_attention_heads * cfg.attention_head_dim),
        "has_vae": pipe.vae is not None,
        "num_classes": pipe.num_classes,
        "labels": {str(k): v for k, v in sorted(pipe.labels.items())},
        "layers": [{"name": l.name, "kind": l.kind, "shape": list(l.shape), "params": l.params, "block": l.block} for l in linears],
    }


def generate(
    pipe: Pipeline,
    labels: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    scheduler: str = "ddim",
    transformer: torch.nn.Module | None = None,
    progress: bool = True,
    **kwargs,
) -> SampleResult:
    """Samples one image per label with the pipeline's (or the given) transformer."""
    return sample(pipe, labels, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed, transformer=transformer, progress=progress, **kwargs)


def eval_labels(num_classes: int, n_per_label: int) -> list[int]:
    """The evaluation label list: ``n_per_label`` images of every class, class-major (0,0,…,1,1,…)."""
    return [c for c in range(num_classes) for _ in range(n_per_label)]


@functools.lru_cache(maxsize=2)
def real_features(n: int = N_REAL, seed: int = REAL_SEED) -> tuple[torch.Tensor, float]:
    """Classifier features of ``n`` real Shapes-10 images (seed ``seed``) and the classifier's accuracy on them."""
    images, labels = data.make_dataset(n, seed)
    pred, feats = classify(load_classifier(), images)
    return feats, metrics.accuracy(pred, labels)


def content_metrics(images: torch.Tensor, labels: Sequence[int]) -> dict:
    """Classifier accuracy of ``images`` on their intended labels and the Fréchet distance to real images."""
    pred, feats = classify(load_classifier(), images)
    real, _ = real_features()
    return {"class_acc": metrics.accuracy(pred, torch.as_tensor(list(labels))), "fd": metrics.frechet_distance(feats, real), "pred": pred}


def evaluate(
    pipe: Pipeline,
    *,
    n_per_label: int = 10,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    scheduler: str = "ddim",
    progress: bool = True,
) -> dict:
    """Generates ``n_per_label`` images per class with the FP model and scores them with the shipped classifier.

    Returns ``class_acc_fp``, ``fd_fp``, ``class_acc_real`` (classifier on real held-out data), ``seconds_sample``
    and ``n_images``. Only models with Shapes-10 labels can be scored by the shipped classifier.
    """
    labels = eval_labels(pipe.num_classes, n_per_label)
    t0 = time.perf_counter()
    result = generate(pipe, labels, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler, progress=progress)
    seconds = time.perf_counter() - t0
    content = content_metrics(result.images, labels)
    _, real_acc = real_features()
    return {
        "model": pipe.source,
        "recipe": "fp",
        "class_acc_fp": content["class_acc"],
        "fd_fp": content["fd"],
        "class_acc_real": real_acc,
        "seconds_sample": seconds,
        "n_images": len(labels),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "scheduler": scheduler,
    }


def save_grid(images: torch.Tensor, path: str | Path, rows: int, scale: int = 2) -> Path:
    """Writes a PNG grid of uint8 images (B, 3, H, W) with ``rows`` rows; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, rows, scale=scale)).save(path)
    return path


def label_choices(pipe: Pipeline) -> list[tuple[str, int]]:
    """(display name, class id) pairs for pickers."""
    return [(f"{i}: {pipe.label_name(i)}", i) for i in range(pipe.num_classes)]


def generate_grid(
    pipe: Pipeline,
    labels: Sequence[int],
    n_per_label: int,
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    scheduler: str = "ddim",
    scale: int = 3,
) -> tuple["object", dict]:
    """One row per label of ``n_per_label`` images → (uint8 grid array (H, W, 3), info dict with seconds and seed)."""
    from .errors import ConfigError

    if not labels:
        raise ConfigError.invalid("labels", list(labels), "pick at least one class")
    if not 1 <= int(n_per_label) <= 16:
        raise ConfigError.invalid("images per label", n_per_label, "1 to 16")
    batch = [int(y) for y in labels for _ in range(int(n_per_label))]
    result = generate(pipe, batch, steps=int(steps), guidance=float(guidance), seed=int(seed), scheduler=scheduler)
    info = {"seconds": round(result.seconds, 2), "seed": int(seed), "n_images": len(batch), "path": "fp32 (torch, CPU)"}
    return image_grid(result.images, rows=len(labels), scale=scale), info
