"""The evaluation report's open-set parts in the field's (NIST 1:N) terms, over a generic score.

``evaluate`` computes; this module turns its arrays into numbers, tables and pictures. Every function takes
*a score* per face, higher = more likely an enrolled person (today the client's confidence 1/S, the top
softmax probability; any other score works unchanged), and a face is accepted when its score >= the threshold.

* TPIR (true positive identification rate) at a threshold: the share of the known test faces accepted *with
  the right name*. FNIR = 1 - TPIR counts both rejected known faces and known faces given a wrong name.
* FPIR (false positive identification rate): the share of the unknown faces (strangers) accepted, under any name.
* For an FPIR target f over n strangers, k = floor(f * n) strangers may be accepted. The threshold is the
  smallest one with at most k stranger scores at or above it: just above the (k+1)-th highest stranger score
  (``numpy.nextafter`` of it towards +inf), so a score equal to that stranger's is rejected. Ties are exact:
  when strangers share that score, all of them are rejected and the FPIR reached can be below f (it never
  exceeds it). Targets below 1/n (k = 0 would only say "above every stranger") are skipped and said so.
* The worst persons: per person, the share of their test faces that came back with their name (the returned
  decision, not the score), lowest first; ties go to the person with more test faces (more evidence), then
  by name. Persons whose every test face came back right are not listed.

Pictures are PNGs written atomically (rendered into memory, then :func:`atomic_write_bytes`); matplotlib is
imported lazily with the Agg backend.
"""
from __future__ import annotations

import io
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from preprocessing.errors import ImageLoadError
from preprocessing.fileio import atomic_write_bytes
from preprocessing.images import load_image_file

logger = logging.getLogger(__name__)

FPIR_TARGETS = (0.001, 0.01, 0.1)
UNKNOWN_NAME = "unknown_person"
N_WORST = 5
THUMBS_PER_PERSON = 8
THUMB_PX = 96


@dataclass(frozen=True)
class OperatingPoint:
    """One row of the TPIR-at-FPIR table."""
    label: str  # "FPIR <= 1%" or "threshold used"
    target_fpir: float | None  # None for the threshold the system used
    threshold: float
    above_stranger: float | None  # a target's threshold is just above this stranger's score (it is rejected)
    tpir: float
    fnir: float
    fpir: float
    strangers_accepted: int
    known_right_name: int


@dataclass(frozen=True)
class PersonResult:
    name: str
    n_test: int
    n_right: int  # came back with their own name
    returned: tuple[str, ...]  # what came back for each test face, in the test order
    paths: tuple[Path, ...]

    @property
    def accuracy(self) -> float:
        return self.n_right / self.n_test


def rates_at(threshold: float, known_scores: np.ndarray, known_right: np.ndarray,
             unknown_scores: np.ndarray) -> tuple[float, float]:
    """(TPIR, FPIR) when a score >= ``threshold`` is accepted; ``known_right``: the best class is the true one."""
    known_scores, known_right, unknown_scores = _arrays(known_scores, known_right, unknown_scores)
    tpir = float(np.mean((known_scores >= threshold) & known_right)) if len(known_scores) else math.nan
    fpir = float(np.mean(unknown_scores >= threshold)) if len(unknown_scores) else math.nan
    return tpir, fpir


def threshold_for_fpir(unknown_scores: np.ndarray, target: float) -> float | None:
    """The smallest threshold with at most floor(target * n) stranger scores at or above it (module docstring);
    None when target < 1/n or there are no strangers."""
    u = np.sort(np.asarray(unknown_scores, dtype=np.float64))[::-1]
    n = len(u)
    k = math.floor(target * n + 1e-9)  # 1e-9: 0.001 * 1000 is 1 however the float rounds
    if n == 0 or k < 1:
        return None
    if k >= n:
        return float(-np.inf)
    return float(np.nextafter(u[k], np.inf))


def tpir_at_fpir(known_scores: np.ndarray, known_right: np.ndarray, unknown_scores: np.ndarray,
                 used_threshold: float, targets: Sequence[float] = FPIR_TARGETS
                 ) -> tuple[list[OperatingPoint], list[float]]:
    """The table's rows (one per reachable target, then the threshold used) and the targets skipped (< 1/n)."""
    known_scores, known_right, unknown_scores = _arrays(known_scores, known_right, unknown_scores)
    rows: list[OperatingPoint] = []
    skipped: list[float] = []
    for target in targets:
        t = threshold_for_fpir(unknown_scores, target)
        if t is None:
            skipped.append(float(target))
            continue
        rows.append(_point(f"FPIR <= {_pct(target)}", float(target), t, known_scores, known_right, unknown_scores))
    rows.append(_point("threshold used", None, float(used_threshold), known_scores, known_right, unknown_scores))
    return rows, skipped


def _point(label: str, target: float | None, t: float, ks: np.ndarray, kr: np.ndarray,
           us: np.ndarray) -> OperatingPoint:
    right = int(np.sum((ks >= t) & kr))
    fa = int(np.sum(us >= t))
    tpir = right / len(ks) if len(ks) else math.nan
    above = float(np.nextafter(t, -np.inf)) if target is not None else None
    return OperatingPoint(label=label, target_fpir=target, threshold=t, above_stranger=above, tpir=tpir,
                          fnir=1.0 - tpir,
                          fpir=fa / len(us) if len(us) else math.nan, strangers_accepted=fa, known_right_name=right)


def det_curve(known_scores: np.ndarray, known_right: np.ndarray,
              unknown_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, FPIR, FNIR) at every distinct score and just above the highest (all rejected), ascending."""
    ks, kr, us = _arrays(known_scores, known_right, unknown_scores)
    scores = np.concatenate([ks, us])
    if not len(scores):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    ts = np.unique(scores)
    ts = np.append(ts, np.nextafter(ts[-1], np.inf))
    right = np.sort(ks[kr])
    us_sorted = np.sort(us)
    # how many scores are >= t: n - (how many are < t)
    n_right = len(right) - np.searchsorted(right, ts, side="left")
    n_fa = len(us_sorted) - np.searchsorted(us_sorted, ts, side="left")
    fnir = 1.0 - n_right / len(ks) if len(ks) else np.full(len(ts), math.nan)
    fpir = n_fa / len(us) if len(us) else np.full(len(ts), math.nan)
    return ts, np.asarray(fpir, dtype=np.float64), np.asarray(fnir, dtype=np.float64)


def threshold_grid(known_scores: np.ndarray, unknown_scores: np.ndarray, used_threshold: float,
                   n: int = 201) -> np.ndarray:
    """``n`` thresholds evenly over the scores' range and the threshold used ([0, 1] for a probability, not for
    a logit), to draw rates against; [0, 1] when there is nothing to span."""
    v = np.concatenate([np.asarray(known_scores, float).ravel(), np.asarray(unknown_scores, float).ravel(),
                        [float(used_threshold)]])
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n)


def worst_persons(truth: Sequence[int], returned: Sequence[int], classes: Sequence[str],
                  paths: Sequence[Path | str], n: int = N_WORST) -> list[PersonResult]:
    """The ``n`` persons whose test faces came back with their name least often (ordering: module docstring).

    ``returned``: the class index that came back per test face, or a negative number for unknown."""
    truth = np.asarray(truth, dtype=int)
    returned = np.asarray(returned, dtype=int)
    if not (len(truth) == len(returned) == len(paths)):
        raise ValueError(f"worst_persons: {len(truth)} truths, {len(returned)} returned, {len(paths)} paths")
    people: list[PersonResult] = []
    for c in sorted(set(truth.tolist())):
        idx = np.flatnonzero(truth == c)
        back = tuple(classes[r] if r >= 0 else UNKNOWN_NAME for r in returned[idx])
        people.append(PersonResult(name=classes[c], n_test=len(idx), n_right=int(np.sum(returned[idx] == c)),
                                   returned=back, paths=tuple(Path(paths[i]) for i in idx)))
    missed = [p for p in people if p.n_right < p.n_test]
    missed.sort(key=lambda p: (p.accuracy, -p.n_test, p.name))
    return missed[:n]


def _arrays(ks: Any, kr: Any, us: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ks = np.asarray(ks, dtype=np.float64).reshape(-1)
    kr = np.asarray(kr, dtype=bool).reshape(-1)
    us = np.asarray(us, dtype=np.float64).reshape(-1)
    if len(ks) != len(kr):
        raise ValueError(f"{len(ks)} known scores but {len(kr)} right/wrong flags")
    return ks, kr, us


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


# ---- pictures ------------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Render ``fig`` as PNG in memory, write it atomically, close it."""
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_det(path: Path, known_scores: np.ndarray, known_right: np.ndarray, unknown_scores: np.ndarray,
             used_threshold: float, score_name: str) -> Path:
    """DET-style curve: FNIR against FPIR on log axes; zeros drawn at half of one face (0.5/n), the floor."""
    plt = _pyplot()
    ks, kr, us = _arrays(known_scores, known_right, unknown_scores)
    _, fpir, fnir = det_curve(ks, kr, us)
    fp_floor, fn_floor = 0.5 / max(len(us), 1), 0.5 / max(len(ks), 1)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.step(np.maximum(fpir, fp_floor), np.maximum(fnir, fn_floor), where="post", label="over all thresholds")
    tpir_u, fpir_u = rates_at(used_threshold, ks, kr, us)
    ax.plot([max(fpir_u, fp_floor)], [max(1 - tpir_u, fn_floor)], "o", color="C3",
            label=f"threshold used {used_threshold:.4g}: FPIR {fpir_u:.3g}, FNIR {1 - tpir_u:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(fp_floor / 1.5, 1.05)
    ax.set_ylim(fn_floor / 1.5, 1.05)
    ax.axvline(fp_floor, color="grey", lw=0.5, ls=":")
    ax.axhline(fn_floor, color="grey", lw=0.5, ls=":")
    ax.set_xlabel(f"FPIR (strangers accepted, {len(us)} strangers; 0 drawn at {fp_floor:.2g})")
    ax.set_ylabel(f"FNIR = 1 - TPIR ({len(ks)} known faces; 0 drawn at {fn_floor:.2g})")
    ax.set_title(f"DET: threshold on {score_name}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)  # a DET curve runs from upper left to lower right
    fig.tight_layout()
    return save_figure(fig, path)


def plot_scores(path: Path, known_scores: np.ndarray, known_right: np.ndarray, unknown_scores: np.ndarray,
                used_threshold: float, score_name: str) -> Path:
    """Histogram of the scores: known faces whose best class is right / wrong, and strangers (share of each)."""
    plt = _pyplot()
    ks, kr, us = _arrays(known_scores, known_right, unknown_scores)
    groups = [(ks[kr], "known, right name", "C2"), (ks[~kr], "known, wrong name", "C1"), (us, "strangers", "C3")]
    allv = np.concatenate([ks, us, [used_threshold]])
    lo, hi = float(np.min(allv)), float(np.max(allv))
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for v, name, color in groups:
        if len(v):
            ax.hist(v, bins=bins, weights=np.full(len(v), 1.0 / len(v)), histtype="step", lw=1.5, color=color,
                    label=f"{name} ({len(v)})")
        else:  # still in the legend: "none" is a result too
            ax.plot([], [], color=color, lw=1.5, label=f"{name} (0)")
    ax.axvline(used_threshold, color="grey", ls="--", label=f"threshold used {used_threshold:.4g}")
    ax.set_xlabel(score_name)
    ax.set_ylabel("share of the group")
    ax.set_title("Scores: accepted when score >= threshold", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _thumbnail(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        img = Image.fromarray(load_image_file(path))
    except ImageLoadError as exc:
        logger.warning("thumbnail: %s", exc)
        return None
    img.thumbnail((THUMB_PX, THUMB_PX))
    return np.asarray(img)


def plot_worst_persons(path: Path, persons: Sequence[PersonResult]) -> Path:
    """One row per person: their test photos, each titled with what came back (green right, red wrong)."""
    plt = _pyplot()
    rows = max(len(persons), 1)
    cols = max([min(p.n_test, THUMBS_PER_PERSON) for p in persons] + [2])
    fig = plt.figure(figsize=(1.6 * cols + 0.4, 2.2 * rows), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(rows, 1))
    if not persons:
        subfigs[0].text(0.5, 0.5, "every person's test faces came back right", ha="center", va="center")
    for sub, p in zip(subfigs, persons):
        more = f" (first {THUMBS_PER_PERSON} shown)" if p.n_test > THUMBS_PER_PERSON else ""
        sub.suptitle(f"{p.name}: {p.n_right}/{p.n_test} came back right{more}", fontsize=9, fontweight="bold",
                     x=0.01, ha="left")
        axes = np.atleast_1d(sub.subplots(1, cols))
        for ax in axes:
            ax.axis("off")
        for ax, img_path, back in zip(axes, p.paths[:THUMBS_PER_PERSON], p.returned):
            thumb = _thumbnail(img_path)
            if thumb is None:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(thumb)
            ax.set_title(back[:22], fontsize=7, color="green" if back == p.name else "red")
    return save_figure(fig, path)


# ---- the report section --------------------------------------------------------------------------

def open_set_section(out_dir: Path, known_scores: np.ndarray, known_right: np.ndarray, unknown_scores: np.ndarray,
                     used_threshold: float, score_name: str, truth: Sequence[int], returned: Sequence[int],
                     classes: Sequence[str], test_paths: Sequence[Path | str] | None
                     ) -> tuple[list[str], dict[str, Any]]:
    """Write det.png, scores.png and worst_persons.png (when test paths are given) into ``out_dir``; return the
    Markdown lines and the numbers for evaluation.json."""
    ks, kr, us = _arrays(known_scores, known_right, unknown_scores)
    rows, skipped = tpir_at_fpir(ks, kr, us, used_threshold)
    lines = ["", "## Open set in NIST 1:N terms", "",
             f"Score: {score_name} (higher = more likely an enrolled person; accepted when score >= threshold). "
             f"TPIR: known test faces accepted with the right name ({len(ks)}). FPIR: strangers accepted under "
             f"any name ({len(us)}). FNIR = 1 - TPIR. A target's threshold is the smallest with at most "
             "floor(target x strangers) strangers at or above it (just above the next stranger's score: strangers "
             "tied with it are rejected too, so the FPIR reached can be below the target, never above). The row "
             "'threshold used' applies the system's threshold to the same scores (the servers' own decisions are "
             "in the table above).", ""]
    if len(us):
        lines += ["| operating point | threshold | TPIR | FNIR | FPIR reached | strangers accepted |",
                  "|---|---|---|---|---|---|"]
        for p in rows:
            shown = f"{p.threshold:.6g}" if p.above_stranger is None else f"> {p.above_stranger:.6g}"
            lines.append(f"| {p.label} | {shown} | {p.tpir:.4f} | {p.fnir:.4f} | {p.fpir:.4f} | "
                         f"{p.strangers_accepted}/{len(us)} |")
        if skipped:
            lines += ["", "Skipped (below 1/strangers = " + f"{1 / len(us):.3g}, not measurable with {len(us)} "
                      "strangers): " + ", ".join(f"FPIR <= {_pct(t)}" for t in skipped) + "."]
    else:
        lines.append("No unknown faces were given (--unknown): FPIR and its table need strangers.")
    det = plot_det(out_dir / "det.png", ks, kr, us, used_threshold, score_name)
    hist = plot_scores(out_dir / "scores.png", ks, kr, us, used_threshold, score_name)
    lines += ["", f"![DET curve]({det.name})", "", f"![score histogram]({hist.name})", ""]
    numbers: dict[str, Any] = {"score": score_name, "targets_skipped": skipped,
                               "operating_points": [asdict(p) for p in rows]}
    if test_paths is not None:
        worst = worst_persons(truth, returned, classes, test_paths)
        numbers["worst_persons"] = [{"name": p.name, "n_test": p.n_test, "n_right": p.n_right,
                                     "accuracy": p.accuracy, "returned": list(p.returned)} for p in worst]
        lines += ["## The five worst persons", "",
                  "Per person: known test faces that came back with their own name (the decision the servers "
                  "returned). Lowest first; ties: more test faces first, then by name; persons with every test "
                  "face right are not listed.", ""]
        if worst:
            lines += ["| person | right / test faces | accuracy | what came back instead |", "|---|---|---|---|"]
            for p in worst:
                wrong = Counter(b for b in p.returned if b != p.name)
                lines.append(f"| {p.name} | {p.n_right}/{p.n_test} | {p.accuracy:.3f} | "
                             + ", ".join(f"{b} x{n}" for b, n in sorted(wrong.items(), key=lambda x: (-x[1], x[0])))
                             + " |")
            pic = plot_worst_persons(out_dir / "worst_persons.png", worst)
            lines += ["", f"![worst persons]({pic.name})", ""]
        else:
            lines += ["Every person's test faces came back with the right name (no worst_persons.png).", ""]
    return lines, numbers
