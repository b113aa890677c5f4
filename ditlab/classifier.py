"""The shipped Shapes-10 classifier: the project's content metric (is a generated "star" still a star?).

A small CNN; its 128-d penultimate features feed the Fréchet distance (an FID analogue, see ``metrics.py``).
Stored as ``config.json`` + ``model.safetensors`` in ``assets/classifier/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class ShapeClassifier(nn.Module):
    """Conv net on (B, 3, 32, 32) images in [-1, 1] → logits (B, num_classes)."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        w = width
        self.body = nn.Sequential(
            block(3, w), block(w, w), nn.MaxPool2d(2),  # 16×16
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8×8
            block(2 * w, feature_dim), block(feature_dim, feature_dim), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, feature_dim) pooled features."""
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> "ShapeClassifier":
        folder = Path(folder)
        model = cls(**json.loads((folder / "config.json").read_text()))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


@torch.no_grad()
def classify(model: ShapeClassifier, images_uint8: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) → (predicted labels (B,), features (B, feature_dim))."""
    preds, feats = [], []
    for i in range(0, len(images_uint8), batch_size):
        x = images_uint8[i : i + batch_size].float().div(127.5).sub(1.0)
        f = model.features(x)
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)
