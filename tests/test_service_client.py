"""The service client's own checks, without servers: what it makes of answers that cannot be right."""
from __future__ import annotations

import json

import numpy as np
import pytest

from orchestration.client.jobs import UNKNOWN
from orchestration.mpspdz.hosts import write_hosts
from orchestration.shared.model import ModelError
from orchestration.client.service import ServiceClient

# (best, S, z_max, generation): the unknown decision is on z_max, 1/S is for display only
GOOD = (np.array([1, 0]), np.array([1.25, 1.0]), np.array([0.8, 3.5]), "g1")
# a local truncation that wrapped: the denominator's share is off by 2^(64-16), 2^32 once decoded
WRAPPED = (np.array([1, 0]), np.array([1.25, 1.0 + 2.0 ** 32]), np.array([0.8, 3.5]), "g1")
# ... or the top logit's
WRAPPED_Z = (np.array([1, 0]), np.array([1.25, 1.0]), np.array([0.8, 3.5 + 2.0 ** 32]), "g1")


class Scripted(ServiceClient):
    """Answers from a script instead of two servers."""

    def __init__(self, tmp_path, answers):
        (tmp_path / "model.json").write_text(json.dumps({"d": 2, "classes": ["ann", "bob"], "run_id": "r1",
                                                         "gen": "g1"}))
        super().__init__(tmp_path, write_hosts(tmp_path / "hosts", [("127.0.0.1", 9), ("127.0.0.1", 10)]))
        self.answers = list(answers)
        self.asked = 0

    def recognise_shares(self, padded, gen):
        assert padded.shape == (2, 3) and gen == "g1"
        self.asked += 1
        return self.answers.pop(0)


def test_an_answer_out_of_range_is_asked_again_once_and_then_an_error(tmp_path):
    x = np.array([[0.6, 0.8], [1.0, 0.0]])
    cl = Scripted(tmp_path, [WRAPPED, GOOD])
    preds = cl.recognise(x, threshold=0.9).predictions
    assert cl.asked == 2
    assert [(p.label, p.best) for p in preds] == [(UNKNOWN, 1), (0, 0)]  # z_max 0.8 < 0.9: unknown
    assert [p.score for p in preds] == [0.8, 3.5] and [p.confidence for p in preds] == [0.8, 1.0]
    with pytest.raises(ModelError, match="out of range twice"):
        Scripted(tmp_path, [WRAPPED, WRAPPED]).recognise(x, threshold=0.9)
    with pytest.raises(ModelError, match="out of range twice"):
        Scripted(tmp_path, [WRAPPED_Z, WRAPPED_Z]).recognise(x, threshold=0.9)
    with pytest.raises(ModelError, match="out of range twice"):
        Scripted(tmp_path, [(np.array([2, 0]), *GOOD[1:])] * 2).recognise(x, threshold=0.9)  # no class 2


def test_the_decision_is_on_the_top_logit_not_the_confidence(tmp_path):
    """A saturated confidence (1/S = 1) with a low top logit is unknown; a low confidence with a high one is not."""
    x = np.array([[0.6, 0.8], [1.0, 0.0]])
    answer = (np.array([1, 0]), np.array([1.0, 1.9]), np.array([-0.5, 2.0]), "g1")
    preds = Scripted(tmp_path, [answer]).recognise(x, threshold=1.0).predictions
    assert [p.label for p in preds] == [UNKNOWN, 0]
    preds = Scripted(tmp_path, [answer]).recognise(x, threshold=-1.0).predictions  # a negative logit threshold
    assert [p.label for p in preds] == [1, 0]


# ---- a stale model record after a retrain (issue 20, finding 5) ------------------------------------------

import socket  # noqa: E402
import ssl  # noqa: E402
import threading  # noqa: E402

from orchestration.client.jobs import model_record_path  # noqa: E402
from orchestration.mpspdz import certs  # noqa: E402
from orchestration.shared.wire import ServiceError, receive, send  # noqa: E402

STALE = "server 0: the service serves model generation g2, the request expects g1"


class Stale(Scripted):
    """A service that serves generation ``serving``; a fake clock that only the pauses move."""

    def __init__(self, tmp_path, serving="g2", **kw):
        super().__init__(tmp_path, [])
        self.serving, self.now, self.pauses, self.gens = serving, 0.0, [], []
        for k, v in kw.items():
            setattr(self, k, v)

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.pauses.append(seconds)
        self.now += seconds

    def recognise_shares(self, padded, gen):
        self.gens.append(gen)
        if gen != self.serving:
            raise ServiceError(STALE.replace("g1", gen), "generation")
        return GOOD[0], GOOD[1], GOOD[2], gen


def test_a_stale_record_backs_off_a_few_times_then_says_what_to_copy(tmp_path):
    """The old client asked about 47 times in 10 s; now 0.2 s doubling to 2 s: 8 tries within retry_generation,
    and the message names this client's record and the data owner's var/client/model.json."""
    cl = Stale(tmp_path)
    with pytest.raises(ServiceError) as err:
        cl.recognise(np.array([[0.6, 0.8], [1.0, 0.0]]), threshold=0.5)
    assert err.value.code == "generation"
    assert cl.pauses == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0] and len(cl.gens) == 8 and sum(cl.pauses) <= 10
    msg = str(err.value)
    assert STALE in msg and "8 tries" in msg, msg
    assert f"this client's model record {model_record_path(tmp_path)} is generation g1" in msg, msg
    assert "Copy the data owner's var/client/model.json" in msg and "service.model_record" in msg, msg


def test_a_record_copied_during_the_back_off_is_used_at_once(tmp_path):
    cl = Stale(tmp_path)
    real_sleep = cl.sleep

    def copy_then_sleep(seconds):
        real_sleep(seconds)
        if len(cl.pauses) == 2:
            rec = json.loads(model_record_path(tmp_path).read_text())
            model_record_path(tmp_path).write_text(json.dumps(dict(rec, gen="g2")))

    cl.sleep = copy_then_sleep
    assert cl.recognise(np.array([[0.6, 0.8], [1.0, 0.0]]), threshold=0.5).gen == "g2"
    assert cl.gens == ["g1", "g1", "g2"]


def test_service_model_record_is_fetched_checked_and_installed_before_giving_up(tmp_path):
    published = tmp_path / "published.json"
    published.write_text(json.dumps({"d": 2, "classes": ["ann", "bob"], "run_id": "r1", "gen": "g2"}))
    (tmp_path / "c").mkdir()
    cl = Stale(tmp_path / "c", model_record=str(published))
    assert cl.recognise(np.array([[0.6, 0.8], [1.0, 0.0]]), threshold=0.5).gen == "g2"
    assert json.loads(model_record_path(tmp_path / "c").read_text())["gen"] == "g2"
    assert cl.gens[-1] == "g2" and len(cl.gens) == 9  # 8 tries on g1, the fetch, then g2 at once

    # the same generation published: the message says it fetched it and the owner has not published yet
    same = Stale(tmp_path / "c", serving="g3", model_record=str(published))
    with pytest.raises(ServiceError) as err:
        same.recognise(np.array([[0.6, 0.8], [1.0, 0.0]]), threshold=0.5)
    assert f"fetched from service.model_record ({published})" in str(err.value), err.value

    # what is published is checked as a model record; this client's own record stays as it was
    for text, why in (("not json", "not JSON"), (json.dumps({"d": 2, "classes": []}), "'classes'"),
                      (json.dumps([1]), "not an object")):
        published.write_text(text)
        bad = Stale(tmp_path / "c", serving="g3", model_record=str(published))
        kept = model_record_path(tmp_path / "c").read_bytes()
        with pytest.raises(ModelError, match=why) as err:
            bad.recognise(np.array([[0.6, 0.8], [1.0, 0.0]]), threshold=0.5)
        assert str(published) in str(err.value)
        assert model_record_path(tmp_path / "c").read_bytes() == kept
    with pytest.raises(ModelError, match="https"):
        Stale(tmp_path / "c", serving="g3", model_record="http://example.invalid/model.json").fetch_model_record()


class _Plain(socket.socket):
    """One end of a socket pair standing in for a TLS connection (no bytes buffered inside TLS)."""

    def pending(self):
        return 0


def test_a_generation_error_keeps_both_connections(tmp_path):
    """Both servers answer a stale request with `generation` (server 0 fails it on server 1 too): the client
    reads both answers and asks again on the same two connections instead of reconnecting."""
    (tmp_path / "model.json").write_text(json.dumps({"d": 2, "classes": ["ann", "bob"], "run_id": "r1",
                                                     "gen": "g1"}))
    cl = ServiceClient(tmp_path, write_hosts(tmp_path / "hosts", [("127.0.0.1", 9), ("127.0.0.1", 10)]),
                       timeout=5.0, retry_generation=1.0)
    cl.sleep = lambda s: None
    served = [0, 0]
    ends = []
    for i in range(2):
        a, b = socket.socketpair()
        ends.append(b)
        cl.socks[i] = _Plain(fileno=a.detach())

        def server(sock=b, i=i):
            while True:
                try:
                    head, _ = receive(sock)
                except Exception:
                    return
                served[i] += 1
                send(sock, {"type": "error", "id": head["id"], "code": "generation", "message": STALE})

        threading.Thread(target=server, daemon=True).start()
    kept = list(cl.socks)
    try:
        with pytest.raises(ServiceError) as err:
            cl.recognise(np.array([[0.6, 0.8]]), threshold=0.5)
        assert err.value.code == "generation", err.value
        assert cl.socks == kept and cl.connects == 0 and served[0] == served[1] >= 3, (served, err.value)
    finally:
        cl.close()
        for b in ends:
            b.close()


# ---- not pinned or not running (finding 2) ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(tmp_path, port):
    """A client with its own key and server 0's and 1's certificates pinned; the service's client port is
    ``port`` for server 0."""
    for i in range(2):
        certs.make_party_cert(tmp_path / f"s{i}", i)
        certs.install_server_certs(tmp_path / "c", [tmp_path / f"s{i}" / "certs" / f"P{i}.pem"])
    certs.make_client_cert(tmp_path / "c", "door1")
    (tmp_path / "c" / "model.json").write_text(json.dumps({"d": 2, "classes": ["a", "b"], "run_id": "r", "gen": "g"}))
    return ServiceClient(tmp_path / "c", write_hosts(tmp_path / "hosts", [("127.0.0.1", port - 100),
                                                                          ("127.0.0.1", port - 99)]), timeout=5.0)


def test_a_service_that_is_not_running_is_told_apart_from_one_that_refuses_the_certificate(tmp_path):
    port = _free_port()
    cl = _client(tmp_path, port)
    with pytest.raises(ServiceError) as err:
        cl.status()
    assert err.value.code == "unavailable" and "not running or not reachable" in str(err.value), err.value
    assert "invoke serve --id 0 --hosts" in str(err.value) and str(port) in str(err.value)

    # a gateway that does not pin this client: the handshake fails with an alert
    stranger = tmp_path / "stranger"
    certs.make_client_cert(stranger, "other")
    ctx = certs.harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(tmp_path / "s0" / "certs" / "P0.pem", tmp_path / "s0" / "certs" / "P0.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(certs.client_files(stranger)[1]))
    lsock = socket.create_server(("127.0.0.1", port))

    def gateway():
        raw, _ = lsock.accept()
        try:
            ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            pass
        raw.close()

    t = threading.Thread(target=gateway, daemon=True)
    t.start()
    try:
        with pytest.raises(ServiceError) as err:
            cl.status()
    finally:
        t.join(10)
        lsock.close()
    msg = str(err.value)
    fp = certs.inspect(certs.client_files(tmp_path / "c")[1]).fingerprint
    assert err.value.code == "refused" and "is not pinned on server 0" in msg, msg
    assert fp in msg and "invoke certs --id 0 --allow-client client.pem" in msg, msg
    assert "not running" not in msg and "invoke serve" not in msg


def test_names_come_from_the_record_of_the_answers_generation(tmp_path):
    """After a retrain that added a person, a client that fetched the new record (service.model_record) names the
    answers with the new record's classes (it named them with the old one's, and the new person's index crashed)."""
    from orchestration.client import app
    from orchestration.client.private import Layout

    published = tmp_path / "published.json"
    published.write_text(json.dumps({"d": 2, "classes": ["ann", "bob", "cy"], "run_id": "r2", "gen": "g2"}))
    (tmp_path / "var" / "client").mkdir(parents=True)
    cl = Stale(tmp_path / "var" / "client", model_record=str(published))
    cl.recognise_shares = lambda padded, gen: (cl.gens.append(gen) or _stale_or(gen, (np.array([2, 0]),
                                                                                      np.array([1.25, 1.0]),
                                                                                      np.array([0.8, 3.0]), gen)))
    out, _ = app.recognise(None, Layout(tmp_path / "var"), np.array([[0.6, 0.8], [1.0, 0.0]]), 0.5, service=cl)
    assert [name for name, _, _ in out] == ["cy", "ann"]
    assert [score for _, _, score in out] == [0.8, 3.0]


def _stale_or(gen, answer):
    if gen != "g2":
        raise ServiceError(STALE.replace("g1", gen), "generation")
    return answer


def test_the_unknown_threshold_comes_from_the_record_of_the_answers_generation(tmp_path):
    """Without --threshold, the decision uses the threshold of the record that answered: a retrain whose new
    record raises the threshold to 0.9 makes a 0.8 answer unknown_person; a threshold given explicitly stays."""
    from orchestration.client import app
    from orchestration.client.private import Layout

    published = tmp_path / "published.json"
    published.write_text(json.dumps({"d": 2, "classes": ["ann", "bob", "cy"], "run_id": "r2", "gen": "g2",
                                     "threshold": 0.9, "threshold_score": "zmax"}))
    (tmp_path / "var" / "client").mkdir(parents=True)
    x = np.array([[0.6, 0.8], [1.0, 0.0]])
    for threshold, expect in ((None, ["unknown_person", "ann"]), (0.5, ["cy", "ann"])):
        client_dir = tmp_path / "var" / "client"
        (client_dir / "model.json").unlink(missing_ok=True)
        cl = Stale(client_dir, model_record=str(published))
        cl.recognise_shares = lambda padded, gen, cl=cl: (cl.gens.append(gen) or _stale_or(
            gen, (np.array([2, 0]), np.array([1.0, 1.0]), np.array([0.8, 3.0]), gen)))
        out, _ = app.recognise(None, Layout(tmp_path / "var"), x, threshold, service=cl)
        assert [name for name, _, _ in out] == expect, threshold


def test_a_record_whose_threshold_is_a_confidence_is_refused(tmp_path):
    """A record from before the score changed holds a 1/S threshold (no threshold_score): it is not applied to
    z_max (0.97 would be a plausible logit threshold and silently wrong); an explicit threshold still works."""
    from orchestration.client import app
    from orchestration.client.private import Layout

    client_dir = tmp_path / "var" / "client"
    client_dir.mkdir(parents=True)
    (client_dir / "model.json").write_text(json.dumps({"d": 2, "classes": ["ann", "bob"], "run_id": "r1", "gen": "g1",
                                                       "threshold": 0.97}))
    x = np.array([[0.6, 0.8], [1.0, 0.0]])
    cl = Scripted(client_dir, [GOOD])
    (client_dir / "model.json").write_text(json.dumps({"d": 2, "classes": ["ann", "bob"], "run_id": "r1", "gen": "g1",
                                                       "threshold": 0.97}))
    with pytest.raises(ModelError, match="on the score 'confidence'.*allowed: 'zmax'.*Retrain"):
        app.recognise(None, Layout(tmp_path / "var"), x, None, service=cl)
    with pytest.raises(ModelError, match="on the score 'confidence'"):
        app.default_threshold(Layout(tmp_path / "var"))
    out, _ = app.recognise(None, Layout(tmp_path / "var"), x, 1.0, service=cl)
    assert [name for name, _, _ in out] == ["unknown_person", "ann"]
