"""Loading pipelines: supported layouts, clear one-line errors, and the layer listing."""

import json
import shutil

import pytest
import torch

from ditlab.errors import ModelLoadError
from ditlab.models import layer_kind, list_linears, load_pipeline
from ditlab.testing import tiny_dit_pipeline, tiny_pixart_pipeline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_dit_pipeline(tmp_path_factory.mktemp("tiny") / "dit")


def _one_line_error(source) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(source)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_missing_folder_is_one_line(tmp_path):
    assert "no such folder" in _one_line_error(tmp_path / "nope")


def test_folder_without_model_index(tmp_path):
    assert "model_index.json" in _one_line_error(tmp_path)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    assert "not a folder" in _one_line_error(f)


def test_non_dit_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    message = _one_line_error(tmp_path)
    assert "StableDiffusionPipeline" in message and "DiTPipeline" in message


def test_pickle_checkpoint_is_refused(tmp_path, tiny_dir):
    copy = tmp_path / "pickled"
    shutil.copytree(tiny_dir, copy)
    weights = next((copy / "transformer").glob("*.safetensors"))
    weights.unlink()
    torch.save({"w": torch.zeros(1)}, copy / "transformer" / "diffusion_pytorch_model.bin")
    assert "pickle" in _one_line_error(copy)


def test_truncated_safetensors_is_one_line(tmp_path, tiny_dir):
    copy = tmp_path / "truncated"
    shutil.copytree(tiny_dir, copy)
    weights = next((copy / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot load" in _one_line_error(copy)


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error("someone/not-cached-dit")
    assert "offline" in message or "cannot fetch" in message


def test_loads_dit_layout_with_labels(tiny_dir):
    pipe = load_pipeline(tiny_dir)
    assert pipe.family == "dit" and pipe.num_classes == 10 and pipe.null_class == 10
    assert pipe.label_name(3) == "class3"
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


def test_loads_latent_dit_and_pixart(tmp_path):
    latent = load_pipeline(tiny_dit_pipeline(tmp_path / "latent", with_vae=True))
    assert latent.vae is not None and latent.in_channels == 4
    pixart = load_pipeline(tiny_pixart_pipeline(tmp_path / "pixart"))
    assert pixart.family == "pixart" and pixart.text_encoder is not None and pixart.tokenizer is not None
    kinds = {layer.kind for layer in list_linears(pixart.transformer)}
    assert {"qkv", "out", "fc1", "fc2", "adaLN", "embedder", "final"} <= kinds


def test_shipped_model_layers(shipped):
    layers = list_linears(shipped.transformer)
    assert len(layers) == 6 * 9 + 2
    counts = {}
    for layer in layers:
        counts[layer.kind] = counts.get(layer.kind, 0) + 1
    assert counts == {"qkv": 18, "out": 6, "fc1": 6, "fc2": 6, "adaLN": 6, "embedder": 12, "final": 2}
    fc1 = next(l for l in layers if l.name == "transformer_blocks.0.ff.net.0.proj")
    assert fc1.shape == (768, 192) and fc1.params == 768 * 192 + 768 and fc1.block == 0


@pytest.mark.parametrize("name,kind", [
    ("transformer_blocks.3.attn1.to_k", "qkv"),
    ("transformer_blocks.3.attn2.to_v", "qkv"),
    ("transformer_blocks.3.attn1.to_out.0", "out"),
    ("transformer_blocks.0.ff.net.0.proj", "fc1"),
    ("transformer_blocks.0.ff.net.2", "fc2"),
    ("transformer_blocks.0.norm1.linear", "adaLN"),
    ("adaln_single.linear", "adaLN"),
    ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "embedder"),
    ("adaln_single.emb.timestep_embedder.linear_2", "embedder"),
    ("caption_projection.linear_1", "embedder"),
    ("proj_out_2", "final"),
])
def test_layer_kinds(name, kind):
    assert layer_kind(name) == kind
