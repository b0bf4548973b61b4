"""invoke setup's installer: archives, the official release, source trees, runtime libraries, and the check.

Nothing here reaches the internet: the online path (GitHub's releases API and the release download) is
pointed at a local HTTPS server on 127.0.0.1 with a throw-away CA made by openssl. The real MP-SPDZ archive comes from ../shared/mp-spdz beside the repository; without it
the tests that need it FAIL.
"""
from __future__ import annotations

import errno
import hashlib
import io
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from orchestration.mpspdz import install
from orchestration.mpspdz.install import SetupError
from orchestration.mpspdz.toolchain import find_mpspdz

REPO = Path(__file__).resolve().parents[1]

#: /proc/cpuinfo flag lines of real CPUs
HASWELL = ("processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz\n"
           "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
           "sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 "
           "x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 erms invpcid\n")
BROADWELL = HASWELL.replace("invpcid", "invpcid rtm rdseed adx smap")
ZEN2 = ("processor\t: 0\nmodel name\t: AMD EPYC 7R32\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 "
        "ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 "
        "sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb "
        "sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr\n")
CORE2 = ("processor\t: 0\nmodel name\t: Intel(R) Core(TM)2 Duo CPU E8400\nflags\t\t: fpu vme de pse tsc msr pae "
         "mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx lm "
         "constant_tsc pni dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cx16 xtpr pdcm sse4_1 lahf_lm\n")
GRAVITON = ("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
            "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\n")


# ---- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_archive(mpspdz_archive) -> Path:
    """A real MP-SPDZ archive that runs here: ../shared's, or on a CPU without AVX-512 this machine's build
    packed alike (conftest.mpspdz_archive)."""
    return mpspdz_archive


@pytest.fixture(scope="session")
def unpacked(real_archive, tmp_path_factory) -> Path:
    """The real archive's top folder, unpacked once (read it, do not change it)."""
    root = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(real_archive) as tar:
        tar.extractall(root, filter="data")
    (top,) = root.iterdir()
    return top


def make_tar(dest: Path, folder: Path, top: str, drop: tuple[str, ...] = ()) -> Path:
    """Pack ``folder`` as ``top/`` into a .tar.xz, without the paths in ``drop``."""
    with tarfile.open(dest, "w:xz", preset=0) as tar:
        tar.add(folder, arcname=top, filter=lambda ti: None if ti.name.split("/", 1)[-1] in drop else ti)
    return dest


def fake_mpspdz(root: Path, tag: str = "fake") -> Path:
    """A small stand-in with MP-SPDZ's files (the binaries are shell scripts)."""
    root.mkdir(parents=True)
    for name in ("semi2k-party.x", "dealer-ring-party.x"):
        (root / name).write_text(f"#!/bin/sh\necho {tag} {name}\n")
        (root / name).chmod(0o755)
    (root / "compile.py").write_text("# compiler\n")
    (root / "Compiler").mkdir()
    (root / "Compiler" / "__init__.py").write_text("")
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_installed(parent: Path, *keep: str) -> None:
    """No target, and no staging folder left beside it."""
    left = sorted(p.name for p in parent.iterdir() if p.name not in keep)
    assert left == [], f"left behind in {parent}: {left}"


@pytest.fixture
def fake_archive(tmp_path) -> Path:
    return make_tar(tmp_path / "mp-spdz-fake.tar.xz", fake_mpspdz(tmp_path / "src" / "x"), "mp-spdz-fake")


# ---- archives -----------------------------------------------------------------------------------

def test_archive_with_wrong_checksum_is_refused(tmp_path, fake_archive):
    target = tmp_path / "opt"
    target.mkdir()
    side = fake_archive.with_name(fake_archive.name + ".sha256")
    side.write_text(f"{'0' * 64}  {fake_archive.name}\n")
    with pytest.raises(SetupError, match=rf"sha256 is {sha256(fake_archive)}, but {side.name} says 0{{64}}"):
        install.install_mpspdz(target / "mp-spdz", archive=fake_archive)
    assert_nothing_installed(target)
    side.unlink()
    with pytest.raises(SetupError, match="but --sha256 says 1{64}"):
        install.install_mpspdz(target / "mp-spdz", archive=fake_archive, sha256="1" * 64)
    assert_nothing_installed(target)
    side.write_text("not a checksum\n")
    with pytest.raises(SetupError, match=r"\.sha256: expected a sha256 \(64 hex digits"):
        install.install_mpspdz(target / "mp-spdz", archive=fake_archive)
    assert_nothing_installed(target)
    with pytest.raises(SetupError, match="--sha256 'abc': expected 64 hex digits"):
        install.install_mpspdz(target / "mp-spdz", archive=fake_archive, sha256="abc")


def test_archive_with_right_checksum_installs(tmp_path, fake_archive):
    fake_archive.with_name(fake_archive.name + ".sha256").write_text(f"{sha256(fake_archive)}  x\n")
    home = tmp_path / "opt" / "mp-spdz"
    done = install.install_mpspdz(home, archive=fake_archive, sha256=sha256(fake_archive).upper())
    assert done.changed and done.home == home
    assert (home / "semi2k-party.x").read_text() == "#!/bin/sh\necho fake semi2k-party.x\n"
    assert sha256(fake_archive) in (home / install.RECORD).read_text()
    assert oct((home / install.RECORD).stat().st_mode & 0o777) == "0o644"
    assert oct(home.stat().st_mode & 0o777) == "0o755"
    assert_nothing_installed(home.parent, "mp-spdz")


def test_archive_missing_a_binary_is_refused_naming_it(tmp_path):
    src = fake_mpspdz(tmp_path / "src" / "x")
    (src / "dealer-ring-party.x").unlink()
    archive = make_tar(tmp_path / "a.tar.xz", src, "mp-spdz-fake")
    target = tmp_path / "opt"
    with pytest.raises(SetupError, match=r"a\.tar\.xz: not a usable MP-SPDZ for this project: missing "
                                         r"dealer-ring-party\.x"):
        install.install_mpspdz(target / "mp-spdz", archive=archive, unverified=True)
    assert_nothing_installed(target)


def test_archive_missing_libspdz_is_refused_naming_it(tmp_path, unpacked):
    archive = make_tar(tmp_path / "nolib.tar.xz", unpacked, "mp", drop=("libSPDZ.so",))
    target = tmp_path / "opt"
    # a source build's binaries also carry its tree in their run path (MP-SPDZ's Makefile adds it after $ORIGIN):
    # there the loader finds the tree's copy, and the refusal says so instead
    with pytest.raises(SetupError, match=r"missing libSPDZ\.so (\(needed by semi2k-party\.x\)|beside semi2k-party\.x: it "
                                         r"loads \S+/libSPDZ\.so from outside)"):
        install.install_mpspdz(target / "mp-spdz", archive=archive, unverified=True)
    assert_nothing_installed(target)


def test_binaries_that_load_libspdz_from_elsewhere_are_incomplete(tmp_path, unpacked, monkeypatch):
    """An install whose binaries only run because another folder's libSPDZ.so is found is not complete."""
    home = tmp_path / "mp"
    shutil.copytree(unpacked, home, symlinks=True)
    (home / "libSPDZ.so").unlink()
    monkeypatch.setenv("LD_LIBRARY_PATH", str(unpacked))
    assert install.problems(home) == [
        f"libSPDZ.so beside {b}: it loads {unpacked}/libSPDZ.so from outside {home} (its run path is not $ORIGIN; "
        f"invoke setup --from-source DIR links it so)" for b in ("semi2k-party.x", "dealer-ring-party.x")]


def test_truncated_corrupt_and_malformed_archives_are_refused(tmp_path, real_archive, fake_archive):
    data = real_archive.read_bytes()
    bad = {
        "truncated.tar.xz": data[: len(data) // 2],
        "garbage.tar.xz": os.urandom(4096),
        "flipped.tar.xz": data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:],
        "not-a-tar.tar.xz": lzma.compress(b"hello, not a tar file\n" * 100),
        "empty.tar.xz": b"",
    }
    target = tmp_path / "opt"
    target.mkdir()
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SetupError, match=rf"{re.escape(name)}: cannot unpack it, it is truncated, corrupt"):
            install.install_mpspdz(target / "mp-spdz", archive=path, unverified=True)
        assert_nothing_installed(target)
    # two top folders, and a member that would land outside the target
    two = tmp_path / "two.tar.xz"
    with tarfile.open(two, "w:xz") as tar:
        tar.add(fake_mpspdz(tmp_path / "t1"), arcname="one")
        tar.add(fake_mpspdz(tmp_path / "t2"), arcname="two")
    with pytest.raises(SetupError, match="expected one top folder .* found one, two"):
        install.install_mpspdz(target / "mp-spdz", archive=two, unverified=True)
    evil = tmp_path / "evil.tar.xz"
    with tarfile.open(evil, "w:xz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(SetupError, match="cannot unpack it"):
        install.install_mpspdz(target / "mp-spdz", archive=evil, unverified=True)
    assert not (tmp_path / "escaped").exists()
    assert_nothing_installed(target)
    with pytest.raises(SetupError, match="no such file"):
        install.install_mpspdz(target / "mp-spdz", archive=tmp_path / "missing.tar.xz")
    with pytest.raises(SetupError, match="matches nothing"):
        install.install_mpspdz(target / "mp-spdz", archive=str(tmp_path / "nothing-*.tar.xz"))
    with pytest.raises(SetupError, match="must match exactly one MP-SPDZ archive, it matches .*flipped.*garbage"):
        install.install_mpspdz(target / "mp-spdz", archive=str(tmp_path / "*.tar.xz"))
    with pytest.raises(SetupError, match="at most one of --archive FILE and --from-source DIR"):
        install.install_mpspdz(target / "mp-spdz", archive=fake_archive, from_source=tmp_path)
    assert_nothing_installed(target)


def test_a_folder_setup_did_not_make_is_left_alone(tmp_path, fake_archive):
    home = tmp_path / "mp-spdz"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match="exists but is not a complete MP-SPDZ .*invoke setup did not make it, so it "
                                         "is left alone: move it away, pass --force"):
        install.install_mpspdz(home, archive=fake_archive)
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
    assert_nothing_installed(tmp_path, "mp-spdz", "mp-spdz-fake.tar.xz", "src")
    done = install.install_mpspdz(home, archive=fake_archive, force=True, unverified=True)
    assert done.changed and not (home / "notes.txt").exists() and (home / "dealer-ring-party.x").exists()
    assert_nothing_installed(tmp_path, "mp-spdz", "mp-spdz-fake.tar.xz", "src")


def test_an_empty_folder_is_installed_into(tmp_path, fake_archive):
    home = tmp_path / "mp-spdz"
    home.mkdir()
    assert install.install_mpspdz(home, archive=fake_archive, unverified=True).changed
    assert (home / "semi2k-party.x").exists()


def test_an_unwritable_place_is_a_clear_error(tmp_path, fake_archive, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(install.tempfile, "mkdtemp", refuse)
    with pytest.raises(SetupError, match=r"cannot write next to .*Permission denied.*--home DIR"):
        install.install_mpspdz(tmp_path / "mp-spdz", archive=fake_archive, unverified=True)


# ---- crafted archives, checksums, the swap between hash and unpack (security regressions) ----------

def crafted_archive(dest: Path, top: str, add) -> Path:
    """A .tar.xz with a small MP-SPDZ in ``top/`` and then whatever ``add(tar)`` puts in."""
    with tarfile.open(dest, "w:xz", preset=0) as tar:
        tar.add(fake_mpspdz(dest.parent / f"{dest.name}.src"), arcname=top)
        add(tar)
    dest.with_name(dest.name + ".sha256").write_text(f"{sha256(dest)}  {dest.name}\n")
    return dest


def _member(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "",
            data: bytes = b"", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def cve_2025_4517_chain(outside_from_top: str):
    """The public CVE-2025-4517 shape: symlinks a..p to 247-character folders, nested so that the chain is longer
    than PATH_MAX and os.path.realpath (which tarfile's data filter relies on) gives up; a last symlink then
    climbs out through it, and a file is written through that symlink."""
    def add(tar: tarfile.TarFile) -> None:
        comp, steps, path = "d" * 247, "abcdefghijklmnop", "top"
        for step in steps:
            _member(tar, f"{path}/{comp}", tarfile.DIRTYPE, mode=0o755)
            _member(tar, f"{path}/{step}", tarfile.SYMTYPE, comp)
            path = f"{path}/{comp}"
        long_link = "/".join(steps) + "/" + "l" * 254
        _member(tar, f"top/{long_link}", tarfile.SYMTYPE, "../" * len(steps))
        _member(tar, "top/escape", tarfile.SYMTYPE, f"{long_link}/{outside_from_top}")
        _member(tar, "top/escape/pwned", data=b"written outside the install folder\n")
    return add


@pytest.mark.parametrize("case", ["cve-2025-4517 symlink chain", "hard link out", "hard link inside",
                                  "character device", "block device", "fifo", "dotdot path", "absolute path",
                                  "absolute symlink", "symlink out", "file through an inside symlink"])
def test_crafted_archives_are_refused_whole_and_write_nothing_outside(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("mine\n")
    target = tmp_path / "opt"
    target.mkdir()
    # staging is target/.mp-spdz.setup-XXX/unpack/top: four levels up from top is tmp_path
    adds = {
        "cve-2025-4517 symlink chain": (cve_2025_4517_chain("../../../../outside"),
                                        "lies under 'top/a', which is a symlink"),
        "hard link out": (lambda t: _member(t, "top/lib.so", tarfile.LNKTYPE, str(outside / "victim")),
                          "'top/lib.so' is a hard link"),
        "hard link inside": (lambda t: _member(t, "top/again.py", tarfile.LNKTYPE, "top/compile.py"),
                             "'top/again.py' is a hard link"),
        "character device": (lambda t: _member(t, "top/null", tarfile.CHRTYPE), "'top/null' is a character device"),
        "block device": (lambda t: _member(t, "top/sda", tarfile.BLKTYPE), "'top/sda' is a block device"),
        "fifo": (lambda t: _member(t, "top/pipe", tarfile.FIFOTYPE), "'top/pipe' is a fifo"),
        "dotdot path": (lambda t: _member(t, "top/../../../../outside/victim", data=b"overwritten\n"),
                        "'top/../../../../outside/victim' has a '..' component"),
        "absolute path": (lambda t: _member(t, str(outside / "abs"), data=b"x\n"), f"'{outside}/abs' has an "
                                                                                     f"absolute path"),
        "absolute symlink": (lambda t: _member(t, "top/etc", tarfile.SYMTYPE, str(outside)),
                             f"'top/etc' is a symlink to '{outside}': only relative symlinks"),
        "symlink out": (lambda t: _member(t, "top/out", tarfile.SYMTYPE, "../../../../outside"),
                        "'top/out' is a symlink to '../../../../outside', which points outside"),
        "file through an inside symlink": (
            lambda t: (_member(t, "top/lnk", tarfile.SYMTYPE, "Compiler"),
                       _member(t, "top/lnk/evil.py", data=b"x\n")),
            "'top/lnk/evil.py' lies under 'top/lnk', which is a symlink"),
    }
    add, named = adds[case]
    archive = crafted_archive(tmp_path / "evil.tar.xz", "top", add)
    try:
        install.install_mpspdz(target / "mp-spdz", archive=archive)
        msg = "installed"
    except SetupError as exc:
        msg = str(exc)
    # first: nothing was written outside the target
    assert sorted(p.name for p in outside.iterdir()) == ["victim"] and (outside / "victim").read_text() == "mine\n"
    assert "cannot unpack it safely: member " in msg and named in msg, msg
    assert msg.endswith("the whole archive is refused, nothing was installed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.xz", "evil.tar.xz.sha256", "evil.tar.xz.src",
                                                          "opt", "outside"]
    assert_nothing_installed(target)


def test_safe_members_are_unpacked_with_safe_modes(tmp_path):
    """Relative symlinks to files and folders unpacked before them stay (none goes through another symlink);
    modes become 0644 or 0755: no setuid/setgid/sticky bit, nothing writable by group or others."""
    def add(tar):
        _member(tar, "top/bin/tool.sh", data=b"#!/bin/sh\n", mode=0o6777)
        _member(tar, "top/notes.txt", data=b"n\n", mode=0o666)
        _member(tar, "top/private.txt", data=b"p\n", mode=0o600)
        _member(tar, "top/open", tarfile.DIRTYPE, mode=0o1777)
        _member(tar, "top/compiler-link", tarfile.SYMTYPE, "Compiler")
        _member(tar, "top/bin/compile-link.py", tarfile.SYMTYPE, "../compile.py")

    archive = crafted_archive(tmp_path / "ok.tar.xz", "top", add)
    home = tmp_path / "opt" / "mp-spdz"
    install.install_mpspdz(home, archive=archive)
    modes = {rel: oct((home / rel).lstat().st_mode & 0o7777) for rel in
             ("bin/tool.sh", "notes.txt", "private.txt", "open", "bin", "semi2k-party.x", "compile.py")}
    assert modes == {"bin/tool.sh": "0o755", "notes.txt": "0o644", "private.txt": "0o644", "open": "0o755",
                     "bin": "0o755", "semi2k-party.x": "0o755", "compile.py": "0o644"}
    assert os.readlink(home / "compiler-link") == "Compiler" and (home / "compiler-link" / "__init__.py").is_file()
    assert (home / "bin" / "compile-link.py").resolve() == (home / "compile.py").resolve()
    # a symlink to one that is not there (yet), or through another symlink, is refused
    for bad, why in ((lambda t: _member(t, "top/later", tarfile.SYMTYPE, "not-yet"), "'top/later' is a symlink to "
                      "'not-yet', which is not a file or folder extracted before it"),
                     (lambda t: (_member(t, "top/l1", tarfile.SYMTYPE, "Compiler"),
                                 _member(t, "top/l2", tarfile.SYMTYPE, "l1/__init__.py")), "'top/l2' is a symlink to "
                      "'l1/__init__.py', which is not a file or folder extracted before it (or goes through")):
        archive = crafted_archive(tmp_path / "bad.tar.xz", "top", bad)
        with pytest.raises(SetupError, match=re.escape(why)):
            install.install_mpspdz(tmp_path / "opt2" / "mp-spdz", archive=archive)
        shutil.rmtree(tmp_path / "bad.tar.xz.src")


def test_an_archive_without_a_checksum_needs_unverified(tmp_path, fake_archive):
    target = tmp_path / "opt"
    with pytest.raises(SetupError) as err:
        install.install_mpspdz(target / "mp-spdz", archive=fake_archive)
    assert str(err.value) == (
        f"{fake_archive}: nothing to verify it against: there is no mp-spdz-fake.tar.xz.sha256 beside it and no "
        f"--sha256. Put the sha256 from a source you trust beside it (`sha256sum mp-spdz-fake.tar.xz > "
        f"mp-spdz-fake.tar.xz.sha256`, on the machine it came from), or pass --sha256 <hex>; to install it "
        f"unverified on purpose, pass --unverified. Nothing was installed")
    assert not target.exists()
    done = install.install_mpspdz(target / "mp-spdz", archive=fake_archive, unverified=True)
    assert done.changed and done.detail == f"sha256 {sha256(fake_archive)} (unverified)"
    assert (target / "mp-spdz" / "semi2k-party.x").exists()
    # --unverified does not skip a checksum that is there
    fake_archive.with_name(fake_archive.name + ".sha256").write_text("4" * 64 + "\n")
    with pytest.raises(SetupError, match="but mp-spdz-fake.tar.xz.sha256 says 4{64}"):
        install.install_mpspdz(target / "mp-spdz", archive=fake_archive, unverified=True, force=True)


def test_setup_task_refuses_an_unverified_archive_without_a_traceback(tmp_path, fake_archive):
    home = tmp_path / "opt" / "mp-spdz"
    r = subprocess.run([sys.executable, "-m", "invoke", "setup", "--home", str(home), "--archive", str(fake_archive),
                        "--no-models"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"setup failed: {fake_archive}: nothing to verify it against" in r.stderr and "--unverified" in r.stderr
    assert "Traceback" not in r.stderr and not home.parent.exists()


def test_the_archive_is_unpacked_from_the_file_that_was_hashed(tmp_path, fake_archive, monkeypatch):
    """The archive is replaced on disk right after it was hashed: what is installed is still what was hashed."""
    fake_archive.with_name(fake_archive.name + ".sha256").write_text(f"{sha256(fake_archive)}  x\n")
    other = make_tar(tmp_path / "other.tar.xz", fake_mpspdz(tmp_path / "src" / "y", tag="SWAPPED"), "mp-spdz-fake")
    real_sha256 = hashlib.sha256
    swapped = []

    class SwapAfterHashing:
        def __init__(self, *args):
            self._h = real_sha256(*args)

        def update(self, data):
            self._h.update(data)

        def hexdigest(self):
            if not swapped:  # the first digest is the archive's: now swap the file on disk
                os.replace(other, fake_archive)
                swapped.append(True)
            return self._h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", SwapAfterHashing)
    home = tmp_path / "opt" / "mp-spdz"
    install.install_mpspdz(home, archive=fake_archive)
    assert swapped
    assert (home / "semi2k-party.x").read_text() == "#!/bin/sh\necho fake semi2k-party.x\n"


# ---- an install folder that is a mount point -------------------------------------------------------

def with_sidecar(archive: Path) -> Path:
    archive.with_name(archive.name + ".sha256").write_text(f"{sha256(archive)}  {archive.name}\n")
    return archive


def refuse_to_rename(monkeypatch, home: Path, also=lambda src, dst: False):
    """os.rename as on a mount point: renaming ``home`` itself fails with EBUSY (and ``also`` other renames)."""
    real_rename = os.rename

    def rename(src, dst, *args, **kw):
        if Path(src) == home or also(Path(src), Path(dst)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real_rename(src, dst, *args, **kw)

    monkeypatch.setattr(os, "rename", rename)


def test_a_mount_point_is_installed_into_by_replacing_its_contents(tmp_path, fake_archive, monkeypatch):
    home = tmp_path / "opt" / "mp-spdz"
    home.mkdir(parents=True)  # an empty volume mounted at /opt/mp-spdz
    refuse_to_rename(monkeypatch, home)
    with_sidecar(fake_archive)
    done = install.install_mpspdz(home, archive=fake_archive)
    assert done.changed and install.problems(home) == []
    assert sorted(p.name for p in home.iterdir()) == [install.RECORD, "Compiler", "compile.py",
                                                     "dealer-ring-party.x", "semi2k-party.x"]
    assert oct(home.stat().st_mode & 0o777) == "0o755"
    assert_nothing_installed(home.parent, "mp-spdz")
    # again with --force, over the install of ours
    other = with_sidecar(make_tar(tmp_path / "other.tar.xz", fake_mpspdz(tmp_path / "src" / "y", tag="new"),
                                  "mp-spdz-new"))
    install.install_mpspdz(home, archive=other, force=True)
    assert (home / "semi2k-party.x").read_text() == "#!/bin/sh\necho new semi2k-party.x\n"
    assert not [p for p in home.iterdir() if p.name.startswith(".invoke-setup-")]
    assert_nothing_installed(home.parent, "mp-spdz")


def test_a_mount_point_whose_contents_cannot_be_replaced_is_left_as_it_was(tmp_path, fake_archive, monkeypatch):
    home = tmp_path / "opt" / "mp-spdz"
    install.install_mpspdz(home, archive=with_sidecar(fake_archive))
    before = {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()}
    # the new files are being moved in when one rename fails: everything is put back
    refuse_to_rename(monkeypatch, home, also=lambda src, dst: dst == home / "semi2k-party.x"
                     and src.parent.name.startswith(".invoke-setup-new-"))
    other = with_sidecar(make_tar(tmp_path / "other.tar.xz", fake_mpspdz(tmp_path / "src" / "y", tag="new"),
                                  "mp-spdz-new"))
    with pytest.raises(SetupError, match=rf"cannot replace the contents of {re.escape(str(home))} .*Device or "
                                         rf"resource busy.*it is as it was"):
        install.install_mpspdz(home, archive=other, force=True)
    assert {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()} == before
    assert_nothing_installed(home.parent, "mp-spdz")
    # a home that is not a folder and cannot be renamed: a clear error, no traceback
    monkeypatch.undo()
    plain = tmp_path / "file-home"
    plain.write_text("x")
    refuse_to_rename(monkeypatch, plain)
    with pytest.raises(SetupError, match=r"cannot move .*file-home aside to replace it .*nothing was changed"):
        install.install_mpspdz(plain, archive=fake_archive, force=True)


# ---- the real archive: install, check, idempotence -----------------------------------------------

@pytest.mark.mpc
def test_install_from_the_real_archive_and_check(tmp_path, real_archive, monkeypatch):
    home = tmp_path / "opt" / "mp-spdz"
    done = install.install_mpspdz(home, archive=real_archive)
    assert done.changed and sha256(real_archive) in done.detail
    assert install.problems(home) == []
    monkeypatch.setenv("MP_SPDZ_HOME", str(home))
    assert find_mpspdz().home == home.resolve()
    assert install.ensure_runtime_libraries(home).installed == []

    before = {p: p.stat().st_mtime_ns for p in home.rglob("*")}
    results = install.check_installation(home)
    assert [r.binary for r in results] == ["semi2k-party.x", "dealer-ring-party.x"]
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*")} == before  # read only: no caches, no logs

    # idempotent: a second install does nothing
    again = install.install_mpspdz(home, archive=real_archive)
    assert not again.changed and again.source == str(real_archive)
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*")} == before

    # an installation of ours that lost a file is installed again; one that is complete only with --force
    (home / "dealer-ring-party.x").unlink()
    assert install.problems(home) == ["dealer-ring-party.x"]
    assert install.install_mpspdz(home, archive=real_archive).changed
    assert install.problems(home) == []
    assert install.install_mpspdz(home, archive=real_archive, force=True).changed
    assert_nothing_installed(home.parent, "mp-spdz")


@pytest.mark.mpc
def test_a_check_that_computes_wrong_results_fails(tmp_path, unpacked, monkeypatch):
    """The check compares the revealed values with the inputs: a party binary that prints a wrong result fails."""
    home = tmp_path / "mp"
    shutil.copytree(unpacked, home, symlinks=True)
    real = home / "real-dealer.x"
    (home / "dealer-ring-party.x").rename(real)
    (home / "dealer-ring-party.x").write_text(f"#!/bin/sh\n\"{real}\" \"$@\" | sed 's/product [0-9]*/product 7/'\n")
    (home / "dealer-ring-party.x").chmod(0o755)
    with pytest.raises(SetupError, match=r"dealer check with dealer-ring-party\.x: inputs \d+ and \d+ gave product 7"):
        install.check_installation(home)


# ---- the official release: CPU variant, checksum, layout ------------------------------------------

@pytest.mark.parametrize("cpuinfo, machine, variant", [
    (BROADWELL, "x86_64", "adx"),
    (ZEN2, "x86_64", "adx"),
    (HASWELL, "x86_64", "amd64"),  # AVX2 and BMI2, but no ADX
    (CORE2, "x86_64", "amd64"),
    ("", "x86_64", "amd64"),
])
def test_release_variant_as_tldr_sh(cpuinfo, machine, variant):
    assert install.release_variant(cpuinfo, machine) == variant


def test_release_variant_other_machines_and_this_one():
    with pytest.raises(SetupError, match=r"x86_64 only, this machine is 'aarch64': build from source"):
        install.release_variant(GRAVITON, "aarch64")
    assert install.cpu_flags(GRAVITON) >= {"asimd", "aes"}
    here = Path("/proc/cpuinfo").read_text()
    expect = "adx" if "adx" in install.cpu_flags(here) else "amd64"
    assert install.release_variant(here, platform.machine()) == expect


def release_tarball(tmp_path: Path, unpacked: Path) -> Path:
    """A stand-in for the official release's layout: binaries per CPU variant under bin/Linux-*/."""
    root = tmp_path / "release" / "mp-spdz-0.4.2"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "README.md").write_text("licences\n")
    (root / "bin" / "boost-license.txt").write_text("boost\n")
    for variant in ("amd64", "adx"):
        d = root / "bin" / f"Linux-{variant}"
        d.mkdir()
        for name in ("semi2k-party.x", "dealer-ring-party.x", "mascot-party.x"):
            (d / name).write_text(f"#!/bin/sh\necho {variant}\n")
            (d / name).chmod(0o755)
    shutil.copy2(unpacked / "compile.py", root / "compile.py")
    shutil.copytree(unpacked / "Compiler", root / "Compiler")
    return make_tar(tmp_path / "mp-spdz-0.4.2.tar.xz", root, "mp-spdz-0.4.2")


# ---- a local HTTPS server playing GitHub's releases API and its downloads -----------------------

def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    folder.mkdir()
    (folder / "ca.cnf").write_text("[req]\ndistinguished_name = dn\nx509_extensions = ca\n[dn]\n"
                                   "[ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign\n"
                                   "subjectKeyIdentifier = hash\n")
    (folder / "server.ext").write_text("basicConstraints = critical, CA:FALSE\nsubjectAltName = IP:127.0.0.1\n"
                                       "extendedKeyUsage = serverAuth\nkeyUsage = critical, digitalSignature\n"
                                       "authorityKeyIdentifier = keyid\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=test CA", "-config", "ca.cnf", "-keyout", "ca.key",
             "-out", "ca.pem", cwd=folder)
    _openssl("req", "-new", *ec, "-subj", "/CN=127.0.0.1", "-config", "ca.cnf", "-keyout", "server.key", "-out",
             "server.csr", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days",
             "1", "-extfile", "server.ext", "-out", "server.pem", cwd=folder)
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


class FakeGitHub:
    """What the HTTPS server answers: ``release`` at the API path (JSON, or None: 404), ``files`` at /download/."""

    def __init__(self, url: str, ca: Path):
        self.url, self.ca = url, ca
        self.release: dict | None = None
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []

    def publish(self, tarball: Path, digest: str | None = "right", name: str = "mp-spdz-0.4.2.tar.xz",
                via_redirect: bool = True) -> None:
        """The release with ``tarball`` as asset ``name`` (``digest``: "right", None: no digest, or a value)."""
        self.files[tarball.name] = tarball.read_bytes()
        path = f"/redirect/{tarball.name}" if via_redirect else f"/download/{tarball.name}"
        asset = {"name": name, "browser_download_url": self.url + path, "size": tarball.stat().st_size}
        if digest is not None:
            asset["digest"] = f"sha256:{sha256(tarball)}" if digest == "right" else digest
        self.release = {"tag_name": "v0.4.2", "assets": [{"name": "mp-spdz-0.4.2.tar.xz.sig"}, asset]}

    @property
    def downloads(self) -> list[str]:
        return [r for r in self.requests if r.startswith("/download/")]


@pytest.fixture
def github(tmp_path, monkeypatch):
    import http.server
    import json
    import ssl
    import threading

    ca, cert, key = make_ca_and_server_cert(tmp_path / "tls")
    api_path = "/repos/data61/MP-SPDZ/releases/tags/v0.4.2"

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            fake.requests.append(self.path)
            if self.path == api_path and fake.release is not None:
                body, status = json.dumps(fake.release).encode(), 200
            elif self.path.startswith("/redirect/"):  # as github.com sends downloads to its storage host
                self.send_response(302)
                self.send_header("Location", fake.url + self.path.replace("/redirect/", "/download/", 1))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            elif self.path.startswith("/download/") and self.path[len("/download/"):] in fake.files:
                body, status = fake.files[self.path[len("/download/"):]], 200
            else:
                body, status = b'{"message": "Not Found"}', 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    fake = FakeGitHub(f"https://127.0.0.1:{server.server_address[1]}", ca)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def test_release_verified_by_githubs_digest_installs_and_picks_the_cpu_variant(tmp_path, unpacked, github,
                                                                              monkeypatch):
    tarball = release_tarball(tmp_path, unpacked)
    github.publish(tarball)
    home = tmp_path / "opt" / "mp-spdz"
    done = install.install_mpspdz(home, release_api=github.url, cafile=github.ca, cpuinfo=BROADWELL,
                                  machine="x86_64")
    assert done.changed and "release binaries for adx" in done.detail
    assert done.source == f"{github.url}/redirect/{tarball.name}"
    assert f"sha256 {sha256(tarball)} (GitHub's digest of mp-spdz-0.4.2.tar.xz)" in done.detail
    assert github.downloads == [f"/download/{tarball.name}"]  # followed the redirect, over HTTPS
    assert (home / "semi2k-party.x").read_text() == "#!/bin/sh\necho adx\n"
    assert (home / "mascot-party.x").exists() and (home / "bin" / "boost-license.txt").exists()
    assert not list((home / "bin").glob("Linux-*"))
    assert_nothing_installed(home.parent, "mp-spdz")
    # the defaults: MPSPDZ_RELEASE_API for the API, SSL_CERT_FILE for the trusted certificates; --sha256 also checks
    monkeypatch.setenv("MPSPDZ_RELEASE_API", github.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(github.ca))
    home2 = tmp_path / "opt2" / "mp-spdz"
    done = install.install_mpspdz(home2, sha256=sha256(tarball), cpuinfo=HASWELL, machine="x86_64")
    assert "(--sha256, GitHub's digest of mp-spdz-0.4.2.tar.xz)" in done.detail
    assert (home2 / "dealer-ring-party.x").read_text() == "#!/bin/sh\necho amd64\n"
    # the same layout given as --archive
    home3 = tmp_path / "opt3" / "mp-spdz"
    install.install_mpspdz(home3, archive=tarball, unverified=True, cpuinfo=HASWELL, machine="x86_64")
    assert (home3 / "dealer-ring-party.x").read_text() == "#!/bin/sh\necho amd64\n"


def test_release_with_a_wrong_digest_is_refused_and_nothing_installed(tmp_path, unpacked, github):
    tarball = release_tarball(tmp_path, unpacked)
    target = tmp_path / "opt"
    github.publish(tarball, digest="sha256:" + "2" * 64)
    with pytest.raises(SetupError, match=rf"sha256 is {sha256(tarball)}, but GitHub's digest of "
                                         rf"mp-spdz-0\.4\.2\.tar\.xz says 2{{64}}: refusing it .*nothing was installed"):
        install.install_mpspdz(target / "mp-spdz", release_api=github.url, cafile=github.ca)
    assert_nothing_installed(target)
    # GitHub's digest right, --sha256 wrong: both are checked
    github.publish(tarball)
    with pytest.raises(SetupError, match=r"but --sha256 says 3{64}: refusing it"):
        install.install_mpspdz(target / "mp-spdz", sha256="3" * 64, release_api=github.url, cafile=github.ca)
    assert_nothing_installed(target)
    # a download that is not the file GitHub describes
    github.files[tarball.name] = b"something else"
    with pytest.raises(SetupError, match=r"sha256 is [0-9a-f]{64}, but GitHub's digest .* says "
                                         rf"{sha256(tarball)}: refusing it"):
        install.install_mpspdz(target / "mp-spdz", release_api=github.url, cafile=github.ca)
    assert_nothing_installed(target)


def test_release_api_without_the_asset_or_its_digest_is_refused(tmp_path, unpacked, github):
    tarball = release_tarball(tmp_path, unpacked)
    target = tmp_path / "opt"
    kw = dict(release_api=github.url, cafile=github.ca)
    github.publish(tarball, name="mp-spdz-0.4.1.tar.xz")
    with pytest.raises(SetupError, match=r"releases/tags/v0\.4\.2: release v0\.4\.2 has no asset "
                                         r"mp-spdz-0\.4\.2\.tar\.xz \(it has: mp-spdz-0\.4\.2\.tar\.xz\.sig, "
                                         r"mp-spdz-0\.4\.1\.tar\.xz\); nothing was installed"):
        install.install_mpspdz(target / "mp-spdz", **kw)
    for digest in (None, ""):
        github.publish(tarball, digest=digest)
        with pytest.raises(SetupError) as err:
            install.install_mpspdz(target / "mp-spdz", **kw)
        for part in ("cannot install MP-SPDZ's official release mp-spdz-0.4.2.tar.xz online", "gives no sha256 "
                     "digest for it", "RELEASE_SHA256 in orchestration/mpspdz/install.py is empty", "--sha256 <hex>",
                     "invoke setup --archive FILE", "--from-source DIR", "docs/docker.md", "Nothing was installed"):
            assert part in str(err.value)
    github.publish(tarball, digest="md5:0123")
    with pytest.raises(SetupError, match=r"asset mp-spdz-0\.4\.2\.tar\.xz has digest 'md5:0123', expected 'sha256:'"):
        install.install_mpspdz(target / "mp-spdz", **kw)
    github.release = None  # 404
    with pytest.raises(SetupError, match=r"cannot ask GitHub for MP-SPDZ's release v0\.4\.2 at .*HTTP Error 404.*"
                                         r"--archive FILE"):
        install.install_mpspdz(target / "mp-spdz", **kw)
    assert github.downloads == [] and not target.exists()  # refused before any download, nothing written
    # no digest from GitHub, but --sha256 given: that is enough
    github.publish(tarball, digest=None)
    done = install.install_mpspdz(target / "mp-spdz", sha256=sha256(tarball), cpuinfo=CORE2, machine="x86_64", **kw)
    assert done.changed and "(--sha256)" in done.detail


def test_release_api_needs_https_and_a_trusted_certificate(tmp_path, unpacked, github, monkeypatch):
    tarball = release_tarball(tmp_path, unpacked)
    github.publish(tarball)
    target = tmp_path / "opt"
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "tls" / "server.pem"))  # not the CA that signed it
    with pytest.raises(SetupError, match=r"cannot ask GitHub .*CERTIFICATE_VERIFY_FAILED"):
        install.install_mpspdz(target / "mp-spdz", release_api=github.url)
    with pytest.raises(SetupError, match=r"the releases API \(MPSPDZ_RELEASE_API\) 'http://127\.0\.0\.1:1/repos/.*': "
                                         r"only https:// is accepted"):
        install.install_mpspdz(target / "mp-spdz", release_api="http://127.0.0.1:1")
    github.release["assets"][1]["browser_download_url"] = "http://127.0.0.1:1/x.tar.xz"
    with pytest.raises(SetupError, match=r"browser_download_url 'http://127\.0\.0\.1:1/x\.tar\.xz': only https://"):
        install.install_mpspdz(target / "mp-spdz", release_api=github.url, cafile=github.ca)
    assert github.downloads == [] and not target.exists()


def test_pinned_release_agrees_with_the_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG MPSPDZ_VERSION={re.escape(install.RELEASE_VERSION)}$", text, re.M)
    pinned = re.search(r"^ARG MPSPDZ_SHA256=(\S*)$", text, re.M).group(1)
    assert pinned == install.RELEASE_SHA256
    assert install.RELEASE_SHA256 == "" or re.fullmatch(r"[0-9a-f]{64}", install.RELEASE_SHA256)


# ---- --from-source ------------------------------------------------------------------------------

def test_source_build_commands(tmp_path):
    assert install.source_build_commands(tmp_path, jobs=3) == [
        (tmp_path / "deps" / "SimplestOT_C" / "ref10", ["cmake", "."]),
        (tmp_path, ["make", "-j3", "MY_LDLIBS=-Wl,-rpath,\\$$ORIGIN", "semi2k-party.x", "dealer-ring-party.x"]),
    ]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make to check how it passes MY_LDLIBS on")
def test_make_passes_origin_to_the_link_line(tmp_path):
    """MP-SPDZ's Makefile puts MY_LDLIBS into LDLIBS, used unquoted in a shell recipe: $ORIGIN must arrive."""
    (tmp_path / "Makefile").write_text("LDLIBS = -lgmp $(MY_LDLIBS)\nsemi2k-party.x:\n\techo $(LDLIBS) > link.txt\n")
    cmd = install.source_build_commands(tmp_path, 1)[1][1]
    subprocess.run([*cmd[:3], "semi2k-party.x"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "link.txt").read_text().strip() == "-lgmp -Wl,-rpath,$ORIGIN"


def source_tree(root: Path, unpacked: Path) -> Path:
    for rel in ("Makefile", "CONFIG", "Machines/semi2k-party.cpp", "Machines/dealer-ring-party.cpp",
                "deps/SimplestOT_C/ref10/CMakeLists.txt", "deps/libOTe/CMakeLists.txt", "License.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    shutil.copy2(unpacked / "compile.py", root / "compile.py")
    shutil.copytree(unpacked / "Compiler", root / "Compiler")
    (root / "Compiler" / "__pycache__").mkdir()
    (root / "Compiler" / "__pycache__" / "x.pyc").write_bytes(b"")
    (root / "semi2k-party.x").write_text("stale, linked without $ORIGIN")
    return root


@pytest.fixture
def fake_build_tools(tmp_path, unpacked, monkeypatch):
    """cmake and make stand-ins on PATH: they log their calls; make 'builds' by copying the real binaries."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "cmake").write_text('#!/bin/sh\necho "cmake $PWD $*" >> "$FAKE_LOG"\n')
    (bin_dir / "make").write_text(
        '#!/bin/sh\necho "make $PWD $*" >> "$FAKE_LOG"\n'
        'if [ -n "$FAKE_FAIL" ]; then echo "In file included from Machines/semi2k-party.cpp:1:" >&2; '
        'echo "fatal error: boost/filesystem.hpp: No such file" >&2; exit 2; fi\n'
        'test ! -e semi2k-party.x || { echo "stale binary not removed" >&2; exit 3; }\n'
        'cp "$FAKE_PREBUILT/semi2k-party.x" "$FAKE_PREBUILT/dealer-ring-party.x" "$FAKE_PREBUILT/libSPDZ.so" .\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_PREBUILT", str(unpacked))
    return log


def test_from_source_builds_and_installs(tmp_path, unpacked, fake_build_tools):
    src = source_tree(tmp_path / "MP-SPDZ", unpacked)
    home = tmp_path / "opt" / "mp-spdz"
    done = install.install_mpspdz(home, from_source=src, jobs=2)
    assert done.changed and done.source == f"built from {src}"
    assert fake_build_tools.read_text().splitlines() == [
        f"cmake {src}/deps/SimplestOT_C/ref10 .",
        f"make {src} -j2 MY_LDLIBS=-Wl,-rpath,\\$$ORIGIN semi2k-party.x dealer-ring-party.x",
    ]
    assert install.problems(home) == []
    assert (home / "License.txt").exists() and not (home / "Compiler" / "__pycache__").exists()
    assert_nothing_installed(home.parent, "mp-spdz")


def test_from_source_error_paths(tmp_path, unpacked, fake_build_tools, monkeypatch):
    target = tmp_path / "opt"
    home = target / "mp-spdz"
    with pytest.raises(SetupError, match=r"--from-source .*nowhere: no such folder \(expected an MP-SPDZ source tree"):
        install.install_mpspdz(home, from_source=tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "Makefile").write_text("")
    with pytest.raises(SetupError, match=r"not an MP-SPDZ source tree \(missing CONFIG, compile\.py, "
                                         r"Compiler/__init__\.py, Machines/semi2k-party\.cpp"):
        install.install_mpspdz(home, from_source=tmp_path / "other")
    src = source_tree(tmp_path / "MP-SPDZ", unpacked)
    shutil.rmtree(src / "deps" / "SimplestOT_C")
    with pytest.raises(SetupError, match=r"submodules are not checked out \(missing deps/SimplestOT_C/ref10/"
                                         r"CMakeLists\.txt\): run `git submodule update --init --recursive`"):
        install.install_mpspdz(home, from_source=src)
    shutil.rmtree(src)
    src = source_tree(tmp_path / "MP-SPDZ", unpacked)
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(SetupError, match=r"(?s)`make -j1 .*` in .*MP-SPDZ failed \(exit 2\); nothing was installed\. "
                                         r"A build needs Boost >= 1\.75.*boost/filesystem\.hpp"):
        install.install_mpspdz(home, from_source=src, jobs=1)
    assert not target.exists() or not list(target.iterdir())
    monkeypatch.delenv("FAKE_FAIL")
    real_which = shutil.which
    monkeypatch.setattr(install.shutil, "which", lambda name, *a, **k: None if name == "cmake" else real_which(name))
    with pytest.raises(SetupError, match=r"--from-source needs cmake on PATH \(Debian: apt-get install "
                                         r".*libboost1\.81-all-dev"):
        install.install_mpspdz(home, from_source=src)


# ---- Debian runtime libraries -------------------------------------------------------------------

LDD_MISSING = """\tlinux-vdso.so.1 (0x00007ffd4b5f2000)
\tlibSPDZ.so => /opt/mp-spdz/./libSPDZ.so (0x00007f1e0a000000)
\tlibgmpxx.so.4 => not found
\tlibgmp.so.10 => /lib/x86_64-linux-gnu/libgmp.so.10 (0x00007f1e09f7f000)
\tlibboost_iostreams.so.1.81.0 => not found
\tlibfoo.so.7 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f1e0a5ff000)
"""


def test_parse_ldd():
    libs = install.parse_ldd(LDD_MISSING)
    assert libs["libSPDZ.so"] == "/opt/mp-spdz/./libSPDZ.so"
    assert libs["libgmpxx.so.4"] is None and libs["libgmp.so.10"] == "/lib/x86_64-linux-gnu/libgmp.so.10"
    assert "linux-vdso.so.1" not in libs
    assert install.parse_ldd("\tnot a dynamic executable\n") == {}
    assert install.debian_packages(["libgmpxx.so.4", "libcrypto.so.3", "libssl.so.3", "libfoo.so.7"]) == (
        ["libgmpxx4ldbl", "libssl3"], ["libfoo.so.7"])


def never(cmd, **kw):
    raise AssertionError(f"tests never run {cmd}")


def test_missing_libraries_are_named_with_their_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(install, "_ldd", lambda b: LDD_MISSING.replace("\tlibfoo.so.7 => not found\n", ""))
    with pytest.raises(SetupError) as err:
        install.ensure_runtime_libraries(tmp_path, is_root=False, apt_get="/usr/bin/apt-get", run=never)
    msg = str(err.value)
    assert "libboost_iostreams.so.1.81.0 (needed by semi2k-party.x, dealer-ring-party.x)" in msg
    assert "sudo apt-get install libboost-iostreams1.81.0 libgmpxx4ldbl" in msg
    assert "as root, invoke setup installs them itself" in msg
    monkeypatch.setattr(install, "_ldd", lambda b: LDD_MISSING)
    with pytest.raises(SetupError, match=r"no known Debian package provides libfoo\.so\.7 \(`apt-file search"):
        install.ensure_runtime_libraries(tmp_path, is_root=True, apt_get=None, run=never)
    with pytest.raises(SetupError, match=r"sudo apt-get install libboost-iostreams1\.81\.0 libgmpxx4ldbl; no known"):
        install.ensure_runtime_libraries(tmp_path, is_root=False, apt_get="/usr/bin/apt-get", run=never)


def test_as_root_missing_packages_are_installed_with_apt(tmp_path, monkeypatch):
    state = {"installed": False}
    found = LDD_MISSING.replace(" => not found", " => /lib/x86_64-linux-gnu/x.so").replace("libfoo", "libgmp")
    monkeypatch.setattr(install, "_ldd", lambda b: found if state["installed"] else
                        LDD_MISSING.replace("\tlibfoo.so.7 => not found\n", ""))
    calls = []

    def apt(cmd, **kw):
        calls.append((cmd, kw.get("stdin"), kw["env"].get("DEBIAN_FRONTEND")))
        state["installed"] = "install" in cmd
        return subprocess.CompletedProcess(cmd, 0, "", "")

    libs = install.ensure_runtime_libraries(tmp_path, is_root=True, apt_get="/usr/bin/apt-get", run=apt)
    assert libs.installed == ["libboost-iostreams1.81.0", "libgmpxx4ldbl"]
    assert calls == [
        (["/usr/bin/apt-get", "update"], subprocess.DEVNULL, "noninteractive"),
        (["/usr/bin/apt-get", "install", "-y", "--no-install-recommends", "libboost-iostreams1.81.0", "libgmpxx4ldbl"],
         subprocess.DEVNULL, "noninteractive"),
    ]

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package libgmpxx4ldbl")

    state["installed"] = False
    with pytest.raises(SetupError, match=r"(?s)`/usr/bin/apt-get update` failed \(exit 100\) while installing "
                                         r"libboost-iostreams1\.81\.0 libgmpxx4ldbl for .*Unable to locate package"):
        install.ensure_runtime_libraries(tmp_path, is_root=True, apt_get="/usr/bin/apt-get", run=failing)


def test_libspdz_missing_at_run_time_means_reinstall(tmp_path, monkeypatch):
    monkeypatch.setattr(install, "_ldd", lambda b: "\tlibSPDZ.so => not found\n")
    with pytest.raises(SetupError, match=r"libSPDZ\.so is missing beside the binaries.*invoke setup --force"):
        install.ensure_runtime_libraries(tmp_path, is_root=True, apt_get="/usr/bin/apt-get", run=never)


# ---- the README's commands and CI ------------------------------------------------------------------

def readme_first_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_starts_with_two_commands_that_ci_runs():
    setup_line, test_line = readme_first_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_line == "invoke test"
    assert re.search(rf"^{re.escape(test_line)}$", ci, re.M), "CI must run exactly the README's test command"
    assert "invoke setup --archive ../shared/mp-spdz/mp-spdz-*.tar.xz" in setup_line
    assert re.search(r"^python3 -m invoke setup --archive ", ci, re.M) or re.search(r"^invoke setup --archive", ci,
                                                                                       re.M)
    assert "invoke demo --dataset ../shared/faces/lfw10" in setup_line and "invoke demo --dataset ../shared/faces/lfw10" in ci


def test_ci_fails_clearly_without_the_mpspdz_archive(tmp_path):
    """A clone without ../shared/mp-spdz: .ci/run stops before installing anything, and says why."""
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci" / "run", clone / ".ci" / "run")
    r = subprocess.run(["bash", ".ci/run"], cwd=clone, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, CI="true"), timeout=60)
    assert r.returncode != 0
    assert "CI cannot install MP-SPDZ" in r.stderr and "../shared/mp-spdz/mp-spdz-*.tar.xz" in r.stderr
