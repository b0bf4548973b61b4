"""Verifying and unpacking an MP-SPDZ archive (``invoke setup --archive``, and the official release download).

The archive is opened once: hashed from that file object, checked against every expected sha256, then
unpacked from the same file object (:func:`verified_extract`), so a file swapped on disk between the check
and the unpacking is never seen.

Unpacking does not rely on :mod:`tarfile`'s extraction filters (``filter="data"`` is bypassable on some
Python versions, CVE-2025-4517). :func:`check_members` refuses the whole archive, naming the member, when
one is a hard link, a device, a fifo or anything else that is neither a regular file, a directory nor a
safe symlink; has an absolute path or a ``..`` component; lies under a symlink or a file; or comes twice.
A symlink is safe only when it is relative and its target, resolved inside the archive's own entries
(never through another symlink), is a regular file or a directory extracted before it. :func:`safe_extract`
then writes only those entries, itself: files are created new (``O_EXCL | O_NOFOLLOW``) under real
directories, modes are 0644 or 0755 (executables keep their exec bit; no setuid, setgid or sticky bit, nothing
writable by group or others, the owner is whoever runs setup).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

logger = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
#: (what says so, the expected sha256), e.g. ("--sha256", "ab12...")
Check = tuple[str, str]


class SetupError(RuntimeError):
    """MP-SPDZ could not be installed or does not work; the message says what and how to go on."""


# ---- checksums ---------------------------------------------------------------------------------

def check_sha256_arg(value: str | None, what: str = "--sha256") -> str | None:
    """``value`` as lower-case hex, None when empty; an error unless it is 64 hex digits."""
    if value in (None, ""):
        return None
    value = str(value).strip()
    if not SHA256_HEX.match(value):
        raise SetupError(f"{what} {value!r}: expected 64 hex digits (the archive's sha256)")
    return value.lower()


def resolve_archive(value: str | Path) -> Path:
    """The archive file; a glob pattern (``mp-spdz-*.tar.xz``) must match exactly one file."""
    path = Path(value).expanduser()
    if not path.exists() and glob.has_magic(str(value)):
        matches = sorted(glob.glob(os.path.expanduser(str(value))))
        if len(matches) != 1:
            found = ", ".join(matches) if matches else "nothing"
            raise SetupError(f"--archive {value}: the pattern must match exactly one MP-SPDZ archive, it matches "
                             f"{found}")
        path = Path(matches[0])
    if not path.is_file():
        raise SetupError(f"--archive {path}: no such file (expected an MP-SPDZ .tar.xz with one top folder)")
    return Path(os.path.abspath(path))


def sidecar_sha256(archive: Path) -> str | None:
    """The checksum in ``<archive>.sha256`` (``<hex>  <name>``, as sha256sum writes it), if there is one."""
    side = archive.with_name(archive.name + ".sha256")
    if not side.exists():
        return None
    try:
        text = side.read_text(errors="replace").strip()
    except OSError as exc:
        raise SetupError(f"{side}: cannot read it ({exc})")
    first = text.split()[0] if text else ""
    if not SHA256_HEX.match(first):
        raise SetupError(f"{side}: expected a sha256 (64 hex digits, as `sha256sum` writes it), found {text[:80]!r}")
    return first.lower()


def archive_checks(archive: Path, expected: str | None) -> list[Check]:
    """What ``archive`` must hash to: ``--sha256`` and the ``.sha256`` file beside it, those that exist."""
    checks: list[Check] = [("--sha256", expected)] if expected else []
    side = sidecar_sha256(archive)
    if side:
        checks.append((f"{archive.name}.sha256", side))
    return checks


def no_checksum_message(archive: Path) -> str:
    return (f"{archive}: nothing to verify it against: there is no {archive.name}.sha256 beside it and no --sha256. "
            f"Put the sha256 from a source you trust beside it (`sha256sum {archive.name} > {archive.name}.sha256`, "
            f"on the machine it came from), or pass --sha256 <hex>; to install it unverified on purpose, pass "
            f"--unverified. Nothing was installed")


def sha256_of(fh: BinaryIO) -> str:
    """sha256 of what ``fh`` holds from its current position to the end."""
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def verified_extract(fh: BinaryIO, checks: Sequence[Check], dest: Path, what: str) -> tuple[Path, str]:
    """Hash the open archive ``fh`` from its start, compare with every check, then unpack the same ``fh``.

    Returns (the archive's one top folder in ``dest``, the sha256). No checks: unverified (a warning).
    """
    fh.seek(0)
    digest = sha256_of(fh)
    for by, value in checks:
        if digest != value:
            raise SetupError(f"{what}: sha256 is {digest}, but {by} says {value}: refusing it (a damaged or "
                             f"different file); nothing was installed")
    if not checks:
        logger.warning("%s: not verified (--unverified: no .sha256 beside it and no --sha256); sha256 %s", what,
                       digest)
    fh.seek(0)
    return safe_extract(fh, dest, what), digest


# ---- which members may be unpacked -------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    parts: tuple[str, ...]  # the path inside the archive, without "." components
    kind: str  # "dir", "file" or "link"
    member: tarfile.TarInfo


def _refuse(what: str, name: str, why: str) -> SetupError:
    return SetupError(f"{what}: cannot unpack it safely: member {name!r} {why}; the whole archive is refused, "
                      f"nothing was installed")


def _parts(what: str, name: str) -> tuple[str, ...]:
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise _refuse(what, name, "has an absolute path (or a backslash or NUL)" if name.startswith("/")
                      else "has a backslash or NUL in its path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(what, name, "has a '..' component (it would land outside the install folder)")
    return parts


def _link_target(what: str, entry: Entry, kinds: dict[tuple[str, ...], str]) -> None:
    """A symlink must point, relatively, to a file or folder extracted before it, without passing a symlink."""
    name, target = entry.member.name, entry.member.linkname
    if not target or target.startswith("/") or "\x00" in target:
        raise _refuse(what, name, f"is a symlink to {target!r}: only relative symlinks inside the archive are allowed")
    at = list(entry.parts[:-1])
    comps = [p for p in target.split("/") if p not in ("", ".")]
    for i, comp in enumerate(comps):
        if comp == "..":
            if not at:
                raise _refuse(what, name, f"is a symlink to {target!r}, which points outside the install folder")
            at.pop()
            continue
        at.append(comp)
        kind = kinds.get(tuple(at))
        last = i == len(comps) - 1
        if kind is None or kind == "link" or (not last and kind != "dir"):
            raise _refuse(what, name, f"is a symlink to {target!r}, which is not a file or folder extracted before "
                                      f"it (or goes through another symlink)")
    if not at:
        raise _refuse(what, name, f"is a symlink to {target!r}: the archive's root")


def check_members(members: Sequence[tarfile.TarInfo], what: str) -> list[Entry]:
    """The entries to unpack, in order; a :class:`SetupError` naming the first member that is refused."""
    kinds: dict[tuple[str, ...], str] = {}
    explicit: set[tuple[str, ...]] = set()
    entries: list[Entry] = []
    for m in members:
        parts = _parts(what, m.name)
        if m.isreg():
            kind = "file"
        elif m.isdir():
            kind = "dir"
        elif m.issym():
            kind = "link"
        else:
            kind = ("a hard link" if m.islnk() else "a character device" if m.ischr() else "a block device"
                    if m.isblk() else "a fifo" if m.isfifo() else f"of tar type {m.type!r}")
            raise _refuse(what, m.name, f"is {kind}: only regular files, folders and symlinks inside the archive "
                                        f"are allowed")
        if not parts:
            if kind != "dir":
                raise _refuse(what, m.name, "is the archive's root but not a folder")
            continue
        for i in range(1, len(parts)):
            above = kinds.setdefault(parts[:i], "dir")
            if above != "dir":
                raise _refuse(what, m.name, f"lies under {'/'.join(parts[:i])!r}, which is a "
                                            f"{'symlink' if above == 'link' else 'file'}")
        if parts in explicit or (parts in kinds and kind != "dir"):
            raise _refuse(what, m.name, "comes twice in the archive (or replaces a folder)")
        entry = Entry(parts, kind, m)
        if kind == "link":
            _link_target(what, entry, kinds)
        kinds[parts] = kind
        explicit.add(parts)
        entries.append(entry)
    return entries


# ---- unpacking ---------------------------------------------------------------------------------

def _real_dir(dest: Path, parts: tuple[str, ...], what: str, name: str) -> Path:
    """``dest/parts``, made if missing; every step checked to be a real folder, never a symlink."""
    path = dest
    for part in parts:
        path = path / part
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(what, name, f"would be written through {path}, which is not a folder")
    return path


def _file_mode(member: tarfile.TarInfo) -> int:
    return 0o755 if member.mode & 0o111 else 0o644


def safe_extract(fh: BinaryIO, dest: Path, what: str) -> Path:
    """Unpack the tar (.tar.xz, .tar.gz, .tar) read from ``fh`` into the new folder ``dest``; returns its one
    top folder. Everything is checked before anything is written (see :func:`check_members`)."""
    dest.mkdir(mode=0o700)
    dirs: list[Path] = [dest]
    try:
        with tarfile.open(fileobj=fh, mode="r:*") as tar:
            entries = check_members(tar.getmembers(), what)
            for e in entries:
                parent = _real_dir(dest, e.parts[:-1], what, e.member.name)
                path = parent / e.parts[-1]
                if e.kind == "dir":
                    dirs.append(_real_dir(dest, e.parts, what, e.member.name))
                elif e.kind == "link":
                    os.symlink(e.member.linkname, path)
                else:
                    src = tar.extractfile(e.member)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(path, flags, 0o600)
                    with open(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                        os.fchmod(out.fileno(), _file_mode(e.member))
                    os.utime(path, (e.member.mtime, e.member.mtime), follow_symlinks=False)
    except SetupError:
        raise
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as exc:
        raise SetupError(f"{what}: cannot unpack it, it is truncated, corrupt or not a .tar.xz/.tar.gz archive "
                         f"({type(exc).__name__}: {exc}); nothing was installed")
    for root, subdirs, _ in os.walk(dest):  # the implicit folders too; os.walk does not enter symlinks
        dirs.extend(Path(root) / d for d in subdirs if not (Path(root) / d).is_symlink())
    for d in dirs:
        os.chmod(d, 0o755)  # never a symlink: filtered above
    entries = sorted(dest.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        names = ", ".join(e.name for e in entries) or "nothing"
        raise SetupError(f"{what}: expected one top folder (like mp-spdz-0.4.2/), found {names}")
    return entries[0]
