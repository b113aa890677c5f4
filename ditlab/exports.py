"""QDIR export and import for the app: a QDIR folder zipped for download, an uploaded zip unpacked safely (no path
escapes, bounded size), and the quantized copy of a QDIR loaded as is (never re-quantized)."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .atomic import remove_left_by_dead_processes, write_atomic
from .errors import ConfigError, DitlabError, ModelLoadError
from .public import checked_path, limits


def write_file(target: Path, write) -> Path:
    """Calls ``write(tmp)`` on a temporary file beside ``target`` (same name ending) and renames it onto ``target``: a
    crash or a full disk never leaves a partial ``target``. A disk error becomes one line naming ``target``."""
    from .qdir import WriteError

    try:
        write_atomic(target, write, suffix=target.suffix)
    except OSError as exc:
        if not isinstance(exc, DitlabError):
            raise WriteError.of(target, exc) from exc
        raise
    return target


def export_zip(qdir: str | os.PathLike) -> Path:
    """Zips a QDIR folder as ``<qdir>.zip`` (files at the archive root, written atomically); returns the zip path."""
    folder = Path(qdir)
    return write_file(folder.parent / f"{folder.name}.zip", lambda tmp: shutil.make_archive(tmp.removesuffix(".zip"), "zip", root_dir=folder))


def _safe_extract(archive: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        total = 0
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
                raise ModelLoadError(f"{archive.name}: unsafe path {info.filename!r} in the zip; refused")
            total += info.file_size
            if total > max_bytes:
                raise ModelLoadError(f"{archive.name}: uncompressed size exceeds {max_bytes} bytes; refused")
        zf.extractall(dest)


def unpack_qdir(path: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """The QDIR folder of an exported zip (extracted safely under ``workdir``) or of a folder path."""
    from .qdir import is_qdir

    src = checked_path(str(path), "export")
    if not src.exists():
        raise ModelLoadError(f"export = {str(path)!r} does not exist; allowed: a QDIR folder or a .zip exported by ditlab")
    if src.is_dir():
        if limits().public:
            raise ConfigError.invalid("export folder", str(path), "an uploaded .zip (public mode loads no server folders)")
        folder = src
    else:
        if not zipfile.is_zipfile(src):
            raise ModelLoadError(f"{src.name}: not a zip file; allowed: a .zip exported by ditlab")
        folder = Path(tempfile.mkdtemp(prefix="qdir-", dir=workdir))
        _safe_extract(src, folder, limits().max_upload_bytes)
    if not is_qdir(folder):
        if src.is_dir():  # a server folder must be the QDIR itself (never a scan of, say, /tmp's subfolders)
            raise ModelLoadError(f"{str(path)!r}: no ditlab_qdir.json in this folder; allowed: a QDIR folder written by Export or `ditlab quantize`")
        subs = [p for p in folder.iterdir() if p.is_dir() and is_qdir(p)]
        if len(subs) != 1:
            raise ModelLoadError(f"{src.name}: no ditlab_qdir.json inside; allowed: a folder or zip written by Export")
        folder = subs[0]
    return folder


def load_qdir(folder: str | os.PathLike) -> tuple:
    """(Quantized, FP source) of an exported QDIR folder: the quantized copy is used as is, never re-quantized."""
    from .api import Quantized, qdir_source
    from .qdir import load_quantized

    qpipe, recipe = load_quantized(folder)
    return Quantized(pipe=qpipe, recipe=recipe, report=None, seconds_quantize=0.0), qdir_source(folder)


# ---------------------------------------------------------------- the app's working folders
WORKDIR_PREFIX = "ditlab-app-"


def app_workdir(parent: str | os.PathLike | None = None) -> Path:
    """A working folder for one app process, ``<tmp>/ditlab-app-<pid>-<random>``, removed when the process exits.
    Folders that processes which have died left behind (killed, so their exit hook never ran) are removed first."""
    import atexit

    parent = Path(parent or tempfile.gettempdir())
    remove_left_by_dead_processes(parent.glob(f"{WORKDIR_PREFIX}*-*"), lambda p: p.name[len(WORKDIR_PREFIX):].split("-", 1)[0])
    folder = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=parent))
    atexit.register(shutil.rmtree, folder, True)
    return folder


class SessionFolders:
    """Per-session folders under an app's working folder, so that uploads and exports never pile up: a session keeps
    only its newest folder of each kind ("upload": an unpacked export it loaded; "export": a zip it made, which
    gradio has copied to its own cache by the time the next one is made), and all of them go when it ends."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "sessions"

    def _session_root(self, session: str) -> Path:
        from .public import safe_name

        return self.root / safe_name(session or "local")

    def _base(self, session: str, kind: str) -> Path:
        return self._session_root(session) / kind

    def fresh(self, session: str, kind: str) -> Path:
        """A new empty folder of ``kind`` for ``session`` (the older ones stay until ``keep_only``)."""
        base = self._base(session, kind)
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def keep_only(self, session: str, kind: str, folder: Path) -> None:
        """Removes ``session``'s other folders of ``kind``: ``folder`` is now the one in use."""
        base = self._base(session, kind)
        for other in base.iterdir() if base.is_dir() else ():
            if other != folder:
                shutil.rmtree(other, ignore_errors=True)

    def drop(self, session: str) -> None:
        """Removes every folder of ``session`` (when it ends)."""
        shutil.rmtree(self._session_root(session), ignore_errors=True)
