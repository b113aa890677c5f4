"""The sampler: determinism, CFG branches seen by hooks, schedulers, validation."""

import numpy as np
import pytest
import torch

from ditlab.errors import ConfigError
from ditlab.models import load_pipeline
from ditlab.sampling import MAX_SEED, initial_noise, sample
from ditlab.testing import tiny_dit_pipeline, tiny_pixart_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_pipeline(tiny_dit_pipeline(tmp_path_factory.mktemp("s") / "dit"))


def test_same_seed_same_images(tiny):
    a = sample(tiny, [0, 1, 2], steps=4, seed=5, progress=False)
    b = sample(tiny, [0, 1, 2], steps=4, seed=5, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    c = sample(tiny, [0, 1, 2], steps=4, seed=6, progress=False)
    assert not torch.equal(a.latents, c.latents)


def test_noise_of_an_image_does_not_depend_on_the_batch():
    assert torch.equal(initial_noise((3, 4, 4), 9, 5)[3], initial_noise((3, 4, 4), 9, 4)[3])


def test_seeds_are_32_bit_and_never_alias(tiny):
    """0 … 2³²−1 are distinct seeds; anything else is refused by name (it used to wrap: 2³² gave seed 0's images)."""
    assert not torch.equal(initial_noise((3, 4, 4), 0, 1), initial_noise((3, 4, 4), MAX_SEED, 1))
    sample(tiny, [0], steps=1, seed=MAX_SEED, progress=False)
    for bad in (-1, MAX_SEED + 1, 2**70, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="seed"):
            sample(tiny, [0], steps=1, seed=bad, progress=False)


def test_image_barely_depends_on_batch_composition(tiny):
    alone = sample(tiny, [4], steps=3, seed=2, progress=False).latents
    in_batch = sample(tiny, [4, 7, 1], steps=3, seed=2, progress=False).latents[:1]
    assert torch.allclose(alone, in_batch, atol=1e-4)


def test_hooks_see_every_step_and_cfg_layout(tiny):
    seen = []

    class Hook:
        def before(self, ctx):
            seen.append(("before", ctx.index, ctx.timestep, ctx.batch_size, ctx.cfg))

        def after(self, ctx, latents, eps):
            seen.append(("after", ctx.index, tuple(latents.shape)))

    sample(tiny, [0, 1], steps=5, guidance=3.0, seed=0, hooks=[Hook()], progress=False)
    befores = [s for s in seen if s[0] == "before"]
    assert [s[1] for s in befores] == list(range(5))
    assert all(s[3] == 2 and s[4] for s in befores)
    assert len({s[2] for s in befores}) == 5  # distinct timesteps
    assert all(s[2] == (2, 3, 16, 16) for s in seen if s[0] == "after")


def test_guidance_one_runs_a_single_branch(tiny):
    calls = []
    handle = tiny.transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        sample(tiny, [0, 1], steps=2, guidance=1.0, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2


def test_dpm_solver_and_ddim_both_work_and_differ(tiny):
    a = sample(tiny, [3], steps=6, scheduler="ddim", progress=False)
    b = sample(tiny, [3], steps=6, scheduler="dpm++", progress=False)
    assert a.images.shape == b.images.shape and not torch.equal(a.latents, b.latents)


def test_trajectory_is_recorded(tiny):
    result = sample(tiny, [1], steps=4, record_trajectory=True, progress=False)
    assert len(result.trajectory) == 4 and torch.equal(result.trajectory[-1], result.latents)


@pytest.mark.parametrize("kwargs,field", [
    ({"labels": [10]}, "labels"),
    ({"labels": []}, "labels"),
    ({"labels": [0], "steps": 0}, "steps"),
    ({"labels": [0], "scheduler": "euler-x"}, "scheduler"),
    ({"labels": [0], "guidance": -1.0}, "guidance"),
    ({"labels": [2.7]}, "labels"),  # was silently class 2
    ({"labels": [True]}, "labels"),  # was class 1
    ({"labels": ["3"]}, "labels"),
    ({"labels": 3}, "labels"),
    ({"labels": "circle"}, "labels"),
    ({"labels": np.array([[1, 2]])}, "labels"),
    ({"labels": [0], "steps": 2.0}, "steps"),
    ({"labels": [0], "guidance": "4"}, "guidance"),
    ({"labels": [0], "guidance": None}, "guidance"),
    ({"labels": [0], "guidance": float("nan")}, "guidance"),
    ({"labels": [0], "prompts": ["a red circle"]}, "prompts"),  # a DiT takes labels: prompts were ignored
])
def test_bad_requests_name_the_field(tiny, kwargs, field):
    with pytest.raises(ConfigError) as info:
        sample(tiny, progress=False, **kwargs)
    assert info.value.field == field


def test_labels_steps_and_guidance_from_numpy_and_torch_are_taken(tiny):
    """Notebook values: numpy / torch integer arrays and scalars are the same request as Python ints."""
    ref = sample(tiny, [1, 2], steps=2, guidance=3.0, progress=False).latents
    for labels, steps, guidance in ((np.array([1, 2]), np.int64(2), np.float32(3.0)), (torch.tensor([1, 2]), torch.tensor(2), 3)):
        assert torch.equal(sample(tiny, labels, steps=steps, guidance=guidance, progress=False).latents, ref)


def test_pixart_prompts(tmp_path):
    pipe = load_pipeline(tiny_pixart_pipeline(tmp_path / "pixart"))
    a = sample(pipe, prompts=["a red circle", "the big blue star"], steps=3, seed=1, progress=False)
    b = sample(pipe, prompts=["a red circle", "the big blue star"], steps=3, seed=1, progress=False)
    assert a.images.shape == (2, 3, 16, 16) and torch.equal(a.images, b.images)
    with pytest.raises(ConfigError):
        sample(pipe, labels=[0], progress=False)
