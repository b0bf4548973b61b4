"""Putting a checked MP-SPDZ folder in place of the install folder, all or nothing as far as the OS allows.

The new folder is staged next to the target and renamed into place (:func:`swap_into_place`). An install
folder that cannot be renamed because it is a mount point (a container volume at ``/opt/mp-spdz``: EBUSY,
or EXDEV) keeps its folder and gets its contents replaced instead (:func:`replace_contents`): the new files
are first copied into a hidden folder inside it, on its own file system; only then are the old entries moved
aside and the new ones moved in, by renames within that file system, and a failure moves everything back.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from orchestration.mpspdz.archive import SetupError

logger = logging.getLogger(__name__)

#: errors of rename(2) that mean "this folder cannot be renamed", as a mount point cannot
CANNOT_RENAME = (errno.EBUSY, errno.EXDEV)


def staging_dir(home: Path) -> Path:
    """A new owner-only folder next to ``home``, on the same file system."""
    parent = home.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{home.name}.setup-", dir=parent))
    except OSError as exc:
        raise SetupError(f"cannot write next to {home} ({exc}): run invoke setup as a user who may write to {parent}, "
                         f"or install elsewhere with --home DIR (and set MP_SPDZ_HOME or mpspdz.home to it)")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def swap_into_place(top: Path, home: Path, staging: Path, record: str) -> None:
    """Make ``top`` the folder ``home``; what was there goes into ``staging`` (deleted afterwards by the caller).

    ``record`` names the file inside ``top`` that marks an install as setup's (moved in first by
    :func:`replace_contents`, so an interrupted replacement is recognised as setup's and replaced next time).
    """
    if home.exists() or home.is_symlink():
        old = staging / "previous"
        try:
            os.rename(home, old)
        except OSError as exc:
            if exc.errno not in CANNOT_RENAME or home.is_symlink() or not home.is_dir():
                raise SetupError(f"cannot move {home} aside to replace it ({exc}); nothing was changed")
            logger.info("%s cannot be renamed (%s; a mount point?): replacing its contents", home, exc.strerror)
            replace_contents(top, home, record)
            return
        try:
            os.rename(top, home)
        except BaseException as exc:
            os.rename(old, home)
            if isinstance(exc, OSError):
                raise SetupError(f"cannot rename the new MP-SPDZ into place at {home} ({exc}); {home} is as it was")
            raise
    else:
        try:
            os.rename(top, home)
        except OSError as exc:
            raise SetupError(f"cannot rename the new MP-SPDZ into place at {home} ({exc}); nothing was installed")
    _fsync_dir(home.parent)


def replace_contents(top: Path, home: Path, record: str) -> None:
    """Replace everything inside the folder ``home`` by the contents of ``top`` (``home`` itself stays)."""
    tag = secrets.token_hex(4)
    new, old = home / f".invoke-setup-new-{tag}", home / f".invoke-setup-old-{tag}"
    try:
        shutil.copytree(top, new, symlinks=True)
        old.mkdir(mode=0o700)
    except OSError as exc:
        shutil.rmtree(new, ignore_errors=True)
        raise SetupError(f"cannot write into {home} ({exc}): it cannot be renamed (a mount point?) and its contents "
                         f"could not be replaced; it is as it was. Free space there, or install elsewhere with "
                         f"--home DIR")
    names = sorted(p.name for p in new.iterdir())
    names.sort(key=lambda n: n != record)  # the record first: a half-replaced folder is still setup's
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in sorted(home.iterdir()):
            if entry.name not in (new.name, old.name):
                os.rename(entry, old / entry.name)
                moved_out.append(entry.name)
        for name in names:
            os.rename(new / name, home / name)
            moved_in.append(name)
    except BaseException as exc:  # an interrupt too: put the old contents back
        try:
            for name in reversed(moved_in):
                os.rename(home / name, new / name)
            for name in reversed(moved_out):
                os.rename(old / name, home / name)
        except OSError as again:
            raise SetupError(f"replacing the contents of {home} failed ({exc}) and so did putting them back "
                             f"({again}): the old files are in {old}, the new ones in {new}; run invoke setup "
                             f"--force to install again")
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SetupError(f"cannot replace the contents of {home} ({exc}); it is as it was")
        raise
    os.rmdir(new)
    shutil.rmtree(old, ignore_errors=True)
    os.chmod(home, 0o755)
    _fsync_dir(home)
