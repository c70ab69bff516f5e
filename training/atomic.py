"""Crash-safe file and folder writes: temporary name, fsync, os.replace, fsync of the parent folder."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Union

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def fsync_path(path: Union[str, Path]) -> None:
    """fsync a file or a folder so its contents (or its entries) reach the disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    fd = os.open(str(path), flags)
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems (and Windows for folders) refuse fsync on a folder; the rename is still atomic.
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write bytes so that `path` holds either the old or the complete new content, never a mix."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_dir(final: Union[str, Path], fill: Callable[[Path], None]) -> Path:
    """Create folder `final` atomically: `fill(tmp_dir)` writes the files, then one rename publishes them.

    A crash at any point leaves either no `final` or a complete one; leftovers are hidden `.tmp-*`
    folders that `remove_stale_temporaries` deletes.
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; refusing to overwrite a published checkpoint")
    tmp = final.parent / f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for child in tmp.iterdir():
            if child.is_file():
                fsync_path(child)
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
    return final


def remove_dir_safely(path: Union[str, Path]) -> None:
    """Delete a folder by first renaming it to a hidden trash name, so a half-deleted folder never looks valid."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.parent / f"{TRASH_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(folder: Union[str, Path]) -> list[Path]:
    """Delete `.tmp-*` and `.trash-*` leftovers of interrupted writes in `folder`; returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for child in folder.iterdir():
        if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed
