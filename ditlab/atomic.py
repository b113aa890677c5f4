"""One way to write a file so that readers see the old file or the complete new one, never half of one.

The temporary file sits beside the target (same filesystem, so ``os.replace`` is atomic on POSIX) and its name carries
the writer's pid (``.<name>.<pid>-<random>.tmp<suffix>``), so ``calib_cache`` can remove files of writers that were
killed mid-write. Used by the calibration cache, the sensitivity cache, the results documents and the app's exports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def write_atomic(path: Path, write: Callable[[str], object], suffix: str = "") -> None:
    """Calls ``write(tmp_path)``, flushes it to disk and renames it onto ``path``; the temporary file is removed on
    any failure. ``suffix`` is appended to the temporary name (for writers that insist on a file ending)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain open() would give it
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` with ``write_atomic`` (the old file or the complete new one, mode as a plain write)."""
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def _umask() -> int:
    """The process umask: from /proc on Linux (reading it with os.umask would change it for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process id can be
        return False
    except PermissionError:
        return True
    return True


def remove_left_by_dead_processes(paths: Iterable[Path], pid_of: Callable[[Path], str]) -> list[Path]:
    """Removes each of ``paths`` (files or folders) whose writer's process id, ``pid_of(path)`` (text), is a number
    of a process that no longer runs: what killed writers left behind. Returns the removed paths."""
    removed = []
    for path in paths:
        pid = pid_of(path)
        if pid.isdigit() and not process_alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` if it is a file (not a folder), which makes ``path`` unwritable; else None."""
    existing = next((p for p in path.parents if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes one file's data, or one folder's entries (e.g. a rename inside it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flushes every file under ``folder`` and the folders themselves to disk (before a folder is renamed into place,
    so that after a power loss the renamed folder is never there with empty or short files)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:  # files before the folders that list them
        fsync_path(path)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with its I/O failures as ``OSError``: the Rust writer reports a full disk as
    ``SafetensorError("... No space left on device (os error 28)")``, which callers that handle OSError would miss."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path)) if metadata is None else save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc
