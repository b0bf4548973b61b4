"""Private training and recognition: client shares in, two servers compute, client reconstructs.

Folder layout under ``var`` (as it would be on three separate machines)::

    client/            plaintext side: names, model record, reconstructed results
    server0/, server1/ one folder per server, shares and sizes only:
        inputs/<job>/      Input-Binary-P<i>-0 + manifest.json (a share bundle from the client)
        model -> model-<run>/   current model shares (symlink, swapped atomically)
        model-<run>/       Transactions-P<i>.data + manifest.json
        outputs/<job>.bin  output shares for the client + <job>.json manifest
        logs/              MP-SPDZ output of each run
        run-<job>/         scratch working directory of one protocol run (removed afterwards)
    build/             compiled programs (Programs/Bytecode, Programs/Schedules)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from preprocessing import sharing
from preprocessing.sharing import FRAC_BITS, ShareManifest, atomic_write_json

from . import reference
from .launcher import RunResult, run_parties
from .mpspdz import MPSPDZ, MPSPDZError, compile_program, program_version

logger = logging.getLogger(__name__)

TRAIN_PROGRAM = "face_train"
PREDICT_PROGRAM = "face_predict"
UNKNOWN = -1


class ModelError(MPSPDZError):
    """No model, or the servers' model shares do not match the client's record."""


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def client(self) -> Path:
        return self.root / "client"

    @property
    def build(self) -> Path:
        return self.root / "build"

    def server(self, i: int) -> Path:
        return self.root / f"server{i}"

    def model_dir(self, i: int) -> Path:
        return self.server(i) / "model"

    @property
    def client_model(self) -> Path:
        return self.client / "model.json"


@dataclass
class TrainReport:
    run_id: str
    classes: list[str]
    n: int
    params: reference.TrainParams
    compile_seconds: float
    run: RunResult
    share_seconds: float
    threshold: reference.ThresholdChoice


@dataclass
class Prediction:
    label: int  # class index, or UNKNOWN when the protocol decided confidence < threshold
    confidence: float  # softmax probability of the best class
    best: int  # best class index whatever the decision (the client's own query: it may know)


@dataclass
class PredictReport:
    predictions: list[Prediction]
    run: RunResult
    compile_seconds: float
    batch: int
    extra: dict[str, Any] = field(default_factory=dict)


def _header_length(path: Path) -> int:
    """Length of MP-SPDZ's persistence file signature (8-byte length + specification)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
    if len(raw) < 8:
        raise ModelError(f"{path}: truncated persistence file (no header)")
    return 8 + int.from_bytes(raw, "little")


def _read_shares(path: Path, start: int, count: int) -> np.ndarray:
    """Read ``count`` 64-bit shares at share position ``start`` of a persistence file."""
    head = _header_length(path)
    size = path.stat().st_size
    need = head + 8 * (start + count)
    if size < need:
        raise ModelError(f"{path}: holds {(size - head) // 8} shares, expected at least {start + count} (truncated?)")
    with open(path, "rb") as fh:
        fh.seek(head + 8 * start)
        return np.frombuffer(fh.read(8 * count), dtype="<u8").astype(np.uint64)


def _prepare_rundir(layout: Layout, i: int, job: str, bundle: Path, model_file: Path | None) -> Path:
    run = layout.server(i) / f"run-{job}"
    if run.exists():
        shutil.rmtree(run)
    (run / "Player-Data").mkdir(parents=True)
    (run / "Persistence").mkdir()
    os.symlink(layout.build.resolve() / "Programs", run / "Programs")
    shutil.copyfile(bundle / f"Input-Binary-P{i}-0", run / "Player-Data" / f"Input-Binary-P{i}-0")
    if model_file is not None:
        shutil.copyfile(model_file, run / "Persistence" / f"Transactions-P{i}.data")
    return run


def _check_bundle(bundle: Path, i: int, expect: dict[str, Any]) -> ShareManifest:
    """The runner's check of a share bundle before the protocol starts."""
    m = ShareManifest.load(bundle / "manifest.json")
    data = bundle / m.file
    if not data.exists():
        raise sharing.SharingError(f"{data}: share file missing")
    size = data.stat().st_size
    if size != 8 * m.n_values:
        raise sharing.SharingError(f"{data}: {size} bytes, manifest says {8 * m.n_values} (truncated or wrong file)")
    if sharing.sha256_bytes(data.read_bytes()) != m.sha256:
        raise sharing.SharingError(f"{data}: checksum differs from {bundle / 'manifest.json'} (corrupted or swapped)")
    for key, value in expect.items():
        if getattr(m, key) != value:
            raise sharing.SharingError(f"{bundle / 'manifest.json'}: {key} is {getattr(m, key)!r}, expected {value!r}")
    if m.party != i:
        raise sharing.SharingError(f"{bundle}: bundle is for server {m.party}, not server {i}")
    return m


def _server_model(layout: Layout, i: int) -> tuple[Path, dict[str, Any]]:
    mdir = layout.model_dir(i)
    manifest = mdir / "manifest.json"
    if not manifest.exists():
        raise ModelError(f"server {i} has no model ({manifest} missing): run `invoke train` first")
    meta = json.loads(manifest.read_text())
    data = mdir / f"Transactions-P{i}.data"
    if not data.exists():
        raise ModelError(f"server {i}: model shares {data} missing")
    _read_shares(data, 0, meta["d1"] * meta["c"])  # size check
    return data, meta


def _swap_model(layout: Layout, i: int, run_id: str, persistence: Path, meta: dict[str, Any]) -> None:
    """Install new model shares beside the old ones, then repoint ``model`` atomically."""
    server = layout.server(i)
    new_dir = server / f"model-{run_id}"
    if new_dir.exists():
        shutil.rmtree(new_dir)
    tmp_dir = server / f".model-{run_id}.tmp"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    shutil.copyfile(persistence, tmp_dir / f"Transactions-P{i}.data")
    atomic_write_json(tmp_dir / "manifest.json", meta)
    os.replace(tmp_dir, new_dir)
    link = server / "model"
    old = link.resolve() if link.is_symlink() else None
    tmp_link = server / ".model.link"
    tmp_link.unlink(missing_ok=True)
    os.symlink(new_dir.name, tmp_link)
    os.replace(tmp_link, link)
    if old is not None and old != new_dir.resolve() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def train_private(
    mp: MPSPDZ,
    layout: Layout,
    embeddings: np.ndarray,
    labels: Sequence[str],
    params: reference.TrainParams,
    *,
    host: str = "127.0.0.1",
    timeout: float = 1800.0,
    on_line: Callable[[int, str], None] | None = None,
    on_spawn: Callable[[list], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> TrainReport:
    """Share ``embeddings``/``labels``, train under MPC, keep model shares per server.

    ``meta`` (e.g. the embedder used) is kept in the client's model record.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (n, d) array, got shape {x.shape}")
    if len(labels) != x.shape[0]:
        raise ValueError(f"{len(labels)} labels for {x.shape[0]} embeddings")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"need at least 2 people to train a classifier, got {len(classes)}: {classes}")
    index = {name: k for k, name in enumerate(classes)}
    order = reference.training_order(len(x), params.seed)
    x = x[order]
    y_idx = np.array([index[name] for name in labels])[order]
    n, d = x.shape
    c = len(classes)
    x1 = reference.with_bias(x)
    y = np.zeros((n, c), dtype=np.int64)
    y[np.arange(n), y_idx] = 1
    args = params.program_args(n, d + 1, c)

    t0 = time.monotonic()
    full = compile_program(mp, TRAIN_PROGRAM, args, layout.build)
    compile_seconds = time.monotonic() - t0

    run_id = sharing.new_run_id()
    job = f"train-{run_id}"
    t0 = time.monotonic()
    bundles = tuple(layout.server(i) / "inputs" / job for i in range(2))
    version = program_version(TRAIN_PROGRAM)
    sharing.write_share_bundle([(x1, FRAC_BITS), (y, 0)], bundles, program=TRAIN_PROGRAM,
                               program_version=version, kind="train", n=n, d=d + 1, n_classes=c, run_id=run_id)
    share_seconds = time.monotonic() - t0
    expect = {"program": TRAIN_PROGRAM, "program_version": version, "n": n, "d": d + 1, "n_classes": c,
              "frac_bits": FRAC_BITS, "kind": "train"}
    for i in range(2):
        _check_bundle(bundles[i], i, expect)
    rundirs = [_prepare_rundir(layout, i, job, bundles[i], None) for i in range(2)]
    logs = [layout.server(i) / "logs" / f"{job}.log" for i in range(2)]
    try:
        result = run_parties(mp, full, rundirs, logs, host=host, timeout=timeout, on_line=on_line,
                             on_spawn=on_spawn)
        server_meta = {"run_id": run_id, "d1": d + 1, "c": c, "n": n, "frac_bits": FRAC_BITS,
                "program": TRAIN_PROGRAM, "program_version": version, "created": time.time()}
        for i in range(2):
            pers = rundirs[i] / "Persistence" / f"Transactions-P{i}.data"
            _read_shares(pers, 0, (d + 1) * c)
        for i in range(2):
            _swap_model(layout, i, run_id, rundirs[i] / "Persistence" / f"Transactions-P{i}.data", server_meta)
    finally:
        for r in rundirs:
            shutil.rmtree(r, ignore_errors=True)
        for b in bundles:
            shutil.rmtree(b, ignore_errors=True)
    choice = reference.choose_threshold(x, y_idx, c, params)  # client side, plaintext, enrollment data only
    record = {"run_id": run_id, "classes": classes, "d": d, "n": n, "params": params.__dict__,
              "created": time.time(), "train_seconds": result.wall_seconds, "train_data_mb": result.data_sent_mb,
              "threshold": choice.threshold, "threshold_choice": choice.__dict__, **(meta or {})}
    atomic_write_json(layout.client_model, record)
    logger.info("trained %d classes on %d faces in %.1f s, %.1f MB sent", c, n, result.wall_seconds,
                result.data_sent_mb)
    return TrainReport(run_id, classes, n, params, compile_seconds, result, share_seconds, choice)


def load_client_model(layout: Layout) -> dict[str, Any]:
    if not layout.client_model.exists():
        raise ModelError(f"no trained model ({layout.client_model} missing): run `invoke train` first")
    return json.loads(layout.client_model.read_text())


def bucket_size(q: int) -> int:
    """Queries are padded to a power of two so few program sizes need compiling."""
    b = 1
    while b < q:
        b *= 2
    return b


def predict_private(
    mp: MPSPDZ,
    layout: Layout,
    embeddings: np.ndarray,
    threshold: float,
    *,
    host: str = "127.0.0.1",
    timeout: float = 600.0,
    on_line: Callable[[int, str], None] | None = None,
    on_spawn: Callable[[list], None] | None = None,
) -> PredictReport:
    """Recognise a batch of embeddings under MPC; returns class index (or UNKNOWN) and confidence."""
    record = load_client_model(layout)
    q_real = len(embeddings)
    x = np.asarray(embeddings, dtype=np.float64).reshape(q_real, -1)
    if q_real == 0:
        raise ValueError("no embeddings to recognise")
    if x.shape[1] != record["d"]:
        raise ValueError(f"embeddings have dimension {x.shape[1]}, the model expects {record['d']}")
    models = [_server_model(layout, i) for i in range(2)]
    d1, c = record["d"] + 1, len(record["classes"])
    for i, (_, meta) in enumerate(models):
        if meta["run_id"] != record["run_id"] or meta["d1"] != d1 or meta["c"] != c:
            raise ModelError(f"server {i} holds model {meta['run_id']} ({meta['d1']}x{meta['c']}), the client expects "
                             f"{record['run_id']} ({d1}x{c}): retrain with `invoke train`")
    exp_bits = int(record["params"]["exp_bits"])
    q = bucket_size(q_real)
    padded = np.zeros((q, d1))
    padded[:q_real] = reference.with_bias(x)
    args = [str(q), str(d1), str(c), str(exp_bits)]
    t0 = time.monotonic()
    full = compile_program(mp, PREDICT_PROGRAM, args, layout.build)
    compile_seconds = time.monotonic() - t0

    job = f"predict-{sharing.new_run_id()}"
    bundles = tuple(layout.server(i) / "inputs" / job for i in range(2))
    version = program_version(PREDICT_PROGRAM)
    sharing.write_share_bundle([(np.array([[threshold]]), FRAC_BITS), (padded, FRAC_BITS)], bundles,
                               program=PREDICT_PROGRAM, program_version=version, kind="predict",
                               n=q, d=d1, n_classes=c, run_id=record["run_id"])
    expect = {"program": PREDICT_PROGRAM, "program_version": version, "n": q, "d": d1, "n_classes": c,
              "run_id": record["run_id"], "kind": "predict"}
    for i in range(2):
        _check_bundle(bundles[i], i, expect)
    rundirs = [_prepare_rundir(layout, i, job, bundles[i], models[i][0]) for i in range(2)]
    logs = [layout.server(i) / "logs" / f"{job}.log" for i in range(2)]
    out_shares = []
    try:
        result = run_parties(mp, full, rundirs, logs, host=host, timeout=timeout, on_line=on_line,
                             on_spawn=on_spawn)
        for i in range(2):
            pers = rundirs[i] / "Persistence" / f"Transactions-P{i}.data"
            shares = _read_shares(pers, d1 * c, 3 * q)
            out = layout.server(i) / "outputs" / f"{job}.bin"
            sharing.atomic_write_bytes(out, shares.astype("<u8").tobytes())
            atomic_write_json(out.with_suffix(".json"), {"job": job, "q": q, "values": ["best", "known", "confidence"],
                                                         "frac_bits": FRAC_BITS, "run_id": record["run_id"]})
            out_shares.append(shares)
    finally:
        for r in rundirs:
            shutil.rmtree(r, ignore_errors=True)
        for b in bundles:
            shutil.rmtree(b, ignore_errors=True)
    total = sharing.reconstruct(out_shares[0], out_shares[1])
    best = total[:q].view(np.int64)
    known = total[q:2 * q].view(np.int64)
    conf = sharing.decode_fixed(total[2 * q:])
    if not (np.all((best[:q_real] >= 0) & (best[:q_real] < c)) and np.all(np.isin(known[:q_real], (0, 1)))):
        raise ModelError(f"reconstructed outputs out of range (class 0..{c - 1}, decision 0/1): the two servers' "
                         "shares do not belong together")
    preds = [Prediction(int(best[k]) if known[k] else UNKNOWN, float(conf[k]), int(best[k])) for k in range(q_real)]
    return PredictReport(preds, result, compile_seconds, q)
