"""Installing MP-SPDZ for this project (``invoke setup``) and checking that it runs.

MP-SPDZ comes from one of three sources:

* an archive (``--archive FILE``, offline): a ``.tar.xz`` (or ``.tar.gz``) with one top folder holding
  the files below; ``FILE.sha256`` beside it and ``--sha256`` are checked when present;
* MP-SPDZ's official binary release (the default, online): version :data:`RELEASE_VERSION`, checked
  against the pinned :data:`RELEASE_SHA256` (or ``--sha256``). The release ships prebuilt binaries
  per CPU variant in ``bin/Linux-amd64`` and ``bin/Linux-adx``; :func:`release_variant` picks one
  as MP-SPDZ's own ``Scripts/tldr.sh`` does;
* a source tree (``--from-source DIR``): ``make semi2k-party.x dealer-ring-party.x`` there, linked
  to find ``libSPDZ.so`` beside the binaries, then the needed files are copied.

The project needs ``semi2k-party.x`` and ``dealer-ring-party.x`` (plus ``libSPDZ.so`` when they are
linked against it, as a shared-library build is), ``compile.py`` and ``Compiler/``. Every install is
staged in a temporary folder next to the target, checked, and renamed into place: a failed install
leaves the target as it was. The installed folder is only read afterwards; the check compiles and runs
in a temporary folder.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import lzma
import os
import platform
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from preprocessing.fileio import atomic_write_json

from orchestration.mpspdz.launcher import PartySpec, free_ports, run_parties
from orchestration.mpspdz.toolchain import DEALER_BINARY, MPSPDZ, PARTY_BINARY, PROTOCOLS, MPSPDZError, compile_program, programs_dir

logger = logging.getLogger(__name__)

#: MP-SPDZ's official binary release that ``invoke setup`` installs online (the Dockerfile pins the same).
RELEASE_VERSION = "0.4.2"
RELEASE_FILE = f"mp-spdz-{RELEASE_VERSION}.tar.xz"
RELEASE_URL = f"https://github.com/data61/MP-SPDZ/releases/download/v{RELEASE_VERSION}/{RELEASE_FILE}"
#: sha256 of RELEASE_FILE. Required before anything is downloaded, and empty for now: GitHub could not
#: be reached where this was written, so the checksum could not be computed (see docs/docker.md,
#: "The MP-SPDZ checksum"). Pin it here (and as the Dockerfile's MPSPDZ_SHA256 default) once known.
RELEASE_SHA256 = ""

REQUIRED_FILES = (PARTY_BINARY, DEALER_BINARY, "compile.py", "Compiler/__init__.py")
BINARIES = (PARTY_BINARY, DEALER_BINARY)
SHARED_LIB = "libSPDZ.so"
#: what a source build's install gets besides the binaries and the compiler (what the archive ships)
SOURCE_EXTRAS = ("License.txt", "Scripts/setup-ssl.sh", "Scripts/setup-clients.sh", "ExternalIO",
                 "Programs/Source/bankers_bonus.mpc")
#: written into every folder invoke setup installs: where it came from (and that setup may replace it)
RECORD = ".invoke-setup.json"

#: the Debian bookworm packages of the shared libraries MP-SPDZ's binaries load
DEBIAN_PACKAGES = {
    "libgmpxx.so.4": "libgmpxx4ldbl",
    "libgmp.so.10": "libgmp10",
    "libsodium.so.23": "libsodium23",
    "libssl.so.3": "libssl3",
    "libcrypto.so.3": "libssl3",
    "libboost_filesystem.so.1.81.0": "libboost-filesystem1.81.0",
    "libboost_iostreams.so.1.81.0": "libboost-iostreams1.81.0",
    "libz.so.1": "zlib1g",
    "libbz2.so.1.0": "libbz2-1.0",
    "liblzma.so.5": "liblzma5",
    "libzstd.so.1": "libzstd1",
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
}
#: what a source build needs (Debian bookworm), for messages
BUILD_PACKAGES = "build-essential clang cmake libboost1.81-all-dev libgmp-dev libsodium-dev libssl-dev"

CHECK_PROGRAM = "setup_check"  # mpc_programs/setup_check.mpc
CHECK_TIMEOUT = 120.0
_CHECK_LINE = re.compile(r"^setup-check: product (-?\d+) sum (-?\d+)\s*$", re.M)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class SetupError(RuntimeError):
    """MP-SPDZ could not be installed or does not work; the message says what and how to go on."""


def no_release_checksum_message() -> str:
    """Why the online install cannot go ahead without a checksum, and what to do instead."""
    return (f"cannot install MP-SPDZ's official release {RELEASE_FILE} online: its sha256 (64 hex digits) is not "
            f"pinned. RELEASE_SHA256 in orchestration/mpspdz/install.py is empty because GitHub could not be reached "
            f"where this project was prepared, so the checksum could not be computed, and a download is never "
            f"installed unverified (the Dockerfile's MPSPDZ_SHA256 and the CI workflow stop for the same reason). "
            f"Either pass --sha256 <hex> with the sha256 of {RELEASE_FILE} from a download you trust (docs/docker.md, "
            f"'The MP-SPDZ checksum', says how to get it), or install offline from an MP-SPDZ archive with "
            f"`invoke setup --archive FILE` (this project's offline machines and CI: "
            f"`invoke setup --archive ../shared/mp-spdz/mp-spdz-*.tar.xz`), or build your own MP-SPDZ source tree "
            f"with `invoke setup --from-source DIR`.")


# ---- CPU variant of the official release -------------------------------------------------------

def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU feature flags of a /proc/cpuinfo text (x86 ``flags``, ARM ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def release_variant(cpuinfo: str, machine: str) -> str:
    """Which prebuilt binaries of the official release run here: ``adx`` or ``amd64``.

    As MP-SPDZ's ``Scripts/tldr.sh``: ``adx`` (built with AVX2, BMI2, ADX: Broadwell/Zen and newer) when
    the CPU has the ``adx`` flag, else ``amd64`` (runs on any x86-64) on an x86_64 machine; there are no
    release binaries for other machines (``Scripts/build.sh`` builds exactly these two).
    """
    if "adx" in cpu_flags(cpuinfo):
        return "adx"
    if machine != "x86_64":
        raise SetupError(f"MP-SPDZ's release has binaries for x86_64 only, this machine is {machine!r}: build from "
                         f"source instead (invoke setup --from-source DIR)")
    return "amd64"


def _this_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


# ---- what an installation holds ---------------------------------------------------------------

def _ldd(binary: Path) -> str | None:
    """``ldd``'s output for ``binary``; None when there is no ldd."""
    exe = shutil.which("ldd")
    if exe is None:
        return None
    proc = subprocess.run([exe, str(binary)], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def parse_ldd(text: str) -> dict[str, str | None]:
    """soname -> the file it resolves to, or None when ldd says ``not found``."""
    libs: dict[str, str | None] = {}
    for line in text.splitlines():
        name, arrow, target = line.strip().partition(" => ")
        if not arrow:
            continue
        target = target.strip()
        libs[name.strip()] = None if target.startswith("not found") else target.split(" (", 1)[0].strip()
    return libs


def missing_libraries(binaries: Sequence[Path]) -> dict[str, list[str]] | None:
    """soname -> names of the binaries that cannot find it; None when ldd is not available."""
    missing: dict[str, list[str]] = {}
    for b in binaries:
        text = _ldd(b)
        if text is None:
            return None
        for name, target in parse_ldd(text).items():
            if target is None:
                missing.setdefault(name, []).append(b.name)
    return missing


def problems(top: Path) -> list[str]:
    """What keeps ``top`` from being a usable MP-SPDZ for this project (empty: nothing)."""
    top = Path(top)
    if not top.is_dir():
        return [f"folder {top}"]
    found = []
    for rel in REQUIRED_FILES:
        path = top / rel
        if not path.is_file():
            found.append(rel)
        elif rel in BINARIES and not os.access(path, os.X_OK):
            found.append(f"{rel} (not executable)")
    for name in BINARIES:
        if not (top / name).is_file():
            continue
        text = _ldd(top / name)
        if text is None:
            continue  # no ldd: the check run will tell
        target = parse_ldd(text).get(SHARED_LIB, "")
        if target is None:
            found.append(f"{SHARED_LIB} (needed by {name})")
        elif target and Path(target).resolve().parent != top.resolve():
            found.append(f"{SHARED_LIB} beside {name}: it loads {target} from outside {top} (its run path is not "
                         f"$ORIGIN; invoke setup --from-source DIR links it so)")
    return list(dict.fromkeys(found))


def _is_ours(home: Path) -> bool:
    return (home / RECORD).is_file() and not home.is_symlink()


def _is_empty_dir(home: Path) -> bool:
    return home.is_dir() and not home.is_symlink() and not any(home.iterdir())


# ---- installing --------------------------------------------------------------------------------

@dataclass
class Installed:
    home: Path
    changed: bool  # False: it was complete already, nothing was done
    source: str  # where it came from
    detail: str = ""  # the variant chosen, the checksum, ...


def install_mpspdz(home: Path, *, archive: str | Path | None = None, sha256: str | None = None,
                   from_source: str | Path | None = None, force: bool = False, jobs: int | None = None,
                   release_url: str = RELEASE_URL, cpuinfo: str | None = None, machine: str | None = None,
                   ) -> Installed:
    """Install MP-SPDZ into ``home`` unless a complete one is there (``force`` reinstalls).

    Raises :class:`SetupError` naming the file or value at fault; ``home`` is then as it was.
    """
    home = Path(os.path.abspath(Path(home).expanduser()))
    if archive and from_source:
        raise SetupError("give at most one of --archive FILE and --from-source DIR")
    expected = _check_sha256_arg(sha256)
    if archive:
        archive = resolve_archive(archive)
    elif from_source:
        from_source = _check_source_tree(Path(from_source))
    present = home.exists() or home.is_symlink()
    if present and not force:
        issues = problems(home)
        if not issues:
            record = _read_record(home)
            return Installed(home, False, record.get("source", "installed before, not by invoke setup"),
                             record.get("detail", ""))
        if not _is_ours(home) and not _is_empty_dir(home):
            raise SetupError(f"{home} exists but is not a complete MP-SPDZ (missing {', '.join(issues)}), and invoke "
                             f"setup did not make it, so it is left alone: move it away, pass --force to replace it, "
                             f"or install elsewhere with --home DIR")
    if not (archive or from_source or expected or RELEASE_SHA256):  # refused before anything is written
        raise SetupError(no_release_checksum_message())

    staging = _staging_dir(home)
    try:
        if archive:
            top, record = _stage_archive(Path(archive), expected, staging, cpuinfo, machine)
        elif from_source:
            top, record = _stage_source(Path(from_source), staging, jobs)
        else:
            top, record = _stage_release(release_url, expected or RELEASE_SHA256, staging, cpuinfo, machine)
        issues = problems(top)
        if issues:
            raise SetupError(f"{record['source']}: not a usable MP-SPDZ for this project: missing "
                             f"{', '.join(issues)} (it needs {', '.join(REQUIRED_FILES)}, and {SHARED_LIB} beside the "
                             f"binaries when they are linked against it)")
        record["installed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(top / RECORD, record).chmod(0o644)
        top.chmod(0o755)
        _swap_into_place(top, home, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("MP-SPDZ installed at %s from %s", home, record["source"])
    return Installed(home, True, record["source"], record.get("detail", ""))


def _check_sha256_arg(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    value = str(value).strip()
    if not _SHA256.match(value):
        raise SetupError(f"--sha256 {value!r}: expected 64 hex digits (the archive's sha256)")
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar_sha256(archive: Path) -> str | None:
    """The checksum in ``<archive>.sha256`` (``<hex>  <name>``, as sha256sum writes it), if there is one."""
    side = archive.with_name(archive.name + ".sha256")
    if not side.exists():
        return None
    try:
        text = side.read_text(errors="replace").strip()
    except OSError as exc:
        raise SetupError(f"{side}: cannot read it ({exc})")
    first = text.split()[0] if text else ""
    if not _SHA256.match(first):
        raise SetupError(f"{side}: expected a sha256 (64 hex digits, as `sha256sum` writes it), found {text[:80]!r}")
    return first.lower()


def _verify(archive: Path, expected: str | None) -> str:
    """Check ``archive`` against ``expected`` and its .sha256 file; returns the digest."""
    checks = []
    if expected:
        checks.append(("--sha256", expected))
    side = _sidecar_sha256(archive)
    if side:
        checks.append((f"{archive.name}.sha256", side))
    digest = _sha256_file(archive)
    for what, value in checks:
        if digest != value:
            raise SetupError(f"{archive}: sha256 is {digest}, but {what} says {value}: refusing it (a damaged or "
                             f"different file); nothing was installed")
    if not checks:
        logger.warning("%s: not verified (no %s.sha256 beside it and no --sha256); sha256 %s", archive, archive.name,
                       digest)
    return digest


def _staging_dir(home: Path) -> Path:
    parent = home.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{home.name}.setup-", dir=parent))
    except OSError as exc:
        raise SetupError(f"cannot write next to {home} ({exc}): run invoke setup as a user who may write to {parent}, "
                         f"or install elsewhere with --home DIR (and set MP_SPDZ_HOME or mpspdz.home to it)")


def _extract(archive: Path, dest: Path, what: str) -> Path:
    """Unpack ``archive`` into ``dest``; returns its one top folder."""
    dest.mkdir()
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")  # no absolute paths, no '..', no links out, no devices
            else:  # pragma: no cover - Python without extraction filters
                for m in tar.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                        raise tarfile.TarError(f"refusing member {m.name!r}")
                tar.extractall(dest)
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as exc:
        raise SetupError(f"{what}: cannot unpack it, it is truncated, corrupt or not a .tar.xz/.tar.gz archive "
                         f"({type(exc).__name__}: {exc}); nothing was installed")
    entries = sorted(dest.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        names = ", ".join(e.name for e in entries) or "nothing"
        raise SetupError(f"{what}: expected one top folder (like mp-spdz-0.4.2/), found {names}")
    return entries[0]


def _use_release_binaries(top: Path, what: str, cpuinfo: str | None, machine: str | None) -> str:
    """The official release keeps its binaries in bin/Linux-<variant>/: put the right ones at the top, as tldr.sh."""
    if (top / PARTY_BINARY).exists() or not (top / "bin").is_dir():
        return ""
    variant = release_variant(_this_cpuinfo() if cpuinfo is None else cpuinfo,
                              platform.machine() if machine is None else machine)
    src = top / "bin" / f"Linux-{variant}"
    if not src.is_dir():
        have = ", ".join(sorted(p.name for p in (top / "bin").iterdir() if p.is_dir())) or "none"
        raise SetupError(f"{what}: has no bin/Linux-{variant}/ for this CPU (it has: {have})")
    for f in src.iterdir():
        os.replace(f, top / f.name)
    for d in (top / "bin").glob("Linux-*"):  # the licences in bin/ stay
        shutil.rmtree(d)
    return variant


def _stage_archive(archive: Path, expected: str | None, staging: Path, cpuinfo: str | None,
                   machine: str | None) -> tuple[Path, dict]:
    digest = _verify(archive, expected)
    top = _extract(archive, staging / "unpack", str(archive))
    variant = _use_release_binaries(top, str(archive), cpuinfo, machine)
    detail = f"sha256 {digest}" + (f", release binaries for {variant}" if variant else "")
    return top, {"source": str(archive), "sha256": digest, "variant": variant, "detail": detail}


def _stage_release(url: str, expected: str, staging: Path, cpuinfo: str | None,
                   machine: str | None) -> tuple[Path, dict]:
    import urllib.error
    import urllib.request

    dest = staging / RELEASE_FILE
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SetupError(f"cannot download {url} ({exc}); offline, install from an archive with --archive FILE")
    digest = _sha256_file(dest)
    if digest != expected:
        raise SetupError(f"{url}: the download's sha256 is {digest}, expected {expected}: refusing it; nothing was "
                         f"installed")
    top = _extract(dest, staging / "unpack", url)
    variant = _use_release_binaries(top, url, cpuinfo, machine)
    detail = f"MP-SPDZ {RELEASE_VERSION}, sha256 {digest}" + (f", release binaries for {variant}" if variant else "")
    return top, {"source": url, "sha256": digest, "variant": variant, "detail": detail}


def _swap_into_place(top: Path, home: Path, staging: Path) -> None:
    """Rename the checked folder to ``home``; what was there goes into ``staging`` (deleted afterwards)."""
    if home.exists() or home.is_symlink():
        old = staging / "previous"
        os.rename(home, old)
        try:
            os.rename(top, home)
        except BaseException:
            os.rename(old, home)
            raise
    else:
        os.rename(top, home)
    try:
        fd = os.open(home.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read_record(home: Path) -> dict:
    try:
        return json.loads((home / RECORD).read_text())
    except (OSError, ValueError):
        return {}


# ---- building from source ----------------------------------------------------------------------

def source_build_commands(src: Path, jobs: int | None = None) -> list[tuple[Path, list[str]]]:
    """(folder, command) to build both party binaries in an MP-SPDZ source tree.

    SimplestOT_C needs ``cmake .`` first. ``MY_LDLIBS`` (which MP-SPDZ's Makefile adds to the link line) puts
    ``$ORIGIN`` first in the binaries' run path, so they find libSPDZ.so beside themselves once copied.
    """
    src = Path(src)
    jobs = jobs or os.cpu_count() or 1
    return [
        (src / "deps" / "SimplestOT_C" / "ref10", ["cmake", "."]),
        (src, ["make", f"-j{int(jobs)}", "MY_LDLIBS=-Wl,-rpath,\\$$ORIGIN", PARTY_BINARY, DEALER_BINARY]),
    ]


def _check_source_tree(src: Path) -> Path:
    src = Path(os.path.abspath(src.expanduser()))
    if not src.is_dir():
        raise SetupError(f"--from-source {src}: no such folder (expected an MP-SPDZ source tree, e.g. a clone of "
                         f"https://github.com/data61/MP-SPDZ with its submodules)")
    lacking = [rel for rel in ("Makefile", "CONFIG", "compile.py", "Compiler/__init__.py",
                               "Machines/semi2k-party.cpp", "Machines/dealer-ring-party.cpp")
               if not (src / rel).is_file()]
    if lacking:
        raise SetupError(f"--from-source {src}: not an MP-SPDZ source tree (missing {', '.join(lacking)})")
    subs = [rel for rel in ("deps/SimplestOT_C/ref10/CMakeLists.txt", "deps/libOTe/CMakeLists.txt")
            if not (src / rel).is_file()]
    if subs:
        raise SetupError(f"--from-source {src}: its submodules are not checked out (missing {', '.join(subs)}): run "
                         f"`git submodule update --init --recursive` in {src}")
    tools = [t for t in ("make", "cmake") if shutil.which(t) is None]
    if tools:
        raise SetupError(f"--from-source needs {' and '.join(tools)} on PATH (Debian: apt-get install {BUILD_PACKAGES})")
    return src


def _stage_source(src: Path, staging: Path, jobs: int | None) -> tuple[Path, dict]:
    for name in BINARIES:  # relink them, so that the run path below applies (objects are kept)
        (src / name).unlink(missing_ok=True)
    for cwd, cmd in source_build_commands(src, jobs):
        logger.info("%s (in %s)", " ".join(cmd), cwd)
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise SetupError(f"`{' '.join(cmd)}` in {cwd} could not start: {exc}")
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise SetupError(f"`{' '.join(cmd)}` in {cwd} failed (exit {proc.returncode}); nothing was installed. "
                             f"A build needs Boost >= 1.75 and the Debian packages {BUILD_PACKAGES}. Last lines:\n{tail}")
    top = staging / "mp-spdz"
    top.mkdir()
    for name in (*BINARIES, SHARED_LIB, "compile.py"):
        if (src / name).is_file():
            shutil.copy2(src / name, top / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.d", "*.x")
    shutil.copytree(src / "Compiler", top / "Compiler", ignore=ignore)
    for rel in SOURCE_EXTRAS:
        path = src / rel
        if path.is_dir():
            shutil.copytree(path, top / rel, ignore=ignore)
        elif path.is_file():
            (top / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, top / rel)
    return top, {"source": f"built from {src}", "detail": f"make {PARTY_BINARY} {DEALER_BINARY} in {src}"}


# ---- the Debian runtime libraries --------------------------------------------------------------

@dataclass
class Libraries:
    checked: bool  # False: no ldd here
    installed: list[str]  # Debian packages apt-get installed now


def debian_packages(sonames: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Debian packages that provide ``sonames``, sonames no known package provides)."""
    pkgs = sorted({DEBIAN_PACKAGES[s] for s in sonames if s in DEBIAN_PACKAGES})
    unknown = sorted(s for s in sonames if s not in DEBIAN_PACKAGES)
    return pkgs, unknown


def ensure_runtime_libraries(home: Path, *, is_root: bool | None = None, apt_get: str | None = "auto",
                             run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Libraries:
    """Check with ldd that both binaries find their shared libraries (and that openssl is there).

    As root with apt-get, missing Debian packages are installed; otherwise the error names them.
    ``is_root`` None: this process's; ``apt_get`` "auto": the one on PATH, None: none.
    """
    binaries = [Path(home) / b for b in BINARIES]
    missing = missing_libraries(binaries)
    if missing is None:
        logger.warning("no ldd on this machine: the binaries' shared libraries were not checked")
        return Libraries(False, [])
    if SHARED_LIB in missing:
        raise SetupError(f"{home}: {SHARED_LIB} is missing beside the binaries: the installation is incomplete; run "
                         f"invoke setup --force to reinstall it")
    need_openssl = shutil.which("openssl") is None  # the check's certificates, and `invoke certs`
    if not missing and not need_openssl:
        return Libraries(True, [])
    pkgs, unknown = debian_packages(list(missing))
    if need_openssl:
        pkgs.append("openssl")
    what = "; ".join(f"{s} (needed by {', '.join(bs)})" for s, bs in sorted(missing.items()))
    if need_openssl:
        what = "; ".join(filter(None, [what, "the openssl command"]))
    is_root = (os.geteuid() == 0) if is_root is None else is_root
    if apt_get == "auto":
        apt_get = shutil.which("apt-get")
    if not (is_root and apt_get and pkgs):
        how = f"install the Debian packages: sudo apt-get install {' '.join(pkgs)}" if pkgs else ""
        if unknown:
            how = "; ".join(filter(None, [how, f"no known Debian package provides {', '.join(unknown)} "
                                               f"(`apt-file search NAME` finds one)"]))
        raise SetupError(f"missing on this machine: {what}. To fix it, {how}; then run invoke setup again"
                         + ("" if is_root or not pkgs else " (as root, invoke setup installs them itself)"))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt_get, "update"], [apt_get, "install", "-y", "--no-install-recommends", *pkgs]):
        logger.info("%s", " ".join(cmd))
        proc = run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
        if proc.returncode != 0:
            tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-15:])
            raise SetupError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}) while installing "
                             f"{' '.join(pkgs)} for {what}:\n{tail}")
    still = missing_libraries(binaries) or {}
    if still or unknown or shutil.which("openssl") is None:
        left = ", ".join(sorted(still)) or ", ".join(unknown) or "the openssl command"
        raise SetupError(f"after apt-get install {' '.join(pkgs)}, still missing: {left}")
    return Libraries(True, pkgs)


# ---- the check: a two-party and a three-party dealer run ---------------------------------------

@dataclass
class CheckResult:
    name: str
    binary: str
    a: int
    b: int
    seconds: float


def check_installation(home: Path, *, timeout: float = CHECK_TIMEOUT, host: str = "127.0.0.1") -> list[CheckResult]:
    """Compile ``mpc_programs/setup_check.mpc`` and run it with semi2k-party.x (2 parties, TLS) and with
    dealer-ring-party.x (-N 3, TLS), on random secret inputs; check the revealed product and sum.

    Everything is written to a temporary folder; ``home`` is only read.
    """
    mp = MPSPDZ(Path(home))
    a, b = secrets.randbelow(1 << 30) + 2, secrets.randbelow(1 << 30) + 2
    results = []
    with tempfile.TemporaryDirectory(prefix="mpspdz-setup-check-") as tmp:
        work = Path(tmp)
        for proto in (PROTOCOLS["semi2k"], PROTOCOLS["dealer"]):
            binary = mp.binary(proto)
            what = "two-party" if proto.dealer is None else "dealer"
            try:
                program = compile_program(mp, CHECK_PROGRAM, [], work / "build", proto=proto)
            except MPSPDZError as exc:
                raise SetupError(f"the check program does not compile with {mp.compiler} for {proto.name}: {exc}")
            run = work / proto.name
            (run / "Player-Data").mkdir(parents=True)
            os.symlink(programs_dir(work / "build", proto), run / "Programs")
            (run / "Player-Data" / "Input-P0-0").write_text(f"{a}\n")
            (run / "Player-Data" / "Input-P1-0").write_text(f"{b}\n")
            make_test_certs(run / "Player-Data", proto.n_parties)
            start = time.monotonic()
            base = free_ports(host, proto.n_parties)
            hosts = run / "hosts"
            hosts.write_text("".join(f"{host}:{base + i}\n" for i in range(proto.n_parties)))
            specs = [PartySpec(i, run, run / f"P{i}.log", host, base + i) for i in range(proto.n_parties)]
            try:
                run_parties(mp, program, specs, hosts, encrypted=True, timeout=timeout, proto=proto)
            except MPSPDZError as exc:
                raise SetupError(f"{what} check with {binary} failed: {exc}")
            _expect(run / "P0.log", a, b, f"{what} check with {proto.binary}")
            label = ("two parties over TLS" if proto.dealer is None
                     else f"two parties and a dealer (-N {proto.n_parties}) over TLS")
            results.append(CheckResult(label, proto.binary, a, b, time.monotonic() - start))
    return results


def _expect(log: Path, a: int, b: int, what: str) -> None:
    text = log.read_text(errors="replace")
    m = _CHECK_LINE.search(text)
    if not m:
        tail = "\n".join(text.strip().splitlines()[-8:])
        raise SetupError(f"{what}: party 0 printed no result line. Last lines:\n{tail}")
    product, total = int(m.group(1)), int(m.group(2))
    if (product, total) != (a * b, a + b):
        raise SetupError(f"{what}: inputs {a} and {b} gave product {product} and sum {total}, expected {a * b} and "
                         f"{a + b}: this MP-SPDZ computes wrong results")


def make_test_certs(player_data: Path, n: int) -> None:
    """Throw-away TLS keys and self-signed certificates P0..P<n-1> with the hash links MP-SPDZ looks up."""
    exe = shutil.which("openssl")
    if exe is None:
        raise SetupError("the openssl command is needed for the TLS check (Debian: apt-get install openssl)")
    for i in range(n):
        pem, key = player_data / f"P{i}.pem", player_data / f"P{i}.key"
        for cmd in ([exe, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-days", "1", "-subj", f"/CN=P{i}", "-keyout", str(key), "-out", str(pem)],
                    [exe, "x509", "-hash", "-noout", "-in", str(pem)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise SetupError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        k = 0
        while (player_data / f"{proc.stdout.strip()}.{k}").exists():
            k += 1
        os.symlink(pem.name, player_data / f"{proc.stdout.strip()}.{k}")

