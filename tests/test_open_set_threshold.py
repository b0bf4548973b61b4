"""Open-set thresholds calibrated on public faces (models/thresholds.json, benchmarks/calibrate_threshold.py)."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from orchestration.shared import reference
from preprocessing import models
from tests.synthetic import clusters

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    if "calibrate_threshold" in sys.modules:
        return sys.modules["calibrate_threshold"]
    spec = importlib.util.spec_from_file_location("calibrate_threshold", REPO / "benchmarks" / "calibrate_threshold.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibrate_threshold"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_shipped_thresholds_load_and_are_logits() -> None:
    assert {"facenet", "dlib"} <= set(models.calibrated_embedders())
    bench = _benchmark()
    for embedder in models.calibrated_embedders():
        entry = models.open_set_calibration(embedder)
        assert entry["score"] == models.OPEN_SET_SCORE == reference.SCORE == "zmax"
        assert entry["alpha"] == bench.train_params(embedder).alpha  # calibrated with invoke.yaml's alpha
        sizes = sorted(int(n) for n in entry["threshold_by_gallery_size"])
        values = [models.open_set_threshold(embedder, n, alpha=entry["alpha"]) for n in sizes]
        # logits on z_max = alpha/2 (1 - d^2): below alpha/2 (a stranger at distance 0 is not one)
        assert all(-entry["alpha"] < t < entry["alpha"] / 2 for t in values), values
        assert values == sorted(values)  # larger galleries: strangers' top logit rises, so does the threshold
        assert all(entry["fpir_at_threshold"][str(n)] <= 0.0101 for n in sizes)
        # between two calibrated sizes the larger one's threshold applies; above the largest, the largest's
        assert models.open_set_threshold(embedder, sizes[1] + 1) == values[2]
        assert models.open_set_threshold(embedder, 1) == values[0]
        assert models.open_set_threshold(embedder, 10 ** 6) == values[-1]


def test_thresholds_on_another_score_are_refused(monkeypatch) -> None:
    old = dict(models.open_set_calibration("facenet"), score="confidence")
    monkeypatch.setattr(models, "open_set_calibration", lambda embedder: old)
    with pytest.raises(ValueError, match="on the score 'confidence'.*allowed: 'zmax'"):
        models.open_set_threshold("facenet", 10)


def test_unknown_embedder_lists_the_calibrated_ones() -> None:
    with pytest.raises(ValueError, match="calibrated embedders: dlib, facenet"):
        models.open_set_threshold("vgg_face", 10)


def test_threshold_refused_for_another_alpha() -> None:
    with pytest.raises(ValueError, match="calibrated for alpha 16"):
        models.open_set_threshold("facenet", 10, alpha=32.0)
    with pytest.raises(ValueError, match="classes must be >= 1"):
        models.open_set_threshold("facenet", 0)


def test_lowest_threshold_meets_the_bound_exactly() -> None:
    bench = _benchmark()
    conf = np.linspace(0.0, 0.99, 100)
    t = bench.lowest_threshold(conf, 0.05)
    assert np.mean(conf >= t) <= 0.05 and np.mean(conf >= conf[conf < t].max()) > 0.05
    assert bench.rounded_up(0.123451) == 0.12346 and bench.rounded_up(2.0) == 1.0
    assert bench.rounded_up(2.0, score="zmax") == 2.0 and bench.rounded_up(-1.234561, score="zmax") == -1.23456
    assert bench.step_threshold({2: 0.9, 10: 0.5}, 7) == 0.9 and bench.step_threshold({2: 0.9, 10: 0.5}, 10) == 0.5
    # z_max: the next calibrated size up (strangers' top logit rises with the gallery), the largest beyond
    assert bench.step_threshold({2: 1.0, 10: 3.0}, 7, "zmax") == 3.0
    assert bench.step_threshold({2: 1.0, 10: 3.0}, 2, "zmax") == 1.0
    assert bench.step_threshold({2: 1.0, 10: 3.0}, 50, "zmax") == 3.0
    assert bench.lowest_threshold(np.zeros(0), 0.01, floor=-np.inf) == -np.inf


def test_calibration_on_synthetic_clusters() -> None:
    bench = _benchmark()
    x, labels = clusters(people=12, per=8, spread=0.6, seed=3)
    unknown, _ = clusters(people=30, per=1, spread=0.6, seed=4)
    cals = bench.calibrate(x, np.array(labels), unknown, bench.train_params("facenet"), [3, 6], repeats=2,
                           max_fpir=0.05)
    conf, zmax = cals["confidence"], cals["zmax"]
    assert 0 < conf.threshold < 1 and conf.by_size[3] >= conf.by_size[6]
    assert zmax.by_size[3] <= zmax.by_size[6] == zmax.threshold  # non-decreasing in the size
    for cal in (conf, zmax):
        assert all(cal.stepped[n]["fpir"] <= 0.05 for n in (3, 6))
    # both scores were measured on the same queries
    assert conf.counts == zmax.counts and conf.stepped[3]["closed_set_accuracy"] == zmax.stepped[3]["closed_set_accuracy"]
    assert "top logit z_max: T" in bench.comparison(cals) and "confidence 1/S: T" in bench.comparison(cals)
    assert bench.record(zmax, "m", 0, 2, "3, 6")["score"] == "zmax"


def test_calibration_on_lfw10_is_quick(lfw10: Path, tmp_path: Path) -> None:
    """The benchmark's core on real faces: lfw10's people split into enrolled persons and strangers."""
    bench = _benchmark()
    gallery = tmp_path / "gallery"  # 6 photos of each person: 4 to enrol, 2 held out (half the embedding time)
    for person in sorted(p for p in lfw10.iterdir() if p.is_dir()):
        (gallery / person.name).mkdir(parents=True)
        for photo in sorted(person.glob("*.jpg"))[:6]:
            (gallery / person.name / photo.name).symlink_to(photo)
    start = time.monotonic()
    x, labels = bench.embed_people(gallery, "facenet", tmp_path / "cache", progress=False)
    cal = bench.calibrate(x, labels, np.zeros((0, x.shape[1])), bench.train_params("facenet"), [3, 5],
                          backend="facenet", repeats=3)["zmax"]
    assert time.monotonic() - start < 60
    assert -16 < cal.threshold < 8  # alpha 16: z_max = 8 (1 - d^2)
    for n in (3, 5):
        assert cal.stepped[n]["fpir"] <= 0.01 and cal.stepped[n]["closed_set_accuracy"] > 0.9
        assert cal.counts[n]["stranger_queries"] > 0
    assert "| 5 |" in bench.table(cal)


# ---- the gallery's public settings and the names mode's program argument -------------------------

def _settings_dict(**over):
    raw = {"d": 128, "name_words": 8, "alpha": 16.0, "thresholds": [[1, 1.5], [50, 2.8], [150, 3.5]], "exp_bits": 8,
           "embedder": "facenet", "score": "zmax"}
    raw.update(over)
    return raw


def test_gallery_thresholds_are_logits_from_the_next_calibrated_size_up() -> None:
    from orchestration.server.gallery import Settings

    s = Settings.from_dict(_settings_dict())
    assert s.score == "zmax" and Settings.from_dict(s.as_dict()) == s
    assert [s.threshold_for(n) for n in (1, 2, 50, 51, 150, 10 ** 4)] == [1.5, 2.8, 2.8, 3.5, 3.5, 3.5]
    # any finite real, negative too
    assert Settings.from_dict(_settings_dict(thresholds=[[1, -2.5]])).threshold_for(3) == -2.5
    for bad in ([[1, float("inf")]], [[1, float("nan")]], [[0, 1.0]], [], [[1, 5000.0]]):
        with pytest.raises(ValueError, match="logit threshold on z_max, a finite real"):
            Settings.from_dict(_settings_dict(thresholds=bad))
    with pytest.raises(ValueError, match="score 'probability': expected 'zmax'"):
        Settings.from_dict(_settings_dict(score="probability"))


def test_old_gallery_settings_on_1_over_s_are_refused_then_replaced(tmp_path: Path) -> None:
    """settings.json from before issue 18 names no score: its thresholds are confidences; the names mode would
    compare z_max with 0.97. It reads (the gallery's persons stay), refuses to give a threshold, and the next
    `serve --sources` with the calibrated logit thresholds takes them over."""
    from orchestration.server.gallery import Gallery, GalleryError, Settings
    from orchestration.server.job import Server
    from preprocessing.fileio import atomic_write_json

    old = _settings_dict(thresholds=[[1, 0.97], [100, 0.87]])
    del old["score"]
    g = Gallery(Server(tmp_path, 0))
    g.root.mkdir(parents=True)
    atomic_write_json(g.root / "settings.json", old)
    held = g.settings()
    assert held.score == "confidence"
    with pytest.raises(GalleryError, match="on the score 'confidence'.*allowed: 'zmax'"):
        held.threshold_for(5)
    new = Settings.from_dict(_settings_dict())
    assert g.init(new) == new and g.settings() == new
    with pytest.raises(GalleryError, match="made with other settings: d 128"):  # anything else still may not change
        g.init(Settings.from_dict(_settings_dict(d=64)))
    with pytest.raises(ValueError, match="0 < threshold < 1"):  # an old table's values must be confidences
        Settings.from_dict(dict(old, thresholds=[[1, 1.5]]))


def test_logit_arg_spells_negatives_so_the_compiler_takes_them() -> None:
    from orchestration.shared.ports import logit_arg, service_program_args

    assert logit_arg(1.5) == "1.5" and logit_arg(-1.5) == "m1.5" and logit_arg(-0.0) == "0.0"
    assert service_program_args(4, 129, 16, 8, [8, -0.25])[-3:] == ["names", "8", "m0.25"]
    with pytest.raises(ValueError, match="finite logit"):
        logit_arg(float("nan"))


def test_choose_threshold_is_on_zmax() -> None:
    """Genuine: cross-validated z_max of enrolled faces; impostor: the best other class's z_max with the own class
    left out; equal-error point capped at max_genuine_reject. On well separated clusters it lies between them."""
    x, labels = clusters(people=6, per=8, spread=0.3, seed=5)
    y = np.array([sorted(set(labels)).index(n) for n in labels])
    params = reference.TrainParams(alpha=16.0)
    choice = reference.choose_threshold(x, y, 6, params)
    assert choice.score == "zmax" and choice.genuine_accept >= 0.97
    w = reference.train(x, y, 6, params)
    z = reference.with_bias(x) @ w
    genuine = z.max(axis=1)
    impostor = np.array([np.delete(z[k], y[k]).max() for k in range(len(x))])
    # a logit: between the two groups' typical values, far outside a probability's [0, 1] here
    assert np.median(impostor) < choice.threshold < np.median(genuine)
    assert choice.threshold > 1.0
