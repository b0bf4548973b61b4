"""The gateway's client connections (orchestration.server.connections) on loopback, no MPC.

Real TLS, real certificates, the real service client's TLS context; the gateway's request handling
replaced by a recorder. Checked: caps on connections (in all, per client) and on handshakes in
progress; the header refused before the body; a frame trickled byte by byte is cut at the frame
timeout; idle, revoked and expired connections are closed; a bug while handling a frame costs that
connection only.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestration.client.service import ServiceClient
from orchestration.mpspdz import certs
from orchestration.mpspdz.hosts import write_hosts
from orchestration.server.connections import ClientConn, ClientConnections, Limits, Refused
from orchestration.shared.wire import encode, receive


class Gateway:
    """ClientConnections on a free loopback port, with a janitor; records what it is handed."""

    def __init__(self, root: Path, limits: Limits, check=None, handle=None):
        self.server = root / "server0"
        certs.make_party_cert(self.server, 0)
        self.stop = threading.Event()
        self.seen: list[dict[str, Any]] = []
        self.closed: list[str] = []
        self.cc = ClientConnections(
            0, self.server, lambda: (certs.cert_dir(self.server) / "P0.pem", certs.cert_dir(self.server) / "P0.key"),
            check=check or (lambda conn, h: 0), handle=handle or self._handle,
            on_close=lambda conn: self.closed.append(conn.name), stop=self.stop, limits=limits)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self.cc.accept_loop, args=(self.lsock,), daemon=True).start()
        threading.Thread(target=self._janitor, daemon=True).start()

    def _handle(self, conn: ClientConn, header: dict[str, Any], body: bytes) -> None:
        self.seen.append(header)
        conn.reply({"type": "status", "echo": header.get("n")})

    def _janitor(self) -> None:
        while not self.stop.wait(0.2):
            self.cc.sweep()

    def client(self, root: Path, name: str) -> ServiceClient:
        folder = root / f"client-{name}"
        certs.make_client_cert(folder, name)
        certs.allow_client(self.server, folder / "certs" / "client.pem")
        (folder / "certs" / "P0.pem").write_bytes((certs.cert_dir(self.server) / "P0.pem").read_bytes())
        (folder / "certs" / "P1.pem").write_bytes((certs.cert_dir(self.server) / "P0.pem").read_bytes())
        hosts = write_hosts(root / f"hosts-{name}", [("127.0.0.1", self.port - 100), ("127.0.0.1", self.port - 99)])
        return ServiceClient(folder, hosts, timeout=5)

    def close(self) -> None:
        self.stop.set()
        self.lsock.close()


@pytest.fixture
def gw(tmp_path):
    made: list[Gateway] = []

    def make(**kw) -> Gateway:
        limits = Limits(**{k: kw.pop(k) for k in list(kw) if k in Limits.__dataclass_fields__})
        g = Gateway(kw.pop("root", tmp_path), limits, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def _connect(cl: ServiceClient):
    cl.socks[0] = None
    return cl._sock(0)


def _status(sock) -> dict[str, Any]:
    sock.sendall(encode({"type": "status"}))
    return receive(sock)[0]


def test_connections_are_capped_in_all_and_per_client(gw, tmp_path):
    g = gw(max_connections=3, max_per_client=2)
    alice, bob = g.client(tmp_path, "alice"), g.client(tmp_path, "bob")
    a1, a2 = _connect(alice), _connect(alice)
    assert _status(a1)["type"] == _status(a2)["type"] == "status"
    a3 = _connect(alice)
    head = receive(a3)[0]
    assert head["code"] == "busy" and "alice holds 2 connections" in head["message"]
    b1 = _connect(bob)
    assert _status(b1)["type"] == "status"
    b2 = _connect(bob)
    head = receive(b2)[0]
    assert head["code"] == "busy" and "3 client connections" in head["message"]
    a1.close()
    deadline = time.monotonic() + 5
    while g.cc.count() > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(_connect(bob))["type"] == "status"  # a freed place is taken again


def test_handshakes_in_progress_are_capped_and_time_out(gw, tmp_path):
    g = gw(max_handshakes=2, handshake_timeout=1.0)
    alice = g.client(tmp_path, "alice")
    silent = [socket.create_connection(("127.0.0.1", g.port)) for _ in range(2)]  # TCP, never TLS
    time.sleep(0.3)
    third = socket.create_connection(("127.0.0.1", g.port))
    third.settimeout(2)
    assert third.recv(10) == b""  # closed at once: no thread, no buffer for it
    time.sleep(1.2)  # the silent ones' handshakes time out and free their places
    assert _status(_connect(alice))["type"] == "status"
    for s in silent + [third]:
        s.close()


def test_a_header_is_refused_before_its_body_is_read(gw, tmp_path):
    def check(conn, h):
        if h.get("n", 0) > 10:
            raise Refused("too many queries", "bad-request", "r1")
        return 8 * h.get("n", 0)

    g = gw(check=check)
    s = _connect(g.client(tmp_path, "alice"))
    head = b'{"type":"recognize","id":"r1","n":100000}'
    s.sendall(struct.pack("<II", 64 << 20, len(head)) + head)  # announces 64 MiB, sends none of it
    t0 = time.monotonic()
    reply = receive(s)[0]
    assert reply == {"type": "error", "id": "r1", "code": "bad-request", "message": "too many queries"}
    assert time.monotonic() - t0 < 2 and not g.seen


def test_a_trickled_frame_is_cut_at_the_frame_timeout(gw, tmp_path):
    g = gw(frame_timeout=1.0)
    s = _connect(g.client(tmp_path, "alice"))
    s.sendall(b"\x40\x00")  # half a length prefix, then nothing
    t0 = time.monotonic()
    reply = receive(s)[0]
    assert reply["code"] == "bad-request" and "not complete in time" in reply["message"]
    assert 0.8 < time.monotonic() - t0 < 3


def test_idle_connections_are_closed(gw, tmp_path):
    g = gw(idle_timeout=1.0)
    s = _connect(g.client(tmp_path, "alice"))
    assert _status(s)["type"] == "status"
    time.sleep(1.8)
    reply = receive(s)[0]
    assert reply["code"] == "refused" and "idle" in reply["message"]
    assert g.closed == ["alice"]


def test_a_revoked_or_expired_client_is_cut_off(gw, tmp_path):
    g = gw()
    alice, bob = g.client(tmp_path, "alice"), g.client(tmp_path, "bob")
    sa, sb = _connect(alice), _connect(bob)
    assert _status(sa)["type"] == _status(sb)["type"] == "status"
    (certs.client_dir_of(g.server) / "alice.pem").unlink()
    reply = receive(sa)[0]  # the janitor closes the open connection
    assert reply["code"] == "refused" and "no longer pinned" in reply["message"]
    with pytest.raises(Exception):
        _connect(alice).sendall(encode({"type": "status"}))
        receive(alice.socks[0])
    conn = next(c for c in g.cc.conns if c.name == "bob")
    conn.not_after = time.time() - 1  # as if its notAfter passed
    reply = receive(sb)[0]
    assert reply["code"] == "refused" and "expired" in reply["message"]


def test_a_bug_while_handling_a_frame_costs_that_connection_only(gw, tmp_path):
    def handle(conn, header, body):
        if header.get("boom"):
            raise KeyError("a bug")
        conn.reply({"type": "status"})

    g = gw(handle=handle)
    alice = g.client(tmp_path, "alice")
    s = _connect(alice)
    s.sendall(encode({"type": "status", "boom": 1}))
    reply = receive(s)[0]
    assert reply["code"] == "failed" and reply["message"] == "internal error"
    assert _status(_connect(alice))["type"] == "status"


# ---- random sequences of what clients do, on one gateway ---------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

OPS = st.lists(st.one_of(
    st.tuples(st.just("connect"), st.integers(0, 1)),
    st.tuples(st.just("status"), st.integers(0, 5)),
    st.tuples(st.just("bytes"), st.integers(0, 5), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("half"), st.integers(0, 5)),
    st.tuples(st.just("hang-up"), st.integers(0, 5)),
    st.tuples(st.just("revoke"), st.integers(0, 1)),
    st.tuples(st.just("pin"), st.integers(0, 1)),
    st.tuples(st.just("raw"), st.binary(max_size=32)),
), min_size=1, max_size=12)


@settings(max_examples=12, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS)
def test_random_client_behaviour_never_stops_the_gateway(gw, tmp_path_factory, ops):
    """Connects, frames, garbage, frames cut in half, hang-ups, revocations and re-pins in any order: the
    gateway keeps accepting, every connection it holds is within its caps, and a well-behaved client is
    answered afterwards."""
    root = tmp_path_factory.mktemp("ops")
    g = gw(root=root, max_connections=6, max_per_client=3, frame_timeout=1.0, handshake_timeout=2.0)
    names = ["alice", "bob"]
    clients = [g.client(root, n) for n in names]
    pins = [(certs.client_dir_of(g.server) / f"{n}.pem", (certs.client_dir_of(g.server) / f"{n}.pem").read_bytes())
            for n in names]
    socks: list = []
    for op in ops:
        try:
            if op[0] == "connect":
                socks.append(_connect(clients[op[1]]))
                clients[op[1]].socks = [None, None]
            elif op[0] == "raw":
                s = socket.create_connection(("127.0.0.1", g.port), timeout=1)
                s.sendall(op[1])
                s.close()
            elif op[0] == "revoke":
                pins[op[1]][0].unlink(missing_ok=True)
            elif op[0] == "pin":
                pins[op[1]][0].write_bytes(pins[op[1]][1])
            elif socks:
                s = socks[op[1] % len(socks)]
                s.settimeout(1)
                if op[0] == "status":
                    s.sendall(encode({"type": "status"}))
                elif op[0] == "bytes":
                    s.sendall(op[2])
                elif op[0] == "half":
                    s.sendall(encode({"type": "status"})[:5])
                elif op[0] == "hang-up":
                    s.close()
        except (OSError, Exception):  # noqa: BLE001 - a client's own failures are not the point
            pass
        assert g.cc.count() <= 6
        assert not g.stop.is_set()
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    for path, pem in pins:
        path.write_bytes(pem)
    fresh = g.client(root, "carol")
    deadline = time.monotonic() + 20  # generous: CI's machine may be busy
    while True:  # the gateway frees the places of closed connections within its timeouts
        try:
            assert _status(_connect(fresh))["type"] == "status"
            break
        except (OSError, AssertionError, Exception):  # noqa: BLE001
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_refused_client_is_logged_with_its_certificates_name_fingerprint_and_the_pin_command(gw, tmp_path, caplog):
    """OpenSSL gives no certificate it refused; the gateway reads it from the client's handshake all the same,
    so the operator knows whom the log speaks of and what to pin. Pinned clients still connect as before."""
    g = gw()
    alice = g.client(tmp_path, "alice")
    door = tmp_path / "client-door"
    info = certs.make_client_cert(door, "door")  # a real client certificate, pinned nowhere
    for k in ("P0", "P1"):
        (door / "certs" / f"{k}.pem").write_bytes((certs.cert_dir(g.server) / "P0.pem").read_bytes())
    hosts = write_hosts(tmp_path / "hosts-door", [("127.0.0.1", g.port - 100), ("127.0.0.1", g.port - 99)])
    caplog.set_level("WARNING", logger="orchestration.server.connections")
    with pytest.raises(Exception):
        _status(_connect(ServiceClient(door, hosts, timeout=5)))
    deadline = time.monotonic() + 5
    while not any("refused client" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "refused client" in r.getMessage())
    assert "server 0 refused client connection" in line, line
    assert "'client-door'" in line and info.fingerprint in line, line
    assert "invoke certs --id 0 --allow-client" in line, line
    assert _status(_connect(alice))["type"] == "status"  # a pinned client is served as before


def test_clients_pinned_in_a_row_are_all_trusted(gw, tmp_path):
    """Pins change while a connection sends frames (each frame re-reads the pins): a new client's connection is
    trusted by a context built for the pins as they are now. (The context was cached by the pin table's id(), and a
    new table could reuse a freed one's id: a pinned client was then refused with 'unknown ca'.)"""
    g = gw()
    first = g.client(tmp_path, "first")
    sock = _connect(first)
    for k in range(12):
        cl = g.client(tmp_path, f"c{k}a")
        _status(sock)  # the pins are read again: a new table
        cl2 = g.client(tmp_path, f"c{k}b")
        _status(sock)  # and again, while the context was built for an older one
        for c in (cl, cl2):
            assert _status(_connect(c))["type"] == "status"
            c.close()
    first.close()
