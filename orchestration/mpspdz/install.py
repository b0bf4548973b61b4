"""Installing MP-SPDZ for this project (``invoke setup``) and checking that it runs.

MP-SPDZ comes from one of three sources:

* an archive (``--archive FILE``, offline): a ``.tar.xz`` (or ``.tar.gz``) with one top folder holding
  the files below, verified against ``FILE.sha256`` beside it and ``--sha256``; with neither it is refused
  unless ``--unverified`` says to install it unverified;
* MP-SPDZ's official binary release (the default, online): version :data:`RELEASE_VERSION`, verified
  against the sha256 digest GitHub publishes for the release asset (``release.py``), and against
  :data:`RELEASE_SHA256` and ``--sha256`` when given. The release ships prebuilt binaries per CPU variant in
  ``bin/Linux-amd64`` and ``bin/Linux-adx``; :func:`release_variant` picks one as MP-SPDZ's own
  ``Scripts/tldr.sh`` does;
* a source tree (``--from-source DIR``): ``make semi2k-party.x dealer-ring-party.x`` there, linked
  to find ``libSPDZ.so`` beside the binaries, then the needed files are copied.

The project needs ``semi2k-party.x`` and ``dealer-ring-party.x`` (plus ``libSPDZ.so`` when they are
linked against it, as a shared-library build is), ``compile.py`` and ``Compiler/``. Every install is
staged in a temporary folder next to the target, checked, and put into place (``place.py``): a failed
install leaves the target as it was. Archives are hashed and unpacked from one open file, with our own
member checks (``archive.py``). The installed folder is only read afterwards; the check compiles and runs
in a temporary folder. :func:`run_setup` is all of ``invoke setup``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from preprocessing.fileio import atomic_write_json

from orchestration.mpspdz import release
from orchestration.mpspdz.archive import (SetupError, archive_checks, check_sha256_arg, no_checksum_message,
                                          resolve_archive, verified_extract)
from orchestration.mpspdz.launcher import PartySpec, free_ports, run_parties
from orchestration.mpspdz.place import staging_dir, swap_into_place
from orchestration.mpspdz.toolchain import (DEALER_BINARY, MPSPDZ, PARTY_BINARY, PROTOCOLS, MPSPDZError,
                                            compile_program, mpspdz_home, programs_dir)

logger = logging.getLogger(__name__)

#: MP-SPDZ's official binary release that ``invoke setup`` installs online (the Dockerfile pins the same).
RELEASE_VERSION = "0.4.2"
RELEASE_FILE = f"mp-spdz-{RELEASE_VERSION}.tar.xz"
#: sha256 of RELEASE_FILE, checked besides GitHub's digest when set. Empty: GitHub could not be reached where
#: this was written (see docs/docker.md, "The MP-SPDZ checksum"); pin it here and as the Dockerfile's
#: MPSPDZ_SHA256 default once known.
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


def no_release_checksum_message(api_url: str) -> str:
    """Why the online install cannot go ahead: nothing to check the download against."""
    return (f"cannot install MP-SPDZ's official release {RELEASE_FILE} online: GitHub's releases API ({api_url}) "
            f"gives no sha256 digest for it, and none is pinned (RELEASE_SHA256 in orchestration/mpspdz/install.py "
            f"is empty) or given with --sha256; a download is never installed unverified. Either pass --sha256 <hex> "
            f"with the sha256 of {RELEASE_FILE} from a download you trust (docs/docker.md, 'The MP-SPDZ checksum', "
            f"says how to get it), or install offline from an MP-SPDZ archive with `invoke setup --archive FILE` "
            f"(this project's offline machines and CI: `invoke setup --archive ../shared/mp-spdz/mp-spdz-*.tar.xz`), "
            f"or build your own MP-SPDZ source tree with `invoke setup --from-source DIR`. Nothing was installed")


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
                   unverified: bool = False, release_api: str | None = None, cafile: str | Path | None = None,
                   cpuinfo: str | None = None, machine: str | None = None) -> Installed:
    """Install MP-SPDZ into ``home`` unless a complete one is there (``force`` reinstalls).

    ``unverified``: install an archive that has no ``.sha256`` beside it and no ``sha256`` (else refused).
    ``release_api``, ``cafile``: the releases API's base URL and the only certificates to trust for it (default:
    ``$MPSPDZ_RELEASE_API`` or GitHub, and the system's). Raises :class:`SetupError` naming the file or value
    at fault; ``home`` is then as it was.
    """
    home = Path(os.path.abspath(Path(home).expanduser()))
    if archive and from_source:
        raise SetupError("give at most one of --archive FILE and --from-source DIR")
    expected = check_sha256_arg(sha256)
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
    # what the download or the archive must hash to, settled before anything is written
    if archive:
        checks = archive_checks(Path(archive), expected)
        if not checks and not unverified:
            raise SetupError(no_checksum_message(Path(archive)))
    elif not from_source:
        asset = release.find_asset(RELEASE_VERSION, RELEASE_FILE, api=release_api, cafile=cafile)
        checks = [(by, value) for by, value in (("--sha256", expected), ("RELEASE_SHA256", RELEASE_SHA256),
                                                (f"GitHub's digest of {asset.name}", asset.sha256)) if value]
        if not checks:
            raise SetupError(no_release_checksum_message(release.release_api_url(RELEASE_VERSION, release_api)))

    staging = staging_dir(home)
    try:
        if archive:
            top, record = _stage_archive(Path(archive), checks, staging, cpuinfo, machine)
        elif from_source:
            top, record = _stage_source(Path(from_source), staging, jobs)
        else:
            top, record = _stage_release(asset, checks, staging, cafile, cpuinfo, machine)
        issues = problems(top)
        if issues:
            raise SetupError(f"{record['source']}: not a usable MP-SPDZ for this project: missing "
                             f"{', '.join(issues)} (it needs {', '.join(REQUIRED_FILES)}, and {SHARED_LIB} beside the "
                             f"binaries when they are linked against it)")
        record["installed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(top / RECORD, record).chmod(0o644)
        top.chmod(0o755)
        swap_into_place(top, home, staging, RECORD)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("MP-SPDZ installed at %s from %s", home, record["source"])
    return Installed(home, True, record["source"], record.get("detail", ""))


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


def _stage_archive(archive: Path, checks: list[tuple[str, str]], staging: Path, cpuinfo: str | None,
                   machine: str | None) -> tuple[Path, dict]:
    try:
        fh = open(archive, "rb")  # hashed and unpacked from this one open file
    except OSError as exc:
        raise SetupError(f"--archive {archive}: cannot read it ({exc})")
    with fh:
        top, digest = verified_extract(fh, checks, staging / "unpack", str(archive))
    variant = _use_release_binaries(top, str(archive), cpuinfo, machine)
    detail = (f"sha256 {digest}" + ("" if checks else " (unverified)")
              + (f", release binaries for {variant}" if variant else ""))
    return top, {"source": str(archive), "sha256": digest, "variant": variant, "detail": detail}


def _stage_release(asset: release.Asset, checks: list[tuple[str, str]], staging: Path, cafile: str | Path | None,
                   cpuinfo: str | None, machine: str | None) -> tuple[Path, dict]:
    with open(staging / asset.name, "w+b") as fh:  # in the owner-only staging folder; unpacked from this file
        release.download(asset.url, fh, cafile=cafile)
        top, digest = verified_extract(fh, checks, staging / "unpack", asset.url)
    variant = _use_release_binaries(top, asset.url, cpuinfo, machine)
    detail = (f"MP-SPDZ {RELEASE_VERSION}, sha256 {digest} ({', '.join(by for by, _ in checks)})"
              + (f", release binaries for {variant}" if variant else ""))
    return top, {"source": asset.url, "sha256": digest, "variant": variant, "detail": detail}


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



# ---- invoke setup, all of it -------------------------------------------------------------------

def run_setup(*, home: str | Path | None = None, configured_home: str | None = None, archive: str | None = None,
              configured_archive: str | None = None, project: Path = Path("."), sha256: str | None = None,
              from_source: str | None = None, force: bool = False, unverified: bool = False,
              jobs: str | int | None = None, fetch_models: Callable[[], None] | None = None,
              say: Callable[[str], None] = print, note: Callable[[str], None] | None = None) -> None:
    """``invoke setup``: MP-SPDZ (unless complete), its runtime libraries, the model weights, and the check.

    ``home`` (the flag) wins over MP_SPDZ_HOME and ``configured_home`` (invoke.yaml); ``configured_archive``
    (invoke.yaml, relative to ``project``) is used when neither ``archive`` nor ``from_source`` is given.
    ``fetch_models`` None: the weights are not fetched. ``say`` gets what is done, ``note`` warnings (default:
    ``say``).
    Raises :class:`SetupError` or :class:`MPSPDZError`.
    """
    target = Path(home).expanduser().absolute() if home else mpspdz_home(configured_home)[0]
    if not (archive or from_source):
        archive = configured_archive
        if archive and not Path(archive).expanduser().is_absolute():
            archive = str(Path(project) / archive)  # relative to the project, like invoke.yaml itself
    try:
        n_jobs = int(jobs) if jobs else None
    except ValueError:
        raise SetupError(f"--jobs {jobs!r}: expected a whole number of parallel make jobs")
    done = install_mpspdz(target, archive=archive, sha256=sha256, from_source=from_source, force=force,
                          jobs=n_jobs, unverified=unverified)
    if done.changed:
        say(f"MP-SPDZ installed at {done.home} from {done.source} ({done.detail})")
    else:
        again = "; --force installs it again" if (archive or from_source or sha256) else ""
        say(f"MP-SPDZ at {done.home} is complete: nothing to install ({done.source}{again})")
    libs = ensure_runtime_libraries(done.home)
    if libs.installed:
        say(f"runtime libraries: installed {' '.join(libs.installed)}")
    elif libs.checked:
        say(f"runtime libraries: {PARTY_BINARY} and {DEALER_BINARY} find all of theirs")
    if fetch_models is not None:
        fetch_models()
    else:
        say("model weights: not fetched (--no-models)")
    for r in check_installation(done.home):
        say(f"check passed: {r.binary}, {r.name}: secret inputs {r.a} and {r.b}, revealed product and sum correct "
            f"({r.seconds:.1f} s)")
    if not done.changed and not libs.installed:
        say("setup: everything was in place already; only the check ran")
    found, source = mpspdz_home(configured_home)
    if found != done.home.resolve():
        (note or say)(f"note: the other tasks look for MP-SPDZ at {found} ({source}), not at {done.home}: set MP_SPDZ_HOME="
             f"{done.home} (or mpspdz.home in invoke.yaml) to use this one")
