"""File helpers: atomic writes, owner-only files, and destroying files that held shares.

* Atomic writes: a reader sees the old file or the new one, never half of one.
* Owner-only: everything the client and the servers write (shares, models, keys, logs, scratch) is
  readable by the owner only. :func:`owner_only` sets the process umask to 077 while any such
  block runs (a process-wide setting, so it is counted, not nested blindly); folders made inside
  are 0700 and files 0600, and child processes started inside inherit it.
* Destroying: :func:`destroy_file` overwrites a file's bytes in place and flushes them before it
  unlinks the file. This is best effort: on journaling or copy-on-write file systems (btrfs, ZFS,
  data=journal ext4), on SSDs (wear levelling) and in backups or snapshots old blocks can survive.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, TextIO

logger = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
_CHUNK = 1 << 20


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path``: temp file in the same folder, fsync, os.replace, fsync the folder.

    The temp file is made by :func:`tempfile.mkstemp`, mode 0600, and keeps that mode when it replaces ``path``.
    Folders it has to make are owner-only (0700); existing ones keep their mode.
    """
    path = Path(path)
    with owner_only():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- owner-only files --------------------------------------------------------------------------

_umask_lock = threading.Lock()
_umask_users = 0
_umask_saved = 0


@contextmanager
def owner_only() -> Iterator[None]:
    """Inside this block (or a function decorated with ``@owner_only()``) new files are 0600, folders 0700.

    The umask is per process, so while any thread is inside such a block it stays at 077; the
    previous umask comes back when the last one leaves.
    """
    global _umask_users, _umask_saved
    with _umask_lock:
        if _umask_users == 0:
            _umask_saved = os.umask(PRIVATE_UMASK)
            os.umask(_umask_saved | PRIVATE_UMASK)
        _umask_users += 1
    try:
        yield
    finally:
        with _umask_lock:
            _umask_users -= 1
            if _umask_users == 0:
                os.umask(_umask_saved)


def private_dir(path: str | Path) -> Path:
    """Make ``path`` (and missing parents) if needed and set it to 0700.

    A folder made by an older version with 0755 is tightened here, which also shuts others out of
    any 0644 files still inside it."""
    path = Path(path)
    with owner_only():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        try:
            os.chmod(path, 0o700)
        except PermissionError as exc:
            raise PermissionError(f"{path}: cannot make it owner-only (mode 0700): {exc}") from None
    return path


def _open_private_fd(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:  # an existing file keeps its mode on open: tighten it
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(path: str | Path, mode: str = "w") -> TextIO | BinaryIO:
    """Open ``path`` for writing ("w", "wb", "a", "ab"); a new file is 0600 from its first byte."""
    if mode not in ("w", "wb", "a", "ab"):
        raise ValueError(f"open_private: mode {mode!r}, expected one of w, wb, a, ab")
    flags = os.O_WRONLY | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    return os.fdopen(_open_private_fd(Path(path), flags), mode)  # type: ignore[return-value]


def copy_private(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src``'s bytes to ``dst``, which is 0600 from the moment it exists (keys, shares)."""
    dst = Path(dst)
    with open(src, "rb") as fin, os.fdopen(_open_private_fd(dst, os.O_WRONLY | os.O_TRUNC), "wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
    return dst


# ---- destroying ----------------------------------------------------------------------------------

def destroy_file(path: str | Path) -> None:
    """Overwrite ``path``'s bytes with zeros in place, fsync, then unlink it (a symlink is only unlinked).

    Best effort: see the module docstring for where old blocks can survive."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:  # a symlink (ELOOP) or a file we may not write: nothing to overwrite, unlink it
        fd = -1
    if fd >= 0:
        try:
            left = os.fstat(fd).st_size
            zeros = bytes(min(left, _CHUNK))
            while left > 0:
                left -= os.write(fd, zeros[:min(left, len(zeros))])
            os.fsync(fd)
        except OSError as exc:
            logger.warning("%s: could not overwrite before unlinking (%s)", path, exc)
        finally:
            os.close(fd)
    path.unlink(missing_ok=True)


def destroy_tree(root: str | Path) -> None:
    """:func:`destroy_file` for every file under ``root``, then remove the folders (symlinks are not followed)."""
    root = Path(root)
    if root.is_symlink() or root.is_file():
        destroy_file(root)
        return
    if not root.exists():
        return
    try:
        for dirpath, dirs, files in os.walk(root, topdown=False):
            for name in files:
                destroy_file(Path(dirpath) / name)
            for name in dirs:
                d = Path(dirpath) / name
                d.unlink() if d.is_symlink() else d.rmdir()
        root.rmdir()
    except OSError as exc:
        logger.warning("%s: could not destroy every file (%s); removing the rest", root, exc)
        shutil.rmtree(root, ignore_errors=True)
