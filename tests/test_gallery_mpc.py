"""Many data owners (issue 17) on the real protocol: gallery_enrol.mpc and face_predict's names mode.

Each program runs alone on local parties (tests/mpc_run.py) with inputs made here, honest or hostile,
and is compared with its float64 reference (orchestration/shared/reference.py). These tests need
MP-SPDZ; without it they FAIL (conftest's ``mp``): a skipped protocol proves nothing.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from orchestration.shared import reference
from orchestration.shared.model import ENROL_PROGRAM
from preprocessing import sharing

from mpc_run import ProgramRun, run_program, share_ring

pytestmark = pytest.mark.mpc

D = 128
ALPHA = 16.0
MASK64 = (1 << 64) - 1


@pytest.fixture(scope="session")
def mpc_root(tmp_path_factory) -> Path:
    """One build folder and one set of party keys for all runs of this module."""
    return tmp_path_factory.mktemp("mpc")


def unit_rows(rng: np.random.Generator, m: int, d: int = D) -> np.ndarray:
    x = rng.normal(size=(m, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def enc(v) -> np.ndarray:
    return sharing.encode_fixed(np.asarray(v, dtype=np.float64))


def enrol_inputs(raw_rows: np.ndarray, m: int, k: int, alpha: float, rng: np.random.Generator
                 ) -> list[np.ndarray]:
    """Both servers' input files: server 0 holds the public alpha, inv_m and mask, server 1 zeros there;
    the rows (uint64 ring values, padded to k with zeros) are shared between them."""
    x = np.zeros((k, raw_rows.shape[1]), dtype=np.uint64)
    x[:len(raw_rows)] = raw_rows
    public = np.concatenate([enc([alpha]), np.array([round(2 ** 16 / m)], dtype=np.uint64),
                             np.array([1] * m + [0] * (k - m), dtype=np.uint64)])
    x0, x1 = share_ring(x, rng)
    return [np.concatenate([public, x0]), np.concatenate([np.zeros_like(public), x1])]


ROWS_OK = re.compile(r"^ROWS_OK ([01]*)$", re.M)


def rows_ok_line(run: ProgramRun, k: int) -> np.ndarray:
    """Server 0's one printed line; the other parties print nothing of the program (MP-SPDZ: player 0 only)."""
    found = ROWS_OK.findall(run.parties[0].stdout)
    assert len(found) == 1 and len(found[0]) == k, run.parties[0].stdout
    for p in run.parties[1:]:
        assert "ROWS_OK" not in p.stdout
    return np.array([ch == "1" for ch in found[0]])


def run_enrol(mp, root: Path, raw_rows: np.ndarray, m: int, k: int, *, protocol: str = "dealer",
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    run = run_program(mp, root, ENROL_PROGRAM, [k, D], enrol_inputs(raw_rows, m, k, ALPHA,
                                                                    np.random.default_rng(seed)),
                      protocol=protocol)
    for p in run.parties[:2]:
        assert len(p.persistence) == D + 1, "the column and nothing else"
    return sharing.decode_fixed(run.reconstruct(0, D + 1)), rows_ok_line(run, k)


def assert_column_close(col: np.ndarray, ref: np.ndarray) -> None:
    # fixed point with f = 16: a few units of 2^-16 per product, against values of about alpha/sqrt(d)
    assert np.max(np.abs(col - ref)) <= 1e-3 * np.max(np.abs(ref)), np.max(np.abs(col - ref))


@pytest.mark.parametrize("m,k", [(5, 8), (8, 8)])
def test_enrol_column_matches_reference(mp, mpc_root, m, k):
    rng = np.random.default_rng(m)
    photos = unit_rows(rng, m)
    col, ok = run_enrol(mp, mpc_root, enc(photos), m, k)
    assert_column_close(col, reference.ncm_column(photos, ALPHA))
    # the padding rows are zero, which fails the norm check: the caller ignores rows >= m
    assert ok.tolist() == [True] * m + [False] * (k - m)
    assert ok[:m].tolist() == reference.rows_ok(photos).tolist()


def test_enrol_ncm_column_is_the_warm_start():
    rng = np.random.default_rng(1)
    x = unit_rows(rng, 12)
    labels = np.arange(12) % 3
    w = reference.warm_start(reference.with_bias(x), labels, 3, ALPHA)
    for j in range(3):
        assert np.allclose(w[:, j], reference.ncm_column(x[labels == j], ALPHA))


def hostile_rows(rng: np.random.Generator) -> tuple[np.ndarray, list[bool]]:
    """Rows as ring values (uint64), each with the bit gallery_enrol must give it."""
    good = enc(unit_rows(rng, 4))
    rows, expect = [good[0]], [True]

    def bad(j: int, raw: int, ok: bool = False) -> None:
        r = good[1 + len(rows) % 3].copy()
        r[j] = np.uint64(raw & MASK64)
        rows.append(r)
        expect.append(ok)

    bad(3, int(1.5 * 2 ** 16))  # a coordinate of 1.5
    bad(7, 2 ** 40)  # 2^40 raw = 2^24: far outside, the norm wraps to nonsense
    bad(9, 2 ** 63)  # the most negative ring value
    bad(11, 2 ** 63 - 1)  # the most positive
    bad(0, 2 ** 32)  # its square is 2^64 = 0 in the ring: the norm looks fine, the coordinate does not
    bad(5, -(2 ** 16))  # exactly -1: outside the open interval
    near = good[2].view(np.int64).copy()  # a coordinate of -5 * 2^-16 (ring value 2^64 - 5): in range
    near[4] = -5
    rows.append(near.view(np.uint64))
    expect.append(bool(reference.rows_ok(near.view(np.uint64)[None])[0]))
    assert expect[-1], "the tiny negative row must be a valid one"
    rows.append(np.zeros(D, dtype=np.uint64))  # a zero row
    expect.append(False)
    rows.append(enc(1.3 * unit_rows(rng, 1)[0]))  # norm 1.3
    expect.append(False)
    rows.append(enc(np.sqrt(1.05) * unit_rows(rng, 1)[0]))  # squared norm 1.05: inside the bounds
    expect.append(True)
    return np.array(rows, dtype=np.uint64), expect


def test_enrol_flags_hostile_rows(mp, mpc_root):
    rows, expect = hostile_rows(np.random.default_rng(7))
    assert reference.rows_ok(rows).tolist() == expect
    k = 16
    _, ok = run_enrol(mp, mpc_root, rows, len(rows), k)
    assert ok.tolist() == expect + [False] * (k - len(rows))


def test_enrol_semi2k_small(mp, mpc_root):
    rng = np.random.default_rng(3)
    photos = unit_rows(rng, 3)
    raw = enc(photos)
    raw[2, 0] = np.uint64(2 ** 63 + 12345)  # hostile: the bit says so, the column is the caller's to drop
    col, ok = run_enrol(mp, mpc_root, raw[:2], 2, 4, protocol="semi2k")
    assert_column_close(col, reference.ncm_column(photos[:2], ALPHA))
    assert ok.tolist() == [True, True, False, False]
    _, ok = run_enrol(mp, mpc_root, raw, 3, 4, protocol="semi2k", seed=1)
    assert ok.tolist() == [True, True, False, False]
