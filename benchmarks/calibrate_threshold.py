"""Calibrate the open-set (unknown-face) threshold of each embedder on PUBLIC faces.

With several data owners nobody holds the gallery in the clear, so nobody can tune
the threshold on it (``reference.choose_threshold`` needs the enrolment data). Instead the
threshold is calibrated once per embedder on LFW (``lfw-devtrain``) and shipped in
``models/thresholds.json``; every gallery then uses it: a query is accepted iff its score
>= T. The score (issue 18) is the top logit z_max (``--score zmax``, the default and what the
servers' names mode compares on shares); ``--score confidence`` calibrates the old confidence
1/S (S the softmax denominator) for comparison. Either way both scores are measured and printed
side by side: TPIR at FPIR <= --max-fpir per gallery size.

Rule: per calibrated size n, the LOWEST threshold whose FPIR (strangers accepted) is <= --max-fpir
on the pooled stranger queries of galleries of n persons: TPIR (held-out photos of enrolled persons
accepted AND named right) falls as the threshold rises, so this is the highest TPIR the bound
allows. A gallery of c persons uses the entry of the calibrated sizes that is safe for it (the
thresholds depend on c, the compile-time size of the recognition program): for 1/S strangers'
confidence falls as c grows, so the largest calibrated n <= c; for z_max strangers' top logit
rises with c (a maximum over more classes), so the smallest calibrated n >= c (the largest
size's above it), the z_max entries made non-decreasing in n (each at least the one below it:
the stranger pools differ between sizes, and a larger gallery must never get a lower threshold).
The table also shows the single threshold meeting the bound at every size.

Usage::

    python benchmarks/calibrate_threshold.py                       # facenet and dlib, print the table
    python benchmarks/calibrate_threshold.py --write               # ... and update models/thresholds.json
    python benchmarks/calibrate_threshold.py --score confidence    # thresholds on 1/S instead (comparison)

Embeddings are cached per image under var/cache (the gallery cache of preprocessing.dataset):
the first run over lfw-devtrain takes about 5 minutes per embedder on 2 cores, later runs seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestration.shared import reference
from preprocessing.fileio import atomic_write_text

logger = logging.getLogger("calibrate_threshold")

FACES = REPO.parent / "shared" / "faces"
DEFAULT_SIZES = ("2", "5", "10", "20", "50", "100", "150", "all")
CHECK_SIZES = (3, 7, 15, 30, 75, 120, 220)  # between the calibrated sizes: the per-size rule on fresh splits
MIN_PHOTOS = 4  # a person needs >= 4 usable photos to be enrolled (3 to enrol, 1 held out)
TEST_FRACTION = 0.3  # held-out share of an enrolled person's photos (invoke evaluate's default)
THRESHOLDS_PATH = REPO / "models" / "thresholds.json"
SCORES = ("zmax", "confidence")  # reference.SCORE first; "confidence" is 1/S (reference.OLD_SCORE)
SCORE_TEXT = {"zmax": "top logit z_max", "confidence": "confidence 1/S"}
ABOUT = ("Open-set thresholds per embedder, calibrated on public LFW faces (benchmarks/calibrate_threshold.py), "
         "for galleries nobody holds in the clear (several data owners). Each embedder's 'score' says what its "
         "thresholds are on: 'zmax', the top logit z_max of the model trained with these train settings (accept a "
         "query iff z_max >= threshold; face_predict's names mode compares on shares). Read with "
         "preprocessing.models.open_set_threshold(embedder).")


# --- settings and embeddings ---------------------------------------------------------------------
def train_params(backend: str, config: Path = REPO / "invoke.yaml") -> reference.TrainParams:
    """The TrainParams the servers use for ``backend``: invoke.yaml's train section, alpha per embedder."""
    import yaml

    train = (yaml.safe_load(config.read_text()) or {}).get("train", {})
    alpha = train.get("alpha", {})
    if isinstance(alpha, dict):
        if backend not in alpha:
            raise ValueError(f"{config}: no train.alpha for embedder {backend!r} (has: {', '.join(alpha)})")
        alpha = alpha[backend]
    defaults = reference.TrainParams()
    return reference.TrainParams(epochs=int(train.get("epochs", defaults.epochs)),
                                 batch=int(train.get("batch", defaults.batch)),
                                 lr=float(train.get("lr", defaults.lr)), alpha=float(alpha),
                                 exp_bits=int(train.get("exp_bits", defaults.exp_bits)))


DETECTOR = "cascade"  # the client's default detector (invoke.yaml face.detector); --detector changes it


def embed_people(root: Path, backend: str, cache_dir: Path, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and person labels of <root>/<person>/<image> (the client's cached gallery embedding)."""
    from preprocessing.dataset import embed_gallery

    g = embed_gallery(root, backend=backend, detector=DETECTOR, cache_dir=cache_dir, progress=progress)
    return g.embeddings.astype(np.float64), np.array(g.labels)


def embed_flat(folder: Path, backend: str, cache_dir: Path, progress: bool = True) -> np.ndarray:
    """Embeddings of a flat folder of one-face images (same cache: it is keyed by image bytes)."""
    from preprocessing.dataset import embed_gallery, is_image_file

    with tempfile.TemporaryDirectory() as tmp:
        person = Path(tmp) / "unknown"
        person.mkdir()
        for p in sorted(Path(folder).iterdir()):
            if is_image_file(p):
                (person / p.name).symlink_to(p.resolve())
        g = embed_gallery(Path(tmp), backend=backend, detector=DETECTOR, cache_dir=cache_dir, progress=progress)
        return g.embeddings.astype(np.float64)


# --- scores --------------------------------------------------------------------------------------
@dataclass
class SizeScores:
    """Pooled over the repeats of one gallery size."""

    size: int
    genuine_conf: np.ndarray  # the score (z_max or 1/S) of each held-out photo of an enrolled person
    genuine_correct: np.ndarray  # ... and whether its top class is that person
    stranger_conf: np.ndarray  # the score of each photo of a person not enrolled
    n_enrolled_photos: int = 0  # per repeat (the last one)


def split(labels: np.ndarray, size: int, eligible: Sequence[str], seed: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(enrolment rows, held-out genuine rows, stranger rows) of a seeded split with ``size`` enrolled persons."""
    rng = np.random.default_rng(seed)
    enrolled = set(rng.choice(np.array(sorted(eligible)), size=size, replace=False).tolist())
    enrol, held = [], []
    for name in sorted(enrolled):
        idx = np.flatnonzero(labels == name)
        rng.shuffle(idx)
        k = min(max(round(len(idx) * TEST_FRACTION), 1), len(idx) - 1)
        held += idx[:k].tolist()
        enrol += idx[k:].tolist()
    strangers = np.flatnonzero(~np.isin(labels, sorted(enrolled)))
    return np.array(sorted(enrol)), np.array(sorted(held)), strangers


def gallery_scores(x: np.ndarray, labels: np.ndarray, unknown: np.ndarray, size: int,
                   params: reference.TrainParams, seed: int = 0, repeats: int = 5) -> dict[str, SizeScores]:
    """Train as the servers would on ``repeats`` seeded splits of ``size`` persons; pool the scores, one
    SizeScores per score of SCORES (the same queries)."""
    names, counts = np.unique(labels, return_counts=True)
    eligible = [str(n) for n, k in zip(names, counts) if k >= MIN_PHOTOS]
    if size > len(eligible):
        raise ValueError(f"gallery size {size}: only {len(eligible)} persons have >= {MIN_PHOTOS} photos")
    g_conf: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    s_conf: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    g_ok = []
    n_enrol = 0
    for r in range(repeats):
        enrol, held, strangers = split(labels, size, eligible, seed=1000 * seed + 7919 * size + r)
        classes = sorted(set(labels[enrol]))
        index = {n: k for k, n in enumerate(classes)}
        w = reference.train(x[enrol], np.array([index[n] for n in labels[enrol]]), len(classes), params)
        best, conf, zmax = reference.predict_scores(w, x[held], params.exp_bits)
        g_conf["zmax"].append(zmax)
        g_conf["confidence"].append(conf)
        g_ok.append(best == np.array([index[n] for n in labels[held]]))
        queries = np.vstack([x[strangers], unknown]) if len(unknown) else x[strangers]
        if len(queries):
            _, conf, zmax = reference.predict_scores(w, queries, params.exp_bits)
            s_conf["zmax"].append(zmax)
            s_conf["confidence"].append(conf)
        n_enrol = len(enrol)
    return {k: SizeScores(size, np.concatenate(g_conf[k]), np.concatenate(g_ok),
                          np.concatenate(s_conf[k]) if s_conf[k] else np.zeros(0), n_enrol) for k in SCORES}


def rates(s: SizeScores, t: float) -> dict[str, float]:
    """TPIR (accepted and named right), FPIR (strangers accepted), closed-set accuracy, known accepted."""
    accepted = s.genuine_conf >= t
    return {"tpir": float(np.mean(accepted & s.genuine_correct)),
            "fpir": float(np.mean(s.stranger_conf >= t)) if len(s.stranger_conf) else float("nan"),
            "closed_set_accuracy": float(np.mean(s.genuine_correct)),
            "known_accepted": float(np.mean(accepted))}


def lowest_threshold(stranger_conf: np.ndarray, max_fpir: float, floor: float = 0.0) -> float:
    """The lowest t with mean(stranger_conf >= t) <= max_fpir (``floor`` when every stranger may be accepted)."""
    if not len(stranger_conf):
        return floor
    desc = np.sort(stranger_conf)[::-1]
    k = math.floor(max_fpir * len(desc) + 1e-9)  # strangers that may be accepted
    if k >= len(desc):
        return floor
    return float(np.nextafter(desc[k], np.inf))  # just above the (k+1)-th highest: at most k accepted


def equal_error_threshold(s: SizeScores) -> float:
    """Where the share of genuine queries not accepted-and-right equals FPIR (for comparison)."""
    cands = np.unique(np.concatenate([s.genuine_conf, s.stranger_conf]))
    miss = np.array([1 - np.mean((s.genuine_conf >= t) & s.genuine_correct) for t in cands])
    fpir = np.array([np.mean(s.stranger_conf >= t) for t in cands])
    return float(cands[int(np.argmin(np.abs(miss - fpir)))])


def rounded_up(t: float, decimals: int = 5, score: str = "confidence") -> float:
    """t rounded up (a higher threshold never accepts more strangers); a confidence within [10^-decimals, 1]."""
    up = math.ceil(t * 10 ** decimals - 1e-9) / 10 ** decimals
    return up if score == "zmax" else min(max(up, 10 ** -decimals), 1.0)


def step_threshold(by_size: dict[int, float], classes: int, score: str = "confidence") -> float:
    """The threshold of the calibrated size that is safe for a gallery of ``classes`` persons.

    1/S: the largest calibrated size <= classes (the smallest size's below it): strangers' confidence falls as
    the gallery grows (more classes share the softmax), so a smaller gallery needs at least a larger one's
    threshold. z_max: the smallest calibrated size >= classes (the largest size's above it): strangers' top
    logit rises with the gallery (a maximum over more classes). preprocessing.models.open_set_threshold
    applies the same rule."""
    sizes = sorted(by_size)
    if score == "zmax":
        above = [n for n in sizes if n >= classes]
        return by_size[above[0] if above else sizes[-1]]
    below = [n for n in sizes if n <= classes]
    return by_size[below[-1] if below else sizes[0]]


@dataclass
class Calibration:
    backend: str
    params: reference.TrainParams
    score: str
    threshold: float  # one value for every gallery size: the lowest with FPIR <= max_fpir at all of them
    max_fpir: float
    by_size: dict[int, float] = field(default_factory=dict)  # per calibrated size: lowest with FPIR <= max_fpir
    single: dict[int, dict[str, float]] = field(default_factory=dict)  # rates at ``threshold``
    stepped: dict[int, dict[str, float]] = field(default_factory=dict)  # rates at step_threshold(by_size, size)
    eer: dict[int, float] = field(default_factory=dict)
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    check_sizes: list[int] = field(default_factory=list)  # sizes not calibrated on, scored with the step rule


def calibrate(x: np.ndarray, labels: np.ndarray, unknown: np.ndarray, params: reference.TrainParams,
              sizes: Sequence[int], *, check_sizes: Sequence[int] = (), backend: str = "", seed: int = 0,
              repeats: int = 5, max_fpir: float = 0.01) -> dict[str, Calibration]:
    """Thresholds from the scores at ``sizes``, one Calibration per score of SCORES (the same trained models and
    queries); ``check_sizes`` (fresh splits) test the step rule in between."""
    scores = {n: gallery_scores(x, labels, unknown, n, params, seed=seed, repeats=repeats) for n in sizes}
    checks = [n for n in check_sizes if n not in scores]
    for n in checks:
        scores[n] = gallery_scores(x, labels, unknown, n, params, seed=seed + 1, repeats=repeats)
    out = {}
    for k in SCORES:
        floor = -math.inf if k == "zmax" else 0.0
        by_size = {n: rounded_up(lowest_threshold(scores[n][k].stranger_conf, max_fpir, floor), score=k) for n in sizes}
        if k == "zmax":  # non-decreasing in the size, so that the step rule's larger entry is never the lower one
            for a, b in zip(sorted(by_size), sorted(by_size)[1:]):
                by_size[b] = max(by_size[a], by_size[b])
        cal = Calibration(backend, params, k, max(by_size.values()), max_fpir, by_size=by_size, check_sizes=checks)
        for n in sorted(scores):
            s = scores[n][k]
            cal.single[n] = rates(s, cal.threshold)
            cal.stepped[n] = rates(s, step_threshold(by_size, n, k))
            cal.eer[n] = equal_error_threshold(s)
            cal.counts[n] = {"genuine_queries": len(s.genuine_conf), "stranger_queries": len(s.stranger_conf)}
        out[k] = cal
    return out


# --- output --------------------------------------------------------------------------------------
def comparison(cals: dict[str, Calibration]) -> str:
    """TPIR at FPIR <= the bound per gallery size, every score side by side (each size's own lowest threshold,
    in-sample at calibrated sizes; * = checked size, scored with the step rule) and at each score's single
    threshold."""
    first = cals[SCORES[0]]
    head = " | ".join(f"{SCORE_TEXT[k]}: T | TPIR | FPIR | single T TPIR" for k in SCORES)
    lines = [f"embedder {first.backend}: TPIR at FPIR <= {first.max_fpir:.0%}, per gallery size "
             f"(single T: {', '.join(f'{SCORE_TEXT[k]} {cals[k].threshold:.5f}' for k in SCORES)})",
             f"| gallery size | {head} |", "|---" * (1 + 4 * len(SCORES)) + "|"]
    for n in first.stepped:
        mark = "*" if n in first.check_sizes else ""
        cells = " | ".join(f"{step_threshold(cals[k].by_size, n, k):.5f} | {cals[k].stepped[n]['tpir']:.3f} | "
                           f"{cals[k].stepped[n]['fpir']:.4f} | {cals[k].single[n]['tpir']:.3f}" for k in SCORES)
        lines.append(f"| {n}{mark} | {cells} |")
    return "\n".join(lines)


def table(cal: Calibration) -> str:
    rule = "at or above" if cal.score == "zmax" else "at or below"
    lines = [(f"embedder {cal.backend}, score {SCORE_TEXT[cal.score]}: alpha {cal.params.alpha:g}; FPIR bound "
              f"{cal.max_fpir:.0%}; single threshold {cal.threshold:.5f}; per-size threshold: the calibrated size "
              f"{rule} the gallery's (* = size not calibrated on)"),
             ("| gallery size | closed-set accuracy | single T: TPIR | FPIR | per-size T | TPIR | FPIR "
              "| equal-error T | genuine / stranger queries |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in cal.single.items():
        st, c = cal.stepped[n], cal.counts[n]
        mark = "*" if n in cal.check_sizes else ""
        lines.append(f"| {n}{mark} | {r['closed_set_accuracy']:.3f} | {r['tpir']:.3f} | {r['fpir']:.4f} "
                     f"| {step_threshold(cal.by_size, n, cal.score):.5f} | {st['tpir']:.3f} | {st['fpir']:.4f} "
                     f"| {cal.eer[n]:.4f} | {c['genuine_queries']} / {c['stranger_queries']} |")
    return "\n".join(lines)


def landmark_model() -> str:
    from preprocessing.faces import landmark_model as current

    return current()


def record(cal: Calibration, model_id: str, seed: int, repeats: int, sizes_label: str) -> dict:
    def per(d: dict[int, dict[str, float]], key: str) -> dict[str, float]:
        return {str(n): round(v[key], 4) for n, v in d.items()}

    if cal.score == "zmax":
        rule = (f"threshold_by_gallery_size[n]: the lowest threshold on the top logit z_max with FPIR <= {cal.max_fpir:g} "
                "on galleries of n persons, rounded up to 5 decimals; a gallery of c persons uses the entry of the "
                "smallest n >= c (the largest n above it): strangers' z_max rises with the gallery size")
    else:
        rule = (f"threshold_by_gallery_size[n]: the lowest confidence threshold with FPIR <= {cal.max_fpir:g} on "
                "galleries of n persons, rounded up to 5 decimals (about the 2^-16 resolution of the servers' fixed "
                "point); a gallery of c persons uses the entry of the largest n <= c (the smallest n below it)")
    return {
        "score": cal.score,
        "threshold_by_gallery_size": {str(n): t for n, t in sorted(cal.by_size.items())},
        "single_threshold": cal.threshold,
        "model_id": model_id,
        "alpha": cal.params.alpha,
        "train": {k: v for k, v in asdict(cal.params).items() if k != "seed"},
        "rule": rule,
        "source": (f"benchmarks/calibrate_threshold.py --backend {cal.backend} --score {cal.score} --write on "
                   "../shared/faces/lfw-devtrain "
                   f"(people/ and unknown/; detector {DETECTOR}, landmarks {landmark_model()}), seed {seed}, {repeats} repeats, gallery sizes {sizes_label}"),
        "closed_set_accuracy": per(cal.single, "closed_set_accuracy"),
        "tpir_at_threshold": per(cal.stepped, "tpir"),
        "fpir_at_threshold": per(cal.stepped, "fpir"),
        "checked_sizes": cal.check_sizes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", choices=["facenet", "dlib"],
                    help="embedder (repeatable; default: facenet and dlib)")
    ap.add_argument("--faces", type=Path, default=FACES, help="folder holding lfw-devtrain/")
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="gallery sizes to calibrate on, comma-separated; "
                    f"'all' = every person with >= {MIN_PHOTOS} photos")
    ap.add_argument("--check-sizes", default=",".join(map(str, CHECK_SIZES)),
                    help="gallery sizes between them, scored on fresh splits with the per-size rule ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="seeded splits per gallery size (scores are pooled)")
    ap.add_argument("--max-fpir", type=float, default=0.01)
    ap.add_argument("--score", choices=SCORES, default=SCORES[0],
                    help="the score the thresholds written are on (default zmax, the servers' open-set score)")
    ap.add_argument("--detector", default="cascade", choices=["hog", "cnn", "cascade"],
                    help="face detector the embeddings are made with (invoke.yaml's default: cascade)")
    ap.add_argument("--landmarks", default="5", choices=["5", "68"],
                    help="landmark model the faces are aligned on (invoke.yaml's default: 5)")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "var" / "cache")
    ap.add_argument("--write", action="store_true", help=f"write the thresholds into {THRESHOLDS_PATH.relative_to(REPO)}")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    global DETECTOR
    DETECTOR = args.detector
    from preprocessing.faces import use_landmarks

    use_landmarks(args.landmarks)
    backends = args.backend or ["facenet", "dlib"]
    people, unknown_dir = args.faces / "lfw-devtrain" / "people", args.faces / "lfw-devtrain" / "unknown"
    out = json.loads(THRESHOLDS_PATH.read_text()) if THRESHOLDS_PATH.exists() else {}
    out["about"] = ABOUT
    out.setdefault("embedders", {})
    for backend in backends:
        from preprocessing.embedders import get_embedder

        t0 = time.monotonic()
        x, labels = embed_people(people, backend, args.cache_dir, not args.no_progress)
        unknown = embed_flat(unknown_dir, backend, args.cache_dir, not args.no_progress)
        t_embed = time.monotonic() - t0
        names, counts = np.unique(labels, return_counts=True)
        n_eligible = int(np.sum(counts >= MIN_PHOTOS))
        sizes = [n_eligible if s.strip() == "all" else int(s) for s in args.sizes.split(",")]
        checks = [int(s) for s in args.check_sizes.split(",") if s.strip() and int(s) <= n_eligible]
        params = train_params(backend)
        t0 = time.monotonic()
        cals = calibrate(x, labels, unknown, params, sizes, check_sizes=checks, backend=backend, seed=args.seed,
                         repeats=args.repeats, max_fpir=args.max_fpir)
        cal = cals[args.score]
        print(f"\nembedder {backend}: {len(x)} photos of {len(names)} persons ({n_eligible} with >= {MIN_PHOTOS}), "
              f"{len(unknown)} unknown faces; embedding {t_embed:.0f} s, calibration {time.monotonic() - t0:.1f} s")
        print(comparison(cals))
        print()
        print(table(cal))
        sizes_label = ", ".join(f"{s} (all with >= {MIN_PHOTOS} photos)" if s == n_eligible else str(s) for s in sizes)
        out["embedders"][backend] = record(cal, get_embedder(backend).model_id, args.seed, args.repeats, sizes_label)
    if args.write:
        atomic_write_text(THRESHOLDS_PATH, json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {THRESHOLDS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
