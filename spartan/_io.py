"""Crash-safe file and folder replacement: the package's one implementation.

A reader sees either the old contents or the complete new ones, never a mix, whenever the
process dies. Files are written under a unique temporary name beside the target, flushed to
disk, renamed over the target, and the folder's entry is flushed too. Files get the ordinary
permissions of the process (its umask), like any other output.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "existing_folder", "remove_folder", "replace_folder"]


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Replace the file ``target`` with what ``write(temporary_path)`` writes there."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(temporary)
        _ordinary_permissions(temporary)
        _fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Replace the file ``target`` with ``text`` (UTF-8)."""
    return atomic_write(target, lambda path: path.write_text(text, encoding="utf-8"))


def replace_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Replace the folder ``folder`` with what ``write(staging_folder)`` writes into a new folder.

    At every moment either ``folder`` or ``.<name>.previous`` beside it is complete: read it
    through ``existing_folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.staging-{uuid.uuid4().hex[:12]}")  # unique: saves may overlap
    previous = _previous(folder)
    staging.mkdir()
    try:
        write(staging)
        for file in staging.rglob("*"):
            if file.is_file():
                _ordinary_permissions(file)
                _fsync_file(file)
        _fsync_folder(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(staging, folder)
    _fsync_folder(folder.parent)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def existing_folder(folder: str | os.PathLike) -> Path | None:
    """``folder``, or its previous version when a crash hit between the renames of
    ``replace_folder``; ``None`` when neither exists."""
    folder = Path(folder)
    for candidate in (folder, _previous(folder)):
        if candidate.is_dir():
            return candidate
    return None


def remove_folder(folder: str | os.PathLike) -> None:
    """Delete ``folder`` and any staging or previous version ``replace_folder`` left beside it."""
    folder = Path(folder)
    stagings = folder.parent.glob(f".{folder.name}.staging-*") if folder.parent.is_dir() else []
    for candidate in (folder, _previous(folder), *stagings):
        shutil.rmtree(candidate, ignore_errors=True)


def _previous(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.previous")


def _ordinary_permissions(path: Path) -> None:
    """Read and write for whom the process's umask allows (writers such as safetensors create 0600 files)."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without changing it (changing it is not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is what it offers
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
