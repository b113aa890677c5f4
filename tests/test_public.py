"""Public deployment mode (DITLAB_PUBLIC=1): allowlisted model sources, no path traversal in export names, request and
calibration limits, no remote code — checked on ditlab.public and through the app's handlers (and once over HTTP)."""

import ast
import json
import re
import shutil
import socket
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ditlab import api, public
from ditlab.config import PRESETS
from ditlab.errors import ConfigError, DitlabError, ModelLoadError
from ditlab.models import ASSETS, load_pipeline
from ditlab.testing import tiny_dit_pipeline, tiny_pixart_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random DiT in a folder that is not under the default allowlist (assets/)."""
    return tiny_dit_pipeline(tmp_path_factory.mktemp("outside") / "tiny-dit")


@pytest.fixture
def public_mode(monkeypatch):
    monkeypatch.setenv("DITLAB_PUBLIC", "1")
    monkeypatch.delenv("DITLAB_ALLOWED_DIRS", raising=False)
    monkeypatch.delenv("DITLAB_ALLOWED_HUB_IDS", raising=False)
    return monkeypatch


def _refused(source, field="model source") -> ConfigError:
    with pytest.raises(ConfigError) as err:
        public.check_source(source, field=field)
    message = str(err.value)
    assert err.value.field == field and "public mode" in message and "\n" not in message
    return err.value


# ---------------------------------------------------------------- model sources
@pytest.mark.parametrize("alias", ["shipped", "", None, "tiny-dit"])
def test_shipped_model_is_always_allowed(public_mode, alias):
    assert public.check_source(alias) == alias


def test_only_allowlisted_folders(public_mode, tiny, tmp_path):
    assert public.check_source(str(ASSETS / "tiny-dit")) == str((ASSETS / "tiny-dit").resolve())
    _refused(str(tiny))
    _refused("/etc")
    _refused(str(ASSETS / ".." / "ditlab"))  # traversal out of the allowlist
    _refused(str(ASSETS) + "/../../../../../../etc")
    _refused("~")
    _refused("assets\x00/../etc")
    public_mode.setenv("DITLAB_ALLOWED_DIRS", str(tiny.parent))
    assert public.check_source(str(tiny)) == str(tiny.resolve())
    assert public.check_source(str(tiny / "sub" / "..")) == str(tiny.resolve())
    _refused(str(ASSETS / "tiny-dit"))  # the allowlist replaces the default


def test_a_symlink_out_of_the_allowlist_is_refused(public_mode, tiny, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(tiny, target_is_directory=True)
    public_mode.setenv("DITLAB_ALLOWED_DIRS", str(allowed))
    _refused(str(allowed / "link"))


def test_refusal_does_not_reveal_whether_a_folder_exists(public_mode, tmp_path):
    existing, missing = _refused(str(tmp_path)), _refused(str(tmp_path / "no-such-folder"))
    assert existing.allowed == missing.allowed


def test_relative_paths_under_the_allowlist_are_never_hub_ids(public_mode, monkeypatch):
    monkeypatch.chdir(ROOT)
    resolved = public.check_source("assets/no-such-model")  # would match the hub-id pattern owner/name
    assert resolved == str((ROOT / "assets" / "no-such-model").resolve()) and Path(resolved).is_absolute()
    with pytest.raises(ModelLoadError, match="no such folder"):  # a missing folder, not a hub download
        api.load("assets/no-such-model")


def test_hub_ids_only_if_allowlisted(public_mode, monkeypatch):
    _refused("facebook/DiT-XL-2-256")
    public_mode.setenv("DITLAB_ALLOWED_HUB_IDS", "facebook/DiT-XL-2-256, someone/other")
    assert public.check_source("facebook/DiT-XL-2-256") == "facebook/DiT-XL-2-256"
    _refused("facebook/DiT-XL-2-512")
    monkeypatch.setenv("DITLAB_PUBLIC", "0")
    assert public.check_source("anyone/anything") == "anyone/anything"  # local mode: no policy


def test_api_load_enforces_the_policy(public_mode, tiny):
    with pytest.raises(ConfigError, match="public mode"):
        api.load(str(tiny))
    public_mode.setenv("DITLAB_ALLOWED_DIRS", str(tiny.parent))
    assert api.load(str(tiny)).num_classes == 10


@pytest.mark.parametrize("source", ["/etc", "../../..", "facebook/DiT-XL-2-256", "/work"])
def test_cli_refuses_sources_in_public_mode(public_mode, capsys, source):
    from ditlab.cli import main

    assert main(["info", "--model", source]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model source" in err and "public mode" in err


# ---------------------------------------------------------------- export names
@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=200) | st.sampled_from(["..", "../../etc/passwd", "/etc/passwd", "a/../../b", ".", "~root", "C:\\x", "\x00"]))
def test_safe_name_is_one_harmless_path_component(name):
    safe = public.safe_name(name)
    base = Path("/srv/exports")
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", safe) and not safe.startswith(".")
    assert (base / safe).resolve().parent == base and (base / f"{safe}.recipe.json").resolve().parent == base


# ---------------------------------------------------------------- limits
def test_limits_are_tighter_in_public_mode(public_mode, monkeypatch):
    pub = public.limits()
    monkeypatch.setenv("DITLAB_PUBLIC", "0")
    local = public.limits()
    assert pub.public and not local.public and pub.max_calib_cost is not None and local.max_calib_cost is None
    assert pub.max_images < local.max_images and pub.max_steps < local.max_steps and pub.max_recipe_bytes < local.max_recipe_bytes


def test_calibration_cost_is_bounded_before_any_work(public_mode, monkeypatch, tiny):
    pipe = api._load(str(tiny))
    import ditlab.calibration

    monkeypatch.setattr(ditlab.calibration, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    cap = public.limits().max_calib_cost
    with pytest.raises(ConfigError) as err:
        api.calibrate(pipe, n_samples=cap, steps=2)
    assert err.value.field == "calibration cost" and str(cap) in str(err.value) and f"{cap} images × 2 steps" in str(err.value)


def _vq4dit_recipe(**params) -> str:
    return json.dumps({"version": 1, "name": "vq", "default": {"method": "vq4dit", "w_bits": 3, "a_bits": 16, "params": params}})


def test_vq4dit_calibration_cost_is_bounded(public_mode, monkeypatch, tiny):
    pipe = api._load(str(tiny))
    with pytest.raises(ConfigError) as err:
        api.quantize(pipe, json.loads(_vq4dit_recipe(iterations=1000, samples=256, steps=1000)), progress=False)
    assert err.value.field == "params.iterations × samples × steps" and "256000000" in str(err.value)
    public.check_quantize_cost(pipe.transformer, PRESETS["w3-vq4dit"])  # every preset stays within the bound
    monkeypatch.setenv("DITLAB_PUBLIC", "0")
    public.check_quantize_cost(pipe.transformer, api.parse_recipe(_vq4dit_recipe(iterations=1000)))  # local: no bound


# ---------------------------------------------------------------- no remote code
def test_no_source_file_enables_remote_code():
    """Every ``trust_remote_code`` keyword argument (or dict key) in the code is the literal False."""
    seen = []
    for f in [ROOT / "app.py", *sorted((ROOT / "ditlab").rglob("*.py"))]:
        for node in ast.walk(ast.parse(f.read_text())):
            pairs = [(k.arg, k.value) for k in node.keywords] if isinstance(node, ast.Call) else \
                [(getattr(k, "value", None), v) for k, v in zip(node.keys, node.values)] if isinstance(node, ast.Dict) else []
            for key, value in pairs:
                if key == "trust_remote_code":
                    seen.append((f.name, isinstance(value, ast.Constant) and value.value is False))
    assert ("models.py", True) in seen and all(ok for _, ok in seen), seen


def test_model_folders_cannot_run_their_own_code(tmp_path):
    marker = tmp_path / "code-ran"
    evil = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
    dit = tiny_dit_pipeline(tmp_path / "dit")
    (dit / "evil_model.py").write_text(evil)
    index = json.loads((dit / "model_index.json").read_text())
    index["transformer"] = ["evil_model", "EvilTransformer"]  # a custom component class: ignored, DiT's class is fixed
    (dit / "model_index.json").write_text(json.dumps(index))
    config = json.loads((dit / "transformer" / "config.json").read_text())
    (dit / "transformer" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil_model.EvilTransformer"}}))
    assert load_pipeline(dit).transformer.__class__.__name__ == "DiTTransformer2DModel"
    pixart = tiny_pixart_pipeline(tmp_path / "pixart")
    shutil.copy(dit / "evil_model.py", pixart / "tokenizer" / "evil_tokenizer.py")
    tok_config = pixart / "tokenizer" / "tokenizer_config.json"
    tok = json.loads(tok_config.read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    tok_config.write_text(json.dumps(tok))
    try:
        load_pipeline(pixart)
    except DitlabError as exc:  # refusing is fine; running the code is not
        assert "\n" not in str(exc)
    assert not marker.exists()


# ---------------------------------------------------------------- through the app's handlers
@pytest.fixture(scope="module")
def app():
    return pytest.importorskip("app")


def _untouched(outputs) -> bool:
    return all(isinstance(o, dict) and set(o) <= {"__type__"} for o in outputs[:-1])


def test_handlers_refuse_sources_and_server_paths(public_mode, app, tiny):
    out = app.load_model("local folder", str(tiny))
    assert out[-1].startswith("⚠️ local folder") and "public mode" in out[-1] and _untouched(out)
    out = app.load_model("local folder", str(ASSETS / ".." / ".." / "etc"))
    assert "public mode" in out[-1] and _untouched(out)
    out = app.load_model("hub id", "facebook/DiT-XL-2-256")
    assert out[-1].startswith("⚠️ hub id") and "public mode" in out[-1]
    assert app.load_model("shipped", "")[-1].startswith("✓")
    out = app.load_export(None, str(tiny))
    assert out[-1].startswith("⚠️ export path") and _untouched(out)
    for handler, args in ((app.apply_preset, ("w8a8-rtn", str(tiny))), (app.compare, (PRESETS["fp"].to_json(), [0], 1, 0, 2, 4.0, "cpu-int", str(tiny)))):
        out = handler(*args)  # a source that reached the session state some other way is refused at load time
        assert "model source" in out[-1] and "public mode" in out[-1] and _untouched(out)


def test_handler_limits_name_the_field_and_the_limit(public_mode, app):
    lim = public.limits()
    out = app.generate([0, 1], 16, 0, 2, 4.0)
    assert out[-1].startswith("⚠️ images") and str(lim.max_images) in out[-1]
    out = app.generate([0], 1, 0, lim.max_steps + 1, 4.0)
    assert out[-1].startswith("⚠️ steps") and str(lim.max_steps) in out[-1]
    out = app.compare(PRESETS["w8a8-rtn"].to_json(), [0, 1, 2], 8, 0, 2, 4.0, "cpu-int", "shipped")
    assert "images" in out[-1] and str(lim.max_images) in out[-1] and _untouched(out)
    out = app.compare(_vq4dit_recipe(iterations=1000), [0], 1, 0, 2, 4.0, "cpu-int", "shipped")
    assert "params.iterations × samples × steps" in out[-1] and str(lim.max_calib_cost) in out[-1] and _untouched(out)
    for seed in (None, float("nan"), 1.5, "7"):
        out = app.compare(PRESETS["fp"].to_json(), [0], 1, seed, 2, 4.0, "cpu-int", "shipped")
        assert out[-1].startswith("⚠️ seed") and _untouched(out)
    big = json.dumps({"version": 1, "name": "x" * lim.max_recipe_bytes})
    out = app.import_recipe(big, None, "shipped")
    assert "recipe JSON" in out[-1] and str(lim.max_recipe_bytes) in out[-1] and _untouched(out)


@pytest.fixture(scope="module")
def archive(tiny, tmp_path_factory):
    """An export (QDIR zip) of the tiny DiT, made in local mode; its manifest names the tiny DiT's folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DITLAB_PUBLIC", "0")
        pipe = api.load(str(tiny))
        folder = api.save(api.quantize(pipe, "w8a8-rtn", progress=False), pipe, tmp_path_factory.mktemp("export") / "q")
    return api.export_zip(folder)


def _rezip(archive, out, name, change):
    """A copy of ``archive`` with the JSON file ``name`` passed through ``change``."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, json.dumps(change(json.loads(data))) if item.filename == name else data)
    return out


def test_an_export_zip_cannot_smuggle_a_model_source(public_mode, app, tiny, archive, tmp_path):
    with zipfile.ZipFile(archive) as zf:
        assert json.loads(zf.read("ditlab_qdir.json"))["source"] == str(tiny)  # a folder outside the allowlist
    out = app.load_export(str(archive), "")
    assert "model source" in out[-1] and "public mode" in out[-1] and _untouched(out)
    hub = _rezip(archive, tmp_path / "hub.zip", "ditlab_qdir.json", lambda m: {**m, "source": "someone/big-model"})
    out = app.load_export(str(hub), "")
    assert "model source" in out[-1] and "someone/big-model" in out[-1]


def _forge(archive, out, name, change):
    """Like ``_rezip``, with the manifest's checksum of ``name`` rewritten to match: a consistent forgery (checksums
    catch corruption and edits, not someone who also rewrites the manifest)."""
    import hashlib

    edited = _rezip(archive, out.with_suffix(".tmp.zip"), name, change)
    with zipfile.ZipFile(edited) as zf:
        digest = hashlib.sha256(zf.read(name)).hexdigest()
    return _rezip(edited, out, "ditlab_qdir.json", lambda m: {**m, "files": {**m["files"], name: digest}})


def test_an_export_claiming_a_huge_model_is_refused_before_building_it(public_mode, app, archive, tmp_path):
    claim = lambda c: {**c, "num_layers": 10**7, "num_attention_heads": 64}  # noqa: E731
    edited = _rezip(archive, tmp_path / "edited.zip", "transformer/config.json", claim)
    out = app.load_export(str(edited), "")
    assert "checksum mismatch" in out[-1] and "transformer/config.json" in out[-1] and _untouched(out)
    forged = _forge(archive, tmp_path / "huge.zip", "transformer/config.json", claim)
    out = app.load_export(str(forged), "")
    assert "refused before loading" in out[-1] and "bytes" in out[-1] and _untouched(out)


def test_export_names_stay_inside_the_work_folder(public_mode, app, tiny):
    public_mode.setenv("DITLAB_ALLOWED_DIRS", str(tiny.parent))
    recipe = json.loads(PRESETS["w8a8-rtn"].to_json())
    for evil in ("../../../../tmp/evil", "/etc/passwd", ".."):
        zip_path, recipe_path, msg = app.export(json.dumps({**recipe, "name": evil}), str(tiny))
        assert msg.startswith("✓"), msg
        for path in (Path(zip_path), Path(recipe_path)):
            assert path.resolve().is_relative_to(app.WORKDIR.resolve()) and path.parent.parent == app.WORKDIR / "sessions" / "local" / "export"
            assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name)


# ---------------------------------------------------------------- over HTTP
def test_public_mode_over_http(public_mode, app):
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        out = client.predict("local folder", "/etc", api_name="/load_model")
        assert out[-1].startswith("⚠️ local folder") and "public mode" in out[-1]
        out = client.predict(None, "/etc/passwd", api_name="/load_export")
        assert out[-1].startswith("⚠️ export path")
    finally:
        app.demo.close()


# ---------------------------------------------------------------- rate limit
def test_rate_limit_per_client_with_a_sliding_window(public_mode, monkeypatch):
    now = [1000.0]
    rate = public.RateLimiter(clock=lambda: now[0])
    public_mode.setenv("DITLAB_MAX_JOBS_PER_MINUTE", "3")
    for _ in range(3):
        rate.check("10.0.0.1")
    with pytest.raises(ConfigError) as err:
        rate.check("10.0.0.1")
    assert err.value.field == "request rate" and "at most 3 per minute" in str(err.value) and "60 s" in str(err.value)
    rate.check("10.0.0.2")  # another client is not affected
    now[0] += 59.0
    with pytest.raises(ConfigError):
        rate.check("10.0.0.1")
    now[0] += 1.0  # the first start leaves the window
    rate.check("10.0.0.1")
    monkeypatch.setenv("DITLAB_PUBLIC", "0")
    for _ in range(20):
        rate.check("10.0.0.1")  # local mode: no limit


def test_client_address_prefers_the_first_forwarded_hop():
    from types import SimpleNamespace

    behind_proxy = SimpleNamespace(headers={"x-forwarded-for": "203.0.113.7, 10.0.0.1"}, client=SimpleNamespace(host="10.0.0.1"))
    direct = SimpleNamespace(headers={}, client=SimpleNamespace(host="192.0.2.5"))
    assert public.client_address(behind_proxy) == "203.0.113.7" and public.client_address(direct) == "192.0.2.5"
    assert public.client_address(None) is None


def test_handlers_apply_the_rate_limit(public_mode, app, monkeypatch):
    public_mode.setenv("DITLAB_MAX_JOBS_PER_MINUTE", "1")
    monkeypatch.setattr(app, "RATE", public.RateLimiter())
    grid, status = app.generate([0], 1, 0, 1, 4.0)
    assert "1 images" in status
    out = app.generate([0], 1, 0, 1, 4.0)
    assert out[-1].startswith("⚠️ request rate") and "try again in" in out[-1]


def test_the_spaces_front_matter_matches_what_is_installed_and_tested():
    """Hugging Face Spaces read README.md's front matter: it must start app.py, on the Python the Makefile and
    README require, with a gradio that requirements.txt allows (Spaces install sdk_version, not requirements' gradio)."""
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    head = (root / "README.md").read_text().split("---")[1]
    meta = dict(line.split(":", 1) for line in head.strip().splitlines())
    meta = {k.strip(): v.strip().strip('"') for k, v in meta.items()}
    assert (meta["sdk"], meta["app_file"], meta["python_version"]) == ("gradio", "app.py", "3.11")
    assert (root / meta["app_file"]).is_file() and "Python 3.11" in (root / "README.md").read_text()
    gradio = [Requirement(line.split("#")[0]) for line in (root / "requirements.txt").read_text().splitlines()
              if line.split("#")[0].strip().startswith("gradio")]
    assert len(gradio) == 1 and gradio[0].specifier.contains(meta["sdk_version"]), (meta["sdk_version"], gradio)
