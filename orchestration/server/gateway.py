"""Runs on a server: the recognition service (``invoke serve --id I``), one gateway and one MP-SPDZ party.

Each server runs, for as long as the service is up::

    clients --TLS, client certificates pinned--> gateway i --MP-SPDZ client interface (TLS, loopback)-->
        party i of mpc_programs/face_predict.mpc in "serve" mode <--MPC (TLS)--> the other server's party

The party (``semi2k-party.x``, or ``dealer-ring-party.x`` with the dealer as player 2) loads this
server's model share once and loops over requests; the gateway is MP-SPDZ's one client on this host.
Everything a gateway handles is a share, a size or an id. The gateway has four parts, one module each:

* :mod:`orchestration.server.connections`: client connections (authentication, caps, header checks
  before bodies, revocation, idle timeouts);
* :mod:`orchestration.server.requests`: the table of requests, the state machine both gateways keep;
* :mod:`orchestration.server.link`: the link between the two gateways, on which server 0 plans the
  batches and both announce the requests they hold;
* :mod:`orchestration.server.party`: the driver of this server's MP-SPDZ party, one connection per lane
  (the party's request loops: batches in flight at once), and :mod:`orchestration.server.lanes`, a worker
  thread per lane.

This module ties them into sessions. Model generations: a client names the generation it holds.
Server 0 switches the service to a new generation between two batches, once both servers hold it
(``invoke train``/``refresh-shares`` installed it): same sizes, the party re-reads its share file
(command RELOAD); other sizes, both restart their party. A request for another generation than the
one served is answered with the error code ``generation``, never computed on the wrong model.

Failures: when the party, the link or the other server goes away, or anything unexpected happens in
a session, the requests in flight are answered with the error code ``unavailable`` and the gateway
starts a new session: new party, new link, found again without anyone's help once the other server
is back. No client input can stop a gateway: the worst a client can do is lose its own connection.

Ports: see :class:`orchestration.shared.ports.ServicePorts`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import ssl
import threading
from pathlib import Path
from typing import Any


from preprocessing.fileio import private_dir
from preprocessing.sharing import SharingError

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.hosts import Hosts
from orchestration.mpspdz.toolchain import MPSPDZ, MPSPDZError, Protocol
from orchestration.server import gallery_ops
from orchestration.server.gallery import Gallery, Settings
from orchestration.server.registry import KINDS, REGISTRY_LINK_OFFSET, Registry
from orchestration.server.connections import ClientConn, ClientConnections, Limits, Outbox, Refused
from orchestration.server.job import ModelError, Server, current_generation, plain_id
from orchestration.server.link import Follower, Leader, LinkListener, connect_link, link_box_messages, link_receive
from orchestration.server.party import PartyDriver, SessionEnded, Switching
from orchestration.server.requests import MAX_D1, MAX_PER_CLIENT, MAX_QUERIES, MAX_QUEUED, REQUEST_TIMEOUT, Request, \
    RequestTable, Slot
from orchestration.shared.ports import CLIENT_OFFSET, LINK_OFFSET, MAX_LANES, SPDZ_OFFSET, ServicePorts, \
    service_program_args
from orchestration.shared.roles import ACTIONS, RoleError, require_role
from orchestration.shared.reference import SCORE
from orchestration.shared.wire import WireError, body_shares, int_field, send, str_field

logger = logging.getLogger(__name__)

DEFAULT_EXP_BITS = 8
#: batches in flight at once: the serve program's request loops, each an MP-SPDZ thread with its own gateway
#: connection and channels between the parties. At 20 ms between the servers a batch spends most of its time
#: waiting for the other server, so a second lane nearly doubles throughput at the same latency.
DEFAULT_LANES = 2


class ServiceServer:
    """Server ``server.party``'s gateway and party supervisor. :meth:`serve` runs until ``stop`` is set."""

    def __init__(self, mp: MPSPDZ, server: Server, build: Path, hosts: Hosts, proto: Protocol, *, batch: int = 16,
                 follower_wait: float = 10.0, party_timeout: float = 30.0, start_timeout: float = 120.0,
                 max_queued: int = MAX_QUEUED, max_per_client: int | None = None,
                 request_timeout: float = REQUEST_TIMEOUT, limits: Limits = Limits(),
                 sources: Settings | None = None, lanes: int = DEFAULT_LANES, quick: bool = True):
        if server.party not in (0, 1):
            raise ValueError(f"server id {server.party}: expected 0 or 1")
        if batch < 1 or batch > 1024:
            raise ValueError(f"service batch {batch}: expected 1..1024")
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"service lanes {lanes}: expected 1..{MAX_LANES}")
        n_lines = proto.n_parties
        if len(hosts) < n_lines:
            raise ValueError(f"{hosts.path}: {len(hosts)} lines, the {proto.name} service needs {n_lines} "
                             "(server 0, server 1" + (", the dealer)" if proto.dealer else ")"))
        self.mp, self.server, self.build, self.proto = mp, server, Path(build), proto
        self.ports = ServicePorts(hosts)
        self.party = server.party
        self.batch = batch
        self.follower_wait, self.party_timeout = follower_wait, party_timeout
        self.table = RequestTable(self.party, batch, max_queued=max_queued,
                                  max_per_client=min(max_queued, max_per_client or max(MAX_PER_CLIENT, max_queued // 4)),
                                  half_timeout=2 * follower_wait, request_timeout=request_timeout,
                                  pending_wait=follower_wait)
        self.driver = PartyDriver(mp, server, build, self.ports, proto, batch, party_timeout=party_timeout,
                                  start_timeout=start_timeout, lanes=lanes, quick=quick)
        self.serving: dict[str, Any] | None = None  # {"gen", "d1", "c", "exp_bits"} of the running session
        self.in_flight_peak = 0  # server 0: the most batches it has had in flight at once (lanes at work)
        self.starting: dict[str, Any] | None = None  # the model of the session being set up
        self.stop = threading.Event()
        self.link_box: Outbox | None = None  # the session's link: announcements (server 1), wake-ups (server 0)
        self.certs: certs_mod.PartyCerts  # set by _check_certs before anything listens
        self.clients = ClientConnections(self.party, server.root, lambda: (self.certs.own.path, self.certs.key),
                                         check=self._check_frame,
                                         handle=self._handle, on_close=self._closed, stop=self.stop, limits=limits)
        self.links = LinkListener(lambda: self._link_context(server_side=True), self.stop)
        self._listeners: list[socket.socket] = []
        self.registry: Registry | None = None  # a gallery of many sources (--sources)
        if sources is not None:
            gallery = Gallery(server)
            settings = gallery.init(sources)
            env = gallery_ops.Env(mp, server, proto, hosts, gallery, settings,
                                  announce=(lambda job: self.registry.announce(job)) if self.party == 0 else None)
            self.registry = Registry(env, lambda side: self._link_context(server_side=side),
                                     lambda: (self.serving or {}).get("gen"), self._wake, self.stop,
                                     half_wait=2 * follower_wait)

    # -- TLS contexts -------------------------------------------------------------------------------

    def _check_certs(self) -> None:
        """This server's key and the pinned certificates, checked (openssl) at start and at every session."""
        self.certs = certs_mod.check_party_certs(self.server.root, self.party, self.proto.n_parties)
        self.clients.forget_context()

    def _link_context(self, server_side: bool) -> ssl.SSLContext:
        pc = self.certs
        ctx = certs_mod.harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT))
        ctx.load_cert_chain(pc.own.path, pc.key)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(pc.peers[1 - self.party].path))
        return ctx

    # -- clients -------------------------------------------------------------------------------------

    def _model_d1(self) -> int | None:
        model = self.serving or self.starting or self.current()
        return None if model is None else int(model["d1"])

    def _check_frame(self, conn: ClientConn, header: dict[str, Any]) -> int:
        """A client frame's header, checked before its body is read; returns the body's size."""
        kind = header["type"]
        if kind == "status":
            return 0
        if kind in KINDS:
            if self.registry is None:
                raise Refused(f"server {self.party} keeps no gallery of many sources (serve --sources): {kind} "
                              "is refused", "refused", header.get("id") if isinstance(header.get("id"), str) else None)
            return self.registry.check(conn, header)
        if kind != "recognize":
            raise Refused(f"unknown message type {kind[:40]!r}")
        rid = str_field(header, "id", 64)
        try:
            require_role(conn.role, ACTIONS["recognize"], "recognize", conn.name)
        except RoleError as exc:
            raise Refused(str(exc), "refused", rid) from None
        str_field(header, "gen")
        n = int_field(header, "n", 1, MAX_QUERIES)
        d1 = int_field(header, "d1", 1, MAX_D1)
        model_d1 = self._model_d1()
        if model_d1 is None:
            raise Refused(f"server {self.party} serves no model yet; retry later", "unavailable", rid)
        if d1 != model_d1:
            raise Refused(f"queries have {d1} values, the model takes {model_d1}", "bad-request", rid)
        return 8 * n * d1

    def _handle(self, conn: ClientConn, header: dict[str, Any], body: bytes) -> None:
        if header["type"] == "status":
            conn.reply(self._status(conn))
            return
        if header["type"] in KINDS:
            assert self.registry is not None
            self.registry.handle(conn, header, body)
            return
        n, d1 = header["n"], header["d1"]
        req = Request(header["id"], header["gen"], n, body_shares(body, n * d1, f"request {header['id']}")
                      .reshape(n, d1), conn)
        self.table.take(req, self._model_d1())
        box = self.link_box
        if box is None:
            return
        if self.party == 0:  # wake the leader
            box.put(None)
        else:  # tell server 0 which requests are here
            for frame in link_box_messages(self.table.take_announcements()):
                box.put(frame)

    def _closed(self, conn: ClientConn) -> None:
        self.table.drop_client(conn)

    def _status(self, conn: ClientConn) -> dict[str, Any]:
        """What a client (and the dealer, which must run the very same program) needs to know; of the
        queue, only this client's own part."""
        s = self.serving or self.starting or {}
        state = "serving" if self.serving else "starting" if self.starting else "waiting"
        out = {"type": "status", "party": self.party, "state": state, "gen": s.get("gen"), "d1": s.get("d1"),
               "c": s.get("c"), "exp_bits": s.get("exp_bits"), "names": s.get("names"), "batch": self.batch,
               "lanes": self.driver.lanes, "quick": self.driver.quick,
               "protocol": self.proto.name, "queued": self.table.queued_by(conn.name),
               "max_queued": self.table.max_per_client}
        if self.registry is not None:
            out.update(self.registry.status(conn.role))
        return out

    def _wake(self) -> None:
        """A new generation is installed: server 0's leader looks at once (not at its next heartbeat)."""
        box = self.link_box
        if box is not None and self.party == 0:
            box.put(None)

    def _janitor(self) -> None:
        """Every second: expire requests (half ones, and any past the request timeout) and close revoked,
        expired and idle connections."""
        while not self.stop.wait(1.0):
            try:
                self.table.expire()
                self.clients.sweep()
            except Exception:  # the janitor must outlive any bug
                logger.exception("server %d: janitor", self.party)

    # -- the model ----------------------------------------------------------------------------------

    def generation(self, gen: str) -> dict[str, Any]:
        """Sizes of generation ``gen`` (a name from the ``model`` link or from server 0: checked before use)."""
        try:
            meta = json.loads((self.server.models / plain_id(gen, "gen", self.server.models) / "manifest.json")
                              .read_text())
            names = [int(meta["name_words"]), float(meta["threshold"])] if meta.get("mode") == "names" else None
            return {"gen": gen, "d1": int(meta["d1"]), "c": int(meta["c"]),
                    "exp_bits": int(meta.get("exp_bits", DEFAULT_EXP_BITS)), "names": names}
        except (OSError, ValueError, KeyError, TypeError, SharingError):
            raise ModelError(f"server {self.party} does not hold model generation {gen}") from None

    def current_name(self) -> str | None:
        return current_generation(self.server)

    def current(self) -> dict[str, Any] | None:
        """The generation the ``model`` link points at; only a readlink while it is the one served."""
        gen = current_generation(self.server)
        if gen is None:
            return None
        serving = self.serving
        if serving is not None and gen == serving["gen"]:
            return serving
        try:
            return self.generation(gen)
        except ModelError:
            return None

    # -- batches --------------------------------------------------------------------------------------

    @property
    def lane_batch(self) -> list[int]:
        """Queries per batch of each lane: the quick lane's one first, if any."""
        return self.driver.lane_batch

    def compute(self, command: int, slots: list[Slot], gen: str, lane: int, d1: int) -> None:
        """One batch on the party's ``lane`` (from that lane's worker thread); the answers go to the requests'
        clients."""
        x = self.table.batch_input(slots, d1, self.lane_batch[lane])
        self.table.deliver(slots, self.driver.run_batch(command, x, lane), gen)

    # -- sessions -------------------------------------------------------------------------------------

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

    def _accept_loop(self, lsock: socket.socket, serve: Any) -> None:
        """Hand every connection on ``lsock`` to ``serve(sock, addr)`` in a thread of its own (the other server's
        links: the gateways' and the registry's)."""
        while not self.stop.is_set():
            try:
                sock, addr = lsock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=serve, args=(sock, addr), daemon=True).start()

    def serve(self) -> None:
        """Run until :attr:`stop` is set (SIGTERM / SIGINT in ``invoke serve``)."""
        private_dir(self.server.root)
        self._check_certs()  # fail now when a certificate is missing
        if not certs_mod.allowed_clients(self.server.root):
            logger.warning("server %d: no client is allowed yet (%s is empty): every connection will be refused",
                           self.party, certs_mod.client_dir_of(self.server.root))
        lsock = self._listen(self.ports.client(self.party), "clients")
        threading.Thread(target=self.clients.accept_loop, args=(lsock,), daemon=True).start()
        if self.party == 1:
            lk = self._listen(self.ports.link(), "server 0's gateway")
            threading.Thread(target=self._accept_loop, args=(lk, self.links.accept), daemon=True).start()
        if self.registry is not None and self.party == 1:
            rl = self._listen((self.ports.hosts[1].address, self.ports.hosts[1].port + REGISTRY_LINK_OFFSET),
                              "server 0's registry")
            threading.Thread(target=self._accept_loop, args=(rl, self.registry.follow), daemon=True).start()
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
                except Exception as exc:  # a bug ends the session, never the gateway
                    logger.exception("server %d: session failed (%s); starting a new one", self.party,
                                     type(exc).__name__)
                finally:
                    self.serving = self.starting = None
                    self.driver.stop()
                    self.table.fail_all(code, why)
                if not self.stop.is_set():
                    self.stop.wait(1.0)
        finally:
            for s in self._listeners:
                s.close()
            self.driver.stop()
            logger.info("server %d: stopped after %d answered requests", self.party, self.table.served)

    def _hello(self, link: ssl.SSLSocket, model: dict[str, Any], box: Outbox) -> dict[str, Any]:
        """The session's first messages on a new link; returns the model both serve."""
        if self.party == 0:
            send(link, {"type": "hello", "gen": model["gen"], "lanes": self.lane_batch})
            answer = link_receive(link)
            if answer.get("type") != "hello" or answer.get("ok") is not True:
                raise SessionEnded(f"server 1 cannot serve generation {model['gen']}: {str(answer.get('message'))[:300]}")
            self.table.new_link(announce_all=True)  # each server announces, on this link, every request it holds
            self.link_box = box
            return model
        hello = link_receive(link)
        try:
            model = self.generation(str_field(hello, "gen"))
            if hello.get("lanes", [self.batch]) != self.lane_batch:
                raise ModelError(f"server 0's lanes take batches of {hello.get('lanes', [self.batch])!r} queries, "
                                 f"server 1's {self.lane_batch}: start both with the same --batch, --lanes and "
                                 "--quick (service.batch, service.lanes, service.quick)")
        except (ModelError, WireError) as exc:
            send(link, {"type": "hello", "ok": False, "message": str(exc)})
            raise SessionEnded(str(exc)) from None
        send(link, {"type": "hello", "ok": True})
        held = self.table.new_link(announce_all=False)  # from now on each request is announced as it comes; these came before
        self.link_box = box
        for frame in link_box_messages(held):
            link.sendall(frame)
        return model

    def _session(self) -> None:
        self._check_certs()
        model = self.current()
        while model is None:
            logger.info("server %d: no model yet; waiting for %s", self.party,
                        "a source's first contribution (`invoke contribute`)" if self.registry is not None
                        else "`invoke train`")
            if self.stop.wait(2.0):
                return
            model = self.current()
        if self.party == 0:
            link = connect_link(self.ports.link(), self._link_context(server_side=False), self.stop)
        else:
            link = self.links.take()
        box = Outbox()
        try:
            link.settimeout(self.party_timeout + self.follower_wait)
            model = self._hello(link, model, box)
            self.starting = model
            self.driver.start(model, self.certs)
            self.driver.connect(lambda: self.stop.is_set() or (self.party == 1 and self.links.renewed.is_set()))
            self.serving, self.starting = model, None
            logger.info("server %d: serving model generation %s (%d classes)", self.party, model["gen"], model["c"])
            if self.party == 0:
                Leader(self, link, box).run()
            else:
                Follower(self, link, box, self.links.renewed).run()
        except (WireError, OSError, ssl.SSLError) as exc:
            raise SessionEnded(_one_line(exc)) from None
        finally:
            self.link_box = None
            link.close()
            box.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text.splitlines()) == 1 else " ".join(text.split())[:300]


__all__ = ["CLIENT_OFFSET", "LINK_OFFSET", "SPDZ_OFFSET", "ServicePorts", "ServiceServer", "service_program_args"]


def _settings(text: str | None) -> Settings | None:
    if text is None:
        return None
    try:
        settings = Settings.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--sources {text[:200]!r}: expected the gallery's settings as JSON ({exc})") from None
    if settings.score != SCORE:  # new settings must be on the servers' score; only an old settings.json may not be
        raise ValueError(f"--sources: thresholds on the score {settings.score!r}, allowed: {SCORE!r} (logit thresholds on "
                         "the top logit z_max, as models/thresholds.json holds them; add \"score\": \"zmax\")")
    return settings


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
    ap.add_argument("--lanes", type=int, default=DEFAULT_LANES,
                    help=f"batches of --batch queries in flight at once (the party's request loops, 1..{MAX_LANES}); "
                         "the same on both servers")
    ap.add_argument("--quick", action=argparse.BooleanOptionalAction, default=True,
                    help="one more lane, of one query, for a face that comes alone (on unless negated); the same on "
                         "both servers")
    ap.add_argument("--mpspdz-home", default=None, help="MP-SPDZ folder")
    ap.add_argument("--follower-wait", type=float, default=10.0, help="seconds the servers wait for each other: for a "
                    "model generation both hold; half a request (one server only) is failed after twice this")
    ap.add_argument("--max-queued", type=int, default=MAX_QUEUED,
                    help="queries this gateway holds waiting; beyond it a request gets the error busy")
    ap.add_argument("--max-per-client", type=int, default=None,
                    help="queries one client certificate may have waiting (default: a quarter of --max-queued, at "
                         f"least {MAX_PER_CLIENT})")
    ap.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                    help="seconds after which a request not yet answered is failed (unavailable)")
    ap.add_argument("--max-connections", type=int, default=Limits.max_connections,
                    help="client connections this gateway holds at once")
    ap.add_argument("--max-client-connections", type=int, default=Limits.max_per_client,
                    help="connections one client certificate may hold at once")
    ap.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout,
                    help="seconds after which a connection that sent nothing is closed")
    ap.add_argument("--sources", default=None, metavar="JSON",
                    help="keep a gallery of many sources with these public settings (d, name_words, alpha, "
                         "thresholds by gallery size, exp_bits, embedder), the same on both servers")
    ap.add_argument("--job-timeout", type=float, default=600.0, help="seconds a gallery job may take")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s server" + str(a.id) + ": %(message)s")
    try:
        mp = find_mpspdz(a.mpspdz_home)
        proto = protocol(a.protocol)
        hosts = load_hosts(a.hosts)
        server = Server(a.server_dir.resolve(), a.id)
        limits = Limits(max_connections=a.max_connections, max_per_client=a.max_client_connections,
                        idle_timeout=a.idle_timeout)
        svc = ServiceServer(mp, server, server.build_dir, hosts, proto, batch=a.batch, follower_wait=a.follower_wait,
                            max_queued=a.max_queued, max_per_client=a.max_per_client,
                            request_timeout=a.request_timeout, limits=limits,
                            sources=_settings(a.sources), lanes=a.lanes, quick=a.quick)
        if svc.registry is not None:
            svc.registry.env = dataclasses.replace(svc.registry.env, timeout=a.job_timeout)
    except (MPSPDZError, HostsError, ValueError, OSError, TypeError) as exc:
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
