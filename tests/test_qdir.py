"""QDIR save → load: standalone, bit-identical outputs, atomic writes, clear errors."""

import json
import os

import pytest
import torch

from ditlab import hadamard_ops, qdir
from ditlab.config import LayerConfig, get_preset
from ditlab.errors import DitlabError, ModelLoadError
from ditlab.models import load_pipeline
from ditlab.nn import InputTransform, QuantLinear
from ditlab.quantize import quantize_
from ditlab.sampling import sample
from ditlab.testing import tiny_dit_pipeline


@pytest.fixture(scope="module")
def fp_pipe(tmp_path_factory):
    folder = tiny_dit_pipeline(tmp_path_factory.mktemp("src") / "tiny")
    return load_pipeline(str(folder))


def _inputs():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(2, 3, 16, 16, generator=g), timestep=torch.tensor([50, 700]), class_labels=torch.tensor([1, 10]))


def _exotic(qmodel):
    """Swap one layer for a QuantLinear using every stored part: smooth, centring, sigma, Hadamard, low-rank, static
    scale, the mean term's low-rank correction."""
    name = "transformer_blocks.0.attn1.to_q"
    lin = torch.nn.Linear(64, 64)
    k = 64
    tr = InputTransform(k, smooth=torch.rand(k) + 0.5, center=True, sigma=torch.rand(k) + 0.5, hadamard_signs=hadamard_ops.random_signs(k, 1))
    cfg = LayerConfig(method="svd", w_bits=4, a_bits=8, w_group_size=32, a_granularity="per-tensor", rank=4)
    layer = QuantLinear.from_float(lin, cfg, weight=tr.fold_weight(lin.weight), transform=tr, act_scale=0.05,
                                   lr_down=torch.randn(4, k), lr_up=torch.randn(64, 4) * 0.01)
    layer.set_mean_lowrank(torch.linalg.qr(torch.randn(k, 2)).Q.t(), torch.randn(64, 2) * 0.01)
    parent = qmodel.get_submodule("transformer_blocks.0.attn1")
    setattr(parent, "to_q", layer)
    return name


def test_save_load_bit_identical_transformer(fp_pipe, tmp_path):
    qmodel, report = quantize_(fp_pipe.transformer, "w4a8-rtn", progress=False)
    _exotic(qmodel)
    with torch.no_grad():
        out = qmodel(**_inputs()).sample
    path = qdir.save_quantized(qmodel, None, fp_pipe, tmp_path / "q", extra=report.totals())
    assert qdir.is_qdir(path) and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    pipe, recipe = qdir.load_quantized(path)
    assert recipe == get_preset("w4a8-rtn") and pipe.transformer.ditlab_recipe == recipe
    with torch.no_grad():
        again = pipe.transformer(**_inputs()).sample
    assert torch.equal(out, again)
    loaded = dict(pipe.transformer.named_modules())
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLinear):
            assert loaded[name].spec() == module.spec()
            for key, t in module.state_dict().items():
                assert torch.equal(loaded[name].state_dict()[key], t), (name, key)
    manifest = json.loads((path / qdir.MANIFEST).read_text())
    assert manifest["extra"]["n_quantized"] == len(report.layers) and len(manifest["layers"]) == len(report.layers)


def test_qdir_loads_standalone_and_samples_identically(fp_pipe, tmp_path):
    qmodel, _ = quantize_(fp_pipe.transformer, "w8a8-rtn", progress=False)
    path = qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe.source, tmp_path / "q8")  # source given as a folder
    pipe, _ = qdir.load_quantized(path)
    assert pipe.labels == fp_pipe.labels and pipe.scheduler_config == fp_pipe.scheduler_config and pipe.family == "dit"
    a = sample(fp_pipe, [0, 4], steps=2, seed=5, transformer=qmodel, progress=False)
    b = sample(pipe, [0, 4], steps=2, seed=5, progress=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)


def test_atomic_write_leaves_nothing_on_crash(fp_pipe, tmp_path, monkeypatch):
    qmodel, _ = quantize_(fp_pipe.transformer, "w8a8-rtn", progress=False)
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, tmp_path / "q")
    assert os.listdir(tmp_path) == []  # neither the QDIR nor a temporary folder


def test_overwrite_rules(fp_pipe, tmp_path):
    qmodel, _ = quantize_(fp_pipe.transformer, "w8a8-rtn", progress=False)
    path = qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, tmp_path / "q")
    with pytest.raises(DitlabError, match="already exists"):
        qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, path)
    q4, _ = quantize_(fp_pipe.transformer, "w4a16-rtn", progress=False)
    qdir.save_quantized(q4, "w4a16-rtn", fp_pipe, path, overwrite=True)
    assert qdir.load_quantized(path)[1].name == "w4a16-rtn" and sorted(os.listdir(tmp_path)) == ["q"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DitlabError, match="not a QDIR"):
        qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, tmp_path / "other", overwrite=True)


def test_load_errors(fp_pipe, tmp_path):
    with pytest.raises(ModelLoadError, match="not a QDIR"):
        qdir.load_quantized(tmp_path)
    qmodel, _ = quantize_(fp_pipe.transformer, "w8a8-rtn", progress=False)
    path = qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, tmp_path / "q")
    weights = path / qdir.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum"):
        qdir.load_quantized(path)


def test_unregistered_module_type_is_refused(fp_pipe, tmp_path):
    qmodel, _ = quantize_(fp_pipe.transformer, "w8a8-rtn", progress=False)

    class Odd(torch.nn.Module):
        is_quantized_linear = True
        in_features, out_features = 64, 64

    qmodel.transformer_blocks[0].attn1.to_k = Odd()
    with pytest.raises(DitlabError, match="to_k"):
        qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, tmp_path / "q")
    assert os.listdir(tmp_path) == []


# ---- tampered QDIRs: every file the loader trusts is checked; each failure is one line naming the file -------------
@pytest.fixture(scope="module")
def saved(fp_pipe, tmp_path_factory):
    qmodel, _ = quantize_(fp_pipe.transformer, "w4a8-rtn", progress=False)
    return qdir.save_quantized(qmodel, None, fp_pipe, tmp_path_factory.mktemp("saved") / "q")


def _copy(saved, tmp_path, version=None):
    """A copy of the saved QDIR; version 1: its manifest rewritten as ditlab wrote it before per-file checksums."""
    import shutil

    path = shutil.copytree(saved, tmp_path / "q")
    manifest = json.loads((path / qdir.MANIFEST).read_text())
    if version == 1 and "files" in manifest:
        manifest.update(version=1, sha256=manifest.pop("files")[qdir.WEIGHTS])
        (path / qdir.MANIFEST).write_text(json.dumps(manifest))
    return path


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


TAMPERINGS = {  # name → (change, the file the error must name)
    "recipe w_bits edited": (lambda q: _edit(q / "recipe.json", '"w_bits": 4', '"w_bits": 8'), "recipe.json"),
    "recipe removed": (lambda q: (q / "recipe.json").unlink(), "recipe.json"),
    "recipe garbage": (lambda q: (q / "recipe.json").write_text("{not json"), "recipe.json"),
    "scheduler config removed": (lambda q: (q / qdir.SCHEDULER).unlink(), "scheduler_config.json"),
    "num_layers lowered": (lambda q: _edit(q / qdir.CONFIG, '"num_layers": 2', '"num_layers": 1'), "transformer/config.json"),
    "num_layers raised": (lambda q: _edit(q / qdir.CONFIG, '"num_layers": 2', '"num_layers": 3'), "transformer/config.json"),
    "head dim edited": (lambda q: _edit(q / qdir.CONFIG, '"attention_head_dim": 32', '"attention_head_dim": 16'), "transformer/config.json"),
    "weights truncated": (lambda q: _truncate(q / qdir.WEIGHTS), "quantized.safetensors"),
    "weights removed": (lambda q: (q / qdir.WEIGHTS).unlink(), "quantized.safetensors"),
    "labels removed": (lambda q: (q / "labels.json").unlink(), "labels.json"),
    "model index edited": (lambda q: _edit(q / "model_index.json", "DiTPipeline", "PixArtAlphaPipeline"), "model_index.json"),
    "manifest removed": (lambda q: (q / qdir.MANIFEST).unlink(), qdir.MANIFEST),
}
# a version 1 manifest checks the weights only: the loader itself must still report the other files clearly
V1_TAMPERINGS = ["recipe removed", "recipe garbage", "scheduler config removed", "num_layers lowered", "num_layers raised",
                 "head dim edited", "weights truncated", "weights removed", "manifest removed"]


def _assert_names(exc_info, file):
    message = str(exc_info.value)
    assert file in message and "\n" not in message, message
    for raw in ("Traceback", "AttributeError", "FileNotFoundError", "KeyError", "ModuleList", "SafetensorError"):
        assert raw not in message, message


@pytest.mark.parametrize("tamper", list(TAMPERINGS))
def test_tampered_qdir_is_refused_naming_the_file(saved, tmp_path, tamper):
    change, file = TAMPERINGS[tamper]
    path = _copy(saved, tmp_path)
    change(path)
    with pytest.raises(ModelLoadError) as exc_info:
        qdir.load_quantized(path)
    _assert_names(exc_info, file)


@pytest.mark.parametrize("tamper", V1_TAMPERINGS)
def test_tampered_version_1_qdir_is_refused_naming_the_file(saved, tmp_path, tamper):
    change, file = TAMPERINGS[tamper]
    path = _copy(saved, tmp_path, version=1)
    change(path)
    with pytest.raises(ModelLoadError) as exc_info:
        qdir.load_quantized(path)
    _assert_names(exc_info, file)


def test_version_1_qdir_still_loads(saved, tmp_path):
    pipe, recipe = qdir.load_quantized(_copy(saved, tmp_path, version=1))
    assert recipe == get_preset("w4a8-rtn") and pipe.transformer.ditlab_recipe == recipe


def test_manifest_checksums_cover_every_file(saved):
    manifest = json.loads((saved / qdir.MANIFEST).read_text())
    files = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    assert manifest["version"] == 2 and sorted(manifest["files"]) == [f for f in files if f != qdir.MANIFEST]


def test_edited_recipe_is_refused_through_the_api(fp_pipe, tmp_path):
    """The audit's case: W8 in recipe.json over 4-bit weights must not load (nor be re-saved as W8)."""
    from ditlab import api

    path = api.save(api.quantize(fp_pipe, "w4a16-rtn", progress=False), fp_pipe, tmp_path / "q")
    _edit(path / "recipe.json", '"w_bits": 4', '"w_bits": 8')
    with pytest.raises(ModelLoadError, match=r"recipe\.json: checksum mismatch"):
        api.load(str(path))


def test_a_file_in_the_way_is_named(fp_pipe, tmp_path):
    qmodel, _ = quantize_(fp_pipe.transformer, "w8a8-rtn", progress=False)
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file" / "sub", tmp_path / "file" / "a" / "b"):
        with pytest.raises(qdir.WriteError, match=r"file is a file, not a folder") as exc_info:
            qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, out)
        assert "file exists" not in str(exc_info.value)
    with pytest.raises(DitlabError, match=r"not a QDIR.*choose another output folder") as exc_info:
        qdir.save_quantized(qmodel, "w8a8-rtn", fp_pipe, tmp_path / "file")
    assert "--out" not in str(exc_info.value) and (tmp_path / "file").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_unverified_truncated_weights_are_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _truncate(path / qdir.WEIGHTS)
    with pytest.raises(ModelLoadError, match=r"quantized\.safetensors: not a readable safetensors file") as exc_info:
        qdir.load_quantized_transformer(path, verify=False)
    _assert_names(exc_info, "quantized.safetensors")
