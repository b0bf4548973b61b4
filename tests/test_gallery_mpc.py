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


# ---- face_predict's names mode --------------------------------------------------------------

EXP_BITS = 8  # the servers' padding columns (bias -200) need exp(t) for t >= -256
PAD_BIAS = -200.0
L = 8


def gallery(rng: np.random.Generator, c: int, per: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A warm-start model of c synthetic people (unit embeddings around c centres), their names, the centres."""
    centres = unit_rows(rng, c)
    photos = centres.repeat(per, axis=0) + 0.04 * rng.normal(size=(c * per, D))
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    w = reference.warm_start(reference.with_bias(photos), np.arange(c).repeat(per), c, ALPHA)
    names = rng.integers(0, 2 ** 64, size=(c, L), dtype=np.uint64, endpoint=False)
    return w, names, centres


def queries(rng: np.random.Generator, centres: np.ndarray, known: int, unknown: int) -> np.ndarray:
    """``known`` faces of enrolled people (near a centre), then ``unknown`` strangers (random unit vectors)."""
    idx = rng.integers(0, len(centres), size=known)
    x = np.vstack([centres[idx] + 0.04 * rng.normal(size=(known, D)), rng.normal(size=(unknown, D))])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pad(w: np.ndarray, names: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """The server's inactive capacity slots: zero weights, bias PAD_BIAS, zero names."""
    extra = cap - w.shape[1]
    wp = np.hstack([w, np.zeros((w.shape[0], extra))])
    wp[-1, w.shape[1]:] = PAD_BIAS
    return wp, np.vstack([names, np.zeros((extra, names.shape[1]), dtype=np.uint64)])


def predict_args(q: int, c: int, threshold: float) -> list[str]:
    from orchestration.shared.ports import logit_arg

    return [str(q), str(D + 1), str(c), str(EXP_BITS), "names", str(L), logit_arg(threshold)]


def run_names(mp, root: Path, w: np.ndarray, names: np.ndarray, x: np.ndarray, threshold: float, *,
              protocol: str = "dealer", seed: int = 0) -> tuple[np.ndarray, np.ndarray, ProgramRun]:
    """Names mode, non-serve: returns (words (q, L) uint64, accept * z_max (q,), the run)."""
    rng = np.random.default_rng(seed)
    d1, c = w.shape
    q = len(x)
    model = np.concatenate([enc(w).ravel(), np.asarray(names, dtype=np.uint64).ravel()])
    m0, m1 = share_ring(model, rng)
    x0, x1 = share_ring(enc(reference.with_bias(x)), rng)
    run = run_program(mp, root, "face_predict", predict_args(q, c, threshold), [x0, x1], persistence=[m0, m1],
                      protocol=protocol)
    at = d1 * c + c * L
    for p in run.parties[:2]:
        assert len(p.persistence) == at + (L + 1) * q, "model, names, then the answers and nothing else"
    out = run.reconstruct(at, (L + 1) * q)
    words = out[:L * q].reshape(L, q).T  # word-major in the file
    return words, sharing.decode_fixed(out[L * q:]), run


#: z_max on shares against float64: inputs rounded to 2^-16 and one truncation per dot product
Z_TOL = 2.0 ** -10
#: how close to the threshold the near queries are (well above Z_TOL: the fixed point decides them as float64 does)
NEAR = (0.004, 0.03)


def assert_names_match(words, accept_z, ref_words, ref_z) -> None:
    assert (words == ref_words).all(), "names differ from the reference (or a rejected query leaked one)"
    assert np.all((accept_z == 0) == (ref_z == 0)), (accept_z, ref_z)  # a rejected query answers exactly 0
    assert np.max(np.abs(accept_z - ref_z)) <= Z_TOL, (accept_z, ref_z)


def safe_threshold(w, x, t: float) -> None:
    """The test's threshold must not sit on a query's z_max (fixed point would decide it either way)."""
    zmax = reference.predict_scores(w, x, EXP_BITS)[2]
    assert np.min(np.abs(zmax - t)) > 2 * Z_TOL, np.min(np.abs(zmax - t))


def near_threshold(w: np.ndarray, known: np.ndarray, stranger: np.ndarray, t: float) -> np.ndarray:
    """Queries whose z_max is t +- each of NEAR (just accepted and just rejected): unit mixes of a known face and a
    stranger, the mix found by bisection on the float64 reference."""
    def mix(lam: float) -> np.ndarray:
        v = (1 - lam) * known + lam * stranger
        return v / np.linalg.norm(v)

    def zmax(lam: float) -> float:
        return float(reference.predict_scores(w, mix(lam)[None, :], EXP_BITS)[2][0])

    assert zmax(0.0) > t + max(NEAR) > t - max(NEAR) > zmax(1.0), (zmax(0.0), t, zmax(1.0))
    out = []
    for target in [t + d for d in NEAR] + [t - d for d in NEAR]:
        lo, hi = 0.0, 1.0  # zmax(lo) > target > zmax(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if zmax(mid) > target else (lo, mid)
        out.append(mix(lo))
    return np.array(out)


# one argmax level (up to 64 classes), two (groups of 8 then one of 13) and, with a group of one passed on
# unchanged by the first level, two (97 = 12 x 8 + 1: groups of 8, then one of 13)
@pytest.mark.parametrize("c", [6, 40, 100, 97])
def test_names_match_reference(mp, mpc_root, c):
    """accept = z_max >= T on shares, as reference.predict_names decides, also for queries just above and just
    below the threshold; the accepted answer carries z_max within Z_TOL of float64's."""
    rng = np.random.default_rng(c)
    w, names, centres = gallery(rng, c)
    x = queries(rng, centres, 4, 4)
    t = 1.5  # alpha 16: enrolled faces near 8 (1 - 0.04^2 d), strangers around or below 0
    x = np.vstack([x, near_threshold(w, x[0], x[-1], t)])
    safe_threshold(w, x, t)
    ref_words, ref_z = reference.predict_names(w, names, x, EXP_BITS, t)
    accepted = ref_z != 0
    assert accepted[:4].all() and not accepted[4:8].all(), "the test wants enrolled faces named and some strangers not"
    assert accepted[8:10].all() and not accepted[10:].any(), "near queries: two just above T, two just below"
    words, accept_z, _ = run_names(mp, mpc_root, w, names, x, t)
    assert_names_match(words, accept_z, ref_words, ref_z)


def test_names_ties_answer_one_of_the_tied_names(mp, mpc_root):
    """Two classes with the same column: float64 names the lower index. On shares the two logits may differ by
    one unit of 2^-16 (each dot product is truncated with its own random mask), so either name may come, but
    exactly one of them (never the sum of both: exactly one indicator wins), with the tied z_max."""
    rng = np.random.default_rng(3)
    w, names, centres = gallery(rng, 6)
    w[:, 4] = w[:, 1]
    x = centres[[1, 1, 1, 2]] + 0.04 * rng.normal(size=(4, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref_words, ref_z = reference.predict_names(w, names, x, EXP_BITS, 0.0)
    assert (ref_words[:3] == names[1]).all()
    words, accept_z, _ = run_names(mp, mpc_root, w, names, x, 0.0)
    for k in range(3):
        assert (words[k] == names[1]).all() or (words[k] == names[4]).all(), k
    assert (words[3] == ref_words[3]).all()
    assert np.max(np.abs(accept_z - ref_z)) <= Z_TOL, (accept_z, ref_z)


def test_names_high_threshold_rejects_everything_low_accepts_everything(mp, mpc_root):
    rng = np.random.default_rng(11)
    w, names, centres = gallery(rng, 6)
    x = queries(rng, centres, 4, 2)
    words, accept_z, _ = run_names(mp, mpc_root, w, names, x, ALPHA / 2 + 0.01)  # unit x: z_max <= alpha/2
    assert not words.any() and not accept_z.any()
    # a negative logit threshold (the program argument "m20.0") below every query's z_max accepts them all
    words, accept_z, _ = run_names(mp, mpc_root, w, names, x, -20.0)
    ref_words, ref_z = reference.predict_names(w, names, x, EXP_BITS, -20.0)
    assert (ref_z != 0).all()
    assert_names_match(words, accept_z, ref_words, ref_z)


@pytest.mark.parametrize("c,cap", [(6, 10), (40, 48), (90, 112)])
def test_names_padded_capacity_answers_as_unpadded(mp, mpc_root, c, cap):
    rng = np.random.default_rng(100 + c)
    w, names, centres = gallery(rng, c)
    x = queries(rng, centres, 3, 1)
    t = 1.5
    safe_threshold(w, x, t)
    wp, np_ = pad(w, names, cap)
    words, accept_z, _ = run_names(mp, mpc_root, w, names, x, t)
    words_p, accept_z_p, _ = run_names(mp, mpc_root, wp, np_, x, t, seed=1)
    assert (words_p == words).all()
    assert_names_match(words_p, accept_z_p, *reference.predict_names(w, names, x, EXP_BITS, t))


def test_names_semi2k_small(mp, mpc_root):
    rng = np.random.default_rng(5)
    w, names, centres = gallery(rng, 4)
    x = queries(rng, centres, 2, 2)
    t = -0.5  # negative: the "m" encoding on semi2k too
    safe_threshold(w, x, t)
    words, accept_z, _ = run_names(mp, mpc_root, w, names, x, t, protocol="semi2k")
    assert_names_match(words, accept_z, *reference.predict_names(w, names, x, EXP_BITS, t))


def test_names_serve_mode_compiles(mp, mpc_root):
    from orchestration.mpspdz.toolchain import compile_program, protocol

    args = ["16", "129", "320", "8", "serve", "names", "8", "m1.5"]  # a negative logit threshold
    assert compile_program(mp, "face_predict", args, mpc_root / "build", proto=protocol("dealer")) == \
        "face_predict-" + "-".join(args)
