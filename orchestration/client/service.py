"""Runs on the client: recognition through the running service, and (dealer mode) the service's dealer.

:class:`ServiceClient` holds one TLS connection to each server's gateway (its own client
certificate, the servers' certificates pinned). A request splits the queries into fresh additive
shares, sends server i only share i, and adds the two answers: the best class, the softmax
denominator S and the top logit z_max; the client alone derives the confidence 1/S (for display) and
applies its threshold to z_max (the open-set score), as the one-job mode does (orchestration.client.jobs.collect). Both answers must carry the request's id and
the same model generation, or nothing is added.

:func:`run_service_dealer` is the client's part in the dealer mode: MP-SPDZ's dealer party for
every session the servers start, with the very program they run (it asks server 0 which).
"""
from __future__ import annotations

import logging
import secrets
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from preprocessing import sharing
from preprocessing.fileio import atomic_write_json, destroy_tree, owner_only
from preprocessing.sharing import FRAC_BITS

from orchestration.mpspdz import certs as certs_mod
from orchestration.shared import reference
from orchestration.client.jobs import (ZMAX_BOUND, ModelError, Prediction, answers_in_range, decide, load_model_record,
                                       model_generation, model_record_path, parse_model_record)
from orchestration.mpspdz.hosts import Hosts
from orchestration.mpspdz.launcher import PartySpec, _kill, bind_shim, exit_reason, start_party
from orchestration.mpspdz.toolchain import MPSPDZ, Protocol, compile_program
from orchestration.mpspdz.rundir import prepare_run
from orchestration.shared.model import PREDICT_PROGRAM
from orchestration.shared.ports import ServicePorts, service_program_args, status_lanes
from orchestration.shared.wire import ServiceError, WireError, body_shares, receive, send, shares_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceAnswer:
    predictions: list[Prediction]
    gen: str
    seconds: float


class ServiceClient:
    """A client of the running service. Not thread-safe: one per thread (they may share a client folder)."""

    #: a request for another model generation is asked again after these pauses (seconds, then the last one
    #: again) until ``retry_generation`` runs out: the servers switch between two batches once both hold it
    RETRY_PAUSES = (0.2, 0.4, 0.8, 1.6, 2.0)
    #: after one server's error, how long the other server's answer to the same request is awaited, so that
    #: both connections stay in step and can be kept
    OTHER_HALF_WAIT = 2.0

    def __init__(self, client_dir: Path, hosts: Hosts, *, timeout: float = 30.0, retry_generation: float = 10.0,
                 model_record: str | None = None):
        """``model_record``: where the data owner publishes its model record (service.model_record: a file
        path or an https URL), read once before a request for a stale generation gives up."""
        self.client_dir = Path(client_dir)
        self.ports = ServicePorts(hosts)
        self.timeout, self.retry_generation = timeout, retry_generation
        self.model_record = str(model_record) if model_record else None
        self.socks: list[ssl.SSLSocket | None] = [None, None]
        self.connects = 0  # TLS connections opened (kept connections are reused)

    clock = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)

    # -- connections ----------------------------------------------------------------------------------

    def _context(self, i: int) -> ssl.SSLContext:
        key, pem = certs_mod.client_files(self.client_dir)
        if not key.is_file() or not pem.is_file():
            raise certs_mod.CertError(f"this client has no service certificate ({pem}): run `invoke certs --client NAME` "
                                      "and give the certificate to both servers (`invoke certs --id I --allow-client`)")
        server_pem = certs_mod.cert_dir(self.client_dir) / f"P{i}.pem"
        if not server_pem.is_file():
            raise certs_mod.CertError(f"server {i}'s certificate {server_pem} missing: copy P{i}.pem from server {i} "
                                      f"and install it here with `invoke certs --server-cert P{i}.pem` (it makes no "
                                      "key; give --server-cert twice for both servers at once)")
        ctx = certs_mod.harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # TLS 1.2, ECDHE + AEAD only
        ctx.check_hostname = False  # the certificate itself is pinned: the only one trusted for server i
        ctx.load_verify_locations(cafile=str(server_pem))
        ctx.load_cert_chain(pem, key)
        return ctx

    def not_pinned_advice(self, i: int) -> str:
        """What server ``i``'s operator runs so that this client's certificate is accepted."""
        _, pem = certs_mod.client_files(self.client_dir)
        try:
            fp = certs_mod.inspect(pem).fingerprint
        except certs_mod.CertError:
            fp = "unknown"
        return (f"this client's certificate {pem} (sha256 {fp}) is not pinned on server {i}: give it to server "
                f"{i}'s operator, who checks the fingerprint and runs `invoke certs --id {i} --allow-client "
                "client.pem` (no restart needed)")

    def _sock(self, i: int) -> ssl.SSLSocket:
        s = self.socks[i]
        if s is None:
            addr = self.ports.client(i)
            where = f"server {i}'s service at {addr[0]}:{addr[1]}"
            ctx = self._context(i)
            try:
                raw = socket.create_connection(addr, timeout=self.timeout)
            except OSError as exc:  # refused, timed out, unreachable: nothing listens there for this client
                raise ServiceError(f"{where} is not running or not reachable ({exc}): on server {i} start it with "
                                   f"`invoke serve --id {i} --hosts FILE` (on this machine: `invoke serve`), and "
                                   f"let this client reach port {addr[1]} (its hosts-file port + 100)",
                                   "unavailable") from None
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s = ctx.wrap_socket(raw)
            except ssl.SSLCertVerificationError as exc:
                raw.close()
                pinned = certs_mod.cert_dir(self.client_dir) / f"P{i}.pem"
                raise ServiceError(f"{where} presents a certificate that is not the one pinned in {pinned} "
                                   f"({exc.verify_message or exc}): if server {i} was re-keyed, check its new "
                                   f"P{i}.pem's fingerprint with its operator and install it with `invoke certs "
                                   f"--server-cert P{i}.pem --replace-pin`", "refused") from None
            except (OSError, ssl.SSLError) as exc:  # a TLS alert (unknown ca, certificate unknown) or a reset
                raw.close()
                raise ServiceError(f"{where} refused this client in the TLS handshake ({exc}); "
                                   f"{self.not_pinned_advice(i)}", "refused") from None
            s.settimeout(self.timeout)
            self.socks[i] = s
            self.connects += 1
        return s

    def close(self) -> None:
        for i, s in enumerate(self.socks):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
            self.socks[i] = None

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _exchange(self, messages: Sequence[tuple[dict[str, Any], bytes]]) -> list[tuple[dict[str, Any], bytes]]:
        """Send message i to server i (both first, then read both); any failure closes both connections.

        A connection kept from an earlier request may have died with a server that restarted since:
        then the exchange is tried once more on fresh connections (a request is only a computation on
        fresh shares, so asking twice is harmless)."""
        reused = any(s is not None for s in self.socks)
        try:
            return self._exchange_once(messages)
        except ServiceError as exc:
            if not reused or exc.code != "unavailable" or "connection lost" not in str(exc):
                raise
            logger.info("a kept connection was gone (%s); asking again on fresh connections", exc)
            return self._exchange_once(messages)

    def _exchange_once(self, messages: Sequence[tuple[dict[str, Any], bytes]]) -> list[tuple[dict[str, Any], bytes]]:
        try:
            for i in range(2):  # both connections before anything is sent: a server that cannot be
                self._sock(i)   # reached must not leave the other holding half a request
            for i in (1, 0):  # server 0 plans a request once server 1 announced it: server 1's copy goes first
                head, body = messages[i]
                try:
                    send(self._sock(i), head, body)
                except OSError as exc:
                    raise ServiceError(f"server {i}: connection lost while sending ({exc})", "unavailable") from None
            out: list[tuple[dict[str, Any], bytes] | None] = [None, None]
            deadline = time.monotonic() + self.timeout
            failed: ServiceError | None = None
            while any(o is None for o in out):
                waiting = {self._sock(i): i for i in range(2) if out[i] is None}
                ready = [s for s in waiting if s.pending()]
                if not ready:
                    left = deadline - time.monotonic()
                    ready = select.select(list(waiting), [], [], max(0.0, left))[0] if left > 0 else []
                if not ready:
                    if failed is not None:  # the other half did not come: the connections are out of step
                        raise failed
                    late = " and ".join(f"server {i}" for i in waiting.values())
                    raise ServiceError(f"{late} did not answer within {self.timeout:.0f} s", "unavailable")
                for s in ready:
                    i = waiting[s]
                    try:
                        out[i] = receive(s)
                    except socket.timeout:
                        raise ServiceError(f"server {i} did not answer within {self.timeout:.0f} s",
                                           "unavailable") from None
                    except (WireError, OSError) as exc:
                        raise failed or ServiceError(f"server {i}: connection lost ({exc}); the service is "
                                                     "restarting or down", "unavailable") from None
                    h = out[i][0]
                    if h.get("type") == "error" and failed is None:
                        code = h.get("code") or "failed"
                        advice = f"; {self.not_pinned_advice(i)}" if code == "refused" else ""
                        failed = ServiceError(f"server {i}: {h.get('message')}{advice}", code)
                        if code != "generation" or h.get("id") is None:
                            raise failed  # the connection is closed or the other half may never come
                        # server 0 fails the request on server 1 too: read that answer as well, then both
                        # connections are in step and are kept for the next try
                        deadline = min(deadline, time.monotonic() + self.OTHER_HALF_WAIT)
            if failed is not None:
                raise _Kept(failed)
            return [o for o in out if o is not None]
        except _Kept as kept:
            raise kept.error from None
        except BaseException:
            self.close()
            raise

    # -- requests -------------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return [h for h, _ in self._exchange([({"type": "status"}, b""), ({"type": "status"}, b"")])]

    @staticmethod
    def request_frames(padded: np.ndarray, gen: str, rid: str) -> list[tuple[dict[str, Any], bytes]]:
        """Request ``rid`` for queries ``padded`` (n x d1 with the trailing 1) on model generation ``gen``:
        (header, body) for server 0 and for server 1, each body that server's fresh shares."""
        n, d1 = padded.shape
        head = {"type": "recognize", "id": rid, "gen": gen, "n": n, "d1": d1}
        return [(head, shares_body(s)) for s in sharing.share(sharing.encode_fixed(padded, FRAC_BITS))]

    def recognise_shares(self, padded: np.ndarray, gen: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """Raw answer for queries ``padded`` (n x d1 with the trailing 1): (best class, denominator, top logit,
        generation)."""
        n = len(padded)
        rid = secrets.token_hex(16)
        answers = self._exchange(self.request_frames(padded, gen, rid))
        errors = [(i, h) for i, (h, _) in enumerate(answers) if h.get("type") == "error"]
        if errors:
            i, h = errors[0]
            code = h.get("code") or "failed"
            raise ServiceError(f"server {i}: {h.get('message')}", code)
        parts = []
        for i, (h, body) in enumerate(answers):
            if h.get("type") != "result" or h.get("id") != rid or h.get("n") != n:
                raise ServiceError(f"server {i} answered {h.get('type')} for request {h.get('id')} of {h.get('n')} "
                                   f"queries; expected request {rid} of {n}", "failed")
            try:
                parts.append(body_shares(body, 3 * n, f"server {i}'s answer"))
            except WireError as exc:
                raise ServiceError(str(exc), "failed") from None
        if answers[0][0].get("gen") != answers[1][0].get("gen"):
            raise ServiceError(f"server 0 answered with model generation {answers[0][0].get('gen')}, server 1 with "
                               f"{answers[1][0].get('gen')}", "failed")
        total = sharing.reconstruct(parts[0], parts[1])
        return (total[:n].view(np.int64), sharing.decode_fixed(total[n:2 * n]), sharing.decode_fixed(total[2 * n:]),
                str(answers[0][0]["gen"]))

    def recognise(self, embeddings: np.ndarray, threshold: float) -> ServiceAnswer:
        """Predictions for a batch of embeddings, as :func:`orchestration.client.jobs.collect` makes them."""
        t0 = time.monotonic()
        record = load_model_record(self.client_dir)
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"embeddings: expected a non-empty n x {record['d']} array, got shape {x.shape}")
        if x.shape[1] != record["d"]:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, the model expects {record['d']}")
        if not np.isfinite(threshold):
            raise ValueError(f"threshold {threshold} is not a number")
        padded = reference.with_bias(x)
        start = self.clock()
        deadline = start + self.retry_generation
        tries, pauses, fetched = 0, 0, False
        wraps = 0
        while True:
            c = len(record["classes"])
            try:
                tries += 1
                best, denom, zmax, gen = self.recognise_shares(padded, model_generation(record))
            except ServiceError as exc:
                if exc.code != "generation":
                    raise
                pause = self.RETRY_PAUSES[min(pauses, len(self.RETRY_PAUSES) - 1)]
                if self.clock() + pause > deadline:
                    if self.model_record and not fetched:
                        fetched = True
                        fresh = self.fetch_model_record()
                        if model_generation(fresh) != model_generation(record):
                            record = fresh
                            deadline, pauses = self.clock() + self.retry_generation, 0
                            continue
                    raise ServiceError(self._stale_message(exc, record, tries, self.clock() - start, fetched),
                                       "generation") from None
                self.sleep(pause)  # the servers switch between two batches once both hold the new generation
                pauses += 1
                record = load_model_record(self.client_dir)  # a record copied meanwhile is used at once
                continue
            if answers_in_range(best, denom, zmax, c):
                break
            if wraps:
                raise ModelError(f"reconstructed outputs out of range twice (class 0..{c - 1}, softmax denominator "
                                 f"1..{c}, |top logit| < {ZMAX_BOUND:g}): the two servers' shares do not belong together")
            # a local truncation in the servers' exponentials wraps about once in 10^8 answers: ask again
            logger.warning("an answer out of range (a rare truncation wrap?): asking again")
            wraps += 1
        return ServiceAnswer(decide(best, denom, zmax, threshold), gen, time.monotonic() - t0)

    # -- the model record after a retrain or a refresh ---------------------------------------------------

    def _stale_message(self, exc: ServiceError, record: dict[str, Any], tries: int, seconds: float,
                       fetched: bool) -> str:
        path = model_record_path(self.client_dir)
        head = (f"{exc} ({tries} tries in {seconds:.1f} s): this client's model record {path} is generation "
                f"{model_generation(record)}, the servers hold a newer one (the data owner retrained or refreshed "
                "the model)")
        if fetched:
            return (f"{head}; the record fetched from service.model_record ({self.model_record}) is the same "
                    "generation: the data owner has not published the new one there yet. Ask the data owner to "
                    f"publish its var/client/model.json there, or copy it to {path}")
        return f"{head}. Copy the data owner's var/client/model.json to {path}, or set service.model_record in " \
               "invoke.yaml to where the data owner publishes it (a file path or an https URL)"

    def fetch_model_record(self) -> dict[str, Any]:
        """Read the record at ``model_record`` (a file path or an https URL), check it as
        :func:`load_model_record` does, and install it as this client's ``model.json`` (atomically)."""
        source = str(self.model_record)
        try:
            if source.startswith(("https://", "http://")):
                if not source.startswith("https://"):
                    raise ModelError(f"service.model_record {source}: use an https URL (or a file path)")
                import urllib.request

                with urllib.request.urlopen(source, timeout=self.timeout) as r:  # noqa: S310 (https only)
                    text = r.read(MAX_RECORD + 1)
            else:
                with open(Path(source).expanduser(), "rb") as f:
                    text = f.read(MAX_RECORD + 1)
        except OSError as exc:
            raise ModelError(f"service.model_record {source}: cannot read it ({exc}); copy the data owner's "
                             f"var/client/model.json to {model_record_path(self.client_dir)} instead") from None
        if len(text) > MAX_RECORD:
            raise ModelError(f"service.model_record {source}: larger than {MAX_RECORD} bytes: no model record")
        record = parse_model_record(text, f"service.model_record {source}")
        atomic_write_json(model_record_path(self.client_dir), record)
        logger.info("fetched the model record (generation %s) from %s", model_generation(record), source)
        return record


MAX_RECORD = 16 << 20  # a model record names the classes: 16 MiB is far more than any gallery's names


class _Kept(Exception):
    """An error answer read from both servers: raised past the closing of the connections, which stay."""

    def __init__(self, error: ServiceError):
        super().__init__(str(error))
        self.error = error


# ---- the dealer of the service (dealer mode, on the client) --------------------------------------

@owner_only()
def run_service_dealer(mp: MPSPDZ, client_dir: Path, build: Path, hosts: Hosts, proto: Protocol,
                       stop: threading.Event) -> None:
    """Deal for every session of the service until ``stop`` is set: one dealer party per session.

    Server 0 says which program its session runs (sizes, batch); the dealer compiles and runs
    exactly that one, with the client's key (``certs/P2.*``). It deals ahead of the servers and is
    restarted whenever a session ends."""
    if proto.dealer is None:
        raise ValueError(f"protocol {proto.name} has no dealer")
    party_certs = certs_mod.check_party_certs(client_dir, proto.dealer, proto.n_parties)
    me = hosts[proto.dealer]
    run = Path(client_dir) / "run-service-dealer"
    log_path = Path(client_dir) / "logs" / "service-dealer.log"
    client = ServiceClient(client_dir, hosts, timeout=5.0)
    warned = False
    try:
        while not stop.is_set():
            try:
                st = client.status()[0]
                client.close()  # polls are rare: no connection is kept across a restart of the servers
            except (ServiceError, certs_mod.CertError) as exc:
                if not warned:
                    logger.info("dealer: waiting for the service (%s)", exc)
                    warned = True
                stop.wait(0.5)
                continue
            if st.get("state") not in ("starting", "serving") or st.get("protocol") != proto.name:
                stop.wait(0.2)
                continue
            warned = False
            args = service_program_args(int(st["batch"]), int(st["d1"]), int(st["c"]), int(st["exp_bits"]),
                                        **status_lanes(st))
            program = compile_program(mp, PREDICT_PROGRAM, args, build, proto=proto)
            hosts_file = prepare_run(run, party_certs, build, proto, program, hosts)
            spec = PartySpec(proto.dealer, run, log_path, me.address, me.port)
            proc, log = start_party(mp, spec, program, hosts_file, shim=bind_shim(build), proto=proto)
            try:
                logger.info("dealer: dealing for generation %s (%s, pid %d)", st["gen"], program, proc.pid)
                while proc.poll() is None and not stop.wait(0.2):
                    pass
                if proc.poll() is None:
                    _kill(proc)
                else:
                    why = exit_reason(log_path, proto.dealer, proto, hosts_file=hosts_file) if proc.returncode else ""
                    logger.info("dealer: the session ended (dealer exit code %s%s)", proc.returncode,
                                f": {why}" if why else "")
            finally:
                log.close()
            destroy_tree(run)
            stop.wait(0.3)
    finally:
        client.close()
        destroy_tree(run)


__all__ = ["ServiceAnswer", "ServiceClient", "run_service_dealer"]
