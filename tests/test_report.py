"""The evaluation report's open-set parts (orchestration.client.report) on small hand-made arrays."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestration.client import report
from orchestration.client.evaluate import Evaluation, write_report

# 6 known test faces: score and whether the best class is the true person (two share 0.8, one right, one wrong)
KNOWN = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
RIGHT = np.array([True, True, False, True, True, False])
# 10 strangers, sorted high to low; two tied at 0.8, two at 0.3
STRANGERS = np.array([0.95, 0.8, 0.8, 0.6, 0.4, 0.3, 0.3, 0.2, 0.1, 0.0])


def _row(rows, label):
    return next(r for r in rows if r.label == label)


def test_tpir_at_fpir_exact_values_with_ties():
    rows, skipped = report.tpir_at_fpir(KNOWN, RIGHT, STRANGERS, used_threshold=0.6, targets=(0.1, 0.2, 0.3))
    assert skipped == []
    # 10%: 1 stranger allowed -> just above the 2nd highest (0.8): only 0.95 is accepted
    r = _row(rows, "FPIR <= 10%")
    assert r.above_stranger == 0.8 and 0.8 < r.threshold < 0.8 + 1e-12
    assert (r.strangers_accepted, r.fpir) == (1, 0.1)
    assert (r.known_right_name, r.tpir) == (1, pytest.approx(1 / 6))  # 0.9 only: both 0.8s are rejected
    # 20%: 2 allowed, but the 3rd highest stranger ties the 2nd at 0.8: both rejected, FPIR stays at 10% (below)
    r = _row(rows, "FPIR <= 20%")
    assert r.above_stranger == 0.8 and (r.strangers_accepted, r.fpir) == (1, 0.1)
    # 30%: 3 allowed -> just above 0.6; known right-name faces above it: 0.9, 0.8 (right), 0.7; the wrong 0.8 does
    # not count (a TPIR counting any accept would say 4/6)
    r = _row(rows, "FPIR <= 30%")
    assert r.above_stranger == 0.6 and (r.strangers_accepted, r.fpir) == (3, pytest.approx(0.3))
    assert (r.known_right_name, r.tpir, r.fnir) == (3, 0.5, 0.5)
    # the threshold used: a score equal to it is accepted (>=): the stranger at 0.6 and the known face at 0.6
    r = rows[-1]
    assert r.label == "threshold used" and r.target_fpir is None and r.threshold == 0.6 and r.above_stranger is None
    assert (r.strangers_accepted, r.fpir) == (4, pytest.approx(0.4))
    assert (r.known_right_name, r.tpir) == (4, pytest.approx(4 / 6))
    assert report.rates_at(0.6, KNOWN, RIGHT, STRANGERS) == (pytest.approx(4 / 6), pytest.approx(0.4))


def test_fpir_never_exceeds_its_target():
    rng = np.random.default_rng(3)
    for n in (10, 37, 200, 1000):
        u = np.round(rng.random(n), 2)  # many ties
        for target in (0.001, 0.01, 0.05, 0.1, 0.5):
            t = report.threshold_for_fpir(u, target)
            if t is None:
                assert target * n < 1
                continue
            k = math.floor(target * n + 1e-9)
            assert np.sum(u >= t) <= k
            # the smallest such threshold: one step lower accepts more than k
            assert np.sum(u >= np.nextafter(t, -np.inf)) > k


def test_targets_below_one_stranger_are_skipped_and_said():
    u = np.linspace(0, 1, 50)
    rows, skipped = report.tpir_at_fpir(KNOWN, RIGHT, u, used_threshold=0.5)
    assert skipped == [0.001, 0.01]  # 1/50 = 2%: only 10% is measurable
    assert [r.label for r in rows] == ["FPIR <= 10%", "threshold used"]
    assert report.threshold_for_fpir(np.zeros(1000), 0.001) is not None  # exactly 1/n: measurable
    assert report.threshold_for_fpir(np.zeros(999), 0.001) is None
    assert report.threshold_for_fpir(np.zeros(0), 0.1) is None


def test_det_curve_counts():
    ts, fpir, fnir = report.det_curve(KNOWN, RIGHT, STRANGERS)
    assert np.all(np.diff(ts) > 0)
    assert fpir[0] == 1.0 and fnir[0] == pytest.approx(1 - 4 / 6)  # lowest score: all accepted, 4 right names
    assert fpir[-1] == 0.0 and fnir[-1] == 1.0  # just above the highest: all rejected
    i = int(np.flatnonzero(ts == 0.8)[0])
    assert fpir[i] == pytest.approx(0.3) and fnir[i] == pytest.approx(1 - 2 / 6)
    assert np.all(np.diff(fpir) <= 0) and np.all(np.diff(fnir) >= 0)


def test_threshold_grid_spans_any_score():
    ts = report.threshold_grid(np.array([2.5, 7.0]), np.array([-3.0]), 4.0)  # logits, not probabilities
    assert ts[0] == -3.0 and ts[-1] == 7.0 and len(ts) == 201
    ts = report.threshold_grid(np.array([0.9]), np.zeros(0), 0.9)
    assert ts[0] < 0.9 < ts[-1]


def test_worst_persons_order_and_what_came_back():
    classes = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus"]
    # per test face: (true person, what came back; -1 unknown)
    faces = [(0, 0), (0, 0),             # Ann 2/2: perfect, not listed
             (1, -1), (1, 2),            # Bob 0/2
             (2, -1),                    # Cid 0/1: same accuracy as Bob, fewer faces -> after him
             (3, 3), (3, -1),            # Dee 1/2
             (4, 4), (4, 0),             # Eve 1/2: ties Dee on accuracy and faces -> by name, after Dee
             (5, 5), (5, 5), (5, -1),    # Fay 2/3
             (6, 6), (6, 6), (6, 6), (6, 1)]  # Gus 3/4: sixth, cut
    truth, back = zip(*faces)
    paths = [Path(f"/img/{i}.jpg") for i in range(len(faces))]
    worst = report.worst_persons(truth, back, classes, paths)
    assert [p.name for p in worst] == ["Bob", "Cid", "Dee", "Eve", "Fay"]
    assert [(p.n_right, p.n_test) for p in worst] == [(0, 2), (0, 1), (1, 2), (1, 2), (2, 3)]
    assert worst[0].returned == ("unknown_person", "Cid") and worst[0].paths == (paths[2], paths[3])
    assert worst[3].returned == ("Eve", "Ann")
    assert report.worst_persons([0, 0], [0, 0], classes, paths[:2]) == []
    with pytest.raises(ValueError):
        report.worst_persons([0], [0, 1], classes, paths[:2])


def _is_drawn_png(path: Path, min_size: int = 300) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_size
        assert np.asarray(im.convert("L")).std() > 5


def test_pngs_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    real = report.atomic_write_bytes
    monkeypatch.setattr(report, "atomic_write_bytes", lambda p, data: written.append(Path(p).name) or real(p, data))
    report.plot_det(tmp_path / "det.png", KNOWN, RIGHT, STRANGERS, 0.6, "score")
    report.plot_scores(tmp_path / "scores.png", KNOWN, RIGHT, STRANGERS, 0.6, "score")
    assert written == ["det.png", "scores.png"]
    for name in written:
        _is_drawn_png(tmp_path / name)
    # a rendering that fails half-way leaves the previous picture whole
    before = (tmp_path / "det.png").read_bytes()
    fig, _ = plt.subplots()

    def broken(buf, **kw):
        buf.write(b"\x89PNG half")
        raise RuntimeError("disk full")

    fig.savefig = broken
    with pytest.raises(RuntimeError):
        report.save_figure(fig, tmp_path / "det.png")
    assert (tmp_path / "det.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.png", "scores.png"]  # no temp files left


def _ev(n_people: int, n_test: int, n_unknown: int, threshold: float) -> Evaluation:
    return Evaluation(dataset="d", unknown="u", backend="dlib", n_people=n_people, n_enrolled_faces=10,
                      n_test_faces=n_test, n_unknown_faces=n_unknown, closed_set_accuracy=0.5, plaintext_accuracy=0.5,
                      agreement=1.0, threshold=threshold, known_accept=0.5, known_correct_accept=0.5,
                      unknown_reject=0.5, decision_agreement=1.0, seconds={"training (MPC protocol)": 1.0})


def test_write_report_links_every_picture_and_puts_the_numbers_in_json(tmp_path):
    rng = np.random.default_rng(0)
    photos = []
    for i in range(6):
        p = tmp_path / "photos" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)).save(p)
        photos.append(p)
    photos[5] = tmp_path / "photos" / "missing.jpg"  # an unreadable photo gets a placeholder, not a crash
    classes = ["Ann", "Bob", "Cid"]
    truth = np.array([0, 0, 1, 1, 2, 2])
    best = np.array([0, 1, 1, 1, 2, 0])
    right = best == truth
    returned = np.where(KNOWN >= 0.6, best, -1)
    out = tmp_path / "report"
    write_report(_ev(3, 6, 10, 0.6), out, truth, best, KNOWN, STRANGERS, classes, returned=returned,
                 test_paths=photos, score_name="top logit")
    text = (out / "report.md").read_text()
    for png in ("confusion.png", "open_set.png", "det.png", "scores.png", "worst_persons.png"):
        assert f"]({png})" in text
        _is_drawn_png(out / png, 200)
    assert "top logit" in text and "| FPIR <= 10% | > 0.8 |" in text and "| threshold used | 0.6 |" in text
    assert "Skipped" in text and "FPIR <= 0.1%, FPIR <= 1%" in text
    assert "closed-set accuracy under MPC" in text  # what the report had before stays
    ev = json.loads((out / "evaluation.json").read_text())
    points = {p["label"]: p for p in ev["open_set"]["operating_points"]}
    assert points["FPIR <= 10%"]["tpir"] == pytest.approx(report.rates_at(points["FPIR <= 10%"]["threshold"], KNOWN,
                                                                          right, STRANGERS)[0])
    assert points["threshold used"]["fpir"] == pytest.approx(0.4)
    assert ev["open_set"]["targets_skipped"] == [0.001, 0.01] and ev["open_set"]["score"] == "top logit"
    # Ann: 0.9 right, 0.8 wrong (Bob); Bob: 0.8 right, 0.7 right; Cid: 0.6 right, 0.5 rejected
    assert [(w["name"], w["n_right"], w["returned"]) for w in ev["open_set"]["worst_persons"]] == [
        ("Ann", 1, ["Ann", "Bob"]), ("Cid", 1, ["Cid", "unknown_person"])]

    # everyone right: the table says so and no picture is drawn
    everyone = tmp_path / "everyone"
    write_report(_ev(3, 6, 10, 0.0), everyone, truth, truth, KNOWN, STRANGERS, classes, returned=truth,
                 test_paths=photos)
    assert "Every person's test faces came back with the right name" in (everyone / "report.md").read_text()
    assert not (everyone / "worst_persons.png").exists()
    assert json.loads((everyone / "evaluation.json").read_text())["open_set"]["worst_persons"] == []


def test_write_report_without_strangers_or_photos(tmp_path):
    truth = np.array([0, 1])
    write_report(_ev(2, 2, 0, 0.5), tmp_path, truth, truth, np.array([0.9, 0.4]), np.zeros(0), ["Ann", "Bob"])
    text = (tmp_path / "report.md").read_text()
    assert "No unknown faces" in text and "](worst_persons.png)" not in text
    _is_drawn_png(tmp_path / "det.png", 200)
    assert json.loads((tmp_path / "evaluation.json").read_text())["open_set"]["operating_points"][0]["tpir"] == 0.5
