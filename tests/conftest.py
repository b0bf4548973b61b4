"""Shared fixtures: where the face data lives, small temporary galleries."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces")).resolve()


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set FACES_DIR to the folder holding lfw10/ and lfw-devtrain/)")
    return path


@pytest.fixture(scope="session")
def lfw10() -> Path:
    """10 people x 10 images (LFW originals, 250x250)."""
    return _require(FACES / "lfw10")


@pytest.fixture(scope="session")
def lfw_unknown() -> Path:
    """300 people, one image each, none of them in lfw10."""
    return _require(FACES / "lfw-devtrain" / "unknown")


@pytest.fixture(scope="session")
def devtrain_people() -> Path:
    return _require(FACES / "lfw-devtrain" / "people")


@pytest.fixture(scope="session")
def mp():
    """The MP-SPDZ installation. Missing MP-SPDZ FAILS the protocol tests: skipping would prove nothing."""
    from orchestration.mpspdz.toolchain import MPSPDZError, find_mpspdz

    try:
        return find_mpspdz()
    except MPSPDZError as exc:
        pytest.fail(str(exc))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.lower().startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.fixture(scope="session")
def mpspdz_archive(mp, tmp_path_factory) -> Path:
    """An MP-SPDZ archive (with its .sha256 beside it) whose binaries run on this CPU, for the install tests.

    ``../shared/mp-spdz``'s archive is an -march=native build with AVX-512: on a CPU without AVX-512 its parties
    die of SIGILL, whatever the project's code does. There the working installation (`mp`, built on this machine
    with `invoke setup --from-source`) is packed the same way instead, so that the install path is still
    tested end to end on real binaries."""
    import hashlib
    import tarfile

    found = sorted((REPO.parent / "shared" / "mp-spdz").glob("mp-spdz-*.tar.xz"))
    if len(found) != 1:
        pytest.fail(f"expected exactly one MP-SPDZ archive in {REPO.parent / 'shared' / 'mp-spdz'}, found "
                    f"{[p.name for p in found]}")
    if "avx512f" in _cpu_flags():
        return found[0]
    out = tmp_path_factory.mktemp("mpspdz-archive") / "mp-spdz-this-cpu.tar.xz"
    with tarfile.open(out, "w:xz", preset=0) as tar:
        tar.add(mp.home, arcname="mp-spdz-this-cpu",
                filter=lambda m: None if Path(m.name).name == ".invoke-setup.json" else m)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    Path(f"{out}.sha256").write_text(f"{digest}  {out.name}\n")
    return out
