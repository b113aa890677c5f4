"""Scale check without downloads: the DiT-XL/2 architecture (random weights) loads into ditlab and samples."""

import pytest
import torch

from ditlab.models import Pipeline, list_linears
from ditlab.sampling import sample
from ditlab.testing import dit_xl_2_config


@pytest.mark.slow
def test_dit_xl_2_architecture_lists_254_linears_and_runs_a_sampler_step():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**dit_xl_2_config()).eval().requires_grad_(False)
    assert sum(p.numel() for p in model.parameters()) > 670e6  # ≈ 675M (750M with the per-block embedders counted by diffusers' docs)
    layers = list_linears(model)
    assert len(layers) == 254
    kinds = {}
    for layer in layers:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    assert kinds == {"qkv": 84, "out": 28, "fc1": 28, "fc2": 28, "adaLN": 28, "embedder": 56, "final": 2}
    assert next(l for l in layers if l.name.endswith("ff.net.0.proj")).shape == (4608, 1152)
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False}
    pipe = Pipeline(transformer=model, scheduler_config=scheduler, family="dit", source="DiT-XL/2 (random weights)")
    result = sample(pipe, [207], steps=1, guidance=4.0, decode_images=False, progress=False)
    assert result.latents.shape == (1, 4, 32, 32) and torch.isfinite(result.latents).all()
