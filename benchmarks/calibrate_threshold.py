"""Calibrate the open-set (unknown-face) threshold of each embedder on PUBLIC faces.

With several data owners nobody holds the union of the gallery in the clear, so nobody can tune
the threshold on it (``reference.choose_threshold`` needs the enrolment data). Instead the
threshold is calibrated once per embedder on LFW (``lfw-devtrain``) and shipped in
``models/thresholds.json``; every gallery then uses it: a query is accepted iff its confidence
1/S >= T, i.e. S <= 1/T (S the softmax denominator the servers compute on shares).

For every gallery size (2, 5, 10, 20, 50, 100, 150 and all persons with >= 4 usable photos by
default) and every repeat, a seeded split is drawn: ``size`` enrolled persons (each keeps 70 % of
their photos for enrolment, 30 % are held out as genuine queries, as ``invoke evaluate`` splits),
and strangers (every photo of the persons not enrolled, plus ``lfw-devtrain/unknown``). The float64
reference trains exactly as the servers would (``reference.train`` with invoke.yaml's train
settings and the embedder's ``train.alpha``) and scores the queries with ``reference.predict``.

Rule: per calibrated size n, the LOWEST threshold whose FPIR (strangers accepted) is <= --max-fpir
(1 %), rounded up to 5 decimals (rounding up never raises FPIR). TPIR (held-out genuine queries
accepted AND named right) falls as the threshold rises, so this is the highest TPIR the bound
allows. A gallery of c persons uses the entry of the largest calibrated n <= c: c is public (a
compile-time size of the recognition program), and strangers' confidence falls as c grows, so the
step is conservative; --check-sizes scores fresh splits at sizes in between to show it.
ONE value for all sizes does not work: the table also shows the single threshold meeting the bound
at every size (the 2-person one), and its TPIR collapses beyond ~20 persons.

    python benchmarks/calibrate_threshold.py                       # facenet and dlib, print the table
    python benchmarks/calibrate_threshold.py --write               # ... and update models/thresholds.json

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

logger = logging.getLogger("calibrate_threshold")

FACES = REPO.parent / "shared" / "faces"
DEFAULT_SIZES = ("2", "5", "10", "20", "50", "100", "150", "all")
CHECK_SIZES = (3, 7, 15, 30, 75, 120, 220)  # between the calibrated sizes: the per-size rule on fresh splits
MIN_PHOTOS = 4  # a person needs >= 4 usable photos to be enrolled (3 to enrol, 1 held out)
TEST_FRACTION = 0.3  # held-out share of an enrolled person's photos (invoke evaluate's default)
THRESHOLDS_PATH = REPO / "models" / "thresholds.json"
ABOUT = ("Open-set thresholds per embedder, calibrated on public LFW faces (benchmarks/calibrate_threshold.py), "
         "for galleries nobody holds in the clear (several data owners). Accept a query iff its confidence "
         "1/S >= threshold, i.e. S <= 1/threshold (S: softmax denominator of the model trained with these train "
         "settings). Read with preprocessing.models.open_set_threshold(embedder).")


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


def embed_people(root: Path, backend: str, cache_dir: Path, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and person labels of <root>/<person>/<image> (the client's cached gallery embedding)."""
    from preprocessing.dataset import embed_gallery

    g = embed_gallery(root, backend=backend, detector="hog", cache_dir=cache_dir, progress=progress)
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
        g = embed_gallery(Path(tmp), backend=backend, detector="hog", cache_dir=cache_dir, progress=progress)
        return g.embeddings.astype(np.float64)


# --- scores --------------------------------------------------------------------------------------
@dataclass
class SizeScores:
    """Pooled over the repeats of one gallery size."""

    size: int
    genuine_conf: np.ndarray  # confidence 1/S of each held-out photo of an enrolled person
    genuine_correct: np.ndarray  # ... and whether its top class is that person
    stranger_conf: np.ndarray  # confidence of each photo of a person not enrolled
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
                   params: reference.TrainParams, seed: int = 0, repeats: int = 5) -> SizeScores:
    """Train as the servers would on ``repeats`` seeded splits of ``size`` persons; pool the scores."""
    names, counts = np.unique(labels, return_counts=True)
    eligible = [str(n) for n, k in zip(names, counts) if k >= MIN_PHOTOS]
    if size > len(eligible):
        raise ValueError(f"gallery size {size}: only {len(eligible)} persons have >= {MIN_PHOTOS} photos")
    g_conf, g_ok, s_conf = [], [], []
    n_enrol = 0
    for r in range(repeats):
        enrol, held, strangers = split(labels, size, eligible, seed=1000 * seed + 7919 * size + r)
        classes = sorted(set(labels[enrol]))
        index = {n: k for k, n in enumerate(classes)}
        w = reference.train(x[enrol], np.array([index[n] for n in labels[enrol]]), len(classes), params)
        best, conf = reference.predict(w, x[held], params.exp_bits)
        g_conf.append(conf)
        g_ok.append(best == np.array([index[n] for n in labels[held]]))
        queries = np.vstack([x[strangers], unknown]) if len(unknown) else x[strangers]
        if len(queries):
            s_conf.append(reference.predict(w, queries, params.exp_bits)[1])
        n_enrol = len(enrol)
    return SizeScores(size, np.concatenate(g_conf), np.concatenate(g_ok),
                      np.concatenate(s_conf) if s_conf else np.zeros(0), n_enrol)


def rates(s: SizeScores, t: float) -> dict[str, float]:
    """TPIR (accepted and named right), FPIR (strangers accepted), closed-set accuracy, known accepted."""
    accepted = s.genuine_conf >= t
    return {"tpir": float(np.mean(accepted & s.genuine_correct)),
            "fpir": float(np.mean(s.stranger_conf >= t)) if len(s.stranger_conf) else float("nan"),
            "closed_set_accuracy": float(np.mean(s.genuine_correct)),
            "known_accepted": float(np.mean(accepted))}


def lowest_threshold(stranger_conf: np.ndarray, max_fpir: float) -> float:
    """The lowest t with mean(stranger_conf >= t) <= max_fpir."""
    if not len(stranger_conf):
        return 0.0
    desc = np.sort(stranger_conf)[::-1]
    k = math.floor(max_fpir * len(desc) + 1e-9)  # strangers that may be accepted
    if k >= len(desc):
        return 0.0
    return float(np.nextafter(desc[k], np.inf))  # just above the (k+1)-th highest: at most k accepted


def equal_error_threshold(s: SizeScores) -> float:
    """Where the share of genuine queries not accepted-and-right equals FPIR (for comparison)."""
    cands = np.unique(np.concatenate([s.genuine_conf, s.stranger_conf]))
    miss = np.array([1 - np.mean((s.genuine_conf >= t) & s.genuine_correct) for t in cands])
    fpir = np.array([np.mean(s.stranger_conf >= t) for t in cands])
    return float(cands[int(np.argmin(np.abs(miss - fpir)))])


def rounded_up(t: float, decimals: int = 5) -> float:
    """t rounded up (a higher threshold never accepts more strangers), within [10^-decimals, 1]."""
    return min(max(math.ceil(t * 10 ** decimals - 1e-9) / 10 ** decimals, 10 ** -decimals), 1.0)


def step_threshold(by_size: dict[int, float], classes: int) -> float:
    """The threshold of the largest calibrated size <= classes (the smallest size's below it).

    Conservative between calibrated sizes: strangers' confidence falls as the gallery grows (more classes
    share the softmax), so the threshold a smaller gallery needs is at least the one a larger gallery needs."""
    sizes = sorted(by_size)
    below = [n for n in sizes if n <= classes]
    return by_size[below[-1] if below else sizes[0]]


@dataclass
class Calibration:
    backend: str
    params: reference.TrainParams
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
              repeats: int = 5, max_fpir: float = 0.01) -> Calibration:
    """Thresholds from the scores at ``sizes``; ``check_sizes`` (fresh splits) test the step rule in between."""
    scores = {n: gallery_scores(x, labels, unknown, n, params, seed=seed, repeats=repeats) for n in sizes}
    by_size = {n: rounded_up(lowest_threshold(s.stranger_conf, max_fpir)) for n, s in scores.items()}
    cal = Calibration(backend, params, max(by_size.values()), max_fpir, by_size=by_size,
                      check_sizes=[n for n in check_sizes if n not in scores])
    for n in cal.check_sizes:
        scores[n] = gallery_scores(x, labels, unknown, n, params, seed=seed + 1, repeats=repeats)
    for n in sorted(scores):
        s = scores[n]
        cal.single[n] = rates(s, cal.threshold)
        cal.stepped[n] = rates(s, step_threshold(by_size, n))
        cal.eer[n] = equal_error_threshold(s)
        cal.counts[n] = {"genuine_queries": len(s.genuine_conf), "stranger_queries": len(s.stranger_conf)}
    return cal


# --- output --------------------------------------------------------------------------------------
def table(cal: Calibration) -> str:
    lines = [(f"embedder {cal.backend}: alpha {cal.params.alpha:g}; FPIR bound {cal.max_fpir:.0%}; "
              f"single threshold {cal.threshold:.5f} (accept iff S <= {1 / cal.threshold:.5f}); "
              "per-size threshold: the calibrated size at or below the gallery's (* = size not calibrated on)"),
             ("| gallery size | closed-set accuracy | single T: TPIR | FPIR | per-size T | TPIR | FPIR "
              "| equal-error T | genuine / stranger queries |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in cal.single.items():
        st, c = cal.stepped[n], cal.counts[n]
        mark = "*" if n in cal.check_sizes else ""
        lines.append(f"| {n}{mark} | {r['closed_set_accuracy']:.3f} | {r['tpir']:.3f} | {r['fpir']:.4f} "
                     f"| {step_threshold(cal.by_size, n):.5f} | {st['tpir']:.3f} | {st['fpir']:.4f} "
                     f"| {cal.eer[n]:.4f} | {c['genuine_queries']} / {c['stranger_queries']} |")
    return "\n".join(lines)


def record(cal: Calibration, model_id: str, seed: int, repeats: int, sizes_label: str) -> dict:
    def per(d: dict[int, dict[str, float]], key: str) -> dict[str, float]:
        return {str(n): round(v[key], 4) for n, v in d.items()}

    return {
        "threshold_by_gallery_size": {str(n): t for n, t in sorted(cal.by_size.items())},
        "model_id": model_id,
        "alpha": cal.params.alpha,
        "train": {k: v for k, v in asdict(cal.params).items() if k != "seed"},
        "rule": (f"threshold_by_gallery_size[n]: the lowest confidence threshold with FPIR <= {cal.max_fpir:g} on "
                 "galleries of n persons, rounded up to 5 decimals (about the 2^-16 resolution of the servers' fixed point); a gallery of c persons "
                 "uses the entry of the largest n <= c (the smallest n below it). No single value fits every size: "
                 "the one meeting the bound at all sizes accepts almost no genuine face beyond 20 persons"),
        "source": (f"benchmarks/calibrate_threshold.py --backend {cal.backend} --write on ../shared/faces/lfw-devtrain "
                   f"(people/ and unknown/), seed {seed}, {repeats} repeats, gallery sizes {sizes_label}"),
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
    ap.add_argument("--cache-dir", type=Path, default=REPO / "var" / "cache")
    ap.add_argument("--write", action="store_true", help=f"write the thresholds into {THRESHOLDS_PATH.relative_to(REPO)}")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
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
        cal = calibrate(x, labels, unknown, params, sizes, check_sizes=checks, backend=backend, seed=args.seed,
                        repeats=args.repeats, max_fpir=args.max_fpir)
        print(f"\nembedder {backend}: {len(x)} photos of {len(names)} persons ({n_eligible} with >= {MIN_PHOTOS}), "
              f"{len(unknown)} unknown faces; embedding {t_embed:.0f} s, calibration {time.monotonic() - t0:.1f} s")
        print(table(cal))
        sizes_label = ", ".join(f"{s} (all with >= {MIN_PHOTOS} photos)" if s == n_eligible else str(s) for s in sizes)
        out["embedders"][backend] = record(cal, get_embedder(backend).model_id, args.seed, args.repeats, sizes_label)
    if args.write:
        THRESHOLDS_PATH.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {THRESHOLDS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
