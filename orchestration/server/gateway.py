"""Runs on a server: the recognition service (``invoke serve --id I``), one gateway and one MP-SPDZ party.

Each server runs, for as long as the service is up::

    clients --TLS, client certificates pinned--> gateway i --MP-SPDZ client interface (TLS, loopback)-->
        party i of mpc_programs/face_predict.mpc in "serve" mode <--MPC (TLS)--> the other server's party

The party (``semi2k-party.x``, or ``dealer-ring-party.x`` with the client's dealer as player 2)
loads this server's model share once and loops over requests; the gateway is MP-SPDZ's one client
on this host. It authenticates clients, checks and queues their requests, packs queries into the
program's fixed batch, feeds the party this server's shares and hands each client back this
server's shares of its answers. Everything a gateway handles is a share, a size or an id.

Both parties must compute on the same queries in the same order, so the two gateways talk over a
link of their own (TLS, the servers' certificates pinned): server 0 *leads*. It forms each batch
from the requests it has received, sends the batch's plan (request ids and positions, model
generation) to server 1, and both feed their party. Server 1 tells server 0 over the link which
requests have reached it, and server 0 plans only requests both servers hold: a request that
reached one server only (a client that died between its two sends, a network cut) delays no other
request and is answered as failed after twice ``follower_wait``. A request is answered by both servers
or reported failed by at least one;
the client (orchestration.client.service) adds two shares only when both answered the same
request id for the same generation.

Model generations: a client names the generation it holds. Server 0 switches the service to a new
generation between two batches, once both servers hold it (``invoke train``/``refresh-shares``
installed it): same sizes, the party re-reads its share file (command RELOAD); other sizes, both
restart their party. A request for another generation than the one served is answered with the
error code ``generation``, never computed on the wrong model.

Failures: when the party, the link or the other server goes away, the requests in flight are
answered with the error code ``unavailable`` and the gateway starts a new session: new party,
new link, found again without anyone's help once the other server is back.

Ports, from the hosts file's line ``address:p`` of server i (see :class:`ServicePorts`): ``p`` MPC,
``p + 100`` clients, ``p + 200`` the gateways' link (server 1 listens), and ``p + 300`` MP-SPDZ's client listener (for
the gateway only; TLS with a throw-away key). Each server takes its own ports from its own line,
and the other's from the other's line, so the two hosts files may differ (NAT, relays).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.fileio import copy_private, destroy_file, destroy_tree, private_dir
from preprocessing.sharing import SharingError

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.hosts import Hosts, write_hosts
from orchestration.mpspdz.launcher import PartySpec, _kill, _tail, bind_shim, start_party
from orchestration.mpspdz.toolchain import MPSPDZ, MPSPDZError, Protocol, compile_program, programs_dir
from orchestration.server.job import PREDICT_PROGRAM, ModelError, Server, current_generation, plain_id
from orchestration.shared.wire import (
    WireError,
    body_shares,
    encode,
    int_field,
    receive,
    recv_exact,
    send,
    shares_body,
    str_field,
)

logger = logging.getLogger(__name__)

CLIENT_OFFSET, LINK_OFFSET, SPDZ_OFFSET = 100, 200, 300
CMD_SERVE, CMD_RELOAD = 1, 2
MAX_QUERIES = 4096  # per request
MAX_QUEUED = 131072  # queries a gateway holds waiting, by default (about 135 MB of shares at 128-d embeddings)
HEARTBEAT = 5.0  # seconds: an idle server 0 asks server 1 at least this often, which finds a dead link
DEFAULT_EXP_BITS = 8


@dataclass(frozen=True)
class ServicePorts:
    """Every port of the service, from the hosts file (2 lines; a 3rd for the dealer mode's client)."""

    hosts: Hosts

    def mpc(self, i: int) -> tuple[str, int]:
        return self.hosts[i].address, self.hosts[i].port

    def client(self, i: int) -> tuple[str, int]:
        return self.hosts[i].address, self.hosts[i].port + CLIENT_OFFSET

    def link(self) -> tuple[str, int]:
        return self.hosts[1].address, self.hosts[1].port + LINK_OFFSET

    def spdz(self, i: int) -> tuple[str, int]:
        """Where server i's party listens for its gateway (a run-time input of the party, not of the program)."""
        return self.hosts[i].address, self.hosts[i].port + SPDZ_OFFSET


def service_program_args(batch: int, d1: int, c: int, exp_bits: int) -> list[str]:
    """The serve program's compile-time arguments: sizes only, the same for both servers and the dealer."""
    return [str(batch), str(d1), str(c), str(exp_bits), "serve"]


def prepare_run(run: Path, party_certs: certs_mod.PartyCerts, build: Path, proto: Protocol, program: str,
                hosts: Hosts, listen_base: int | None = None) -> Path:
    """A service party's working folder, made afresh (owner-only): its key and the pinned certificates
    in Player-Data/, an empty Persistence/, the compiled bytecode (linked) and, for a server, its own
    public input (the port base it listens on for its gateway). Returns the folder's hosts file."""
    destroy_tree(run)
    private_dir(run)
    (run / "Persistence").mkdir()
    certs_mod.install_for_run(party_certs, run / "Player-Data")
    d = run / "Programs"
    d.mkdir()
    for sub in ("Bytecode", "Schedules"):
        (d / sub).symlink_to(programs_dir(Path(build).resolve(), proto) / sub)
    (d / "Public-Input").mkdir()
    if listen_base is not None:
        (d / "Public-Input" / program).write_text(f"{listen_base}\n")
    return write_hosts(run / "hosts", [(e.address, e.port) for e in hosts.parties[:proto.n_parties]]).path


# ---- connections ----------------------------------------------------------------------------------

class Outbox:
    """Frames other threads want written on a TLS connection that one thread owns.

    OpenSSL forbids reading and writing one connection from two threads at once, so every TLS
    connection of the gateway has an owner that alone reads and writes it: other threads
    :meth:`put` frames here (never blocking on the network, so a client that stops reading delays
    nobody but itself) and the owner, woken through a socket pair, writes them with :meth:`flush`."""

    def __init__(self) -> None:
        self._frames: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def put(self, frame: bytes | None = None) -> None:
        """Queue ``frame`` (None: only wake the owner)."""
        with self._lock:
            if frame is not None:
                self._frames.append(frame)
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):  # already woken, or closed with its connection
            pass

    def wait(self, sock: ssl.SSLSocket, timeout: float) -> bool:
        """Wait until ``sock`` has data or a frame (or wake-up) is queued; True when ``sock`` has data."""
        if sock.pending():
            return True
        ready = select.select([sock, self._r], [], [], timeout)[0]
        if self._r in ready:
            try:
                while self._r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        return sock in ready

    def flush(self, sock: ssl.SSLSocket) -> None:
        """Owner only: write every queued frame."""
        while True:
            with self._lock:
                if not self._frames:
                    return
                frame = self._frames.popleft()
            sock.sendall(frame)

    def close(self) -> None:
        self._r.close()
        self._w.close()


class ClientConn:
    """One authenticated client connection, owned by its thread; replies from the batch thread are queued."""

    def __init__(self, sock: ssl.SSLSocket, name: str, peer: str):
        self.sock, self.name, self.peer = sock, name, peer
        self.outbox = Outbox()
        self.open = True

    def reply(self, header: dict[str, Any], body: bytes = b"") -> None:
        if self.open:
            self.outbox.put(encode(header, body))

    def close(self) -> None:
        self.open = False
        try:
            self.sock.close()
        except OSError:
            pass
        self.outbox.close()


@dataclass
class Request:
    id: str
    gen: str
    n: int
    shares: np.ndarray  # n x d1, this server's shares
    conn: ClientConn
    t0: float = field(default_factory=time.monotonic)
    best: np.ndarray | None = None
    denom: np.ndarray | None = None
    filled: int = 0
    scheduled: int = 0  # leader: queries already put into a plan
    both: bool = False  # the other server announced that it holds this request too
    finished: bool = False


class SessionEnded(RuntimeError):
    """The party, the link or the other server went away: start a new session."""


class Switching(SessionEnded):
    """Both servers restart their parties for a model generation of other sizes (a planned end)."""


# ---- the gateway ----------------------------------------------------------------------------------

class ServiceServer:
    """Server ``server.party``'s gateway and party supervisor. :meth:`serve` runs until ``stop`` is set."""

    def __init__(self, mp: MPSPDZ, server: Server, build: Path, hosts: Hosts, proto: Protocol, *, batch: int = 16,
                 follower_wait: float = 10.0, party_timeout: float = 30.0, start_timeout: float = 120.0,
                 max_queued: int = MAX_QUEUED):
        if server.party not in (0, 1):
            raise ValueError(f"server id {server.party}: expected 0 or 1")
        if batch < 1 or batch > 1024:
            raise ValueError(f"service batch {batch}: expected 1..1024")
        if max_queued < MAX_QUERIES:
            raise ValueError(f"service max_queued {max_queued}: expected at least {MAX_QUERIES} (one request's maximum)")
        n_lines = proto.n_parties
        if len(hosts) < n_lines:
            raise ValueError(f"{hosts.path}: {len(hosts)} lines, the {proto.name} service needs {n_lines} "
                             "(server 0, server 1" + (", the client's dealer)" if proto.dealer else ")"))
        self.mp, self.server, self.build, self.proto = mp, server, Path(build), proto
        self.ports = ServicePorts(hosts)
        self.party = server.party
        self.batch = batch
        self.follower_wait, self.party_timeout, self.start_timeout = follower_wait, party_timeout, start_timeout
        self.lock = threading.Condition()
        self.requests: dict[str, Request] = {}
        self.max_queued = max_queued
        self.queued = 0  # queries of the requests held (sum of their n)
        self.queue: collections.deque[str] = collections.deque()  # leader: ids in arrival order
        self.verdicts: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()  # follower
        self.serving: dict[str, Any] | None = None  # {"gen", "d1", "c", "exp_bits"} of the running session
        self.starting: dict[str, Any] | None = None  # the model of the session being set up
        self.stop = threading.Event()
        self.session_broken = threading.Event()
        self.link: ssl.SSLSocket | None = None
        self.link_lock = threading.Condition()
        self.partner_has: dict[str, float] = {}  # ids the other server announced before they reached us
        self.to_announce: list[str] = []  # leader: ids that reached us since our last message to server 1
        self.link_box: Outbox | None = None  # the session's link: announcements (server 1), wake-ups (server 0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.certs: certs_mod.PartyCerts  # set by _check_certs before anything listens
        self.rundir = server.root / "service"
        self.served = 0
        self._listeners: list[socket.socket] = []

    # -- TLS contexts -------------------------------------------------------------------------------

    def _check_certs(self) -> None:
        """This server's key and the pinned certificates, checked (openssl) at start and at every session."""
        self.certs = certs_mod.check_party_certs(self.server.root, self.party, self.proto.n_parties)

    def _allowed_context(self) -> tuple[ssl.SSLContext, dict[str, certs_mod.PinnedClient]]:
        """The context for a new client connection, trusting exactly the clients pinned right now."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certs.own.path, self.certs.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        allowed = certs_mod.allowed_clients(self.server.root)
        if allowed:
            ctx.load_verify_locations(cadata="".join(c.pem for c in allowed.values()))
        return ctx, allowed

    def _link_context(self, server_side: bool) -> ssl.SSLContext:
        pc = self.certs
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(pc.own.path, pc.key)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(pc.peers[1 - self.party].path))
        return ctx

    # -- listeners ------------------------------------------------------------------------------------

    def _listen(self, addr: tuple[str, int], what: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            s.close()
            raise MPSPDZError(f"server {self.party}: cannot listen for {what} on {addr[0]}:{addr[1]} ({exc})") from None
        s.listen(64)
        s.settimeout(0.5)
        self._listeners.append(s)
        return s

    def _accept_loop(self, lsock: socket.socket, handler) -> None:
        while not self.stop.is_set():
            try:
                sock, addr = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stop.is_set():
                    return
                continue
            threading.Thread(target=handler, args=(sock, addr), daemon=True).start()

    def _client_thread(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        raw.settimeout(10.0)
        try:
            ctx, allowed = self._allowed_context()
            sock = ctx.wrap_socket(raw, server_side=True)
            fp = certs_mod.fingerprint(ssl.DER_cert_to_PEM_cert(sock.getpeercert(binary_form=True)))
            if fp not in allowed:
                raise ssl.SSLError(f"certificate {fp[:16]}... is not pinned in {certs_mod.client_dir_of(self.server.root)}")
        except (ssl.SSLError, OSError, ValueError, certs_mod.CertError) as exc:
            logger.warning("refused client connection from %s: %s", peer, _one_line(exc))
            raw.close()
            return
        conn = ClientConn(sock, allowed[fp].name, peer)
        sock.settimeout(self.party_timeout)  # within a frame; between frames the client may idle
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        logger.info("client %s connected from %s", conn.name, peer)
        try:
            while not self.stop.is_set():
                readable = conn.outbox.wait(sock, 0.5)
                conn.outbox.flush(sock)
                if not readable:
                    continue
                header, body = receive(sock)
                kind = header["type"]
                if kind == "status":
                    send(sock, self._status())
                elif kind == "recognize":
                    self._take_request(conn, header, body)
                else:
                    raise WireError(f"unknown message type {kind!r}")
        except WireError as exc:
            if str(exc) != "connection closed":
                logger.warning("client %s (%s): %s; connection dropped", conn.name, peer, exc)
                try:
                    send(sock, {"type": "error", "id": None, "code": "bad-request", "message": str(exc)})
                except OSError:
                    pass
        except (OSError, ssl.SSLError) as exc:
            logger.info("client %s (%s): connection lost (%s)", conn.name, peer, _one_line(exc))
        finally:
            conn.close()

    def _status(self) -> dict[str, Any]:
        """What a client (and the dealer, which must run the very same program) needs to know."""
        s = self.serving or self.starting or {}
        state = "serving" if self.serving else "starting" if self.starting else "waiting"
        return {"type": "status", "party": self.party, "state": state, "gen": s.get("gen"), "d1": s.get("d1"),
                "c": s.get("c"), "exp_bits": s.get("exp_bits"), "batch": self.batch, "protocol": self.proto.name,
                "queued": self.queued, "max_queued": self.max_queued}

    def _take_request(self, conn: ClientConn, header: dict[str, Any], body: bytes) -> None:
        rid = str_field(header, "id", 64)
        gen = str_field(header, "gen")
        n = int_field(header, "n", 1, MAX_QUERIES)
        d1 = int_field(header, "d1", 1, 4096)
        shares = body_shares(body, n * d1, f"request {rid}").reshape(n, d1)
        with self.lock:
            if rid in self.requests:
                conn.reply({"type": "error", "id": rid, "code": "bad-request", "message": f"request id {rid} is in use"})
                return
            req = Request(rid, gen, n, shares, conn)
            serving = self.serving
            if serving is not None and d1 != serving["d1"]:
                self._answer_error(req, "bad-request", f"queries have {d1} values, the model takes {serving['d1']}")
                return
            if self.party == 1 and rid in self.verdicts:
                code, msg = self.verdicts.pop(rid)
                self._answer_error(req, code, msg)
                return
            if self.queued + n > self.max_queued:
                self._answer_error(req, "busy", f"server {self.party} holds {self.queued} queries waiting (at most "
                                                f"{self.max_queued}, service.max_queued); retry later")
                return
            self.requests[rid] = req
            self.queued += n
            req.both = self.partner_has.pop(rid, None) is not None
            if self.party == 0:
                self.queue.append(rid)
                self.to_announce.append(rid)
            self.lock.notify_all()
            box = self.link_box
        if box is not None:  # server 0: wake the leader; server 1: tell server 0 this request is here
            box.put(None if self.party == 0 else encode({"type": "have", "ids": [rid]}))

    def _janitor(self) -> None:
        """A request that reached this server only (the other never announced it) is answered as
        failed after twice :attr:`follower_wait`, so no client waits for it and no share stays in
        memory; one both servers hold waits its turn, however long the queue."""
        limit = 2 * self.follower_wait
        other = 1 - self.party
        while not self.stop.wait(1.0):
            now = time.monotonic()
            with self.lock:
                for req in list(self.requests.values()):
                    if not req.both and now - req.t0 > limit:
                        self._answer_error(req, "unavailable", f"server {other} did not confirm request {req.id} "
                                                               f"within {limit:.0f} s (it did not get it, or the "
                                                               "service is restarting); retry")
                for rid, t in list(self.partner_has.items()):
                    if now - t > limit:
                        del self.partner_has[rid]

    def _forget(self, req: Request) -> None:
        """(Under :attr:`lock`.) ``req`` is answered: no longer held."""
        req.finished = True
        if self.requests.get(req.id) is req:
            del self.requests[req.id]
            self.queued -= req.n

    def _answer_error(self, req: Request, code: str, message: str) -> None:
        self._forget(req)
        req.conn.reply({"type": "error", "id": req.id, "code": code, "message": message})
        logger.info("request %s: %d queries, generation %s, %.1f ms, error %s", req.id[:12], req.n, req.gen,
                    1000 * (time.monotonic() - req.t0), code)

    def _answer(self, req: Request, gen: str) -> None:
        assert req.best is not None and req.denom is not None
        self._forget(req)
        req.conn.reply({"type": "result", "id": req.id, "gen": gen, "n": req.n},
                       shares_body(np.concatenate([req.best, req.denom])))
        self.served += 1
        logger.info("request %s: %d queries, generation %s, %.1f ms", req.id[:12], req.n, gen,
                    1000 * (time.monotonic() - req.t0))

    def _fail_all(self, code: str, message: str) -> None:
        with self.lock:
            for req in list(self.requests.values()):
                self._answer_error(req, code, message)
            self.queue.clear()

    # -- the model ----------------------------------------------------------------------------------

    def _generation(self, gen: str) -> dict[str, Any]:
        """Sizes of generation ``gen`` (a name from the ``model`` link or from server 0: checked before use)."""
        try:
            meta = json.loads((self.server.models / plain_id(gen, "gen", self.server.models) / "manifest.json")
                              .read_text())
        except (OSError, ValueError, SharingError):
            raise ModelError(f"server {self.party} does not hold model generation {gen}") from None
        return {"gen": gen, "d1": int(meta["d1"]), "c": int(meta["c"]),
                "exp_bits": int(meta.get("exp_bits", DEFAULT_EXP_BITS))}

    def _current(self) -> dict[str, Any] | None:
        """The generation the ``model`` link points at; only a readlink while it is the one served."""
        gen = current_generation(self.server)
        if gen is None:
            return None
        if self.serving is not None and gen == self.serving["gen"]:
            return self.serving
        try:
            return self._generation(gen)
        except (ModelError, KeyError, ValueError):
            return None

    def _install_model(self, gen: str) -> None:
        """The service's copy of generation ``gen``'s share; the previous copy is overwritten, then unlinked."""
        src = self.server.model_file(self.server.models / gen)
        dest = self.rundir / "Persistence" / f"Transactions-P{self.party}.data"
        tmp = dest.with_name(f".{dest.name}.new")
        copy_private(src, tmp)
        if dest.exists():
            destroy_file(dest)
        os.replace(tmp, dest)

    # -- one session: party + link --------------------------------------------------------------------

    def _start_party(self, model: dict[str, Any]) -> None:
        args = service_program_args(self.batch, model["d1"], model["c"], model["exp_bits"])
        program = compile_program(self.mp, PREDICT_PROGRAM, args, self.build, proto=self.proto)
        hosts_file = prepare_run(self.rundir, self.certs, self.build, self.proto, program, self.ports.hosts,
                                 self.ports.spdz(self.party)[1] - self.party)
        certs_mod.make_gateway_cert(self.rundir / "Player-Data", self.party)
        self._install_model(model["gen"])
        me = self.ports.hosts[self.party]
        spec = PartySpec(self.party, self.rundir, self.server.logs / "service-party.log", me.address, me.port)
        self.proc, self._log = start_party(self.mp, spec, program, hosts_file, shim=bind_shim(self.build),
                                           proto=self.proto)
        logger.info("server %d: party started (%s, program %s, pid %d)", self.party, self.proto.name, program,
                    self.proc.pid)

    def _stop_party(self) -> None:
        if self.proc is not None:
            _kill(self.proc)  # SIGTERM to its process group, SIGKILL after 3 s
            self.proc = None
            self._log.close()
        destroy_tree(self.rundir)

    def _connect_party(self) -> ssl.SSLSocket:
        """Connect to our party as MP-SPDZ client C<i> once it listens (after it met the other parties)."""
        addr = self.ports.spdz(self.party)
        pdata = self.rundir / "Player-Data"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(pdata / f"C{self.party}.pem", pdata / f"C{self.party}.key")
        ctx.load_verify_locations(cafile=str(pdata / f"P{self.party}.pem"))
        ctx.check_hostname = False
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._check_party_alive()
            if self.stop.is_set() or self.session_broken.is_set():
                raise SessionEnded("stopping")
            try:
                raw = socket.create_connection(addr, timeout=2.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SessionEnded(f"party {self.party} did not start listening within {self.start_timeout:.0f} s "
                                       f"(is the other server{' and the dealer' if self.proto.dealer else ''} up?)")
                time.sleep(0.1)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(_octets(str(self.party).encode()))
        sock = ctx.wrap_socket(raw, server_hostname=f"P{self.party}")
        sock.settimeout(self.party_timeout)
        spec = _octets_receive(sock)
        if spec[:4] != b"R\x00\x00\x00" or int.from_bytes(spec[4:8], "little") != 64:
            raise SessionEnded(f"party {self.party} computes over an unexpected domain {spec[:12]!r}")
        return sock

    def _check_party_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = " | ".join(_tail(self.server.logs / "service-party.log", 3).splitlines())
            raise SessionEnded(f"party {self.party} exited with code {self.proc.returncode}: {tail}")

    def _open_link(self) -> ssl.SSLSocket:
        if self.party == 0:
            ctx = self._link_context(server_side=False)
            addr = self.ports.link()
            warned = False
            while not self.stop.is_set():
                try:
                    raw = socket.create_connection(addr, timeout=2.0)
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock = ctx.wrap_socket(raw)
                    sock.settimeout(None)
                    return sock
                except (OSError, ssl.SSLError) as exc:
                    if not warned:
                        logger.info("server 0: waiting for server 1's gateway at %s:%d (%s)", *addr, _one_line(exc))
                        warned = True
                    time.sleep(0.5)
            raise SessionEnded("stopping")
        with self.link_lock:
            while self.link is None and not self.stop.is_set():
                self.link_lock.wait(0.5)
            if self.link is None:
                raise SessionEnded("stopping")
            sock, self.link = self.link, None
            self.session_broken.clear()
            return sock

    def _link_thread(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        """Server 1: a connection on the link port; only server 0's pinned certificate gets through."""
        try:
            raw.settimeout(10.0)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._link_context(server_side=True).wrap_socket(raw, server_side=True)
            sock.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            logger.warning("refused link connection from %s:%d: %s", addr[0], addr[1], _one_line(exc))
            raw.close()
            return
        with self.link_lock:
            if self.link is not None:
                self.link.close()
            self.link = sock
            self.link_lock.notify_all()
        self.session_broken.set()  # a new link from server 0 means it started a new session

    def serve(self) -> None:
        """Run until :attr:`stop` is set (SIGTERM / SIGINT in ``invoke serve``)."""
        private_dir(self.server.root)
        self._check_certs()  # fail now when a certificate is missing
        if not certs_mod.allowed_clients(self.server.root):
            logger.warning("server %d: no client is allowed yet (%s is empty): every connection will be refused",
                           self.party, certs_mod.client_dir_of(self.server.root))
        lsock = self._listen(self.ports.client(self.party), "clients")
        threading.Thread(target=self._accept_loop, args=(lsock, self._client_thread), daemon=True).start()
        if self.party == 1:
            lk = self._listen(self.ports.link(), "server 0's gateway")
            threading.Thread(target=self._accept_loop, args=(lk, self._link_thread), daemon=True).start()
        threading.Thread(target=self._janitor, daemon=True).start()
        logger.info("server %d: serving clients on %s:%d (%s, batch %d)", self.party, *self.ports.client(self.party),
                    self.proto.name, self.batch)
        try:
            while not self.stop.is_set():
                code, why = "unavailable", (f"server {self.party}'s session ended (the other server, its party or "
                                            "the link went away); retry once the service is back")
                try:
                    self._session()
                except Switching as exc:
                    logger.info("server %d: %s", self.party, exc)
                    code, why = "generation", f"server {self.party} is switching to another model generation; retry"
                except SessionEnded as exc:
                    if not self.stop.is_set():
                        logger.warning("server %d: session ended: %s", self.party, exc)
                except (MPSPDZError, ModelError, certs_mod.CertError, OSError) as exc:
                    if self.stop.is_set():
                        break
                    logger.error("server %d: %s", self.party, _one_line(exc))
                finally:
                    self.serving = self.starting = None
                    self._stop_party()
                    self._fail_all(code, why)
                if not self.stop.is_set():
                    self.stop.wait(1.0)
        finally:
            for s in self._listeners:
                s.close()
            self._stop_party()
            logger.info("server %d: stopped after %d answered requests", self.party, self.served)

    def _session(self) -> None:
        self.session_broken.clear()
        self._check_certs()
        model = self._current()
        while model is None:
            logger.info("server %d: no model yet; waiting for `invoke train`", self.party)
            if self.stop.wait(2.0):
                return
            model = self._current()
        link = self._open_link()
        box = Outbox()
        try:
            link.settimeout(self.party_timeout + self.follower_wait)
            if self.party == 0:
                send(link, {"type": "hello", "gen": model["gen"]})
                answer, _ = receive(link)
                if answer.get("type") != "hello" or not answer.get("ok"):
                    raise SessionEnded(f"server 1 cannot serve generation {model['gen']}: {answer.get('message')}")
                with self.lock:  # each server announces, on this link, every request it holds
                    self._new_link(box)
                    self.to_announce = list(self.requests)
            else:
                hello, _ = receive(link)
                gen = hello.get("gen")
                try:
                    model = self._generation(str(gen))
                except (ModelError, KeyError, ValueError) as exc:
                    send(link, {"type": "hello", "ok": False, "message": str(exc)})
                    raise SessionEnded(str(exc)) from None
                send(link, {"type": "hello", "ok": True})
                with self.lock:  # from now on each request is announced as it comes; these came before
                    self._new_link(box)
                    held = list(self.requests)
                if held:
                    send(link, {"type": "have", "ids": held})
            self.starting = model
            self._start_party(model)
            party = self._connect_party()
            self.serving, self.starting = model, None
            logger.info("server %d: serving model generation %s (%d classes)", self.party, model["gen"], model["c"])
            try:
                if self.party == 0:
                    self._lead(link, box, party)
                else:
                    self._follow(link, box, party)
            finally:
                party.close()
        except (WireError, OSError, ssl.SSLError) as exc:
            raise SessionEnded(_one_line(exc)) from None
        finally:
            with self.lock:
                self.link_box = None
            link.close()
            box.close()

    def _new_link(self, box: Outbox) -> None:
        """(Under :attr:`lock`.) What the other server announced on the old link is void."""
        self.partner_has.clear()
        for req in self.requests.values():
            req.both = False
        self.link_box = box

    def _mark_held(self, ids: Any) -> None:
        """The other server announced that requests ``ids`` reached it."""
        if not isinstance(ids, list):
            raise SessionEnded(f"server {1 - self.party} announced requests without a list of ids")
        now = time.monotonic()
        with self.lock:
            for rid in ids:
                req = self.requests.get(str(rid))
                if req is not None:
                    req.both = True
                elif len(self.partner_has) < 100_000:  # it may reach this server a moment later
                    self.partner_has[str(rid)] = now

    def _send_plan(self, link: ssl.SSLSocket, msg: dict[str, Any]) -> None:
        """Server 0: a message to server 1, announcing the requests that reached server 0 since the last."""
        with self.lock:
            msg["have"], self.to_announce = self.to_announce, []
        send(link, msg)

    # -- batches --------------------------------------------------------------------------------------

    def _run_batch(self, party: ssl.SSLSocket, command: int, slots: list[tuple[Request | None, int, int]]
                   ) -> tuple[np.ndarray, np.ndarray]:
        d1 = self.serving["d1"]
        x = np.zeros((self.batch, d1), dtype=np.uint64)
        pos = 0
        for req, start, count in slots:
            if req is not None:
                x[pos:pos + count] = req.shares[start:start + count]
            pos += count
        party.sendall(_octets(np.array([command, 0, 0], dtype="<i8").tobytes()))
        party.sendall(_octets(x.astype("<u8").tobytes()))
        try:
            out = _octets_receive(party)
        except socket.timeout:
            raise SessionEnded(f"party {self.party} did not answer within {self.party_timeout:.0f} s") from None
        vals = np.frombuffer(out, dtype="<u8").astype(np.uint64)
        if len(vals) != 2 * self.batch:
            raise SessionEnded(f"party {self.party} answered {len(vals)} shares, expected {2 * self.batch}")
        return vals[0::2], vals[1::2]

    def _deliver(self, slots: list[tuple[Request | None, int, int]], best: np.ndarray, denom: np.ndarray,
                 gen: str) -> None:
        pos = 0
        with self.lock:
            for req, start, count in slots:
                if req is not None and not req.finished:
                    if req.best is None:
                        req.best = np.zeros(req.n, dtype=np.uint64)
                        req.denom = np.zeros(req.n, dtype=np.uint64)
                    req.best[start:start + count] = best[pos:pos + count]
                    req.denom[start:start + count] = denom[pos:pos + count]
                    req.filled += count
                    if req.filled == req.n:
                        self._answer(req, gen)
                pos += count

    def _lead(self, link: ssl.SSLSocket, box: Outbox, party: ssl.SSLSocket) -> None:
        """Server 0, the link's one reader and writer: plans batches of requests both servers hold."""
        seq = 0
        follower_gen: str | None = None
        last_contact = time.monotonic()
        while not self.stop.is_set():
            self._check_party_alive()
            with self.lock:
                ready = any(self.requests[rid].both for rid in self.queue if rid in self.requests)
            if not ready and box.wait(link, 0.5):  # woken by a new request, or server 1 announced some
                self._leader_read(link)
            assert self.serving is not None
            command, gen = CMD_SERVE, self.serving["gen"]
            mine = self._current()
            idle = time.monotonic() - last_contact > HEARTBEAT
            if idle or (mine is not None and mine["gen"] != gen):
                last_contact = time.monotonic()
                if idle or follower_gen != mine["gen"]:  # ask server 1 what it holds now (and that it is there)
                    self._send_plan(link, {"type": "plan", "seq": seq, "probe": True})
                    follower_gen = self._ack(link, seq)
                    seq += 1
                if mine is not None and mine["gen"] != gen and follower_gen == mine["gen"]:
                    if tuple(mine[k] for k in ("d1", "c", "exp_bits")) != tuple(
                            self.serving[k] for k in ("d1", "c", "exp_bits")):
                        self._send_plan(link, {"type": "plan", "seq": seq, "restart": mine["gen"]})
                        raise Switching(f"switching to generation {mine['gen']}, of other sizes: restarting")
                    command, gen = CMD_RELOAD, mine["gen"]
            slots, rejects, held = self._plan(gen, pending=mine["gen"] if mine is not None else None)
            if not slots and command == CMD_SERVE:
                if rejects:
                    self._send_plan(link, {"type": "plan", "seq": seq, "gen": gen, "slots": [], "reject": rejects})
                    follower_gen = self._ack(link, seq)
                    seq += 1
                elif held:  # requests wait for a switch server 1 is not ready for yet
                    self.stop.wait(0.05)
                continue
            self._send_plan(link, {"type": "plan", "seq": seq, "gen": gen, "reload": command == CMD_RELOAD,
                        "slots": [[r.id, s, c] for r, s, c in slots], "reject": rejects})
            if command == CMD_RELOAD:
                self._install_model(gen)
                self.serving = mine
                logger.info("server 0: switched to model generation %s between two batches", gen)
            best, denom = self._run_batch(party, command, slots)
            self._deliver(slots, best, denom, gen)
            follower_gen = self._ack(link, seq)
            last_contact = time.monotonic()
            seq += 1

    def _ack(self, link: ssl.SSLSocket, seq: int) -> str | None:
        """Server 1's answer to plan ``seq`` (announcements that come first are taken on the way)."""
        while True:
            answer = self._leader_read(link, seq)
            if answer is not None:
                return answer.get("current")

    def _leader_read(self, link: ssl.SSLSocket, seq: int | None = None) -> dict[str, Any] | None:
        """One message from server 1: an announcement of requests it holds (taken, None), or (only
        while plan ``seq`` is out) the answer to that plan, returned."""
        msg, _ = receive(link)
        kind = msg.get("type")
        if kind == "have":
            self._mark_held(msg.get("ids"))
            return None
        if kind != "done" or seq is None or msg.get("seq") != seq:
            raise SessionEnded(f"server 1 sent {kind} {msg.get('seq')} " +
                               (f"in answer to plan {seq}" if seq is not None else "with no plan out"))
        return msg

    def _plan(self, gen: str, pending: str | None
              ) -> tuple[list[tuple[Request, int, int]], list[list[str]], int]:
        """Up to ``batch`` queries from the oldest requests for ``gen`` that server 1 holds too;
        also the requests refused, and how many wait for a switch.

        A request for ``pending`` (the generation this server installed, not yet served because
        server 1 does not hold it yet) waits up to :attr:`follower_wait`; a request for any other
        generation is refused. A request server 1 has not announced stays queued (the janitor fails
        it if server 1 never does)."""
        slots: list[tuple[Request, int, int]] = []
        rejects: list[list[str]] = []
        room = self.batch
        held = 0
        with self.lock:
            waiting: list[str] = []
            while self.queue and room > 0:
                rid = self.queue.popleft()
                req = self.requests.get(rid)
                if req is None or req.finished:
                    continue
                if not req.both:
                    waiting.append(rid)
                    continue
                if req.gen != gen:
                    if req.gen == pending and time.monotonic() - req.t0 < self.follower_wait:
                        waiting.append(rid)
                        held += 1
                        continue
                    msg = f"the service serves model generation {gen}, the request expects {req.gen}"
                    rejects.append([req.id, "generation", msg])
                    self._answer_error(req, "generation", msg)
                    continue
                take = min(room, req.n - req.scheduled)
                slots.append((req, req.scheduled, take))
                req.scheduled += take
                room -= take
                if req.scheduled < req.n:
                    self.queue.appendleft(rid)
            self.queue.extendleft(reversed(waiting))
        return slots, rejects, held

    def _follow(self, link: ssl.SSLSocket, box: Outbox, party: ssl.SSLSocket) -> None:
        """Server 1, the link's one reader and writer: runs server 0's plans, announces requests."""
        silence = 3 * HEARTBEAT + self.party_timeout  # server 0 writes at least every HEARTBEAT seconds
        link.settimeout(self.party_timeout)  # within a message
        heard = time.monotonic()
        while not self.stop.is_set():
            self._check_party_alive()
            if self.session_broken.is_set():
                raise SessionEnded("server 0 opened a new link")
            readable = box.wait(link, 0.5)
            box.flush(link)  # announcements go out before anything else this server sends
            if not readable:
                if time.monotonic() - heard > silence:
                    raise SessionEnded(f"server 0 sent nothing for {silence:.0f} s")
                continue
            plan, _ = receive(link)
            heard = time.monotonic()
            if plan.get("type") != "plan":
                raise SessionEnded(f"server 0 sent {plan.get('type')!r} instead of a plan")
            self._mark_held(plan.get("have", []))
            if "restart" in plan:
                raise Switching(f"server 0 switches to generation {plan['restart']} of other sizes: restarting")
            if plan.get("probe"):
                send(link, {"type": "done", "seq": plan["seq"], "current": current_generation(self.server)})
                continue
            with self.lock:
                for rid, code, msg in plan.get("reject", []):
                    req = self.requests.get(rid)
                    if req is not None:
                        self._answer_error(req, code, msg)
                    else:
                        self._remember(rid, code, msg)
            if not plan["slots"] and not plan.get("reload"):
                send(link, {"type": "done", "seq": plan["seq"], "current": current_generation(self.server)})
                continue
            gen = plan["gen"]
            command = CMD_SERVE
            if plan.get("reload"):
                model = self._generation(gen)
                self._install_model(gen)
                self.serving = model
                command = CMD_RELOAD
                logger.info("server 1: switched to model generation %s between two batches", gen)
            slots = self._gather(plan["slots"], gen)
            best, denom = self._run_batch(party, command, slots)
            self._deliver(slots, best, denom, gen)
            box.flush(link)
            send(link, {"type": "done", "seq": plan["seq"], "current": current_generation(self.server)})

    def _gather(self, wanted: list[list[Any]], gen: str) -> list[tuple[Request | None, int, int]]:
        """The plan's requests. Server 0 plans only requests this server announced, so one that is
        not here any more was answered already (as failed): it is fed as zeros at once, never waited for (server 0's shares of it alone are worthless)."""
        slots: list[tuple[Request | None, int, int]] = []
        with self.lock:
            for rid, start, count in wanted:
                req = self.requests.get(rid)
                if req is None:
                    self._remember(rid, "unavailable", f"request {rid} is no longer on server 1")
                elif req.gen != gen:
                    self._answer_error(req, "generation", f"the service serves model generation {gen}, the request "
                                                          f"expects {req.gen}")
                    req = None
                slots.append((req, int(start), int(count)))
        return slots

    def _remember(self, rid: str, code: str, msg: str) -> None:
        self.verdicts[rid] = (code, msg)
        while len(self.verdicts) > 10000:
            self.verdicts.popitem(last=False)


# ---- MP-SPDZ's octetStream framing (ExternalIO/client.py) ----------------------------------------

def _octets(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + payload


def _octets_receive(sock: ssl.SSLSocket) -> bytes:
    n = int.from_bytes(recv_exact(sock, 4), "little")
    return recv_exact(sock, n)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text.splitlines()) == 1 else " ".join(text.split())[:300]


__all__ = ["CLIENT_OFFSET", "LINK_OFFSET", "SPDZ_OFFSET", "ServicePorts", "ServiceServer", "prepare_run",
           "service_program_args"]


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestration.server.gateway``: one server's gateway (what ``invoke serve --id I`` runs)."""
    import argparse
    import sys

    from orchestration.mpspdz.hosts import HostsError, load_hosts
    from orchestration.mpspdz.toolchain import find_mpspdz, protocol

    ap = argparse.ArgumentParser(prog="python -m orchestration.server.gateway", description=main.__doc__)
    ap.add_argument("--server-dir", required=True, type=Path, help="this server's folder (certs, models, clients)")
    ap.add_argument("--id", required=True, type=int, choices=(0, 1), help="which server this is")
    ap.add_argument("--hosts", required=True, type=Path, help="the service's hosts file")
    ap.add_argument("--protocol", default="dealer", help="dealer | semi2k")
    ap.add_argument("--batch", type=int, default=16, help="queries per MPC batch")
    ap.add_argument("--mpspdz-home", default=None, help="MP-SPDZ folder")
    ap.add_argument("--follower-wait", type=float, default=10.0, help="seconds the servers wait for each other: for a model generation both hold; "
                    "half a request (one server only) is failed after twice this")
    ap.add_argument("--max-queued", type=int, default=MAX_QUEUED,
                    help="queries this gateway holds waiting; beyond it a request gets the error busy")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s server" + str(a.id) + ": %(message)s")
    try:
        mp = find_mpspdz(a.mpspdz_home)
        proto = protocol(a.protocol)
        hosts = load_hosts(a.hosts)
        server = Server(a.server_dir.resolve(), a.id)
        svc = ServiceServer(mp, server, server.build_dir, hosts, proto, batch=a.batch, follower_wait=a.follower_wait,
                            max_queued=a.max_queued)
    except (MPSPDZError, HostsError, ValueError, OSError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1

    def _stop(signum: int, _frame: Any) -> None:
        logger.info("server %d: %s, stopping", a.id, signal.Signals(signum).name)
        svc.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        svc.serve()
    except (MPSPDZError, certs_mod.CertError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
