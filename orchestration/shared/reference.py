"""Plaintext float64 reference of exactly the algorithm the MPC programs run.

Same warm start, epochs, batch order, learning rate and exp approximation as
``mpc_programs/face_train.mpc`` and ``face_predict.mpc``; only the arithmetic differs
(float64 here, 16-bit fixed point there). Tests and benchmarks put the two side by side.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 1
    batch: int = 32
    lr: float = 1.0
    alpha: float = 16.0
    exp_bits: int = 8
    seed: int = 0  # the client shuffles the training rows with this seed before sharing

    def program_args(self, n: int, d1: int, c: int) -> list[str]:
        """face_train's compile-time arguments: sizes and settings the same for every embedder.

        ``alpha`` is not among them: it differs per embedder, so it travels as a secret input."""
        return [str(n), str(d1), str(c), str(self.epochs), str(min(self.batch, n)),
                repr(float(self.lr)), str(self.exp_bits)]


def training_order(n: int, seed: int) -> np.ndarray:
    """The row order SGD sees: a seeded shuffle (sorted-by-person batches would wreck SGD)."""
    return np.random.default_rng(seed).permutation(n)


def with_bias(x: np.ndarray) -> np.ndarray:
    """Append the constant-1 bias feature the programs expect."""
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((x.shape[0], 1))])


def exp_nonpos(t: np.ndarray, exp_bits: int) -> np.ndarray:
    """(1 + t/2^m)^(2^m): the programs' exp for t <= 0."""
    y = 1.0 + t / 2.0 ** exp_bits
    for _ in range(exp_bits):
        y = y * y
    return y


def softmax_rows(z: np.ndarray, exp_bits: int) -> np.ndarray:
    e = exp_nonpos(z - z.max(axis=1, keepdims=True), exp_bits)
    return e / e.sum(axis=1, keepdims=True)


def ncm_column(photos: np.ndarray, alpha: float) -> np.ndarray:
    """One person's nearest-class-mean column (d+1,): [alpha * mu, -alpha/2 * |mu|^2], mu = mean of ``photos`` (m, d).

    What gallery_enrol.mpc computes on shares, and the warm start of face_train for every class."""
    mu = np.asarray(photos, dtype=np.float64).mean(axis=0)
    return np.concatenate([alpha * mu, [-alpha / 2 * float(mu @ mu)]])


def class_means(x: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    """Each class's mean embedding (c, d), in one pass over the rows (no n x c one-hot, no loop over classes).

    What the client shares for ``epochs = 0`` instead of the faces and labels. Raises ValueError when a
    class has no row: its mean, and so its model column, would not exist."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=c)
    if len(counts) > c or (counts == 0).any():
        empty = np.flatnonzero(counts[:c] == 0)
        raise ValueError(f"labels must cover classes 0..{c - 1} with at least one row each; "
                         f"{'classes ' + ', '.join(map(str, empty[:5])) + ' have none' if len(empty) else 'some are >= c'}")
    sums = np.zeros((c, x.shape[1]))
    np.add.at(sums, labels, x)
    return sums / counts[:, None]


def ncm_model(means: np.ndarray, alpha: float) -> np.ndarray:
    """The nearest-class-mean model W (d+1, c) of class means (c, d): every class's :func:`ncm_column`."""
    means = np.asarray(means, dtype=np.float64)
    return np.vstack([alpha * means.T, -alpha / 2 * np.einsum("cd,cd->c", means, means)[None, :]])


def warm_start(x1: np.ndarray, labels: np.ndarray, c: int, alpha: float) -> np.ndarray:
    return ncm_model(class_means(x1[:, :-1], labels, c), alpha)


#: gallery_enrol's bounds on a row's squared norm (the embeddings are L2-normalised)
ENROL_NORM_BOUNDS = (0.9, 1.1)


def rows_ok(photos: np.ndarray, frac_bits: int = 16) -> np.ndarray:
    """gallery_enrol's range check per row: every |x| < 1 and |x|^2 within ENROL_NORM_BOUNDS, on fixed point.

    ``photos``: real values (float, encoded as the client does: round(x * 2^f)) or raw ring elements
    (uint64, read as signed 64-bit: what a hostile source may send). The squared norm is the exact sum of
    the raw squares at scale 2^(2f), compared with int(bound * 2^(2f)), as the program does."""
    arr = np.asarray(photos)
    if arr.dtype == np.uint64:
        raw = arr.view(np.int64)
    else:
        raw = np.round(np.asarray(arr, dtype=np.float64) * 2 ** frac_bits).astype(np.int64)
    lo, hi = (int(b * 2 ** (2 * frac_bits)) for b in ENROL_NORM_BOUNDS)
    out = np.zeros(raw.shape[0], dtype=bool)
    for r, row in enumerate(raw):
        vals = [int(v) for v in row]  # Python integers: no wrap, whatever the values
        if all(-2 ** frac_bits < v < 2 ** frac_bits for v in vals):
            out[r] = lo <= sum(v * v for v in vals) <= hi
    return out


def train(x: np.ndarray, labels: np.ndarray, c: int, params: TrainParams) -> np.ndarray:
    """Train on embeddings ``x`` (n, d) with integer labels; returns W (d+1, c)."""
    if params.epochs == 0:  # the warm start alone: no row order, no one-hot (10,000 classes stay cheap)
        return ncm_model(class_means(x, labels, c), params.alpha)
    order = training_order(len(x), params.seed)
    x1 = with_bias(np.asarray(x)[order])
    labels = np.asarray(labels)[order]
    n = x1.shape[0]
    w = warm_start(x1, labels, c, params.alpha)
    batch = min(params.batch, n)
    starts = [(s, batch) for s in range(0, n - n % batch, batch)]
    if n % batch:
        starts.append((n - n % batch, n % batch))
    for _ in range(params.epochs):
        for s, rows in starts:
            xb = x1[s:s + rows]
            g = softmax_rows(xb @ w, params.exp_bits)
            g[np.arange(rows), labels[s:s + rows]] -= 1.0  # P - Y, one batch's one-hot at a time
            w = w - (params.lr / rows) * (xb.T @ g)
    return w


#: the open-set score the servers return and every threshold is on (issue 18): the top logit z_max.
#: With the nearest-class-mean warm start z_c = alpha/2 (1 - |x - mu_c|^2) for a unit x, so z_max is the
#: distance to the nearest class mean on a scale that does not depend on the gallery size, and it does
#: not saturate the way the confidence 1/S does (a margin above ~11 logits is exactly 1 in fixed point).
SCORE = "zmax"
#: what a threshold on an older record or table was for: the confidence 1/S (top softmax probability)
OLD_SCORE = "confidence"
SCORE_DESCRIPTION = "top logit z_max"


def predict(w: np.ndarray, x: np.ndarray, exp_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Class index and top-class probability (the confidence 1/S) for each row of ``x``."""
    best, conf, _ = predict_scores(w, x, exp_bits)
    return best, conf


def predict_scores(w: np.ndarray, x: np.ndarray, exp_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """face_predict's index mode for each row of ``x``: (top class, confidence 1/S, top logit z_max).

    The top class goes to the lower index on ties; S = sum_j exp(z_j - z_max) with the programs' exp. The
    open-set decision is on z_max (:data:`SCORE`): a face is unknown when z_max < threshold."""
    x = np.asarray(x, dtype=np.float64)
    best, conf, zmax = (np.empty(len(x), dtype=np.int64), np.empty(len(x)), np.empty(len(x)))
    for a, z in _logit_chunks(w, x):
        zm = z.max(axis=1)
        best[a:a + len(z)], zmax[a:a + len(z)] = z.argmax(axis=1), zm
        conf[a:a + len(z)] = 1.0 / exp_nonpos(z - zm[:, None], exp_bits).sum(axis=1)
    return best, conf, zmax


#: logits are computed this many values at a time (n x c at 100,000 faces and 10,000 classes is 8 GB)
_CHUNK_VALUES = 1 << 24


def _logit_chunks(w: np.ndarray, x: np.ndarray):
    """(first row, logits of rows first..first+k) over ``x``, k rows at a time so that k x c stays small."""
    rows = max(1, _CHUNK_VALUES // max(1, w.shape[1]))
    for a in range(0, len(x), rows):
        yield a, with_bias(x[a:a + rows]) @ w


def predict_names(w: np.ndarray, names: np.ndarray, x: np.ndarray, exp_bits: int,
                  threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """face_predict's names mode: (words (q, L) uint64, accept * z_max (q,)).

    ``names`` (c, L) holds each class's name words. The top class (ties: the lower index) and its logit
    z_max as in :func:`predict_scores`; a query is accepted when z_max >= ``threshold`` (a logit, any
    real), and then answers the winner's words and z_max; a rejected one zeros. ``exp_bits`` is kept for
    the callers' sake: this mode computes no exponential."""
    del exp_bits
    z = with_bias(x) @ w
    best = z.argmax(axis=1)
    zmax = z.max(axis=1)
    accept = zmax >= threshold
    words = np.where(accept[:, None], np.asarray(names, dtype=np.uint64)[best], np.uint64(0)).astype(np.uint64)
    return words, np.where(accept, zmax, 0.0)


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    genuine_accept: float  # share of held-out enrolled faces accepted (cross-validation)
    impostor_reject: float  # share of enrolled faces rejected when their own person is left out
    n_genuine: int
    n_impostor: int
    score: str = SCORE  # what the threshold is on: the top logit z_max (records before issue 18: 1/S)


def choose_threshold(x: np.ndarray, labels: np.ndarray, c: int, params: TrainParams,
                     folds: int = 5, max_genuine_reject: float = 0.03) -> ThresholdChoice:
    """Default open-set threshold on the top logit z_max (:data:`SCORE`) from the enrollment data alone,
    on the client, in plaintext.

    Genuine scores: the top logit z_max of each enrolled face under a model trained without it
    (``folds``-fold cross-validation). Impostor scores: the logit of the best *other* person when
    the face's own person is taken out of the model (each person plays the unknown in turn).
    The threshold is the equal-error point of the two (as many genuine faces rejected as impostors
    accepted), lowered where needed so that at most ``max_genuine_reject`` of the genuine faces are
    rejected: turning away an enrolled person costs more than letting the odd stranger be named.
    Uses the very algorithm the servers run, so the scale matches.
    """
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(x)
    genuine: list[float] = []
    fold_of = np.empty(n, dtype=int)
    # stratified: a person's i-th face (in row order) goes to fold i mod folds
    by_person = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_person]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    fold_of[by_person] = (np.arange(n) - first) % folds
    for f in range(folds):
        test = fold_of == f
        train_ = ~test
        if not test.any() or len(np.unique(labels[train_])) < 2:
            continue
        present = np.unique(labels[train_])
        remap = {int(k): i for i, k in enumerate(present)}
        w = train(x[train_], np.array([remap[int(k)] for k in labels[train_]]), len(present), params)
        keep = test & np.isin(labels, present)
        if keep.any():
            _, _, zmax = predict_scores(w, x[keep], params.exp_bits)
            genuine += zmax.tolist()
    w_full = train(x, labels, c, params)
    impostor: list[float] = []
    if c > 2:
        best_other = np.empty(n)
        for a, z in _logit_chunks(w_full, x):
            z[np.arange(len(z)), labels[a:a + len(z)]] = -np.inf  # the best *other* person
            best_other[a:a + len(z)] = z.max(axis=1)
        impostor = best_other[np.argsort(labels, kind="stable")].tolist()  # in class order
    # no genuine (or impostor) score at all: the threshold of the other side alone, or 0 (z = alpha/2 (1 - d^2))
    g = np.array(genuine) if genuine else np.array([float(np.max(impostor, initial=0.0)) + 1.0])
    imp = np.array(impostor) if impostor else np.array([float(np.min(g)) - 1.0])
    candidates = np.unique(np.concatenate([g, imp]))
    # the shares below each candidate by binary search (a loop over candidates is quadratic in the faces)
    frr = np.searchsorted(np.sort(g), candidates, side="left") / len(g)
    far = 1.0 - np.searchsorted(np.sort(imp), candidates, side="left") / len(imp)
    best = int(np.argmin(np.abs(frr - far) + 1e-9 * candidates))
    t = min(float(candidates[best]), float(np.quantile(g, max_genuine_reject)))
    return ThresholdChoice(t, float((g >= t).mean()), float((imp < t).mean()), len(genuine), len(impostor))
