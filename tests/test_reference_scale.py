"""The float64 reference at gallery scale: class means without a one-hot, scores and thresholds in chunks.

Each fast path is checked against the direct formula it replaces, on small data with tiny chunks."""
from __future__ import annotations

import numpy as np
import pytest

from orchestration.client import jobs
from orchestration.shared import reference
from tests.synthetic import clusters


def _data(people: int = 9, per: int = 7, seed: int = 4):
    x, labels = clusters(people=people, per=per, d=12, seed=seed)
    names = sorted(set(labels))
    idx = np.array([names.index(n) for n in labels])
    perm = np.random.default_rng(seed).permutation(len(x))  # classes interleaved, as real galleries are
    return x[perm], idx[perm], len(names)


def test_class_means_are_each_persons_average_and_refuse_an_empty_class():
    x, idx, c = _data()
    means = reference.class_means(x, idx, c)
    for k in range(c):
        np.testing.assert_allclose(means[k], x[idx == k].mean(axis=0))
    w = reference.ncm_model(means, 16.0)
    for k in range(c):
        np.testing.assert_allclose(w[:, k], reference.ncm_column(x[idx == k], 16.0))
    with pytest.raises(ValueError, match="classes 3 have none"):
        reference.class_means(x[idx != 3], idx[idx != 3], c)
    with pytest.raises(ValueError, match="labels must cover classes 0..4"):
        reference.class_means(x, idx, 5)


@pytest.mark.parametrize("epochs", [0, 1, 2])
def test_training_and_scores_in_chunks_match_the_direct_formulas(monkeypatch, epochs):
    x, idx, c = _data()
    params = reference.TrainParams(epochs=epochs, batch=8, alpha=16.0, exp_bits=8, seed=1)
    w = reference.train(x, idx, c, params)
    if epochs == 0:
        np.testing.assert_allclose(w, reference.warm_start(reference.with_bias(x), idx, c, params.alpha))
    else:  # SGD by hand with the full one-hot, in the programs' row order
        order = reference.training_order(len(x), params.seed)
        x1, lab = reference.with_bias(x[order]), idx[order]
        y = np.eye(c)[lab]
        v = reference.warm_start(x1, lab, c, params.alpha)
        for _ in range(epochs):
            for s in range(0, len(x1), 8):
                xb, yb = x1[s:s + 8], y[s:s + 8]
                v = v - (params.lr / len(xb)) * (xb.T @ (reference.softmax_rows(xb @ v, 8) - yb))
        np.testing.assert_allclose(w, v)
    z = reference.with_bias(x) @ w
    whole = reference.predict_scores(w, x, 8)
    choice = reference.choose_threshold(x, idx, c, params)
    monkeypatch.setattr(reference, "_CHUNK_VALUES", 2 * c + 1)  # 2 rows a chunk
    best, conf, zmax = reference.predict_scores(w, x, 8)
    np.testing.assert_array_equal(best, z.argmax(axis=1))
    np.testing.assert_allclose(zmax, z.max(axis=1))
    np.testing.assert_allclose(conf, 1 / reference.exp_nonpos(z - z.max(axis=1, keepdims=True), 8).sum(axis=1))
    for a, b in zip((best, conf, zmax), whole):
        np.testing.assert_allclose(a, b)
    again = reference.choose_threshold(x, idx, c, params)
    assert again.n_genuine == choice.n_genuine == len(x) and again.n_impostor == len(x)
    assert again.threshold == pytest.approx(choice.threshold) and again.genuine_accept == choice.genuine_accept


def test_threshold_rates_match_a_count_over_every_candidate():
    """The binary-search rates against the plain definition: genuine below t rejected, impostors at or above t
    accepted, at the equal-error point (lowered to keep 97 % of genuine faces)."""
    x, idx, c = _data(people=12, per=6, seed=8)
    params = reference.TrainParams(epochs=0, alpha=16.0)
    ch = reference.choose_threshold(x, idx, c, params, max_genuine_reject=1.0)
    # recompute both score sets by the definitions in the docstring
    w = reference.train(x, idx, c, params)
    z = reference.with_bias(x) @ w
    imp = np.array([np.delete(z[r], idx[r]).max() for r in range(len(x))])
    assert ch.impostor_reject == pytest.approx(np.mean(imp < ch.threshold))
    assert 0.0 <= ch.genuine_accept <= 1.0 and ch.n_impostor == len(x)


def test_sgd_on_a_gallery_too_large_for_a_one_hot_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    x, idx, c = _data()
    labels = [f"p{k}" for k in idx]
    monkeypatch.setattr(jobs, "MAX_ONE_HOT_VALUES", len(x) * c - 1)
    with pytest.raises(ValueError, match="train with epochs 0"):
        jobs.share_train(tmp_path / "client", x, labels, reference.TrainParams(epochs=1), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    out = jobs.share_train(tmp_path / "client", x, labels, reference.TrainParams(epochs=0), tmp_path / "out")
    assert (out.bundles[0] / "Input-Binary-P0-0").stat().st_size == 8 * (1 + c * x.shape[1])
