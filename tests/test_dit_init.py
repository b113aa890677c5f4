"""DiT's adaLN-Zero reference init (ditlab/dit_init.py): blocks start as the identity and the model predicts 0."""

import dataclasses

import torch

from ditlab import train


def _tiny_cfg(init: str) -> train.TrainConfig:
    return dataclasses.replace(train.TrainConfig(), hidden_heads=2, head_dim=16, num_layers=2, init=init)


def test_adaln_zero_blocks_are_identity_and_output_is_zero():
    torch.manual_seed(0)
    model = train.build_dit(_tiny_cfg("adaln-zero")).eval()
    x, t, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        assert torch.equal(model(x, timestep=t, class_labels=y).sample, torch.zeros_like(x))
        tokens = model.pos_embed(x)
        out = model.transformer_blocks[0](tokens, timestep=t, class_labels=y)
    assert torch.equal(out, tokens)
    table = model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight
    assert 0.01 < table.std().item() < 0.03


def test_diffusers_init_is_not_identity_and_bad_init_is_named():
    torch.manual_seed(0)
    model = train.build_dit(_tiny_cfg("diffusers")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([10, 20]), class_labels=torch.tensor([1, 2])).sample
    assert out.abs().max() > 0  # what the shipped model started from: random gates and output layer
    try:
        train.build_dit(_tiny_cfg("zero"))
    except ValueError as err:
        assert "init" in str(err) and "adaln-zero" in str(err)
    else:
        raise AssertionError("an unknown init was accepted")
