"""Faults (issue 9, part 3): writers killed midway, a torn calibration cache, a full disk.

Kills are real: a subprocess runs the CLI (or the app's export path) with one function wrapped so that it stops at a
known point of the write — the weights file in the temporary folder, the finished folder before its rename, half a
zip, half a cache tensor file, the cache tensor file before its sidecar — and signals it is there; the test then
sends SIGKILL. The full disk is simulated: the write raises OSError(ENOSPC) after writing part of its bytes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ditlab import api, calib_cache, cli, exports, qdir
from ditlab.errors import DitlabError
from ditlab.testing import tiny_dit_pipeline

ROOT = Path(__file__).resolve().parent.parent

# The subprocess: wraps one function to stop at FAULT_POINT (after creating FAULT_MARKER), then runs the command.
DRIVER = r'''
import os, sys, time

def pause():
    open(os.environ["FAULT_MARKER"], "w").close()
    time.sleep(3600)  # the test kills the process here

import safetensors.torch
from ditlab import calib_cache, qdir

point, real_save = os.environ["FAULT_POINT"], safetensors.torch.save_file
if point == "qdir-weights":  # the weights are in the temporary folder, the manifest is not
    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        pause()
    safetensors.torch.save_file = save_file
elif point == "qdir-place":  # the temporary folder is complete, not yet renamed into place
    qdir._place = lambda *args: pause()
elif point == "zip":  # two files are in the archive, the rest is not
    import zipfile
    real_write, written = zipfile.ZipFile.write, []
    def write(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        written.append(args[0])
        if len(written) == 2:
            self.fp.flush()
            pause()
    zipfile.ZipFile.write = write
elif point == "cache-tensor":  # half of the cache tensor file is on disk
    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        pause()
    safetensors.torch.save_file = save_file
elif point == "cache-sidecar":  # the tensor file is in place, its sidecar is not
    real_atomic = calib_cache._atomic_write
    def atomic(path, write):
        if path.suffix == ".json":
            pause()
        real_atomic(path, write)
    calib_cache._atomic_write = atomic

if sys.argv[1] == "export":  # what the app's Export does: save the QDIR, then zip it
    from ditlab import api
    pipe = api.load(sys.argv[2])
    api.export_zip(api.save(api.quantize(pipe, "w8a8-rtn", progress=False), pipe, sys.argv[3]))
else:
    from ditlab.cli import main
    sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_dit_pipeline(tmp_path_factory.mktemp("faults") / "tiny-dit"))


def kill_at(point: str, args: list[str], tmp_path: Path, env: dict | None = None) -> None:
    """Runs DRIVER with ``args`` until it reaches ``point``, then SIGKILLs it (and reaps it)."""
    marker = tmp_path / f"at-{point}"
    full_env = {**os.environ, "FAULT_POINT": point, "FAULT_MARKER": str(marker), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # liveness bound only
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the writer ended (rc {proc.returncode}) before reaching {point}: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, f"the writer never reached {point}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- quantize / export killed midway
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("point", ["qdir-weights", "qdir-place"])
def test_killed_quantize_leaves_the_old_qdir_or_nothing(tiny, tmp_path, point, existing):
    out = tmp_path / "q"
    old = None
    if existing:
        pipe = api.load(tiny)
        api.save(api.quantize(pipe, "w4a16-rtn", progress=False), pipe, out)
        old = _files(out)
    kill_at(point, ["quantize", "--model", tiny, "--recipe", "w8a8-rtn", "--out", str(out), *(["--overwrite"] if existing else [])], tmp_path)

    stray = [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]
    assert len(stray) == 1, "the kill must happen while the temporary folder exists"
    assert (stray[0] / qdir.WEIGHTS).is_file()
    if existing:
        assert _files(out) == old and qdir.load_quantized(out)[1].name == "w4a16-rtn"  # the old QDIR, byte for byte
    else:
        assert not out.exists()
        with pytest.raises(DitlabError):
            api.load(str(out))
    if point == "qdir-weights":  # the half-written folder itself is refused too, never loaded as a model
        with pytest.raises(DitlabError):
            qdir.load_quantized(stray[0])

    # the same command again (in this process: the killed writer's pid is dead either way) completes and cleans up
    assert cli.main(["quantize", "--model", tiny, "--recipe", "w8a8-rtn", "--out", str(out), *(["--overwrite"] if existing else [])]) == 0
    assert qdir.load_quantized(out)[1].name == "w8a8-rtn"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q")) == []  # the killed writer's folder is gone


def test_killed_export_leaves_no_partial_zip(tiny, tmp_path):
    out = tmp_path / "q"
    kill_at("zip", ["export", tiny, str(out)], tmp_path)
    assert not (tmp_path / "q.zip").exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".q.zip.")]
    assert len(partial) == 1 and zipfile.is_zipfile(partial[0]) is False, "the kill must happen mid-archive"
    assert qdir.load_quantized(out)[1].name == "w8a8-rtn"  # the QDIR was complete before zipping started
    with zipfile.ZipFile(api.export_zip(out)) as zf:  # exporting again gives a whole archive
        assert zf.testzip() is None and qdir.MANIFEST in zf.namelist()


# ---------------------------------------------------------------- the calibration cache
RUN = {"n_samples": 2, "steps": 2}


@pytest.mark.parametrize("point", ["cache-tensor", "cache-sidecar"])
def test_killed_cache_writer_never_yields_a_corrupt_entry(tiny, tmp_path, point):
    cache = tmp_path / "cache"
    kill_at(point, ["calibrate", "--model", tiny, "--n-samples", str(RUN["n_samples"]), "--steps", str(RUN["steps"])], tmp_path,
            env={"DITLAB_CACHE": str(cache)})
    left = sorted(p.name for p in (cache / "calibration").iterdir())
    if point == "cache-tensor":
        assert len(left) == 1 and left[0].startswith(".") and left[0].endswith(".tmp")  # a torn temporary file only
        key = left[0][1:].split(".safetensors")[0]
    else:
        assert len(left) == 1 and left[0].endswith(".safetensors")  # a complete tensor file without its sidecar
        key = left[0].split(".")[0]
    assert calib_cache.load(cache, key) is None  # a miss, not an error and not a half entry

    pipe = api.load(tiny)
    fresh = api.calibrate(pipe, **RUN, use_cache=False, progress=False)
    again = api.calibrate(pipe, **RUN, cache_dir=cache, progress=False)  # recomputed and written whole
    assert again.settings["cache_key"] == key
    for name in fresh:
        assert torch.equal(fresh[name].absmax, again[name].absmax)
    assert sorted(p.name for p in (cache / "calibration").iterdir()) == [f"{key}.json", f"{key}.safetensors"]  # stale temp removed
    assert calib_cache.load(cache, key) is not None


def _layers(value: float) -> dict:
    return {"layer.a": {"n_rows": 3, "absmax": torch.full((4,), value), "xtx": None, "per_timestep": {}}}


@pytest.mark.parametrize("damage", ["temp-only", "tensor-without-sidecar", "sidecar-without-tensor", "sidecar-wrong-hash",
                                    "sidecar-of-other-content", "truncated-tensor", "sidecar-wrong-key", "sidecar-not-json"])
def test_damaged_cache_entries_are_misses(tmp_path, damage):
    key = "k" * 32
    tensor_path, json_path = calib_cache.entry_paths(tmp_path, key)
    assert calib_cache.save(tmp_path, key, _layers(1.0), {"settings": {}})
    if damage == "temp-only":  # a writer killed before its first rename
        tensor_path.rename(tensor_path.with_name(f".{tensor_path.name}.999999999-abc.tmp"))
        json_path.unlink()
    elif damage == "tensor-without-sidecar":
        json_path.unlink()
    elif damage == "sidecar-without-tensor":
        tensor_path.unlink()
    elif damage == "sidecar-wrong-hash":
        sidecar = json.loads(json_path.read_text())
        json_path.write_text(json.dumps({**sidecar, "sha256": "0" * 64}))
    elif damage == "sidecar-of-other-content":  # a second writer (other values) killed between its two renames
        calib_cache._atomic_write(tensor_path, lambda tmp: safetensors.torch.save_file(calib_cache.flatten(_layers(2.0))[0], tmp))
    elif damage == "truncated-tensor":
        tensor_path.write_bytes(tensor_path.read_bytes()[:40])
    elif damage == "sidecar-wrong-key":
        json_path.write_text(json.dumps({**json.loads(json_path.read_text()), "key": "other"}))
    else:
        json_path.write_text('{"format": 1, "key"')
    assert calib_cache.load(tmp_path, key) is None
    assert calib_cache.save(tmp_path, key, _layers(3.0), {"settings": {}})  # the entry is rewritten whole …
    layers, _ = calib_cache.load(tmp_path, key)
    assert torch.equal(layers["layer.a"]["absmax"], torch.full((4,), 3.0))  # … and read back exactly
    assert sorted(p.name for p in tmp_path.joinpath("calibration").iterdir()) == [json_path.name, tensor_path.name]


# ---------------------------------------------------------------- a full disk
def _disk_full_after_some_bytes(monkeypatch):
    """safetensors writes fail like a full disk: part of the file is written, then ENOSPC."""
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_full_disk_quantize_is_one_clear_line(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    _disk_full_after_some_bytes(monkeypatch)
    assert cli.main(["quantize", "--model", tiny, "--recipe", "w8a8-rtn", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out.resolve()) in err and "no space left" in err, err
    assert list(tmp_path.iterdir()) == []  # neither a QDIR nor a temporary folder


def test_full_disk_export_zip_is_one_clear_line(tiny, tmp_path, monkeypatch):
    pipe = api.load(tiny)
    folder = api.save(api.quantize(pipe, "w8a8-rtn", progress=False), pipe, tmp_path / "q")
    real_write = zipfile.ZipFile.write

    def full(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zipfile.ZipFile, "write", full)
    with pytest.raises(DitlabError) as info:
        exports.export_zip(folder)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "q.zip") in message and "no space left" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no zip, no temporary archive


def test_full_disk_in_the_app_export(tiny, monkeypatch):
    app = pytest.importorskip("app")
    before = _files(app.WORKDIR).keys()
    _disk_full_after_some_bytes(monkeypatch)
    *outputs, message = app.export(api.PRESETS["w8a8-rtn"].to_json(), tiny)
    assert message.startswith("⚠️ cannot write ") and "no space left" in message and "\n" not in message, message
    assert all(isinstance(o, dict) for o in outputs)  # the download slots keep what they had
    assert _files(app.WORKDIR).keys() == before  # nothing half-written left behind


# ---------------------------------------------------------------- durability
def test_qdir_files_are_on_disk_before_the_rename(tiny, tmp_path, monkeypatch):
    """Every file and folder of a new QDIR is fsynced before it is renamed into place, and the parent after it."""
    from ditlab import atomic, qdir

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    real_place = qdir._place

    def place(tmp, out, overwrite):
        everything = {str(p) for p in tmp.rglob("*")} | {str(tmp)}
        assert everything <= set(synced), sorted(everything - set(synced))  # nothing visible before it is durable
        synced.clear()
        return real_place(tmp, out, overwrite)

    monkeypatch.setattr(qdir, "_place", place)
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", tiny, "--recipe", "w8a8-rtn", "--out", str(out)]) == 0
    assert synced == [str(tmp_path)] and qdir.is_qdir(out)  # then the rename itself


def test_full_disk_as_the_safetensors_writer_reports_it(tiny, tmp_path, monkeypatch, capsys):
    """On a real full filesystem (a 2 MB tmpfs) safetensors raises SafetensorError("... (os error 28)"), not OSError:
    the quantize command and the calibration cache must still see a full disk."""
    from safetensors import SafetensorError

    from ditlab import calib_cache

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", tiny, "--recipe", "w8a8-rtn", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no space left" in err, err
    assert list(tmp_path.iterdir()) == []
    assert calib_cache.save(tmp_path / "cache", "k" * 32, _layers(1.0), {}) is False  # logged, not raised


def test_atomic_writes_get_a_normal_file_mode(tmp_path):
    """mkstemp creates 0600 files; a result or export written atomically must be readable as a plain write's would be."""
    import os

    from ditlab.atomic import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "out.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_the_app_stops_cleanly_and_removes_its_work_folder(tmp_path, stop):
    """Spaces, Docker and systemd stop the app with SIGTERM, a terminal with Ctrl-C. Both must close the server, remove
    the process's working folder and exit 0. SIGTERM used to kill it at once (the folder stayed), and a stop while
    the warm-up grid was sampling aborted in the C++ runtime ("terminate called without an active exception", −6)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DITLAB_PORT=str(port), DITLAB_HOST="127.0.0.1", TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", DITLAB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores SIGINT
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the app did not start"
                time.sleep(1)
        assert list(tmp_path.glob("ditlab-app-*")), "the app made no working folder"
        proc.send_signal(getattr(signal, stop))  # the warm-up grid is still sampling at this point
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-2000:]
    assert "terminate called" not in output and not list(tmp_path.glob("ditlab-app-*"))
