"""The service against its own clients: an authorised client that misbehaves (issue 15's findings).

Each test reproduces one finding of the security review on the real service (two namespaces, the
client beside server 1) and checks that the gateways survive it, answer the offending request only,
and keep serving everyone else: mismatched halves of one request, a request of the wrong size while
no model is served, a stalled half, revoked certificates on open connections, frames that announce
64 MiB, headers that break the JSON parser, CBC-only clients, and ``status`` telling one client
about another's queue. The servers' folders are owner-only while they serve.
"""
from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestration.client import jobs as client
from orchestration.client.service import ServiceClient
from orchestration.mpspdz import certs
from orchestration.shared import reference
from orchestration.shared.wire import ServiceError, receive, send
from service_lab import NsClients, ServiceLab, trained_service
from synthetic import split
from test_two_hosts import Deployment, invoke, net_ok  # noqa: F401 - net_ok is a fixture

import netlab

pytestmark = [pytest.mark.mpc, pytest.mark.protocol]


@pytest.fixture(scope="module")
def data():
    return split(people=5, per=8, seed=11, every=4)


@pytest.fixture(scope="module")
def svc(net_ok, tmp_path_factory, data):
    x, labels, tr, _ = data

    def other_client(dep: Deployment) -> Path:
        other = dep.pin_client("other", dep.root / "client-other")
        (other / "model.json").write_bytes((dep.client / "model.json").read_bytes())
        return other

    with trained_service(tmp_path_factory.mktemp("abuse"), x[tr], [labels[k] for k in tr], other_client) as svc:
        yield svc


def _alive(lab: ServiceLab) -> None:
    for i in (0, 1):
        p = lab.procs[i]
        assert p is not None and p.poll() is None, f"server {i} stopped:\n{lab.log_tail(i, 30)}"
        for line in lab.logs[i].read_text(errors="replace").splitlines():
            assert "Traceback" not in line, f"server {i} logged a traceback:\n{lab.log_tail(i, 40)}"


def _served(lab: ServiceLab, clients: NsClients, x: np.ndarray) -> int:
    cl = lab.new_client(timeout=30)
    try:
        return len(clients.call(cl.recognise, x, 0.0).predictions)
    finally:
        clients.call(cl.close)


def _gen(lab: ServiceLab) -> str:
    return client.model_generation(client.load_model_record(lab.dep.client))


def _answers(cl: ServiceClient, clients: NsClients, timeout: float = 30.0) -> list[dict]:
    def read() -> list[dict]:
        out = []
        for i in (0, 1):
            cl._sock(i).settimeout(timeout)
            out.append(receive(cl._sock(i))[0])
        return out
    return clients.call(read)


def test_halves_of_one_request_with_other_sizes_fail_that_request_only(svc, data):
    """Finding 1: one id with n=16 at server 0 and n=2 at server 1 crashed server 1 (a broadcast error in
    its batch). Now both servers see each other's sizes before planning: the request is refused at both,
    the gateways stay up, and the next request is served."""
    lab, clients, _ = svc
    x, _, _, te = data
    padded = reference.with_bias(np.resize(x, (16, x.shape[1])))
    for big_at in (0, 1):
        cl = lab.new_client(timeout=30)
        rid = f"mismatch-{big_at}"
        big = ServiceClient.request_frames(padded, _gen(lab), rid)
        small = ServiceClient.request_frames(padded[:2], _gen(lab), rid)
        frames = [big[0], small[1]] if big_at == 0 else [small[0], big[1]]

        def send_both() -> None:
            for i in (1, 0):
                send(cl._sock(i), *frames[i])

        clients.call(send_both)
        t0 = time.monotonic()
        heads = _answers(cl, clients)
        assert all(h["type"] == "error" and h["id"] == rid for h in heads), heads
        assert any("different sizes" in h["message"] for h in heads), heads
        assert time.monotonic() - t0 < 10, "the mismatch was not found at once"
        clients.call(cl.close)
        _alive(lab)
        assert _served(lab, clients, x[te[:3]]) == 3


def test_a_stalled_half_is_released_and_cannot_fill_the_queue(svc, data):
    """Finding 2: the same id with n=4,096 at server 1 and n=1 at server 0 was planned for one query and
    never released; 32 of them made every client busy for good. Now each is refused at once at both
    servers, nothing stays queued, and requests are served after 40 such attempts."""
    lab, clients, _ = svc
    x, _, _, te = data
    padded = reference.with_bias(np.resize(x, (4096, x.shape[1])))
    cl = lab.new_client(timeout=30)
    try:
        for k in range(40):
            rid = f"stall-{k}"
            big = ServiceClient.request_frames(padded, _gen(lab), rid)[1]
            one = ServiceClient.request_frames(padded[:1], _gen(lab), rid)[0]
            clients.call(lambda: (send(cl._sock(1), *big), send(cl._sock(0), *one)))
            heads = _answers(cl, clients)
            assert all(h["type"] == "error" for h in heads), heads
        st = clients.call(cl.status)
        assert [s["queued"] for s in st] == [0, 0], st
    finally:
        clients.call(cl.close)
    _alive(lab)
    assert _served(lab, clients, x[te[:4]]) == 4


def test_a_wrong_size_while_no_model_is_served_is_refused_without_a_crash(net_ok, tmp_path, data):
    """Finding 1, second variant: while a gateway waits for its first model, d1 was not checked; a request with
    d1=2 was held and brought down both gateways once the model came. Now it is refused at once (unavailable),
    and when the model comes the service starts and serves."""
    x, labels, tr, te = data
    with netlab.TwoHosts(rtt_ms=0) as net:
        dep = Deployment(tmp_path, net)
        dep.pin_client()
        lab = ServiceLab(dep)
        for i in range(2):
            lab.start_server(i)
        lab.start_dealer()
        clients = NsClients(net.ns[1])
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if all("no model yet" in lab.logs[i].read_text(errors="replace") for i in range(2)):
                    break
                time.sleep(0.3)
            cl = ServiceClient(dep.client, lab.client_hosts(), timeout=10)
            odd = np.ones((3, 2), dtype=np.float64)
            for rid in ("waiting-a", "waiting-b"):
                def send_odd() -> None:
                    for i, (h, b) in enumerate(ServiceClient.request_frames(odd, "no-such-generation", rid)):
                        send(cl._sock(i), h, b)
                t0 = time.monotonic()
                clients.call(send_odd)
                heads = _answers(cl, clients)
                assert all(h["type"] == "error" and h["code"] == "unavailable" for h in heads), heads
                assert time.monotonic() - t0 < 5, "refused only after the half-request timeout, not at once"
                clients.call(cl.close)  # a refused frame ends its connection
            dep.train(x[tr], [labels[k] for k in tr])  # the model comes: both gateways start serving
            lab.wait_ready(clients)
            _alive(lab)
            assert _served(lab, clients, x[te[:2]]) == 2
        finally:
            lab.stop()
            clients.close()


def test_a_revoked_client_loses_its_open_connections(svc, data):
    """Finding 5: a removed pin was refused on new connections only. Now the gateways close the client's
    open connections within seconds, its next request fails, and other clients are served."""
    lab, clients, other = svc
    x, _, _, te = data
    cl = ServiceClient(other, lab.client_hosts(), timeout=10)
    assert len(clients.call(cl.recognise, x[te[:2]], 0.0).predictions) == 2
    pins = [certs.client_dir_of(Path(s)) / "other.pem" for s in lab.dep.servers]
    saved = [p.read_bytes() for p in pins]
    try:
        for p in pins:
            p.unlink()
        time.sleep(2.5)  # the janitor looks every second

        def read_cut() -> list[bytes]:
            out = []
            for i in (0, 1):
                s = cl._sock(i)
                s.settimeout(5)
                try:
                    out.append(s.recv(65536))
                except OSError:
                    out.append(b"")
            return out

        cut = clients.call(read_cut)
        assert all(b == b"" or b"no longer pinned" in b for b in cut), cut
        with pytest.raises(ServiceError):
            clients.call(cl.recognise, x[te[:2]], 0.0)
        assert _served(lab, clients, x[te[:2]]) == 2
        logs = lab.logs[0].read_text() + lab.logs[1].read_text()
        assert "client other" in logs and "no longer pinned" in logs
    finally:
        clients.call(cl.close)
        for p, b in zip(pins, saved):
            p.write_bytes(b)
            os.chmod(p, 0o600)


def _rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (the gateway and its MP-SPDZ party)."""
    total = 0
    for p in [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_frames_announcing_64_mib_are_refused_before_their_body(svc, data):
    """Finding 6: each connection could buffer a frame of up to 64 MiB before a header field was checked (4
    connections took a gateway from 57 to 311 MiB). Now the header is checked first: 8 connections that announce
    64 MiB and stream it side by side are refused after the header, and the gateway does not grow (its resident
    memory sampled throughout)."""
    lab, clients, _ = svc
    x, _, _, te = data
    pid = lab.procs[0].pid
    before = _rss_kib(pid)
    header = b'{"type":"recognize","id":"huge","gen":"g","n":4096,"d1":2048}'
    prefix = struct.pack("<II", 64 << 20, len(header)) + header
    chunk = b"\0" * (1 << 20)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib(pid))
            time.sleep(0.05)

    def flood() -> list[bytes]:
        cl = lab.new_client(timeout=10)
        socks = []
        for _ in range(8):
            cl.socks = [None, None]
            socks.append(cl._sock(0))
        for s in socks:
            s.sendall(prefix)
            s.settimeout(5)
        alive = list(socks)
        for _ in range(64):  # 1 MiB to each connection in turn, as long as the gateway reads
            for s in list(alive):
                try:
                    s.sendall(chunk)
                except OSError:
                    alive.remove(s)
        out = []
        for s in socks:
            try:
                out.append(s.recv(65536))
            except OSError:
                out.append(b"")
            s.close()
        return out

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        replies = clients.call(flood)
        time.sleep(0.5)
    finally:
        done.set()
        sampler.join()
    assert any(b"bad-request" in r for r in replies), replies
    assert peak[0] - before < 64 << 10, f"the gateway grew by {(peak[0] - before) >> 10} MiB"
    _alive(lab)
    assert _served(lab, clients, x[te[:2]]) == 2


@pytest.mark.parametrize("header", [
    b'{"type":"status","x":' + b"[" * 20000 + b"]" * 20000 + b"}",
    b'{"type":"recognize","id":"big-int","gen":"g","n":' + b"9" * 5000 + b',"d1":129}',
    b'{"type":"recognize","id":"nan","gen":"g","n":NaN,"d1":129}',
    b'["type","status"]',
    b'{"type":"status"}\xff\xfe',
], ids=["nested", "5000-digits", "nan", "not-an-object", "not-utf8"])
def test_headers_that_break_a_json_parser_get_an_error_frame(svc, data, header):
    """Finding 7: deeply nested JSON or a 5,000-digit integer raised RecursionError or ValueError in the
    connection thread and no error frame was sent. Now each is a protocol error: an error frame, that
    connection closed, the gateway unharmed."""
    lab, clients, _ = svc
    x, _, _, te = data

    def hit() -> bytes:
        cl = lab.new_client(timeout=10)
        s = cl._sock(1)
        s.sendall(struct.pack("<II", 4 + len(header), len(header)) + header)
        s.settimeout(10)
        try:
            return s.recv(65536)
        except OSError:
            return b""
        finally:
            cl.close()

    reply = clients.call(hit)
    assert b'"type":"error"' in reply and b"bad-request" in reply, reply
    _alive(lab)
    assert _served(lab, clients, x[te[:1]]) == 1


def test_cbc_only_clients_are_refused(svc):
    """Finding 7: the client port accepted CBC suites. Now a client that offers only CBC suites cannot
    even finish the handshake."""
    lab, clients, _ = svc

    def try_cbc() -> str:
        cl = lab.new_client(timeout=10)
        ctx = cl._context(0)
        ctx.set_ciphers("ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA256:AES128-SHA256:AES256-SHA")
        raw = socket.create_connection(cl.ports.client(0), timeout=10)
        try:
            with ctx.wrap_socket(raw, server_hostname="P0") as t:
                send(t, {"type": "status"})
                return "answered: " + str(receive(t)[0])
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc}"

    outcome = clients.call(try_cbc)
    assert outcome.startswith("refused"), outcome


def test_status_tells_a_client_only_about_its_own_requests(svc, data):
    """Finding 7: status told any client how many queries other clients had queued."""
    lab, clients, other = svc
    x, _, _, _ = data
    padded = reference.with_bias(np.resize(x, (512, x.shape[1])))
    held = lab.new_client(timeout=60)
    try:
        clients.call(lambda: send(held._sock(1), *ServiceClient.request_frames(padded, _gen(lab), "held-half")[1]))
        deadline = time.monotonic() + 10
        while clients.call(held.status)[1]["queued"] != 512 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert clients.call(held.status)[1]["queued"] == 512
        stranger = ServiceClient(other, lab.client_hosts(), timeout=10)
        try:
            assert [s["queued"] for s in clients.call(stranger.status)] == [0, 0]
        finally:
            clients.call(stranger.close)
    finally:
        clients.call(held.close)


def test_the_servers_folders_are_owner_only_while_they_serve(svc):
    """Finding 7: Programs/, Public-Input/ and Persistence/ of the running service were 0755."""
    lab, _, _ = svc
    loose = []
    for s in lab.dep.servers:
        service = Path(s) / "service"
        assert (service / "Persistence").is_dir()
        for p in [service, *service.rglob("*")]:
            if p.is_symlink():
                continue
            mode = p.stat().st_mode & 0o777
            if mode & 0o077:
                loose.append(f"{p} {mode:o}")
    assert not loose, loose
