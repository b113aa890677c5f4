"""Bad model sources beyond tests/test_models.py: corrupted safetensors headers, pickles (never unpickled), broken
JSON files, weights of another model, models too big for memory (refused before allocating, with the estimate),
and non-finite activations met during calibration (named layer, through the CLI too)."""

import json
import pickle
import shutil
import struct

import pytest
import torch

from ditlab import models
from ditlab.errors import CalibrationError, ModelLoadError
from ditlab.models import estimate_params, list_linears, load_pipeline
from ditlab.testing import dit_xl_2_config, tiny_dit_pipeline, tiny_pixart_pipeline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_dit_pipeline(tmp_path_factory.mktemp("sources") / "dit")


@pytest.fixture
def copy(tmp_path, tiny_dir):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dir, folder)
    return folder


def _weights(folder):
    return next((folder / "transformer").glob("*.safetensors"))


def _one_line(source) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(source)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and len(message) < 400, message
    return message


# ---------------------------------------------------------------- damaged weights
@pytest.mark.parametrize("damage", ["huge header length", "header not JSON", "header lies about offsets", "zero bytes", "random bytes"])
def test_corrupted_safetensors_is_one_line(copy, damage):
    path = _weights(copy)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if damage == "huge header length":
        data = struct.pack("<Q", 2**62) + data[8:]
    elif damage == "header not JSON":
        data = data[:8] + b"\xff" * n + data[8 + n:]
    elif damage == "header lies about offsets":
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, 10**12]
        raw = json.dumps(header).encode().ljust(n)[:n] if len(json.dumps(header)) <= n else json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    elif damage == "zero bytes":
        data = b""
    else:
        data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(data)
    message = _one_line(copy)
    assert "cannot load DiTTransformer2DModel" in message and str(copy) in message


def test_weights_of_another_model_are_one_line(copy, tmp_path):
    other = tiny_dit_pipeline(tmp_path / "other", num_classes=3)  # a smaller label table: shapes differ
    shutil.copy(_weights(other), _weights(copy))
    assert "cannot load DiTTransformer2DModel" in _one_line(copy)


class _Payload:
    """Unpickling this writes a file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.pt", "diffusion_pytorch_model.pth", "model.ckpt", "diffusion_pytorch_model.safetensors"])
def test_pickles_are_refused_and_never_unpickled(copy, tmp_path, name):
    marker = tmp_path / "unpickled"
    _weights(copy).unlink()
    (copy / "transformer" / name).write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    message = _one_line(copy)
    assert ("pickle" in message) if not name.endswith(".safetensors") else ("cannot load" in message)
    assert not marker.exists()


def test_a_pickle_next_to_safetensors_is_ignored(copy, tmp_path):
    marker = tmp_path / "unpickled"
    (copy / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    assert load_pipeline(copy).num_classes == 10 and not marker.exists()


# ---------------------------------------------------------------- not a DiT / broken JSON
@pytest.mark.parametrize("file, content, expected", [
    ("model_index.json", b"\xff\xfe\x00garbage", "not valid JSON"),
    ("model_index.json", b"[1, 2, 3]", "not a JSON object"),
    ("model_index.json", json.dumps({"_class_name": ["DiTPipeline"]}).encode(), "not a supported DiT pipeline"),
    ("model_index.json", json.dumps({"_class_name": None}).encode(), "not a supported DiT pipeline"),
    ("model_index.json", ("[" * 100_000).encode(), "not valid JSON"),
    ("labels.json", b"{not json", "not valid JSON"),
    ("labels.json", json.dumps({"id2label": {"cat": "dog"}}).encode(), "id2label"),
    ("scheduler/scheduler_config.json", b"\x00\x01", "not valid JSON"),
    ("transformer/config.json", b"{", "not valid JSON"),
    ("transformer/config.json", json.dumps({"num_layers": "many"}).encode(), "num_layers = 'many'"),
    ("transformer/config.json", json.dumps({"num_layers": -1}).encode(), "num_layers = -1"),
    ("transformer/config.json", json.dumps({"attention_head_dim": 1.5}).encode(), "attention_head_dim = 1.5"),
])
def test_broken_pipeline_files_are_one_line(copy, file, content, expected):
    (copy / file).write_bytes(content)
    message = _one_line(copy)
    assert expected in message


def test_a_vae_folder_is_not_a_dit(tmp_path):
    latent = tiny_dit_pipeline(tmp_path / "latent", with_vae=True)
    assert "not a diffusers pipeline folder" in _one_line(latent / "vae")  # a model, but not a pipeline
    shutil.rmtree(latent / "transformer")
    shutil.copytree(latent / "vae", latent / "transformer")  # the VAE where the DiT should be
    assert "holds a 'AutoencoderKL', not a DiTTransformer2DModel" in _one_line(latent)
    config = json.loads((latent / "transformer" / "config.json").read_text())
    del config["_class_name"]  # unlabelled: the weights do not fit a DiT (diffusers alone would fill in random ones)
    (latent / "transformer" / "config.json").write_text(json.dumps(config))
    assert "missing from the checkpoint" in _one_line(latent)


# ---------------------------------------------------------------- memory estimate, refused before loading
def _built_count(cls, config) -> int:
    with torch.device("meta"):  # no memory: only the shapes
        model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def test_estimate_matches_the_built_models(tmp_path):
    import diffusers

    cases = [(dit_xl_2_config(), "dit", diffusers.DiTTransformer2DModel)]
    for folder, family in ((tiny_dit_pipeline(tmp_path / "a"), "dit"), (tiny_dit_pipeline(tmp_path / "b", with_vae=True), "dit"),
                           (tiny_pixart_pipeline(tmp_path / "c"), "pixart")):
        cases.append((json.loads((folder / "transformer" / "config.json").read_text()), family, getattr(diffusers, models._TRANSFORMER_CLASSES[family])))
    for config, family, cls in cases:
        assert estimate_params(config, family) == pytest.approx(_built_count(cls, config), rel=0.01)


def test_too_big_for_memory_is_refused_before_allocating(copy, monkeypatch):
    config = json.loads((copy / "transformer" / "config.json").read_text())
    huge = {**config, **dit_xl_2_config(), "num_layers": 10_000}  # ~270 G parameters
    (copy / "transformer" / "config.json").write_text(json.dumps(huge))
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.delenv("DITLAB_MAX_MODEL_BYTES", raising=False)
    message = _one_line(copy)
    estimate = 4 * estimate_params(huge, "dit")
    assert f"{estimate:,} bytes" in message and "refused before loading" in message and estimate > 10**12


def test_the_memory_limit_is_overridable(copy, monkeypatch):
    config = json.loads((copy / "transformer" / "config.json").read_text())
    needed = 4 * estimate_params(config, "dit")
    monkeypatch.setenv("DITLAB_MAX_MODEL_BYTES", str(needed - 1))
    message = _one_line(copy)
    assert f"{needed:,} bytes" in message and f"{needed - 1:,} bytes available" in message
    monkeypatch.setenv("DITLAB_MAX_MODEL_BYTES", str(needed))
    assert load_pipeline(copy).num_classes == 10
    monkeypatch.setenv("DITLAB_MAX_MODEL_BYTES", str(needed // 2 + 1))
    assert load_pipeline(copy, dtype=torch.bfloat16).num_classes == 10  # 2 bytes per parameter


def test_available_memory_reads_the_machine(monkeypatch):
    monkeypatch.delenv("DITLAB_MAX_MODEL_BYTES", raising=False)
    available = models.available_memory()
    assert available is not None and 10**8 < available < 10**14


# ---------------------------------------------------------------- non-finite activations during calibration
@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_dir):
    """The tiny DiT with one Inf weight in block 1's adaLN projection, saved as safetensors."""
    folder = tmp_path_factory.mktemp("poisoned") / "dit"
    shutil.copytree(tiny_dir, folder)
    pipe = load_pipeline(folder)
    pipe.transformer.transformer_blocks[1].norm1.linear.weight.data[0, 0] = float("inf")
    pipe.transformer.save_pretrained(folder / "transformer")
    return folder


def test_inf_in_calibration_names_the_layer(poisoned):
    from ditlab.calibration import calibrate

    pipe = load_pipeline(poisoned)
    with pytest.raises(CalibrationError) as info:
        calibrate(pipe, n_samples=1, steps=2, progress=False, use_cache=False)
    message = str(info.value)
    layer = message.split("layer ")[1].split("'")[1]
    assert layer in {i.name for i in list_linears(pipe.transformer)} and layer.startswith("transformer_blocks.1.")
    assert ("NaN" in message or "Inf" in message) and "timestep" in message and "\n" not in message


def test_non_finite_calibration_through_the_cli(poisoned, capsys, monkeypatch, tmp_path):
    from ditlab.cli import main

    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    code = main(["quantize", "--model", str(poisoned), "--recipe", "w8a8-smoothquant", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ditlab quantize: error:") and "transformer_blocks.1." in err and err.count("\n") == 0
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf"])
def test_a_bad_memory_limit_is_refused_by_name(monkeypatch, value):
    from ditlab import models
    from ditlab.errors import ConfigError

    monkeypatch.setenv("DITLAB_MAX_MODEL_BYTES", value)
    with pytest.raises(ConfigError, match="DITLAB_MAX_MODEL_BYTES"):
        models.available_memory()
    monkeypatch.setenv("DITLAB_MAX_MODEL_BYTES", "8e9")
    assert models.available_memory() == 8_000_000_000
