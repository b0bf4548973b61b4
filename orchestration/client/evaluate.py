"""Evaluation under MPC: seeded enroll/test split, private training and recognition, a report.

The report (Markdown + PNGs) gives closed-set accuracy, the plaintext reference's accuracy and the
agreement between them, open-set acceptance/rejection at the chosen threshold and over all thresholds,
a confusion matrix, and time and data sent per phase; and in NIST 1:N terms (orchestration.client.report,
over the score named by SCORE_NAME) TPIR at FPIR 0.1/1/10%, a DET curve, a score histogram, and the five
persons recognised worst with their test photos.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from preprocessing.fileio import atomic_write_json, atomic_write_text

from orchestration.shared import reference
from orchestration.mpspdz.toolchain import DEFAULT_PROTOCOL, MPSPDZ
from orchestration.client.private import Layout, Prediction, predict_private, train_private
from orchestration.client import report as open_set_report

logger = logging.getLogger(__name__)

# The open-set score the report's TPIR/FPIR table, DET curve and histogram use: what the servers return per face
# (Prediction.score, the top logit z_max: reference.SCORE), higher = more likely an enrolled person, accepted
# when >= the threshold.
SCORE_NAME = "top logit z_max"


@dataclass
class Evaluation:
    dataset: str
    unknown: str | None
    backend: str
    n_people: int
    n_enrolled_faces: int
    n_test_faces: int
    n_unknown_faces: int
    closed_set_accuracy: float
    plaintext_accuracy: float
    agreement: float
    threshold: float
    known_accept: float  # known test faces accepted (decision inside MPC)
    known_correct_accept: float  # accepted with the right name
    unknown_reject: float  # unknown faces rejected (decision inside MPC)
    decision_agreement: float  # MPC decisions equal the plaintext reference's
    seconds: dict[str, float] = field(default_factory=dict)
    data_mb: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    protocol: str = DEFAULT_PROTOCOL
    open_set: dict[str, Any] = field(default_factory=dict)  # TPIR at FPIR, worst persons (report.open_set_section)


def split_gallery(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per person: a seeded share of the images for testing (at least one when the person has 2+)."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for name in sorted(set(labels)):
        idx = np.flatnonzero(labels == name)
        rng.shuffle(idx)
        k = int(round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        te += list(idx[:k])
        tr += list(idx[k:])
    return np.array(sorted(tr)), np.array(sorted(te))


def _predict_batches(mp: MPSPDZ, layout: Layout, x: np.ndarray, threshold: float, batch: int, host: str,
                     timeout: float, service: Any = None) -> tuple[list[Prediction], float, float]:
    """Predictions, seconds, MB between the servers (one-job mode; the service does not count its traffic: 0)."""
    out: list[Prediction] = []
    secs = mb = 0.0
    from tqdm import tqdm

    for s in tqdm(range(0, len(x), batch), desc="private recognition", unit="batch", leave=False):
        if service is not None:
            ans = service.recognise(x[s:s + batch], threshold)
            out += ans.predictions
            secs += ans.seconds
            continue
        rep = predict_private(mp, layout, x[s:s + batch], threshold, host=host, timeout=timeout)
        out += rep.predictions
        secs += rep.run.wall_seconds
        mb += rep.run.data_sent_mb
    return out, secs, mb


def evaluate(mp: MPSPDZ, dataset: Path, unknown: Path | None, out_dir: Path, params: reference.TrainParams, *,
             backend: str, detector: str, cache_dir: Path, work: Path, test_fraction: float = 0.3, seed: int = 0,
             batch: int = 64, host: str = "127.0.0.1", timeout: float = 7200.0,
             protocol: str = DEFAULT_PROTOCOL, service: dict[str, Any] | None = None) -> Evaluation:
    """Train on a seeded split, recognise the rest; ``service`` ({"port", "batch"}) recognises through a
    local service started for this evaluation's own model (the user's service and model stay untouched)."""
    from preprocessing.dataset import embed_gallery

    seconds: dict[str, float] = {}
    data: dict[str, float] = {}
    t0 = time.monotonic()
    g = embed_gallery(dataset, backend=backend, detector=detector, cache_dir=cache_dir, progress=True)
    u_x = np.zeros((0, g.embeddings.shape[1]))
    n_skipped = len(g.skipped)
    if unknown is not None:
        u_x, n_u_skipped = _embed_flat(unknown, backend, detector, cache_dir)
        n_skipped += n_u_skipped
    seconds["embedding (client)"] = time.monotonic() - t0
    labels = np.array(g.labels)
    tr, te = split_gallery(labels, test_fraction, seed)
    layout = Layout(work, protocol)
    t0 = time.monotonic()
    report = train_private(mp, layout, g.embeddings[tr], list(labels[tr]), params, host=host, timeout=timeout,
                           meta={"backend": backend, "detector": detector})
    seconds["training (MPC protocol)"] = report.run.wall_seconds
    seconds["training (compile + share + protocol)"] = time.monotonic() - t0
    data["training"] = report.run.data_sent_mb
    classes = report.classes
    index = {n: k for k, n in enumerate(classes)}
    thr = report.threshold.threshold
    truth = np.array([index[n] for n in labels[te]])

    unk_preds: list[Prediction] = []
    with contextlib.ExitStack() as stack:
        client = None
        if service is not None:
            from orchestration.mpspdz.toolchain import protocol as get_protocol
            from orchestration.client.service import ServiceClient
            from orchestration.client.local_service import LocalService

            svc = stack.enter_context(LocalService(mp, layout, get_protocol(protocol), host=host,
                                                   port=int(service["port"]), batch=int(service["batch"]),
                                                   log_dir=layout.root / "service-logs"))
            svc.wait_ready()
            client = stack.enter_context(ServiceClient(layout.client, svc.hosts))
        how = "service" if client is not None else "MPC"
        known_preds, s, mb = _predict_batches(mp, layout, g.embeddings[te], thr, batch, host, timeout, client)
        seconds[f"recognition of known test faces ({how})"] = s
        data["recognition of known test faces"] = mb
        if len(u_x):
            unk_preds, s, mb = _predict_batches(mp, layout, u_x, thr, batch, host, timeout, client)
            seconds[f"recognition of unknown faces ({how})"] = s
            data["recognition of unknown faces"] = mb

    w = reference.train(g.embeddings[tr], np.array([index[n] for n in labels[tr]]), len(classes), params)
    ref_best, _, ref_conf = reference.predict_scores(w, g.embeddings[te], params.exp_bits)  # ref_conf: z_max
    best = np.array([p.best for p in known_preds])
    conf = np.array([p.score for p in known_preds])  # the open-set score (SCORE_NAME), not 1/S
    accepted = np.array([p.label != -1 for p in known_preds])
    # the protocol's accept/reject decisions against the plaintext reference's, known and unknown faces alike
    mpc_decisions = [accepted]
    ref_decisions = [ref_conf >= thr]
    u_conf = np.array([p.score for p in unk_preds])
    if unk_preds:
        _, _, u_ref_conf = reference.predict_scores(w, u_x, params.exp_bits)
        mpc_decisions.append(np.array([p.label != -1 for p in unk_preds]))
        ref_decisions.append(u_ref_conf >= thr)
    ev = Evaluation(
        dataset=str(dataset), unknown=str(unknown) if unknown else None, backend=backend, n_people=len(classes),
        n_enrolled_faces=len(tr), n_test_faces=len(te), n_unknown_faces=len(u_x),
        closed_set_accuracy=float(np.mean(best == truth)), plaintext_accuracy=float(np.mean(ref_best == truth)),
        agreement=float(np.mean(best == ref_best)), threshold=thr, known_accept=float(np.mean(accepted)),
        known_correct_accept=float(np.mean(accepted & (best == truth))),
        unknown_reject=float(np.mean([p.label == -1 for p in unk_preds])) if unk_preds else float("nan"),
        decision_agreement=float(np.mean(np.concatenate(mpc_decisions) == np.concatenate(ref_decisions))),
        seconds=seconds, data_mb=data, skipped=n_skipped, protocol=protocol)
    returned = np.array([p.label for p in known_preds], dtype=int)
    write_report(ev, out_dir, truth, best, conf, u_conf, classes, returned=returned,
                 test_paths=[g.paths[i] for i in te])
    return ev


def _embed_flat(folder: Path, backend: str, detector: str, cache_dir: Path) -> tuple[np.ndarray, int]:
    """Embed a flat folder of images (one unknown face each) through the gallery cache."""
    import tempfile

    from preprocessing.dataset import embed_gallery

    with tempfile.TemporaryDirectory() as tmp:
        person = Path(tmp) / "unknown"
        person.mkdir()
        n = 0
        for p in sorted(Path(folder).iterdir()):
            if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                (person / p.name).symlink_to(p.resolve())
                n += 1
        if n == 0:
            raise ValueError(f"{folder}: no .jpg/.jpeg/.png images of unknown people")
        g = embed_gallery(Path(tmp), backend=backend, detector=detector, cache_dir=cache_dir, progress=True)
        return g.embeddings, len(g.skipped)


def write_report(ev: Evaluation, out_dir: Path, truth: np.ndarray, best: np.ndarray, conf: np.ndarray,
                 u_conf: np.ndarray, classes: list[str], *, returned: np.ndarray | None = None,
                 test_paths: list[Path] | None = None, score_name: str = SCORE_NAME) -> Path:
    """``conf``/``u_conf``: the score per known/unknown face; ``returned``: the class index that came back per
    known face (-1 unknown; default: ``best`` where the score reaches the threshold); ``test_paths``: the known
    test faces' images (the worst persons' thumbnails; without them that part is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    # confusion matrix
    c = len(classes)
    cm = np.zeros((c, c), dtype=int)
    for t, b in zip(truth, best):
        cm[t, b] += 1
    size = min(2 + 0.35 * c, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if c <= 30:
        ax.set_xticks(range(c), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(c), classes, fontsize=7)
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted under MPC")
    ax.set_ylabel("true person")
    ax.set_title(f"Confusion matrix ({c} people, closed set, accuracy {ev.closed_set_accuracy:.3f})")
    fig.tight_layout()
    open_set_report.save_figure(fig, out_dir / "confusion.png")
    # open-set curve over thresholds
    ts = open_set_report.threshold_grid(conf, u_conf, ev.threshold)  # the score's own range, not [0, 1]
    correct = best == truth
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(ts, [np.mean((conf >= t) & correct) for t in ts], label="known faces accepted with the right name")
    if len(u_conf):
        ax.plot(ts, [np.mean(u_conf < t) for t in ts], label="unknown faces rejected")
    ax.axvline(ev.threshold, color="grey", ls="--", label=f"default threshold {ev.threshold:.3f}")
    ax.set_xlabel(f"threshold on {score_name}")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Open set: acceptance and rejection over thresholds")
    fig.tight_layout()
    open_set_report.save_figure(fig, out_dir / "open_set.png")
    if returned is None:
        returned = np.where(conf >= ev.threshold, best, -1)
    section, ev.open_set = open_set_report.open_set_section(
        out_dir, conf, best == truth, u_conf, ev.threshold, score_name, truth, returned, classes, test_paths)

    lines = [
        "# Private face recognition: evaluation",
        "",
        f"Dataset `{ev.dataset}`" + (f", unknown faces `{ev.unknown}`" if ev.unknown else "") + f", backend {ev.backend}, protocol {ev.protocol}.",
        f"{ev.n_people} people, {ev.n_enrolled_faces} enrolled faces, {ev.n_test_faces} known test faces, "
        f"{ev.n_unknown_faces} unknown faces ({ev.skipped} images skipped: no usable face).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| closed-set accuracy under MPC | {ev.closed_set_accuracy:.4f} |",
        f"| closed-set accuracy of the plaintext reference | {ev.plaintext_accuracy:.4f} |",
        f"| MPC and plaintext agree (best person) | {ev.agreement:.4f} |",
        f"| MPC and plaintext agree (accept/reject decision) | {ev.decision_agreement:.4f} |",
        f"| default threshold (from enrollment data) | {ev.threshold:.4f} |",
        f"| known test faces accepted | {ev.known_accept:.4f} |",
        f"| known test faces accepted with the right name | {ev.known_correct_accept:.4f} |",
        f"| unknown faces rejected | {ev.unknown_reject:.4f} |",
        "",
        "| phase | seconds | MB sent between the servers |",
        "|---|---|---|",
    ]
    for k, v in ev.seconds.items():
        mb = next((m for name, m in ev.data_mb.items() if k.startswith(name)), None)
        lines.append(f"| {k} | {v:.1f} | {'' if mb is None else f'{mb:.1f}'} |")
    lines += ["", "![confusion matrix](confusion.png)", "", "![open set](open_set.png)", ""]
    lines += section
    report = atomic_write_text(out_dir / "report.md", "\n".join(lines))
    atomic_write_json(out_dir / "evaluation.json", asdict(ev))
    return report
