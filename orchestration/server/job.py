"""One server's side of a job: check what arrived, run its MP-SPDZ party, keep or send the result.

A server only ever holds shares, sizes and its own key. Its folder::

    certs/               P<i>.key, P<i>.pem (its own), P<j>.pem (the other server's)
    inputs/<job>/        a share bundle from the client (local mode; a remote client's bundle can be anywhere)
    models/<gen>/        model shares Transactions-P<i>.data + manifest.json, one folder per generation
    model -> models/<gen>  the newest generation (symlink, swapped atomically)
    outputs/<job>/       receipt.json (+ shares.bin for recognition): all that goes back to the client
    logs/<job>.log       MP-SPDZ's output
    jobs-done            ids of the jobs this server completed: a bundle runs once, a replay is refused
    run-<job>/           scratch working directory of one protocol run (destroyed afterwards)
    build/               compiled programs (when the server compiles for itself)

Everything in it is owner-only (folders 0700, files 0600).

A generation is a training run or a share refresh. New shares are written aside and the link is
swapped only after the protocol succeeded, so a failed run leaves the last good model in place.
The older generations stay until the client confirms the new one, because a job can succeed on
one server and fail on the other: the client adopts a generation only when both servers
reported it, and until then it still holds the previous one. The client confirms generation G
explicitly (:func:`confirm`, ``invoke confirm``; local mode does it at once), or implicitly by
sending a job for G. Then every generation older than G is destroyed: its files overwritten,
then unlinked. This is what makes a refresh useful: a server that kept both its old and its new
share would hold the sharing of zero (-S, +S) of the refresh, and with it its old share would
combine with the other server's new one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing import sharing
from preprocessing.fileio import (atomic_write_bytes, atomic_write_json, copy_private, destroy_tree, open_private,
                                  owner_only, private_dir)
from preprocessing.sharing import FRAC_BITS, RING_BITS, ShareManifest, SharingError

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.launcher import PartyResult
from orchestration.mpspdz.toolchain import PROTOCOLS, MPSPDZ, Protocol, compile_program, program_version, programs_dir
from orchestration.shared.model import (  # noqa: F401  (PREDICT_PROGRAM, ModelError: imported from here too)
    CONFIRM_FILE, PREDICT_PROGRAM, PROGRAMS, REFRESH_PROGRAM, TRAIN_PROGRAM, ModelError)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Server:
    root: Path
    party: int
    build: Path | None = None  # compiled programs; default <root>/build

    @property
    def build_dir(self) -> Path:
        return self.build or self.root / "build"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def current(self) -> Path:
        return self.root / "model"

    def model_file(self, gen_dir: Path) -> Path:
        return gen_dir / f"Transactions-P{self.party}.data"


# ---- persistence files -------------------------------------------------------------------------

def header_length(path: Path) -> int:
    """Length of MP-SPDZ's persistence file signature (8-byte length + specification)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
    if len(raw) < 8:
        raise ModelError(f"{path}: truncated persistence file (no header)")
    return 8 + int.from_bytes(raw, "little")


def read_shares(path: Path, start: int, count: int) -> np.ndarray:
    """Read ``count`` 64-bit shares at share position ``start`` of a persistence file."""
    head = header_length(path)
    size = path.stat().st_size
    need = head + 8 * (start + count)
    if size < need:
        raise ModelError(f"{path}: holds {(size - head) // 8} shares, expected at least {start + count} (truncated?)")
    with open(path, "rb") as fh:
        fh.seek(head + 8 * start)
        return np.frombuffer(fh.read(8 * count), dtype="<u8").astype(np.uint64)


def write_model_file(path: Path, header_from: Path, shares: np.ndarray) -> None:
    """A persistence file with ``header_from``'s header and ``shares`` as its content."""
    head = header_length(header_from)
    with open(header_from, "rb") as fh:
        header = fh.read(head)
    atomic_write_bytes(path, header + np.asarray(shares, dtype="<u8").tobytes())


# ---- checks before any protocol run ------------------------------------------------------------

#: what an id from a manifest may look like where it becomes a file or folder name on the server
#: (``outputs/<job>``, ``logs/<job>.log``, ``run-<job>``, ``models/<run_id>``, ``models/<model_gen>``)
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def plain_id(value: Any, key: str, where: Path) -> str:
    """``value`` if it is a plain name (no path, not ``.``/``..``); else a :class:`SharingError` naming ``where``."""
    if not isinstance(value, str) or not _PLAIN_ID.fullmatch(value):
        raise SharingError(f"{where}: {key} {value!r} must be a plain name: 1-128 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit (no '/', not '.' or '..')")
    return value


def bundle_file(bundle: Path, name: Any, where: Path) -> Path:
    """The file ``name`` of a manifest, which must be a plain file name inside ``bundle``.

    Checked on the name alone, before anything is opened: no absolute path, no separator, not
    ``.``/``..``; and a symlink must stay inside the bundle folder."""
    what = (f"{where}: file {name!r} must be the plain name of a file in the bundle folder {bundle} "
            "(no absolute path, no '/', not '.' or '..')")
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name)):
        raise SharingError(what)
    path = bundle / name
    if path.is_symlink() and path.resolve().parent != bundle.resolve():
        raise SharingError(f"{what}; it is a symlink to {os.readlink(path)}")
    return path


def check_bundle(bundle: Path, party: int, expect: dict[str, Any] | None = None) -> ShareManifest:
    """This server's check of a client's bundle: integrity, sizes, and that it is for us.

    Every name the manifest gives is checked before any file it names is opened: the share file
    must be a file of the bundle folder, and the ids that become folder names are plain names."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise SharingError(f"{bundle}: no such job folder (expected manifest.json and Input-Binary-P{party}-0)")
    mf = bundle / "manifest.json"
    m = ShareManifest.load(mf)
    if m.job:  # a job needs one to run (prepare_job); the bundle's own checks do not
        plain_id(m.job, "job", mf)
    plain_id(m.run_id, "run_id", mf)
    if m.model_gen or m.kind != "train":  # a training job starts a model: it names no generation
        plain_id(m.model_gen, "model_gen", mf)
    data = bundle_file(bundle, m.file, mf) if m.n_values else None
    if m.party != party:
        raise SharingError(f"{bundle}: bundle is for server {m.party}, not server {party}")
    if m.kind not in PROGRAMS or m.program != PROGRAMS[m.kind]:
        raise SharingError(f"{bundle / 'manifest.json'}: kind {m.kind!r} / program {m.program!r}; expected one of "
                           + ", ".join(f"{k} ({v})" for k, v in PROGRAMS.items()))
    if m.protocol not in PROTOCOLS:
        raise SharingError(f"{bundle / 'manifest.json'}: protocol {m.protocol!r} is not one of: {', '.join(PROTOCOLS)}")
    if m.frac_bits != FRAC_BITS or m.ring_bits != RING_BITS:
        raise SharingError(f"{bundle / 'manifest.json'}: fixed point f={m.frac_bits} in Z_2^{m.ring_bits}, "
                           f"this server uses f={FRAC_BITS} in Z_2^{RING_BITS}")
    if data is not None:
        if not data.is_file():
            raise SharingError(f"{data}: share file missing")
        size = data.stat().st_size
        if size != 8 * m.n_values:
            raise SharingError(f"{data}: {size} bytes, manifest says {8 * m.n_values} (truncated or wrong file)")
        if sharing.sha256_bytes(data.read_bytes()) != m.sha256:
            raise SharingError(f"{data}: checksum differs from {bundle / 'manifest.json'} (corrupted or swapped)")
    for key, value in (expect or {}).items():
        if getattr(m, key) != value:
            raise SharingError(f"{bundle / 'manifest.json'}: {key} is {getattr(m, key)!r}, expected {value!r}")
    return m


def _check_args(m: ShareManifest, bundle: Path) -> list[str]:
    args = [str(a) for a in m.program_args]
    want = {"train": ([m.n, m.d, m.n_classes], 7), "predict": ([m.n, m.d, m.n_classes], 4),
            "refresh": ([m.d, m.n_classes], 2)}[m.kind]
    sizes, count = want
    if len(args) != count or args[:len(sizes)] != [str(v) for v in sizes]:
        raise SharingError(f"{bundle / 'manifest.json'}: program arguments {args} do not match the sizes "
                           f"n={m.n} d={m.d} c={m.n_classes} of a {m.kind} job")
    for a in args:
        try:
            float(a)
        except ValueError:
            raise SharingError(f"{bundle / 'manifest.json'}: program argument {a!r} is not a number") from None
    return args


def model_generations(server: Server) -> dict[str, dict[str, Any]]:
    """The generations this server holds, oldest first: {name: manifest}."""
    out = {}
    if server.models.is_dir():
        for d in sorted(server.models.iterdir()):
            mf = d / "manifest.json"
            if d.is_dir() and not d.name.startswith(".") and mf.is_file():
                try:
                    out[d.name] = json.loads(mf.read_text())
                except json.JSONDecodeError:
                    continue
    return dict(sorted(out.items(), key=lambda kv: _age(kv[1])))


def _age(meta: dict[str, Any]) -> tuple[int, float]:
    """Sort key of a generation: this server's install counter, then its time (older versions had no counter)."""
    return int(meta.get("seq", 0)), float(meta.get("created", 0))


def jobs_done(server: Server) -> set[str]:
    """The jobs this server has completed (a bundle is refused a second time)."""
    try:
        return set((server.root / "jobs-done").read_text().split())
    except FileNotFoundError:
        return set()


def current_generation(server: Server) -> str | None:
    link = server.current
    return Path(os.readlink(link)).name if link.is_symlink() else None


def find_model(server: Server, gen: str, run_id: str, d1: int, c: int) -> tuple[Path, dict[str, Any]]:
    """The model shares of generation ``gen``, checked against what the job expects."""
    i = server.party
    gdir = server.models / gen
    manifest = gdir / "manifest.json"
    if not manifest.is_file():
        held = model_generations(server)
        if not held:
            raise ModelError(f"server {i} has no model ({server.models} is empty): run `invoke train` first")
        cur = current_generation(server)
        listing = ", ".join(f"{g}{' (current)' if g == cur else ''} from run {m.get('run_id')}" for g, m in held.items())
        raise ModelError(f"server {i} does not hold model generation {gen} of run {run_id}; it holds {listing}. "
                         "The two servers' model shares come from different runs: retrain with `invoke train`")
    meta = json.loads(manifest.read_text())
    if meta.get("run_id") != run_id or meta.get("d1") != d1 or meta.get("c") != c:
        raise ModelError(f"server {i}: model generation {gen} is from run {meta.get('run_id')} "
                         f"({meta.get('d1')}x{meta.get('c')}), the job expects run {run_id} ({d1}x{c}): "
                         "retrain with `invoke train`")
    data = server.model_file(gdir)
    if not data.is_file():
        raise ModelError(f"server {i}: model shares {data} missing")
    read_shares(data, 0, d1 * c)  # size check: a truncated file fails here, before the protocol
    return data, meta


# ---- one job -----------------------------------------------------------------------------------

@dataclass
class PreparedJob:
    server: Server
    manifest: ShareManifest
    program: str  # compiled program name
    rundir: Path
    log: Path
    proto: Protocol
    model_meta: dict[str, Any] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)  # refresh, server 0: its random input

    @property
    def job(self) -> str:
        return self.manifest.job

    @property
    def kind(self) -> str:
        return self.manifest.kind


@owner_only()
def prepare_job(mp: MPSPDZ, server: Server, bundle: Path, *, encrypted: bool = True,
                expect: dict[str, Any] | None = None) -> PreparedJob:
    """Every check that can fail before the protocol starts, then the run's working directory."""
    i = server.party
    private_dir(server.root)
    m = check_bundle(bundle, i, expect)
    if not m.job:
        raise SharingError(f"{bundle / 'manifest.json'}: no job id (the client names every job it sends)")
    if m.program_version != program_version(m.program):
        raise SharingError(f"{bundle}: made for another version of {m.program}.mpc ({m.program_version}, this "
                           f"server has {program_version(m.program)}); client and servers must run the same release")
    if m.job in jobs_done(server):
        raise SharingError(f"{bundle}: job {m.job} already ran on server {i} ({server.root / 'jobs-done'}); a bundle "
                           "is used once: the client makes a new job for a new run")
    args = _check_args(m, bundle)
    model_path, model_meta = None, None
    if m.kind in ("predict", "refresh"):
        model_path, model_meta = find_model(server, m.model_gen, m.run_id, m.d, m.n_classes)
        # the client holds m.model_gen (it adopts a generation only once both servers reported it):
        # every older generation is useless now, and kept it would combine with the other's newer share
        confirm_generation(server, m.model_gen, m.run_id)
    proto = PROTOCOLS[m.protocol]
    tls = encrypted or proto.always_tls
    party_certs = certs_mod.check_party_certs(server.root, i, proto.n_parties) if tls else None
    full = compile_program(mp, m.program, args, server.build_dir, proto=proto)

    run = server.root / f"run-{m.job}"
    destroy_tree(run)
    (run / "Player-Data").mkdir(parents=True)
    (run / "Persistence").mkdir()
    os.symlink(programs_dir(server.build_dir.resolve(), proto), run / "Programs")
    if m.n_values:
        copy_private(bundle_file(Path(bundle), m.file, Path(bundle) / "manifest.json"),
                     run / "Player-Data" / f"Input-Binary-P{i}-0")
    mask = None
    if m.kind == "refresh" and i == 0:
        # server 0's secret input: fresh randomness, removed from its own share after the run
        mask = sharing.random_ring(m.d * m.n_classes)
        with open_private(run / "Player-Data" / "Input-Binary-P0-0", "wb") as fh:
            fh.write(mask.astype("<u8").tobytes())
    if model_path is not None:
        copy_private(model_path, run / "Persistence" / f"Transactions-P{i}.data")
    if party_certs is not None:
        certs_mod.install_for_run(party_certs, run / "Player-Data")
    log = server.logs / f"{m.job}.log"
    return PreparedJob(server, m, full, run, log, proto, model_meta, mask)


def _install_generation(server: Server, gen: str, shares_file: Path, meta: dict[str, Any]) -> None:
    """Write generation ``gen`` aside and repoint ``model`` atomically; older generations stay until confirmed."""
    server.models.mkdir(parents=True, exist_ok=True)
    new_dir = server.models / gen
    tmp_dir = server.models / f".{gen}.tmp"
    for d in (new_dir, tmp_dir):
        destroy_tree(d)
    held = model_generations(server)
    meta = dict(meta, seq=1 + max((int(m.get("seq", 0)) for m in held.values()), default=0))
    tmp_dir.mkdir()
    copy_private(shares_file, server.model_file(tmp_dir))
    atomic_write_json(tmp_dir / "manifest.json", meta)
    os.replace(tmp_dir, new_dir)
    tmp_link = server.root / ".model.link"
    tmp_link.unlink(missing_ok=True)
    os.symlink(Path("models") / gen, tmp_link)
    os.replace(tmp_link, server.current)


def _destroy_generation(server: Server, gen: str) -> None:
    """Take generation ``gen`` out of the listing at once (rename), then overwrite and unlink its files."""
    doomed = server.models / f".destroy-{gen}"
    destroy_tree(doomed)
    os.replace(server.models / gen, doomed)
    destroy_tree(doomed)


@owner_only()
def confirm_generation(server: Server, gen: str, run_id: str | None = None) -> list[str]:
    """The client holds generation ``gen``: destroy every older generation; returns their names.

    Newer generations stay (a job the client has not collected yet may still become its model).
    Refuses, destroying nothing, when this server does not hold ``gen`` or it is of another run."""
    held = model_generations(server)
    if gen not in held:
        listing = ", ".join(held) or "none"
        raise ModelError(f"server {server.party} does not hold model generation {gen} (it holds: {listing}); "
                         "nothing destroyed")
    if run_id is not None and held[gen].get("run_id") != run_id:
        raise ModelError(f"server {server.party}: generation {gen} is of model {held[gen].get('run_id')}, the "
                         f"confirmation names model {run_id}; nothing destroyed")
    older = [g for g, meta in held.items() if _age(meta) < _age(held[gen])]
    for g in older:
        _destroy_generation(server, g)
        logger.info("server %d: destroyed model generation %s (the client confirmed %s)", server.party, g, gen)
    for left in server.models.glob(".destroy-*"):  # an earlier destruction that was interrupted
        destroy_tree(left)
    return older


def read_confirmation(ticket: Path, party: int) -> dict[str, str]:
    """A confirmation ticket from the client (``<ticket>/confirm.json``), checked before anything is done."""
    ticket = Path(ticket)
    path = ticket / CONFIRM_FILE
    if not path.is_file():
        hint = " (that is a job bundle: run `invoke party` on it)" if (ticket / "manifest.json").is_file() else ""
        raise SharingError(f"{path}: confirmation ticket missing{hint}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SharingError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("kind") != "confirm":
        raise SharingError(f"{path}: not a confirmation ticket (expected kind 'confirm')")
    if raw.get("party") != party:
        raise SharingError(f"{path}: ticket is for server {raw.get('party')}, not server {party}")
    return {"gen": plain_id(raw.get("gen"), "gen", path), "run_id": plain_id(raw.get("run_id"), "run_id", path)}


@owner_only()
def confirm(server: Server, ticket: Path) -> tuple[str, list[str]]:
    """Run the client's confirmation ticket: (the confirmed generation, the generations destroyed)."""
    t = read_confirmation(ticket, server.party)
    return t["gen"], confirm_generation(server, t["gen"], t["run_id"])


@owner_only()
def finish_job(prep: PreparedJob, result: PartyResult | None) -> Path:
    """After a successful run: install the model or write the output shares, then the receipt.

    Returns the job's output folder ``outputs/<job>/`` (what goes back to the client).
    """
    server, m, i = prep.server, prep.manifest, prep.server.party
    pers = prep.rundir / "Persistence" / f"Transactions-P{i}.data"
    d1, c = m.d, m.n_classes
    receipt: dict[str, Any] = {"job": m.job, "kind": m.kind, "party": i, "run_id": m.run_id, "status": "ok",
                               "finished": time.time()}
    if result is not None:
        receipt.update(seconds=result.seconds, data_sent_mb=result.data_sent_mb,
                       global_data_mb=result.global_data_mb, rounds=result.rounds, protocol=m.protocol,
                       online_rounds=result.online_rounds, offline_rounds=result.offline_rounds)
    out = server.outputs / m.job
    tmp_out = server.outputs / f".{m.job}.tmp"
    destroy_tree(tmp_out)
    tmp_out.mkdir(parents=True)
    if m.kind == "train":
        read_shares(pers, 0, d1 * c)
        meta = {"run_id": m.run_id, "gen": m.run_id, "d1": d1, "c": c, "n": m.n, "frac_bits": FRAC_BITS,
                "program": m.program, "program_version": m.program_version, "created": time.time(),
                # face_train's last argument: the exp approximation recognition uses (the service needs it)
                "exp_bits": int(m.program_args[-1])}
        _install_generation(server, m.run_id, pers, meta)
        receipt["gen"] = m.run_id
    elif m.kind == "refresh":
        new = read_shares(pers, 0, d1 * c)
        if prep.mask is not None:
            with np.errstate(over="ignore"):
                new = new - prep.mask  # server 0 takes its own random input back out
        fixed = prep.rundir / "refreshed.data"
        write_model_file(fixed, pers, new)
        meta = dict(prep.model_meta or {}, gen=m.job, refreshed_from=m.model_gen, created=time.time())
        _install_generation(server, m.job, fixed, meta)
        receipt["gen"] = m.job
    else:  # predict
        q = m.n
        shares = read_shares(pers, d1 * c, 3 * q)  # face_predict's best, S and z_max, q each
        blob = shares.astype("<u8").tobytes()
        with open_private(tmp_out / "shares.bin", "wb") as fh:
            fh.write(blob)
        receipt.update(gen=m.model_gen, q=q, values=["best", "softmax_denominator", "top_logit"], frac_bits=FRAC_BITS,
                       sha256=sharing.sha256_bytes(blob))
    atomic_write_json(tmp_out / "receipt.json", receipt)
    destroy_tree(out)
    os.replace(tmp_out, out)
    with open_private(server.root / "jobs-done", "a") as fh:  # appended after the results are in place
        fh.write(m.job + "\n")
    return out


@owner_only()
def cleanup_job(prep: PreparedJob) -> None:
    """Destroy the run's scratch folder: it holds copies of the input shares, the model shares and the key."""
    destroy_tree(prep.rundir)
    if prep.mask is not None:
        prep.mask[:] = 0
