"""Scoring generated images: FP vs quantized on the same seeds and labels (PSNR, SSIM), and content metrics with the
shipped classifier (accuracy on the intended labels, Fréchet distance of classifier features to real images).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from . import data, metrics
from .classifier import ShapeClassifier, classify
from .errors import ConfigError
from .models import SHIPPED_CLASSIFIER, Pipeline
from .sampling import DEFAULT_SCHEDULER, check_count, check_guidance, check_scheduler, check_seed, check_steps

REAL_SEED = 1  # the classifier's held-out data seed: the reference set for the Fréchet distance
N_REAL = 2000


@functools.lru_cache(maxsize=1)
def load_classifier(folder: str | None = None) -> ShapeClassifier:
    """The shipped Shapes-10 classifier (eval mode)."""
    return ShapeClassifier.load(folder or SHIPPED_CLASSIFIER)


def eval_labels(num_classes: int, n_per_label: int) -> list[int]:
    """The evaluation label list: ``n_per_label`` images of every class, class-major (0,0,…,1,1,…)."""
    return [c for c in range(num_classes) for _ in range(n_per_label)]


@functools.lru_cache(maxsize=2)
def real_features(n: int = N_REAL, seed: int = REAL_SEED) -> tuple[torch.Tensor, float]:
    """Classifier features of ``n`` real Shapes-10 images (seed ``seed``) and the classifier's accuracy on them."""
    images, labels = data.make_dataset(n, seed)
    pred, feats = classify(load_classifier(), images)
    return feats, metrics.accuracy(pred, labels)


def check_scorable(pipe: Pipeline) -> None:
    """The shipped classifier scores Shapes-10 images only: 10 classes of 32×32 RGB."""
    if pipe.family != "dit" or pipe.num_classes != len(data.CLASSES) or pipe.sample_size * (8 if pipe.vae else 1) != data.IMAGE_SIZE:
        raise ConfigError.invalid("model", pipe.source, "a Shapes-10 model (10 classes, 32×32) for classifier metrics; "
                                  "other models get PSNR/SSIM vs FP only")


def content_metrics(images: torch.Tensor, labels: Sequence[int], *, with_fd: bool = True) -> dict:
    """Classifier accuracy of uint8 ``images`` (B, 3, 32, 32) on their intended labels, the predictions (B,) and, with
    ``with_fd`` (needs B ≥ 2), the Fréchet distance of their classifier features to real images."""
    pred, feats = classify(load_classifier(), images)
    out = {"class_acc": metrics.accuracy(pred, torch.as_tensor(list(labels))), "pred": pred}
    if with_fd:
        out["fd"] = metrics.frechet_distance(feats, real_features()[0])
    return out


@dataclass(frozen=True)
class SampleSettings:
    """What an evaluation samples: identical for the FP and the quantized model."""

    n_per_label: int = 10
    steps: int = 25
    guidance: float = 4.0
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER

    def __post_init__(self):
        """Checked on construction: a bad value is a ConfigError naming the field, before any sampling."""
        check_count(self.n_per_label, "n_per_label", 1, 10_000)
        check_steps(self.steps)
        check_guidance(self.guidance)
        check_seed(self.seed)
        check_scheduler(self.scheduler)
        for name, kind in (("n_per_label", int), ("steps", int), ("guidance", float), ("seed", int)):  # numpy / torch → Python
            object.__setattr__(self, name, kind(getattr(self, name)))  # (results stay JSON-ready; equal settings hash alike)


def fidelity(fp_images: torch.Tensor, q_images: torch.Tensor, fp_pred: torch.Tensor | None = None, q_pred: torch.Tensor | None = None) -> dict:
    """PSNR and SSIM of quantized vs FP images (same seeds/labels) and, given predictions, classifier agreement."""
    out = {"psnr": metrics.psnr(fp_images, q_images), "ssim": metrics.ssim(fp_images, q_images)}
    if fp_pred is not None and q_pred is not None:
        out["class_agreement"] = metrics.accuracy(q_pred, fp_pred)
    return out
