"""Protocol tests on synthetic embeddings: no face images, no model files, only MP-SPDZ.

These are what the container's test stage runs (``pytest -m protocol``): local two-server runs
over TLS, share refresh, and the faults that must be caught before the protocol starts.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import split

from orchestration.mpspdz import certs
from orchestration.client import jobs as client
from orchestration.shared import reference
from orchestration.mpspdz.certs import CertError
from orchestration.mpspdz.hosts import HostsError, load_hosts
from orchestration.mpspdz.launcher import PartyFailed
from orchestration.client.private import Layout, ModelError, predict_private, refresh_private, train_private
from orchestration.server.remote import run_party_job
from orchestration.server.job import Server, current_generation, model_generations, read_shares
from preprocessing import sharing

pytestmark = [pytest.mark.mpc, pytest.mark.protocol]

PARAMS = reference.TrainParams(epochs=1, batch=16, lr=1.0, alpha=16.0, exp_bits=8, seed=2)


@pytest.fixture(scope="module")
def data():
    return split(people=5, per=8, seed=7, every=4)


@pytest.fixture(scope="module")
def trained(mp, data, tmp_path_factory):
    x, labels, tr, _ = data
    layout = Layout(tmp_path_factory.mktemp("var"))
    report = train_private(mp, layout, x[tr], [labels[k] for k in tr], PARAMS, timeout=300)
    return layout, report


def _model(layout: Layout, gen: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    rec = client.load_model_record(layout.client)
    n = (rec["d"] + 1) * len(rec["classes"])
    out = []
    for i in range(2):
        d = layout.server(i) / "models" / gen if gen else layout.model_dir(i)
        out.append(read_shares(d / f"Transactions-P{i}.data", 0, n))
    return out[0], out[1]


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _copy(layout: Layout, dest: Path) -> Layout:
    shutil.copytree(layout.root, dest, symlinks=True)
    return Layout(dest)


def test_private_training_and_recognition_match_plaintext(mp, trained, data):
    layout, report = trained
    x, labels, tr, te = data
    idx = {n: k for k, n in enumerate(report.classes)}
    w = reference.train(x[tr], np.array([idx[labels[k]] for k in tr]), len(report.classes), PARAMS)
    s0, s1 = _model(layout)
    got_w = sharing.decode_fixed(sharing.reconstruct(s0, s1)).reshape(w.shape)
    assert np.max(np.abs(got_w - w)) < 0.05
    rep = predict_private(mp, layout, x[te], -1e9)  # every face named
    expected = np.argmax(reference.with_bias(x[te]) @ w, axis=1)
    assert [p.best for p in rep.predictions] == list(expected)
    assert [report.classes[p.label] for p in rep.predictions] == [labels[k] for k in te]


def test_local_runs_use_tls_with_per_server_keys(trained):
    layout, _ = trained
    for i in range(2):
        pc = certs.check_party_certs(layout.server(i), i)
        assert pc.own.common_name == f"P{i}" and pc.peer.common_name == f"P{1 - i}"
        assert oct(pc.key.stat().st_mode & 0o777) == "0o600"
        assert not (layout.server(i) / "certs" / f"P{1 - i}.key").exists()


def test_refresh_shares_keeps_the_model_and_unlinks_the_shares(mp, trained, data, tmp_path):
    layout0, _ = trained
    layout = _copy(layout0, tmp_path / "var")
    x, _, _, te = data
    old = _model(layout)
    before = predict_private(mp, layout, x[te], -1e9).predictions
    old_gen = client.load_model_record(layout.client)["gen"]
    gen, run = refresh_private(mp, layout)
    new = _model(layout)
    assert gen != old_gen and client.load_model_record(layout.client)["gen"] == gen
    # the same model, bit for bit, without anyone having reconstructed it
    assert np.array_equal(sharing.reconstruct(*old), sharing.reconstruct(*new))
    # every share changed; an old share of one server with a new share of the other is noise
    assert np.all(old[0] != new[0]) and np.all(old[1] != new[1])
    model = sharing.reconstruct(*old)
    for mixed in (sharing.reconstruct(old[0], new[1]), sharing.reconstruct(new[0], old[1])):
        assert np.mean(mixed == model) < 0.01
        assert np.mean(np.abs(sharing.decode_fixed(mixed)) > 100) > 0.9  # far outside any weight's range
    after = predict_private(mp, layout, x[te], -1e9).predictions
    assert [p.best for p in after] == [p.best for p in before]
    assert [p.label for p in after] == [p.label for p in before]
    # confidences agree up to sfix's probabilistic rounding, as between any two runs
    assert np.allclose([p.confidence for p in after], [p.confidence for p in before], atol=1e-3)
    assert np.allclose([p.score for p in after], [p.score for p in before], atol=2 ** -10)
    # local mode confirms the new generation at once, and each server destroyed the previous one (until a
    # confirmation both stay: tests/test_security.py::test_both_generations_stay_until_the_client_confirms)
    for i in range(2):
        assert set(model_generations(Server(layout.server(i), i))) == {gen}


def test_refresh_shares_task_end_to_end(trained, tmp_path):
    """`invoke refresh-shares` on a copy of a trained deployment."""
    import subprocess
    import sys

    layout = _copy(trained[0], tmp_path / "var")
    gen = client.load_model_record(layout.client)["gen"]
    r = subprocess.run([sys.executable, "-m", "invoke", "refresh-shares"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, env=dict(os.environ, INVOKE_PATHS_VAR=str(layout.root)))
    assert r.returncode == 0, r.stderr
    assert "model shares renewed: generation refresh-" in r.stdout
    assert client.load_model_record(layout.client)["gen"] != gen


def test_refresh_killed_on_one_server_leaves_a_usable_model(mp, trained, data, tmp_path):
    layout = _copy(trained[0], tmp_path / "var")
    x, _, _, te = data
    gen = client.load_model_record(layout.client)["gen"]

    def kill_server_1(procs):
        os.killpg(procs[1].pid, signal.SIGSTOP)  # cannot finish before it is killed
        threading.Timer(0.5, _kill, args=(procs[1],)).start()

    with pytest.raises(PartyFailed) as err:
        refresh_private(mp, layout, on_spawn=kill_server_1)
    assert err.value.party == 1
    assert client.load_model_record(layout.client)["gen"] == gen
    assert not list((layout.client / "jobs").glob("*.json"))
    rep = predict_private(mp, layout, x[te[:2]], 0.0)
    assert len(rep.predictions) == 2


def test_killed_server_mid_recognition_is_named_and_changes_nothing(mp, trained, data):
    layout, _ = trained
    x, _, _, te = data
    before = [current_generation(Server(layout.server(i), i)) for i in range(2)]

    def kill_server_0(procs):
        os.killpg(procs[0].pid, signal.SIGSTOP)  # recognition takes a tenth of a second: hold it until the kill
        threading.Timer(0.3, _kill, args=(procs[0],)).start()

    start = time.monotonic()
    with pytest.raises(PartyFailed, match="server 0 was killed") as err:
        predict_private(mp, layout, np.tile(x[te], (6, 1)), 0.0, timeout=60, on_spawn=kill_server_0)
    assert err.value.party == 0 and time.monotonic() - start < 60
    assert [current_generation(Server(layout.server(i), i)) for i in range(2)] == before
    for i in range(2):
        assert not list(layout.server(i).glob("run-*")) and not list((layout.server(i) / "outputs").iterdir())


def test_port_in_use_is_a_clear_error(mp, trained, data, tmp_path):
    layout, _ = trained
    x, _, _, te = data
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        hosts = tmp_path / "hosts"
        hosts.write_text(f"127.0.0.1:{port}\n127.0.0.1:{port + 1}\n")
        client.share_predict(layout.client, x[te[:1]], 0.0, tmp_path / "jobs")
        start = time.monotonic()
        with pytest.raises(HostsError, match=f"port {port} on 127.0.0.1 is already in use"):
            run_party_job(mp, layout.server(0), 0, hosts, tmp_path / "jobs" / "server0", timeout=30)
        assert time.monotonic() - start < 5


def test_model_shares_from_another_training_run_are_caught_before_the_protocol(mp, trained, data, tmp_path):
    x, labels, tr, te = data
    layout = _copy(trained[0], tmp_path / "a")
    other = Layout(tmp_path / "b")
    train_private(mp, other, x[tr], [labels[k] for k in tr], PARAMS, timeout=300)
    # server 1 of deployment a gets server 1's model folder from deployment b
    shutil.rmtree(layout.server(1) / "models")
    shutil.copytree(other.server(1) / "models", layout.server(1) / "models")
    (layout.server(1) / "model").unlink()
    os.symlink(os.readlink(other.server(1) / "model"), layout.server(1) / "model")
    with pytest.raises(ModelError, match="server 1 does not hold model generation .* different runs"):
        predict_private(mp, layout, x[te[:1]], 0.0)
    assert not list(layout.server(0).glob("run-*"))


def test_bundle_of_another_size_is_caught(mp, trained, data, tmp_path):
    layout, _ = trained
    x, _, _, te = data
    client.share_predict(layout.client, x[te[:1]], 0.0, tmp_path / "jobs")
    import json

    mf = tmp_path / "jobs" / "server0" / "manifest.json"
    m = json.loads(mf.read_text())
    m["n_classes"] += 1
    m["program_args"][2] = str(m["n_classes"])
    mf.write_text(json.dumps(m))
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1:7400\n127.0.0.1:7401\n")
    with pytest.raises(ModelError, match=r"expects run .*\(129x6\)"):
        run_party_job(mp, layout.server(0), 0, hosts, tmp_path / "jobs" / "server0")


@pytest.mark.parametrize("what", ["bundle", "model"])
def test_truncated_share_files_are_caught(mp, trained, data, tmp_path, what):
    layout = _copy(trained[0], tmp_path / "var")
    x, _, _, te = data
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1:7402\n127.0.0.1:7403\n")
    client.share_predict(layout.client, x[te[:1]], 0.0, tmp_path / "jobs")
    if what == "bundle":
        f = tmp_path / "jobs" / "server1" / "Input-Binary-P1-0"
        err = sharing.SharingError
    else:
        f = layout.model_dir(1) / "Transactions-P1.data"
        err = ModelError
    f.write_bytes(f.read_bytes()[:-24])
    with pytest.raises(err, match="truncated"):
        run_party_job(mp, layout.server(1), 1, hosts, tmp_path / "jobs" / "server1")
    assert not list(layout.server(1).glob("run-*"))


def test_missing_certificate_in_a_server_folder(mp, trained, data, tmp_path):
    layout = _copy(trained[0], tmp_path / "var")
    x, _, _, te = data
    (layout.server(0) / "certs" / "P0.key").unlink()
    with pytest.raises(CertError, match=r"server 0's private key .*P0.key missing: run `invoke certs --id 0`"):
        predict_private(mp, layout, x[te[:1]], 0.0)


def test_certificate_checks(tmp_path, monkeypatch):
    certs.make_party_cert(tmp_path / "s0", 0)
    certs.make_party_cert(tmp_path / "s1", 1)
    with pytest.raises(CertError, match="server 1's certificate .* missing"):
        certs.check_party_certs(tmp_path / "s0", 0)
    with pytest.raises(CertError, match="needs the one of server 1"):
        certs.import_peer_cert(tmp_path / "s0", 0, tmp_path / "s0" / "certs" / "P0.pem")
    with pytest.raises(CertError, match="exists; use --force"):
        certs.make_party_cert(tmp_path / "s0", 0)
    certs.import_peer_cert(tmp_path / "s0", 0, tmp_path / "s1" / "certs" / "P1.pem")
    assert certs.check_party_certs(tmp_path / "s0", 0).peer.common_name == "P1"
    # a key that does not belong to the certificate
    shutil.copyfile(tmp_path / "s1" / "certs" / "P1.key", tmp_path / "s0" / "certs" / "P0.key")
    with pytest.raises(CertError, match="does not belong to"):
        certs.check_party_certs(tmp_path / "s0", 0)
    # an expired certificate
    certs.make_party_cert(tmp_path / "s0", 0, force=True, days=1)
    now = time.time()
    monkeypatch.setattr(certs.time, "time", lambda: now + 2 * 86400)
    with pytest.raises(CertError, match="expired"):
        certs.check_party_certs(tmp_path / "s0", 0)


@pytest.mark.parametrize("text,match", [
    ("127.0.0.1:5000\n", "two non-empty lines .* or three"),
    ("127.0.0.1:5000\n\n127.0.0.1:5001\n", "three non-empty lines"),
    ("127.0.0.1:50x\n127.0.0.1:5001\n", "line 1: port '50x' is not a number"),
    ("127.0.0.1:5000\n127.0.0.1:70000\n", "line 2: port 70000 out of range"),
    ("127.0.0.1:5000\nbad host!:5001\n", "line 2: 'bad host!' is neither"),
    ("127.0.0.1:5000\n127.0.0.1:5000\n", "lines 1 and 2 are both"),
    (" 127.0.0.1:5000\n127.0.0.1:5001\n", "remove the spaces"),
])
def test_hosts_file_errors_name_the_line(tmp_path, text, match):
    p = tmp_path / "hosts"
    p.write_text(text)
    with pytest.raises(HostsError, match=match):
        load_hosts(p)


def test_hosts_file_defaults_and_missing(tmp_path):
    p = tmp_path / "hosts"
    p.write_text("127.0.0.1\nlocalhost:6001\n")
    h = load_hosts(p)
    assert (h[0].port, h[1].address, h[1].port) == (5000, "127.0.0.1", 6001)
    with pytest.raises(HostsError, match="not found"):
        load_hosts(tmp_path / "nope")


def test_stopping_invoke_party_stops_its_protocol_process(trained, data, tmp_path):
    """SIGTERM to `invoke party` (a service manager stopping it) leaves no protocol process behind."""
    import subprocess
    import sys

    layout = _copy(trained[0], tmp_path / "var")
    x, _, _, te = data
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1:{port}\n127.0.0.1:{port + 1}\n127.0.0.1:{port + 2}\n")
    client.share_predict(layout.client, x[te[:1]], 0.0, tmp_path / "jobs")
    p = subprocess.Popen([sys.executable, "-m", "invoke", "party", "--id", "0", "--hosts", str(hosts), "--job",
                          str(tmp_path / "jobs" / "server0"), "--server-dir", str(layout.server(0))],
                         cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    child = None
    while child is None and time.monotonic() < deadline:  # server 1 never comes: server 0 waits
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.readlink(proc / "exe").endswith(("semi2k-party.x", "dealer-ring-party.x")) and \
                        Path(os.readlink(proc / "cwd")).parent == layout.server(0).resolve():
                    child = int(proc.name)
            except OSError:
                continue
        time.sleep(0.05)
    assert child is not None
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "stopped" in err and "model shares are unchanged" in err, err
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
    assert not list(layout.server(0).glob("run-*"))


# ---- both protocols, what the servers receive, the dealer -------------------------------------------

@pytest.mark.parametrize("protocol", ["dealer", "semi2k"])
def test_both_protocols_agree_with_the_reference(mp, data, tmp_path, protocol):
    x, labels, tr, te = data
    layout = Layout(tmp_path / "var", protocol)
    report = train_private(mp, layout, x[tr], [labels[k] for k in tr], PARAMS, timeout=300)
    idx = {n: k for k, n in enumerate(report.classes)}
    w = reference.train(x[tr], np.array([idx[labels[k]] for k in tr]), len(report.classes), PARAMS)
    got_w = sharing.decode_fixed(sharing.reconstruct(*_model(layout))).reshape(w.shape)
    assert np.max(np.abs(got_w - w)) < 0.05
    # the open-set score z_max on the model the servers hold (reconstructed), as float64 computes it
    best, conf, zmax = reference.predict_scores(got_w, x[te], PARAMS.exp_bits)
    t = float(np.median(zmax))  # a threshold among the scores: some faces named, some unknown
    t += 0.01 if np.min(np.abs(zmax - t)) < 2 ** -9 else 0.0
    assert np.min(np.abs(zmax - t)) >= 2 ** -9
    rep = predict_private(mp, layout, x[te], t)
    # MP-SPDZ's split of its round count (-v), which benchmarks/gallery_scale.py prints: online + preprocessing
    p0 = rep.run.parties[0]
    assert p0.online_rounds and p0.offline_rounds is not None and p0.online_rounds + p0.offline_rounds == p0.rounds
    assert [p.best for p in rep.predictions] == list(best)
    assert np.allclose([p.confidence for p in rep.predictions], conf, atol=2e-3)
    assert np.max(np.abs(np.array([p.score for p in rep.predictions]) - zmax)) <= 2 ** -10
    assert [p.label for p in rep.predictions] == [b if z >= t else client.UNKNOWN for b, z in zip(best, zmax)]
    assert 0 < sum(p.label == client.UNKNOWN for p in rep.predictions) < len(te)


def _bits_uniform(values: np.ndarray) -> None:
    """Every one of the 64 bit positions is set in about half of the values (5 sigma)."""
    bits = np.unpackbits(values.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    freq = bits.mean(axis=0)
    sigma = 0.5 / np.sqrt(len(values))
    assert np.all(np.abs(freq - 0.5) < 5 * sigma + 1e-12), freq


@pytest.mark.parametrize("protocol", ["dealer", "semi2k"])
def test_what_each_server_receives_is_uniform_and_uncorrelated(data, tmp_path, protocol):
    """The share bundles, by value: each bit uniform, no correlation with the embeddings or labels, fresh
    randomness for the same data; and no argument or manifest field that tells the embedder or threshold."""
    x, labels, tr, _ = data
    x = np.tile(x, (20, 1))  # enough values for the statistics
    labels = labels * 20
    secret = np.concatenate([[16.0], reference.with_bias(x[reference.training_order(len(x), PARAMS.seed)]).ravel()])
    enc = sharing.encode_fixed(secret).view(np.int64).astype(np.float64)
    layout = Layout(tmp_path / "var", protocol)
    bundles = {}
    for alpha in (16.0, 96.0):  # FaceNet's and dlib's warm-start scales
        params = reference.TrainParams(**{**PARAMS.__dict__, "alpha": alpha})
        sent = client.share_train(layout.client, x, labels, params, tmp_path / f"a{alpha:g}", protocol=protocol)
        bundles[alpha] = sent
    for i in range(2):
        blobs = [np.frombuffer((bundles[a].bundles[i] / f"Input-Binary-P{i}-0").read_bytes(), "<u8")
                 for a in (16.0, 96.0)]
        _bits_uniform(blobs[0])
        share = blobs[0][:len(secret)].view(np.int64).astype(np.float64)
        r = np.corrcoef(share, enc)[0, 1]
        assert abs(r) < 5 / np.sqrt(len(secret)), r
        assert np.mean(blobs[0] == blobs[1]) < 1e-3  # the same data, shared twice: unrelated shares
        manifests = [json.loads((bundles[a].bundles[i] / "manifest.json").read_text()) for a in (16.0, 96.0)]
        # all a server reads besides shares: identical whichever embedder (alpha) the client uses
        for key in ("program", "program_args", "n", "d", "n_classes", "frac_bits", "ring_bits", "kind", "protocol",
                    "n_values", "party", "file", "extra", "program_version"):
            assert manifests[0][key] == manifests[1][key], key
        assert manifests[0]["program_args"] == [str(len(x)), "129", "5", "1", "16", "1.0", "8"]
    # recognition: the threshold never goes to the servers; their bundle is the queries alone
    rec = json.loads(_fake_record(layout, x).read_text())
    outs = [client.share_predict(layout.client, x[:3], t, tmp_path / f"q{t}", protocol=protocol) for t in (0.2, 0.9)]
    for i in range(2):
        ms = [json.loads((o.bundles[i] / "manifest.json").read_text()) for o in outs]
        assert ms[0]["program_args"] == ms[1]["program_args"] == ["4", "129", str(len(rec["classes"])), "8"]
        assert ms[0]["n_values"] == 4 * 129  # the padded queries, nothing else


def _fake_record(layout: Layout, x) -> Path:
    """A client model record (no training needed to make recognition bundles)."""
    from preprocessing.fileio import atomic_write_json

    atomic_write_json(layout.client_model, {"run_id": "r", "gen": "r", "classes": [f"p{k}" for k in range(5)],
                                            "d": x.shape[1], "n": len(x), "params": PARAMS.__dict__})
    return layout.client_model


def test_a_bundle_runs_once_and_a_replay_is_refused(mp, trained, data, tmp_path):
    layout = _copy(trained[0], tmp_path / "var")
    x, _, _, te = data
    sent = client.share_predict(layout.client, x[te[:2]], 0.0, tmp_path / "jobs")
    keep = tmp_path / "copy"
    shutil.copytree(tmp_path / "jobs", keep)
    from orchestration.client.private import run_local

    run_local(mp, layout, sent)
    replay = client.Outgoing(sent.job, sent.kind, (keep / "server0", keep / "server1"), sent.program_args,
                             sent.protocol, sent.program)
    with pytest.raises(sharing.SharingError, match=f"job {sent.job} already ran on server 0"):
        run_local(mp, layout, replay)


def test_killed_dealer_mid_training_is_named_and_changes_nothing(mp, trained, data, tmp_path):
    layout = _copy(trained[0], tmp_path / "var")
    x, labels, tr, _ = data
    before = [current_generation(Server(layout.server(i), i)) for i in range(2)]
    files = [(layout.model_dir(i) / f"Transactions-P{i}.data").read_bytes() for i in range(2)]

    def kill_dealer(procs):
        assert len(procs) == 3
        os.killpg(procs[2].pid, signal.SIGSTOP)  # cannot finish before it is killed
        threading.Timer(0.5, _kill, args=(procs[2],)).start()

    start = time.monotonic()
    with pytest.raises(PartyFailed, match=r"the dealer \(the data owner's client\) was killed") as err:
        train_private(mp, layout, x[tr], [labels[k] for k in tr], PARAMS, timeout=60, on_spawn=kill_dealer)
    assert err.value.party == 2 and time.monotonic() - start < 60
    assert [current_generation(Server(layout.server(i), i)) for i in range(2)] == before
    assert [(layout.model_dir(i) / f"Transactions-P{i}.data").read_bytes() for i in range(2)] == files
    assert not list(layout.client.glob("run-*")) and not list((layout.client / "jobs").glob("train-*.json"))


def test_dealer_errors_name_the_job_and_the_hosts_file(mp, trained, data, tmp_path):
    from orchestration.client.dealer import run_dealer

    layout = _copy(trained[0], tmp_path / "var")
    x, _, _, te = data
    with pytest.raises(client.CollectError, match="no job 'predict-nope' waiting"):
        run_dealer(mp, layout.client, layout.build, tmp_path / "hosts", "predict-nope")
    sent = client.share_predict(layout.client, x[te[:1]], 0.0, tmp_path / "jobs")
    two = tmp_path / "hosts"
    two.write_text("127.0.0.1:7500\n127.0.0.1:7501\n")
    with pytest.raises(HostsError, match=f"job {sent.job} runs protocol dealer, which needs 3 lines"):
        run_dealer(mp, layout.client, layout.build, two, sent.job)
    semi = client.share_predict(layout.client, x[te[:1]], 0.0, tmp_path / "semi", protocol="semi2k")
    with pytest.raises(client.CollectError, match="runs protocol semi2k, which has no dealer"):
        run_dealer(mp, layout.client, layout.build, two, semi.job)
    assert not list(layout.client.glob("run-*"))
