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
