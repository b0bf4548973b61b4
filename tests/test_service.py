"""The recognition service (`invoke serve`) in two network namespaces, with the client beside server 1.

Checked: answers equal the one-job mode's; an unknown, missing or garbage-speaking client is refused
and logged while an allowed one keeps working; a server killed mid-request gives the client a
clear error within 30 s and the service answers again after a restart; a model switch (share
refresh, retraining with other sizes) happens between requests and never mixes generations;
SIGTERM leaves no process behind; nothing a server stores or logs holds a plaintext value.
"""
from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestration.mpspdz import certs
from orchestration.client import jobs as client
from orchestration.server.job import read_shares
from orchestration.shared import reference
from preprocessing import sharing
from orchestration.client.service import ServiceClient
from orchestration.shared.wire import ServiceError, encode, receive, send
from service_lab import NsClients, ServiceLab, trained_service
from synthetic import split
from test_mpc import _fixed_point_needles, assert_no_plaintext
from test_two_hosts import SUPPORTED_VERSIONS, Deployment, invoke, net_ok  # noqa: F401 - net_ok is a fixture

import netlab

pytestmark = [pytest.mark.mpc, pytest.mark.protocol]


@pytest.fixture(scope="module")
def data():
    return split(people=6, per=10, seed=7, every=5)


@pytest.fixture(scope="module")
def svc(net_ok, tmp_path_factory, data):
    """A model trained across two namespaces (one-job mode), then the service started on it."""
    x, labels, tr, _ = data
    with trained_service(tmp_path_factory.mktemp("service"), x[tr], [labels[k] for k in tr]) as (lab, clients, _):
        yield lab, clients


def _recognise(lab: ServiceLab, clients: NsClients, x: np.ndarray, threshold: float = 0.0, **kw):
    cl = lab.new_client(**kw)
    try:
        return clients.call(cl.recognise, x, threshold)
    finally:
        clients.call(cl.close)


def test_service_answers_equal_the_one_job_mode(svc, data):
    lab, clients = svc
    x, labels, tr, te = data
    one_job = lab.dep.predict(x[te]).predictions
    ans = _recognise(lab, clients, x[te])
    assert [p.best for p in ans.predictions] == [p.best for p in one_job]
    assert np.allclose([p.confidence for p in ans.predictions], [p.confidence for p in one_job], atol=2e-3)
    # the open-set score z_max: the service's, the one job's and float64's on the model the servers hold agree
    score = np.array([p.score for p in ans.predictions])
    assert np.max(np.abs(score - [p.score for p in one_job])) <= 2 ** -9
    record = client.load_model_record(lab.dep.client)
    d1, c = record["d"] + 1, len(record["classes"])
    held = sharing.decode_fixed(sharing.reconstruct(*[read_shares(
        lab.dep.servers[i] / "model" / f"Transactions-P{i}.data", 0, d1 * c) for i in range(2)])).reshape(d1, c)
    assert np.max(np.abs(score - reference.predict_scores(held, x[te], 8)[2])) <= 2 ** -10
    assert ans.gen == client.model_generation(record)
    # and both are right on held-out faces of this easy synthetic set
    classes = record["classes"]
    assert np.mean([classes[p.best] == labels[k] for p, k in zip(ans.predictions, te)]) >= 0.9
    # a request larger than one MPC batch spans several, in order
    big = np.concatenate([x[te]] * 5)
    ans_big = _recognise(lab, clients, big)
    assert [p.best for p in ans_big.predictions] == [p.best for p in one_job] * 5
    # each query's answer does not depend on the batch it rides in: the same scores as asked together above
    assert np.max(np.abs(np.array([p.score for p in ans_big.predictions]) - np.tile(score, 5))) <= 2 ** -9
    one = [_recognise(lab, clients, x[te[k:k + 1]]).predictions[0] for k in range(2)]
    assert [p.best for p in one] == [p.best for p in ans.predictions[:2]]
    assert np.max(np.abs(np.array([p.score for p in one]) - score[:2])) <= 2 ** -9


def _raw_connect(lab: ServiceLab, i: int) -> socket.socket:
    addr = lab.new_client().ports.client(i)
    return socket.create_connection(addr, timeout=10)


def test_unauthorised_clients_are_refused_and_logged_while_others_keep_working(svc, data, tmp_path):
    lab, clients = svc
    x, _, _, te = data
    # a client with a certificate of its own that no server pinned
    stranger = tmp_path / "stranger"
    certs.make_client_cert(stranger, "stranger")
    for i in range(2):
        (stranger / "certs" / f"P{i}.pem").write_bytes((lab.dep.client / "certs" / f"P{i}.pem").read_bytes())
    record = (lab.dep.client / "model.json").read_bytes()
    (stranger / "model.json").write_bytes(record)

    def try_stranger():
        cl = ServiceClient(stranger, lab.client_hosts(), timeout=10)
        try:
            cl.recognise(x[te[:2]], 0.0)
        finally:
            cl.close()

    with pytest.raises(ServiceError):
        clients.call(try_stranger)

    # no certificate at all, plain bytes, and TLS without a client certificate
    def no_cert_and_garbage():
        s = _raw_connect(lab, 0)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        try:
            s.recv(100)
        except OSError:
            pass
        s.close()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        raw = _raw_connect(lab, 1)
        try:
            with ctx.wrap_socket(raw) as t:
                t.sendall(encode({"type": "status"}))
                t.recv(100)
        except (ssl.SSLError, OSError):
            pass

    clients.call(no_cert_and_garbage)

    # an allowed client that speaks garbage after the handshake loses its connection only
    def allowed_garbage():
        cl = lab.new_client(timeout=10)
        s = cl._sock(0)
        s.sendall(b"\xff" * 64)
        try:
            head = s.recv(4096)
        except OSError:
            head = b""
        cl.close()
        return head

    reply = clients.call(allowed_garbage)
    assert b"bad-request" in reply or reply == b""
    # meanwhile the allowed client is served, and the refusals are in the servers' logs
    ans = _recognise(lab, clients, x[te[:3]])
    assert len(ans.predictions) == 3
    logs = lab.logs[0].read_text() + lab.logs[1].read_text()
    assert logs.count("refused client connection") >= 3
    assert "certificate verify failed" in logs  # the stranger
    assert "HTTP_REQUEST" in logs and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in logs
    assert "connection dropped" in logs


def test_a_request_for_another_generation_is_an_error_not_an_answer(svc, data):
    lab, clients = svc
    x, _, _, te = data
    cl = lab.new_client()
    padded = np.hstack([x[te[:2]], np.ones((2, 1))])
    try:
        with pytest.raises(ServiceError) as err:
            clients.call(cl.recognise_shares, padded, "0123456789abcdef")
        assert err.value.code == "generation"
    finally:
        clients.call(cl.close)


def test_concurrent_clients_get_their_own_answers(svc, data):
    lab, clients = svc
    x, _, _, te = data
    expect = [p.best for p in _recognise(lab, clients, x).predictions]

    def worker(seed: int) -> list[tuple[list[int], list[int]]]:
        rng = np.random.default_rng(seed)
        cl = lab.new_client()
        out = []
        try:
            for _ in range(25):
                idx = rng.choice(len(x), size=int(rng.integers(1, 6)), replace=False)
                out.append((list(idx), [p.best for p in cl.recognise(x[idx], 0.0).predictions]))
        finally:
            cl.close()
        return out

    futures = [clients.submit(worker, s) for s in range(4)]
    for f in futures:
        for idx, got in f.result(timeout=300):
            assert got == [expect[k] for k in idx]


def test_a_request_of_several_batches_runs_on_several_lanes_at_once(svc, data):
    """Issue 19's pipelining: server 0 plans a batch for every free lane, so the batches of one large request are
    in flight together (server 0's log says how many at most; the clients' status does not, since that would tell
    a client of other clients' load), server 1 takes the parts of the request out of order from its lanes, and
    every query's answer is still the one-job mode's."""
    lab, clients = svc
    x, _, _, _ = data
    big = np.vstack([x, x[:13]])  # 73 queries: four batches of 16 and more, on two lanes of 16 and the quick lane
    one_job = lab.dep.predict(big).predictions
    ans = _recognise(lab, clients, big)
    assert [p.best for p in ans.predictions] == [p.best for p in one_job]
    assert np.max(np.abs(np.array([p.score for p in ans.predictions]) - [p.score for p in one_job])) <= 2 ** -9
    cl = lab.new_client()
    try:
        st = clients.call(cl.status)
    finally:
        clients.call(cl.close)
    assert st[0]["lanes"] == 2 and st[0]["quick"] is True, st[0]
    assert not any("flight" in key for s in st for key in s), st
    peaks = [int(m) for m in re.findall(r"server 0: (\d+) batches in flight at once", lab.logs[0].read_text())]
    assert peaks and max(peaks) >= 2, peaks


def test_a_request_that_reaches_one_server_only_delays_nobody(svc, data):
    """Half a request (a client that died between its two sends, or a network cut) stays on one
    server: requests both servers hold are served without waiting for it, and the half is answered
    as failed (``unavailable``), never computed."""
    lab, clients = svc
    x, _, _, te = data
    record = client.load_model_record(lab.dep.client)
    gen = client.model_generation(record)
    padded = reference.with_bias(np.concatenate([x] * 60))  # 3,600 faces: 225 batches, were it planned
    follower_wait = 10.0  # ServiceServer's default: how long the servers wait for each other

    for only in (0, 1):
        rid = f"half-request-at-server-{only}"

        def send_half() -> ServiceClient:
            cl = lab.new_client(timeout=60)
            send(cl._sock(only), *ServiceClient.request_frames(padded, gen, rid)[only])
            return cl

        half = clients.call(send_half)
        try:
            time.sleep(0.5)  # the half is queued before the whole request comes
            t0 = time.monotonic()
            ans = _recognise(lab, clients, x[te[:4]])
            waited = time.monotonic() - t0
            assert len(ans.predictions) == 4
            assert waited < follower_wait / 2, f"a request waited {waited:.1f} s behind half a request at server {only}"
            # within twice the follower wait (and the janitor's second) the half is answered as failed
            head, _ = clients.call(lambda: receive(half._sock(only)))
            assert head["type"] == "error" and head["id"] == rid and head["code"] == "unavailable", head
        finally:
            clients.call(half.close)


def test_a_queue_longer_than_the_servers_wait_for_each_other_is_served_in_full(svc, data):
    """Requests both servers hold wait their turn, however long the queue: 16 clients send 4,096 faces
    each at once (4,096 batches, about 2 s per request here), and the last ones, which wait longer than
    the 20 s after which half a request is failed, are answered right too."""
    lab, clients = svc
    x, _, _, _ = data
    expect = [p.best for p in _recognise(lab, clients, x).predictions]
    idx = np.arange(4096) % len(x)
    many = NsClients(lab.net.ns[lab.client_ns], n=16)

    def one() -> list[int]:
        cl = lab.new_client(timeout=120)
        try:
            return [p.best for p in cl.recognise(x[idx], 0.0).predictions]
        finally:
            cl.close()

    try:
        futures = [many.submit(one) for _ in range(16)]
        for f in futures:
            assert f.result(timeout=300) == [expect[k] for k in idx]
    finally:
        many.close()


def test_a_server_holding_too_many_queries_answers_busy_at_once(svc, data):
    """Memory is bounded: a server holding service.max_queued queries (the lab sets 100,000) answers a
    request that would pass it with the error busy at once, still takes smaller ones, and takes large
    ones again once its queue drains."""
    lab, clients = svc
    x, _, _, te = data
    assert lab.max_queued == 100_000
    record = client.load_model_record(lab.dep.client)
    gen = client.model_generation(record)
    padded = reference.with_bias(np.resize(x, (4096, x.shape[1])))
    held = lab.new_client(timeout=60)

    def hold_24_halves_at_server_1() -> None:  # never planned (server 0 lacks them): held until failed
        for k in range(24):
            send(held._sock(1), *ServiceClient.request_frames(padded, gen, f"held-{k}")[1])

    def queued() -> list[int]:
        cl = lab.new_client(timeout=10)
        try:
            return [st["queued"] for st in cl.status()]
        finally:
            cl.close()

    try:
        clients.call(hold_24_halves_at_server_1)
        deadline = time.monotonic() + 30
        while clients.call(queued)[1] < 24 * 4096 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert clients.call(queued)[1] == 24 * 4096
        with pytest.raises(ServiceError) as busy:  # 98,304 + 4,096 > 100,000
            _recognise(lab, clients, padded[:, :-1])
        assert busy.value.code == "busy" and "server 1" in str(busy.value), busy.value
        assert len(_recognise(lab, clients, x[te[:4]]).predictions) == 4  # 98,304 + 4 fit
        for k in range(24):  # the halves are failed after 20 s, which drains the queue
            head, _ = clients.call(lambda: receive(held._sock(1)))
            assert head["type"] == "error" and head["code"] == "unavailable", head
        while clients.call(queued) != [0, 0] and time.monotonic() < deadline + 30:
            time.sleep(0.5)  # server 0 fails its half of the busy request the same way
        assert clients.call(queued) == [0, 0]
        assert len(_recognise(lab, clients, padded[:, :-1]).predictions) == 4096
    finally:
        clients.call(held.close)


def test_model_switches_between_requests_and_never_mixes_generations(svc, data):
    lab, clients = svc
    dep = lab.dep
    x, labels, tr, te = data
    expect = [p.best for p in _recognise(lab, clients, x[te]).predictions]
    old_gen = client.load_model_record(dep.client)["gen"]
    answers: list = []
    errors: list = []
    stop = threading.Event()

    def asker():
        cl = lab.new_client(retry_generation=30.0)
        try:
            while not stop.is_set():
                try:
                    a = cl.recognise(x[te], 0.0)
                    answers.append((a.gen, [p.best for p in a.predictions]))
                except ServiceError as exc:
                    errors.append(exc)
        finally:
            cl.close()

    fut = clients.submit(asker)
    time.sleep(1.0)
    # a share refresh (same sizes: the parties re-read their share between two batches), confirmed
    sent = client.share_refresh(dep.client, dep.root / "jobs" / "refresh")
    res = dep.run(dep.root / "jobs" / "refresh")
    assert all(rc == 0 for rc, _ in res), res
    done = client.collect(dep.client, sent.job, dep.outputs(sent.job))
    new_gen = done.record["gen"]
    conf = client.share_confirm(dep.client, dep.root / "jobs" / "confirm")
    for i in range(2):
        invoke("confirm", "--id", str(i), "--job", str(conf.bundles[i]), "--server-dir", str(dep.servers[i]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(g == new_gen for g, _ in answers):
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    fut.result(timeout=120)
    assert {g for g, _ in answers} == {old_gen, new_gen}, (old_gen, new_gen, errors)
    assert all(best == expect for _, best in answers)  # every answer right, before and after the switch
    switched_at = next(k for k, (g, _) in enumerate(answers) if g == new_gen)
    assert all(g == new_gen for g, _ in answers[switched_at:])  # no going back
    assert not errors, errors
    logs = lab.logs[0].read_text()
    assert f"switched to model generation {new_gen} between two batches" in logs

    # retraining with fewer people changes the program's sizes: both servers restart their party
    keep = [k for k in tr if labels[k] != labels[tr[0]]]
    dep.train(x[keep], [labels[k] for k in keep])
    ans = _recognise(lab, clients, x[te], retry_generation=120.0)
    record = client.load_model_record(dep.client)
    assert ans.gen == record["gen"] and len(record["classes"]) == len(set(labels)) - 1
    assert all(0 <= p.best < len(record["classes"]) for p in ans.predictions)


def test_killing_a_server_mid_request_is_reported_and_the_service_recovers(svc, data):
    lab, clients = svc
    x, _, _, te = data
    big = np.concatenate([x] * 60)  # 3,600 faces: many batches per request
    result: dict = {"answered": 0}

    def requests_until_one_fails():
        cl = lab.new_client(timeout=30.0)
        try:
            while result["answered"] < 1000:
                cl.recognise(big, 0.0)
                result["answered"] += 1
        except ServiceError as exc:
            result["error"], result["at"] = exc, time.monotonic()
        finally:
            cl.close()

    fut = clients.submit(requests_until_one_fails)
    time.sleep(1.5)
    killed = time.monotonic()
    lab.stop_process(1, signal.SIGKILL)
    fut.result(timeout=120)
    assert "error" in result, "requests that lost a server must not be answered"
    assert result["at"] - killed < 30
    msg = str(result["error"])
    assert "server" in msg and ("unavailable" == result["error"].code), msg
    # server 1 comes back; server 0 and the dealer find it again without help
    lab.start_server(1)
    lab.wait_ready(clients, timeout=180)
    ans = _recognise(lab, clients, x[te[:4]])
    assert len(ans.predictions) == 4


def test_nothing_a_server_stores_or_logs_holds_a_plaintext_value(svc, data):
    lab, clients = svc
    x, labels, tr, te = data
    ans = _recognise(lab, clients, x[te])
    record = client.load_model_record(lab.dep.client)
    # everything but build/: the compiled public programs and the bind shim (machine code), the same on any server
    files = [p for s in lab.dep.servers for p in Path(s).rglob("*") if p.is_file() and "build" not in
             p.relative_to(s).parts]
    files += lab.logs[:2]
    assert any("service" in str(p) for p in files)  # the running service's folder and logs are looked at
    needles = _fixed_point_needles(x[np.concatenate([tr, te])][:, :40])
    needles |= _fixed_point_needles([p.confidence for p in ans.predictions])
    needles |= _fixed_point_needles([1.0 / p.confidence for p in ans.predictions])
    needles |= _fixed_point_needles([p.score for p in ans.predictions])
    names = [n.encode() for n in record["classes"]]
    assert_no_plaintext(files, names, needles)
    for log in lab.logs[:2]:
        for line in log.read_text().splitlines():
            if "request " in line and " queries" in line:
                # one line per request: time, size, generation, duration, never a share or a result
                assert "best" not in line and "confidence" not in line and "score" not in line


def test_everything_between_the_hosts_is_tls(svc, data, tmp_path):
    """The MPC, the gateways' link and the client's requests to server 0 cross the veth: all inside TLS
    records from their first byte (captured from a restart of both servers on)."""
    lab, clients = svc
    x, _, _, te = data
    for i in (0, 1):
        assert lab.stop_process(i) == 0
    cap = lab.net.capture(0, tmp_path / "veth.cap")
    try:
        for i in (0, 1):
            lab.start_server(i)
        lab.wait_ready(clients)
        _recognise(lab, clients, x[te])
    finally:
        cap.terminate()
        cap.wait(timeout=10)
    streams = netlab.tcp_streams(tmp_path / "veth.cap")
    between = {k: v for k, v in streams.items() if {k[0], k[2]} == set(lab.net.addr)}
    ports = {min(k[1], k[3]) for k in between}
    from orchestration.shared.ports import CLIENT_OFFSET, LINK_OFFSET

    assert 7200 in ports, ports  # the MPC (server 1 and the dealer to server 0)
    assert 7200 + CLIENT_OFFSET in ports and 7201 + LINK_OFFSET in ports, ports  # the client; the gateways' link
    app_data = hellos = 0
    for key, stream in between.items():
        ident, stream = netlab.split_preamble(stream)
        assert ident == b"" or b"P" in ident, f"{key}: cleartext {ident!r} before TLS"
        records = netlab.tls_records(stream)  # raises if any byte is outside a TLS record
        assert records[0][0] == 22, f"{key}: does not start with a TLS handshake"
        app_data += sum(n for t, n in records if t == 23)
        for mtype, body in netlab.tls_handshake_messages(stream):  # README: exactly TLS 1.2, also here
            if mtype in (1, 2):
                hello = netlab.hello_fields(mtype, body)
                assert hello["version"] == 0x0303, f"{key}: hello version {hello['version']:#06x}, not TLS 1.2"
                assert SUPPORTED_VERSIONS not in hello["extensions"], f"{key}: TLS 1.3 offered or chosen"
                hellos += 1
    assert app_data > 10_000
    assert hellos >= 2 * 3  # client and server hello of at least the MPC, the gateways' link and a client


def test_sigterm_stops_everything_and_leaves_no_process(svc):
    lab, clients = svc
    pids = [p.pid for p in lab.procs if p is not None]
    codes = lab.stop()
    assert codes[0] == 0 and codes[1] == 0, [lab.log_tail(i) for i in range(3)]
    time.sleep(1.0)
    left = subprocess.run(["pgrep", "-f", str(lab.root)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    for i in range(2):
        assert "stopped after" in lab.logs[i].read_text()
        assert not (lab.dep.servers[i] / "service").exists()  # the run folder with the key copy is destroyed
