"""The client's side of a job: make one share bundle per server, later collect what comes back.

Only shares and sizes go to the servers; names, the threshold choice and everything needed to
read the results stay in the client's folder::

    client/model.json        the current model: classes, run id, share generation, threshold (on the
                             score named by its ``threshold_score``: the top logit z_max)
    client/jobs/<job>.json   a job sent out and not yet collected (what to do with its results)

Bundles are folders ``<out>/server0`` and ``<out>/server1``; each server's operator runs
``invoke party`` on its own folder, and sends back that server's ``outputs/<job>/``. After a
training or a refresh is collected, :func:`share_confirm` writes a ticket per server the same way
(``invoke confirm`` there), so that each destroys the generations the client no longer needs.
Everything the client writes is owner-only.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from preprocessing import sharing
from preprocessing.fileio import atomic_write_json, owner_only, private_dir
from preprocessing.sharing import FRAC_BITS

from orchestration.shared import reference
from orchestration.mpspdz.toolchain import DEFAULT_PROTOCOL, program_version, protocol as get_protocol
from orchestration.shared.model import CONFIRM_FILE, PREDICT_PROGRAM, REFRESH_PROGRAM, TRAIN_PROGRAM, ModelError

logger = logging.getLogger(__name__)

UNKNOWN = -1


class CollectError(ModelError):
    """Results from the servers are missing, incomplete, or do not belong to the job."""


#: |z_max| of an honest answer: unit embeddings and bounded weights keep every logit far below 2^10
#: (face_predict's COMPARE_BITS rests on the same bound)
ZMAX_BOUND = 2.0 ** 10


@dataclass
class Prediction:
    label: int  # class index, or UNKNOWN when the protocol decided score < threshold
    confidence: float  # softmax probability of the best class, 1/S (for display)
    best: int  # best class index whatever the decision (the client's own query: it may know)
    score: float = float("nan")  # the open-set score: the top logit z_max (reference.SCORE)


def decide(best: np.ndarray, denom: np.ndarray, zmax: np.ndarray, threshold: float) -> list[Prediction]:
    """Predictions from reconstructed answers: a face is UNKNOWN when its score z_max < ``threshold``."""
    return [Prediction(int(best[k]) if zmax[k] >= threshold else UNKNOWN, float(1.0 / denom[k]), int(best[k]),
                       float(zmax[k])) for k in range(len(best))]


def answers_in_range(best: np.ndarray, denom: np.ndarray, zmax: np.ndarray, c: int) -> bool:
    """Whether reconstructed answers can be honest ones: class 0..c-1, 1 <= S <= c (the top class contributes
    exp(0) = 1 and every other at most 1; up to rounding) and |z_max| < ZMAX_BOUND."""
    return bool(np.all((best >= 0) & (best < c)) and np.all((denom > 1 - 1e-3) & (denom < c + 1e-3))
                and np.all(np.abs(zmax) < ZMAX_BOUND))


def record_threshold(record: dict[str, Any], source: str | Path = "model record") -> float:
    """The threshold a model record holds, on the top logit z_max (``reference.SCORE``).

    A record written before issue 18 holds a threshold on the confidence 1/S (a probability near 1) and no
    ``threshold_score``: applied to z_max it would be meaningless, so it is refused with what to do instead.
    A record without a threshold gives 0.0."""
    if "threshold" not in record:
        return 0.0
    score = record.get("threshold_score", reference.OLD_SCORE)
    if score != reference.SCORE:
        raise ModelError(f"{source}: its threshold {record['threshold']!r} is on the score {score!r} (the confidence 1/S, "
                         f"from before the open-set score changed); the servers' open-set score is now "
                         f"{reference.SCORE!r} ({reference.SCORE_DESCRIPTION}), allowed: {reference.SCORE!r}. Retrain "
                         "the model for a new threshold (`invoke train`, or `invoke share-train` and `invoke collect`), "
                         "or give a threshold on z_max explicitly (--threshold)")
    return float(record["threshold"])


@dataclass
class Outgoing:
    job: str
    kind: str
    bundles: tuple[Path, Path]
    program_args: list[str]
    protocol: str = DEFAULT_PROTOCOL
    program: str = ""


def model_record_path(client: Path) -> Path:
    return Path(client) / "model.json"


def is_data_owner(client: Path) -> bool | None:
    """Whether ``client`` is the data owner's client folder: True if it trains or deals (a gallery's
    embeddings, a pending job, the dealer's key P2), False if it only asks the service (its service key and
    nothing of those), None if it cannot be told (a folder with neither yet)."""
    client = Path(client)
    owner = ((client / "gallery.npz").exists() or (client / "certs" / "P2.key").exists()
             or any((client / "jobs").glob("*.json")) or (client.parent / "gallery").is_dir())
    if owner:
        return True
    return False if (client / "certs" / "client.pem").exists() else None


def missing_record_advice(client: Path) -> str:
    """What to do on this client when its model record ``<client>/model.json`` is missing or stale."""
    path = model_record_path(client)
    train = "train it here: `invoke train` (local mode) or `invoke share-train` and `invoke collect` (two hosts)"
    copy = (f"copy the data owner's record, var/client/model.json on the data owner's client, to {path} (or set "
            "service.model_record in invoke.yaml to where the data owner publishes it: a file path or an https URL)")
    owner = is_data_owner(client)
    if owner is True:
        return f"this is the data owner's client: {train}"
    if owner is False:
        return f"this client only asks the service: {copy}"
    return f"on the data owner's client, {train}; on any other client, {copy}"


def check_model_record(record: Any, source: str | Path) -> dict[str, Any]:
    """``record`` as a model record (what ``model.json`` holds), or ModelError naming ``source``."""
    def bad(why: str) -> ModelError:
        return ModelError(f"{source}: not a model record ({why}); expected the data owner's var/client/model.json")

    if not isinstance(record, dict):
        raise bad(f"a JSON {type(record).__name__}, not an object")
    classes = record.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(x, str) for x in classes):
        raise bad("'classes' must be a non-empty list of names")
    d = record.get("d")
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise bad(f"'d' must be the embedding dimension, got {d!r}")
    for key in ("run_id", "gen"):
        if key in record and not isinstance(record[key], str):
            raise bad(f"{key!r} must be a string, got {record[key]!r}")
    if "threshold" in record and (not isinstance(record["threshold"], (int, float)) or isinstance(record["threshold"], bool)):
        raise bad(f"'threshold' must be a number, got {record['threshold']!r}")
    if "threshold_score" in record and record["threshold_score"] not in (reference.SCORE, reference.OLD_SCORE):
        raise bad(f"'threshold_score' must be {reference.SCORE!r} or {reference.OLD_SCORE!r}, got "
                  f"{record['threshold_score']!r}")
    return record


def parse_model_record(text: str | bytes, source: str | Path) -> dict[str, Any]:
    """A model record from JSON text read from ``source`` (a file or a URL), checked."""
    try:
        record = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{source}: not JSON ({exc}); expected the data owner's var/client/model.json") from None
    return check_model_record(record, source)


def load_model_record(client: Path) -> dict[str, Any]:
    path = model_record_path(client)
    if not path.exists():
        raise ModelError(f"no trained model ({path} missing): {missing_record_advice(client)}")
    return parse_model_record(path.read_bytes(), path)


def model_generation(record: dict[str, Any]) -> str:
    """The model generation a record (:func:`load_model_record`) names: its ``gen``, or for a model trained
    before generations had names, its ``run_id``."""
    return record.get("gen", record["run_id"])


def _pending_path(client: Path, job: str) -> Path:
    return Path(client) / "jobs" / f"{job}.json"


def load_pending(client: Path, job: str) -> dict[str, Any]:
    """The record of a job the client sent out and has not collected yet (what to do with its results)."""
    path = _pending_path(client, job)
    if not path.is_file():
        jobs = sorted(p.stem for p in (Path(client) / "jobs").glob("*.json"))
        raise CollectError(f"no job {job!r} waiting at the client ({path} missing); waiting jobs: "
                           f"{', '.join(jobs) or 'none'}")
    return json.loads(path.read_text())


def _bundle_dirs(out: Path | Sequence[Path], job: str) -> tuple[Path, Path]:
    """``out/server0``, ``out/server1`` for one folder; or two folders, where ``{job}`` is replaced."""
    if isinstance(out, (str, Path)):
        return Path(out) / "server0", Path(out) / "server1"
    a, b = (Path(str(p).replace("{job}", job)) for p in out)
    return a, b


#: the largest one-hot label matrix SGD training shares (8 bytes a value, per server, plus the share files)
MAX_ONE_HOT_VALUES = 200_000_000


@owner_only()
def share_train(client: Path, embeddings: np.ndarray, labels: Sequence[str], params: reference.TrainParams,
                out: Path | Sequence[Path], *, meta: dict[str, Any] | None = None,
                protocol: str = DEFAULT_PROTOCOL) -> Outgoing:
    """Share a labelled gallery for private training; keeps classes and threshold at the client.

    ``alpha`` (it depends on the embedder) is shared with the data, never sent as a size or argument."""
    get_protocol(protocol)
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (n, d) array, got shape {x.shape}")
    if len(labels) != x.shape[0]:
        raise ValueError(f"{len(labels)} labels for {x.shape[0]} embeddings")
    private_dir(client)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"need at least 2 people to train a classifier, got {len(classes)}: {classes}")
    index = {name: k for k, name in enumerate(classes)}
    order = reference.training_order(len(x), params.seed)
    x = x[order]
    y_idx = np.array([index[name] for name in labels])[order]
    n, d = x.shape
    c = len(classes)
    if params.epochs == 0:
        # the model is the warm start alone: the class means are all face_train needs (c x d values, whatever n)
        data = [(reference.class_means(x, y_idx, c), FRAC_BITS)]
    else:
        if n * c > MAX_ONE_HOT_VALUES:
            raise ValueError(f"SGD on {n} faces of {c} people needs an n x c one-hot of {n * c:,} values per server "
                             f"(more than {MAX_ONE_HOT_VALUES:,}): train with epochs 0 (the class means alone: "
                             f"{c * d:,} values) for a gallery this large")
        y = np.zeros((n, c), dtype=np.int64)
        y[np.arange(n), y_idx] = 1
        data = [(reference.with_bias(x), FRAC_BITS), (y, 0)]
    args = params.program_args(n, d + 1, c)
    run_id = sharing.new_run_id()
    job = f"train-{run_id}"
    dirs = _bundle_dirs(out, job)
    sharing.write_share_bundle([(np.array([[params.alpha]]), FRAC_BITS), *data], dirs, program=TRAIN_PROGRAM,
                               program_version=program_version(TRAIN_PROGRAM), kind="train", n=n, d=d + 1,
                               n_classes=c, run_id=run_id, job=job, program_args=args, protocol=protocol)
    choice = reference.choose_threshold(x, y_idx, c, params)  # client side, plaintext, enrollment data only
    record = {"run_id": run_id, "gen": run_id, "classes": classes, "d": d, "n": n, "params": params.__dict__,
              "created": time.time(), "threshold": choice.threshold, "threshold_score": choice.score,
              "threshold_choice": choice.__dict__,
              **(meta or {})}
    atomic_write_json(_pending_path(client, job), {"kind": "train", "job": job, "record": record,
                                                   **_dealing(TRAIN_PROGRAM, args, protocol)})
    return Outgoing(job, "train", dirs, args, protocol, TRAIN_PROGRAM)


def _dealing(program: str, args: list[str], protocol: str) -> dict[str, Any]:
    """What the client keeps to run its dealer party for a job (dealer mode)."""
    return {"protocol": protocol, "program": program, "program_args": list(args)}


@owner_only()
def share_predict(client: Path, embeddings: np.ndarray, threshold: float, out: Path | Sequence[Path], *,
                  info: dict[str, Any] | None = None, protocol: str = DEFAULT_PROTOCOL) -> Outgoing:
    """Share a batch of query embeddings (padded to a power of two).

    The decision threshold (on the top logit z_max) stays in the client's job record: the servers return the
    best class, the softmax denominator and z_max, and the client decides "unknown" (see :func:`collect`)."""
    get_protocol(protocol)
    private_dir(client)
    record = load_model_record(client)
    x = np.asarray(embeddings, dtype=np.float64)
    q_real = len(x)
    if q_real == 0:
        raise ValueError("no embeddings to recognise")
    x = x.reshape(q_real, -1)
    if x.shape[1] != record["d"]:
        raise ValueError(f"embeddings have dimension {x.shape[1]}, the model expects {record['d']}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold {threshold} is not a number")
    d1, c = record["d"] + 1, len(record["classes"])
    q = bucket_size(q_real)
    padded = np.zeros((q, d1))
    padded[:q_real] = reference.with_bias(x)
    args = [str(q), str(d1), str(c), str(int(record["params"]["exp_bits"]))]
    job = f"predict-{sharing.new_run_id()}"
    dirs = _bundle_dirs(out, job)
    sharing.write_share_bundle([(padded, FRAC_BITS)], dirs,
                               program=PREDICT_PROGRAM, program_version=program_version(PREDICT_PROGRAM),
                               kind="predict", n=q, d=d1, n_classes=c, run_id=record["run_id"], job=job,
                               program_args=args, model_gen=model_generation(record), protocol=protocol)
    atomic_write_json(_pending_path(client, job), {"kind": "predict", "job": job, "q": q, "q_real": q_real,
                                                   "run_id": record["run_id"], "c": c, "threshold": float(threshold),
                                                   "score": reference.SCORE,
                                                   "info": info or {}, **_dealing(PREDICT_PROGRAM, args, protocol)})
    return Outgoing(job, "predict", dirs, args, protocol, PREDICT_PROGRAM)


@owner_only()
def share_refresh(client: Path, out: Path | Sequence[Path], *, protocol: str = DEFAULT_PROTOCOL) -> Outgoing:
    """A job with no data: both servers re-randomise their shares of the current model."""
    get_protocol(protocol)
    private_dir(client)
    record = load_model_record(client)
    d1, c = record["d"] + 1, len(record["classes"])
    job = f"refresh-{sharing.new_run_id()}"
    dirs = _bundle_dirs(out, job)
    sharing.write_share_bundle([], dirs, program=REFRESH_PROGRAM, program_version=program_version(REFRESH_PROGRAM),
                               kind="refresh", n=0, d=d1, n_classes=c, run_id=record["run_id"], job=job,
                               program_args=[str(d1), str(c)], model_gen=model_generation(record),
                               protocol=protocol)
    atomic_write_json(_pending_path(client, job), {"kind": "refresh", "job": job, "run_id": record["run_id"],
                                                   **_dealing(REFRESH_PROGRAM, [str(d1), str(c)], protocol)})
    return Outgoing(job, "refresh", dirs, [str(d1), str(c)], protocol, REFRESH_PROGRAM)


@owner_only()
def share_confirm(client: Path, out: Path | Sequence[Path]) -> Outgoing:
    """A confirmation ticket per server: the client now holds its current model generation.

    Each server, on its ticket, destroys every older generation of its model shares (see
    :func:`orchestration.server.job.confirm`). Send it after :func:`collect` of a training or a refresh;
    until a server gets it (or a job for the new generation) it keeps the previous generation too.
    """
    private_dir(client)
    record = load_model_record(client)
    gen = model_generation(record)
    job = f"confirm-{gen}"
    dirs = _bundle_dirs(out, job)
    for party, d in enumerate(dirs):
        atomic_write_json(Path(d) / CONFIRM_FILE, {"kind": "confirm", "party": party, "job": job,
                                                   "run_id": record["run_id"], "gen": gen})
    return Outgoing(job, "confirm", dirs, [])


def bucket_size(q: int) -> int:
    """Queries are padded to a power of two so few program sizes need compiling."""
    b = 1
    while b < q:
        b *= 2
    return b


def _receipt(folder: Path, party: int, job: str) -> dict[str, Any]:
    path = Path(folder) / "receipt.json"
    if not path.is_file():
        raise CollectError(f"server {party}'s result {path} missing (did `invoke party --id {party}` finish job {job}?)")
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CollectError(f"{path}: not valid JSON ({exc})") from None
    if r.get("job") != job or r.get("party") != party or r.get("status") != "ok":
        raise CollectError(f"{path}: receipt of job {r.get('job')!r} from server {r.get('party')!r} "
                           f"(status {r.get('status')!r}); expected job {job!r} from server {party}")
    return r


@dataclass
class Collected:
    job: str
    kind: str
    record: dict[str, Any]  # the model record after the job
    predictions: list[Prediction] | None = None
    info: dict[str, Any] | None = None


@owner_only()
def collect(client: Path, job: str, results: Sequence[Path]) -> Collected:
    """Read both servers' ``outputs/<job>/`` and finish the job at the client.

    train: the new model becomes current. refresh: the new share generation becomes current.
    predict: the output shares are reconstructed into predictions.
    """
    private_dir(client)
    pending = load_pending(client, job)
    kind = pending["kind"]
    receipts = [_receipt(results[i], i, job) for i in range(2)]
    if receipts[0].get("gen") != receipts[1].get("gen"):
        raise CollectError(f"job {job}: server 0 reports model generation {receipts[0].get('gen')}, server 1 "
                           f"{receipts[1].get('gen')}")
    preds = None
    if kind == "train":
        record = pending["record"]
        if receipts[0]["gen"] != record["run_id"]:
            raise CollectError(f"job {job}: servers trained {receipts[0]['gen']}, expected {record['run_id']}")
        atomic_write_json(model_record_path(client), record)
    elif kind == "refresh":
        record = load_model_record(client)
        if record["run_id"] != pending["run_id"]:
            raise CollectError(f"job {job} refreshed model {pending['run_id']}, the client now uses {record['run_id']}")
        record["gen"] = receipts[0]["gen"]
        record["refreshed"] = time.time()
        atomic_write_json(model_record_path(client), record)
    else:
        record = load_model_record(client)
        q, q_real, c = pending["q"], pending["q_real"], pending["c"]
        if pending.get("score") != reference.SCORE:
            raise CollectError(f"job {job} was sent out before the open-set score changed (its threshold is on the "
                               f"confidence 1/S, the servers now answer {reference.SCORE}): discard it and recognise again")
        shares = []
        for i, r in enumerate(receipts):
            f = Path(results[i]) / "shares.bin"
            if not f.is_file():
                raise CollectError(f"server {i}'s output shares {f} missing")
            blob = f.read_bytes()
            if len(blob) != 8 * 3 * q or sharing.sha256_bytes(blob) != r.get("sha256"):
                raise CollectError(f"{f}: {len(blob)} bytes, expected {8 * 3 * q} (best, S, z_max) matching its receipt "
                                   "(truncated or corrupted)")
            shares.append(np.frombuffer(blob, dtype="<u8").astype(np.uint64))
        total = sharing.reconstruct(shares[0], shares[1])
        best = total[:q].view(np.int64)[:q_real]
        denom = sharing.decode_fixed(total[q:2 * q])[:q_real]
        zmax = sharing.decode_fixed(total[2 * q:])[:q_real]
        if not answers_in_range(best, denom, zmax, c):
            raise ModelError(f"reconstructed outputs out of range (class 0..{c - 1}, softmax denominator 1..{c}, "
                             f"|top logit| < {ZMAX_BOUND:g}): the two servers' shares do not belong together, or "
                             "(about once in 10^8 answers) a local truncation wrapped; recognise again")
        preds = decide(best, denom, zmax, float(pending["threshold"]))
    _pending_path(client, job).unlink(missing_ok=True)
    return Collected(job, kind, record, preds, pending.get("info"))


@owner_only()
def discard(client: Path, job: str, bundles: Sequence[Path] = ()) -> None:
    """Forget a job that failed (the current model record is untouched)."""
    _pending_path(client, job).unlink(missing_ok=True)
    for b in bundles:
        shutil.rmtree(b, ignore_errors=True)
