"""Private training and recognition with both servers on this machine (local mode).

The client makes one share bundle per server (:mod:`orchestration.client.jobs`), each server checks it and runs
its party (:mod:`orchestration.server.job`), and the client collects the results: the same steps, and the same
files, as with two real hosts (``invoke party``), only launched together here. After a training
or a refresh the client confirms the new generation to both servers at once, and they destroy the
older ones (two hosts: ``invoke share-confirm`` and ``invoke confirm``).

Folder layout under ``var``::

    client/            plaintext side: names, model record, jobs waiting for results
    server0/, server1/ one folder per server (see :mod:`orchestration.server.job`), shares and sizes only
    build/             compiled programs shared by the local servers
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from preprocessing.fileio import atomic_write_json, destroy_tree, owner_only

from orchestration.mpspdz import certs
from orchestration.client import jobs as client
from orchestration.shared import reference
from orchestration.client.dealer import DealerRun, cleanup_dealer, prepare_dealer
from orchestration.client.jobs import UNKNOWN, Prediction  # noqa: F401  (re-exported)
from orchestration.mpspdz.hosts import write_hosts
from orchestration.mpspdz.launcher import RunResult, PartySpec, bind_shim, free_ports, run_parties
from orchestration.mpspdz.toolchain import DEFAULT_PROTOCOL, MPSPDZ, compile_program, protocol as get_protocol
from orchestration.shared.model import PREDICT_PROGRAM, REFRESH_PROGRAM, TRAIN_PROGRAM, ModelError  # noqa: F401
from orchestration.server.job import (  # noqa: F401  (re-exported; local mode runs both servers here)
    Server,
    check_bundle as _check_bundle,
    cleanup_job,
    confirm_generation,
    finish_job,
    prepare_job,
    read_shares as _read_shares,
)

logger = logging.getLogger(__name__)

__all__ = ["Layout", "ModelError", "Prediction", "PredictReport", "TrainReport", "UNKNOWN", "PREDICT_PROGRAM",
           "REFRESH_PROGRAM", "TRAIN_PROGRAM", "_check_bundle", "_read_shares", "bucket_size", "confirm_local",
           "ensure_local_certs", "load_client_model", "predict_private", "refresh_private", "run_local",
           "train_private"]


@dataclass(frozen=True)
class Layout:
    root: Path
    protocol: str = DEFAULT_PROTOCOL  # how the servers compute unless a call says otherwise (mpspdz.protocol)

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

    def servers(self) -> list[Server]:
        return [Server(self.server(i), i, self.build) for i in range(2)]


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
class PredictReport:
    predictions: list[Prediction]
    run: RunResult
    compile_seconds: float
    batch: int
    extra: dict[str, Any] = field(default_factory=dict)


def ensure_local_certs(layout: Layout, n_parties: int = 2) -> None:
    """Local mode: make the parties' keys and exchange certificates on first use.

    The servers' pair only when neither server has a certs folder yet; a half-configured pair is an
    error that the run reports (see :func:`certs.check_party_certs`). With ``n_parties=3`` (dealer
    mode) the client's key too, on first use of that mode, and its certificate goes to both servers.
    """
    dirs = [layout.server(0), layout.server(1)] + ([layout.client] if n_parties == 3 else [])
    if not any(certs.cert_dir(layout.server(i)).exists() for i in range(2)):
        certs.make_local_pair(dirs)
        logger.info("made TLS keys and certificates for the local parties in %s", layout.root)
        return
    if n_parties == 3 and not certs.cert_dir(layout.client).exists():
        mine = certs.make_party_cert(layout.client, 2)
        for i in range(2):
            theirs = certs.cert_dir(layout.server(i)) / f"P{i}.pem"
            if theirs.is_file():
                certs.import_peer_cert(layout.client, 2, theirs)
            if certs.cert_dir(layout.server(i)).is_dir():  # this machine's client was just keyed: it replaces
                certs.import_peer_cert(layout.server(i), i, mine.path, replace=True)  # any older P2 pin
        logger.info("made the client's dealer key and certificate in %s", certs.cert_dir(layout.client))


@owner_only()
def run_local(
    mp: MPSPDZ,
    layout: Layout,
    out: client.Outgoing,
    *,
    host: str = "127.0.0.1",
    timeout: float = 1800.0,
    encrypted: bool = True,
    on_line: Callable[[int, str], None] | None = None,
    on_spawn: Callable[[list], None] | None = None,
) -> tuple[RunResult, list[Path]]:
    """Both servers (and in the dealer mode the client's dealer) run the job ``out`` here.

    Returns the run and each server's output folder."""
    servers = layout.servers()
    proto = get_protocol(out.protocol)
    logger.info("job %s: protocol %s (%s)", out.job, proto.name, proto.summary)
    if encrypted or proto.always_tls:
        ensure_local_certs(layout, proto.n_parties)
    preps = []
    deal: DealerRun | None = None
    try:
        for i in range(2):
            preps.append(prepare_job(mp, servers[i], out.bundles[i], encrypted=encrypted))
        if proto.dealer is not None:
            deal = prepare_dealer(mp, layout.client, layout.build, out.job)
        base = free_ports(host, proto.n_parties)
        hosts_file = write_hosts(preps[0].rundir / "hosts", [(host, base + k) for k in range(proto.n_parties)])
        shim = bind_shim(layout.build)
        dirs = [(p.rundir, p.log) for p in preps] + ([(deal.rundir, deal.log)] if deal else [])
        specs = [PartySpec(i, d, log, hosts_file[i].address, hosts_file[i].port) for i, (d, log) in enumerate(dirs)]
        result = run_parties(mp, preps[0].program, specs, hosts_file.path, encrypted=encrypted, shim=shim,
                             timeout=timeout, on_line=on_line, on_spawn=on_spawn, proto=proto)
        outs = [finish_job(preps[i], result.parties[i]) for i in range(2)]
    except BaseException:
        client.discard(layout.client, out.job)
        raise
    finally:
        for p in preps:
            cleanup_job(p)
        if deal is not None:
            cleanup_dealer(deal)
        for b in out.bundles:
            destroy_tree(b)
    return result, outs


@owner_only()
def train_private(
    mp: MPSPDZ,
    layout: Layout,
    embeddings: np.ndarray,
    labels: Sequence[str],
    params: reference.TrainParams,
    *,
    host: str = "127.0.0.1",
    timeout: float = 1800.0,
    encrypted: bool = True,
    on_line: Callable[[int, str], None] | None = None,
    on_spawn: Callable[[list], None] | None = None,
    meta: dict[str, Any] | None = None,
    protocol: str | None = None,
) -> TrainReport:
    """Share ``embeddings``/``labels``, train under MPC, keep model shares per server.

    ``meta`` (e.g. the embedder used) is kept in the client's model record.
    """
    protocol = protocol or layout.protocol
    t0 = time.monotonic()
    out = client.share_train(layout.client, embeddings, labels, params,
                             _inputs(layout), meta=meta, protocol=protocol)
    share_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    compile_program(mp, TRAIN_PROGRAM, out.program_args, layout.build, proto=get_protocol(protocol))
    compile_seconds = time.monotonic() - t0
    result, outs = run_local(mp, layout, out, host=host, timeout=timeout, encrypted=encrypted, on_line=on_line,
                             on_spawn=on_spawn)
    done = client.collect(layout.client, out.job, outs)
    _drop_outputs(outs)
    confirm_local(layout, done.record)
    record = done.record
    record.update(train_seconds=result.wall_seconds, train_data_mb=result.data_sent_mb)
    atomic_write_json(layout.client_model, record)
    choice = reference.ThresholdChoice(**record["threshold_choice"])
    logger.info("trained %d classes on %d faces in %.1f s, %.1f MB sent", len(record["classes"]), record["n"],
                result.wall_seconds, result.data_sent_mb)
    return TrainReport(record["run_id"], record["classes"], record["n"], params, compile_seconds, result,
                       share_seconds, choice)


def _inputs(layout: Layout) -> list[Path]:
    """Local mode: each server's bundle lands in its own ``inputs/<job>``."""
    return [layout.server(i) / "inputs" / "{job}" for i in range(2)]


def _drop_outputs(outs: Sequence[Path]) -> None:
    for o in outs:
        destroy_tree(o)


@owner_only()
def confirm_local(layout: Layout, record: dict[str, Any]) -> list[list[str]]:
    """Local mode: the client holds ``record``'s generation now; each server destroys the older ones.

    (Two hosts: ``invoke share-confirm``, then ``invoke confirm`` on each server.) Returns what each destroyed."""
    gen = client.model_generation(record)
    return [confirm_generation(s, gen, record["run_id"]) for s in layout.servers()]


def load_client_model(layout: Layout) -> dict[str, Any]:
    return client.load_model_record(layout.client)


bucket_size = client.bucket_size


@owner_only()
def predict_private(
    mp: MPSPDZ,
    layout: Layout,
    embeddings: np.ndarray,
    threshold: float,
    *,
    host: str = "127.0.0.1",
    timeout: float = 600.0,
    encrypted: bool = True,
    on_line: Callable[[int, str], None] | None = None,
    on_spawn: Callable[[list], None] | None = None,
    protocol: str | None = None,
) -> PredictReport:
    """Recognise a batch of embeddings under MPC; per face the class index (or UNKNOWN where the top logit z_max is
    below ``threshold``), the confidence 1/S and the score z_max."""
    protocol = protocol or layout.protocol
    out = client.share_predict(layout.client, embeddings, threshold,
                               _inputs(layout), protocol=protocol)
    t0 = time.monotonic()
    compile_program(mp, PREDICT_PROGRAM, out.program_args, layout.build, proto=get_protocol(protocol))
    compile_seconds = time.monotonic() - t0
    result, outs = run_local(mp, layout, out, host=host, timeout=timeout, encrypted=encrypted, on_line=on_line,
                             on_spawn=on_spawn)
    done = client.collect(layout.client, out.job, outs)
    _drop_outputs(outs)
    assert done.predictions is not None
    return PredictReport(done.predictions, result, compile_seconds, int(out.program_args[0]))


@owner_only()
def refresh_private(
    mp: MPSPDZ,
    layout: Layout,
    *,
    host: str = "127.0.0.1",
    timeout: float = 600.0,
    encrypted: bool = True,
    on_spawn: Callable[[list], None] | None = None,
    protocol: str | None = None,
) -> tuple[str, RunResult]:
    """Re-randomise both servers' model shares (a fresh sharing of zero); returns the new generation."""
    protocol = protocol or layout.protocol
    out = client.share_refresh(layout.client, _inputs(layout), protocol=protocol)
    result, outs = run_local(mp, layout, out, host=host, timeout=timeout, encrypted=encrypted, on_spawn=on_spawn)
    done = client.collect(layout.client, out.job, outs)
    _drop_outputs(outs)
    confirm_local(layout, done.record)
    return done.record["gen"], result
