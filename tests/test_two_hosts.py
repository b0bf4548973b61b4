"""Two servers on two "hosts": network namespaces joined by a veth pair, one `invoke party` in each.

The client makes bundles, each namespace runs its own server folder with its own key, and the
client collects. Checked here: training and recognition across the link, TLS on the wire (a
capture on the veth), a server with a wrong or missing certificate, listening only on the
hosts-file address, and killing either server in the middle of training and of recognition.
Skipped, with the reason, only where the kernel forbids namespaces.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from orchestration.client import jobs as client
from orchestration.shared import reference
from orchestration.server.job import Server, current_generation
import netlab
from synthetic import split

pytestmark = [pytest.mark.mpc, pytest.mark.protocol]

REPO = Path(__file__).resolve().parents[1]
PARAMS = reference.TrainParams(epochs=1, batch=16, lr=1.0, alpha=16.0, exp_bits=8, seed=1)
PORTS = (7100, 7101, 7102)  # server 0, server 1, the client (dealer mode)


@pytest.fixture(scope="module")
def net_ok():
    reason = netlab.unavailable()
    if reason:
        print(f"\nSKIP two-host tests: {reason}", file=sys.stderr)
        pytest.skip(reason)


def invoke(*args: str, ns: netlab.TwoHosts | None = None, i: int = 0, check: bool = True,
           env: dict | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "invoke", *args]
    cmd = ns.cmd(i, argv) if ns else argv
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if check and r.returncode != 0:
        raise AssertionError(f"invoke {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


class Deployment:
    """A client folder and two server folders, certificates made and exchanged with `invoke certs`.

    ``protocol="dealer"`` (the default) adds the client as party 2: it deals from server 1's
    namespace, at its own port, and every party pins the other two's certificates."""

    def __init__(self, root: Path, net: netlab.TwoHosts, protocol: str = "dealer"):
        self.root, self.net, self.protocol = root, net, protocol
        self.client = root / "client"
        self.servers = [root / "server0", root / "server1"]
        self.dirs = self.servers + ([self.client] if protocol == "dealer" else [])
        n = len(self.dirs)
        for i in range(n):
            invoke("certs", "--id", str(i), "--server-dir", str(self.dirs[i]))
        for i in range(n):
            for j in range(n):
                if j != i:
                    invoke("certs", "--id", str(i), "--server-dir", str(self.dirs[i]), "--peer-cert",
                           str(self.dirs[j] / "certs" / f"P{j}.pem"))
        self.hosts_files = [root / f"hosts{i}" for i in range(n)]
        for i in range(n):
            self.hosts_files[i].write_text(net.hosts_text(i, PORTS[:n]))

    def pin_client(self, name: str = "owner", folder: Path | None = None) -> Path:
        """A service client's certificate (``invoke certs --client NAME``) in ``folder`` (default: the data
        owner's), pinned on both servers; a folder of its own also gets the servers' certificates."""
        folder = folder or self.client
        invoke("certs", "--client", name, "--server-dir", str(folder))
        for i in range(2):
            invoke("certs", "--id", str(i), "--server-dir", str(self.servers[i]), "--allow-client",
                   str(folder / "certs" / "client.pem"))
            if folder != self.client:
                (folder / "certs" / f"P{i}.pem").write_bytes((self.client / "certs" / f"P{i}.pem").read_bytes())
        return folder

    def start(self, i: int, job_dir: Path, timeout: int = 120, env: dict | None = None) -> subprocess.Popen:
        argv = [sys.executable, "-m", "invoke", "party", "--id", str(i), "--hosts", str(self.hosts_files[i]), "--job",
                str(job_dir / f"server{i}"), "--server-dir", str(self.servers[i]), "--timeout", str(timeout)]
        return self.net.popen(i, argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, **(env or {})))

    def start_dealer(self, job_dir: Path, timeout: int = 120) -> subprocess.Popen | None:
        """Dealer mode: the client's `invoke deal` for the job in ``job_dir``, from server 1's namespace."""
        if self.protocol != "dealer":
            return None
        job = json.loads((job_dir / "server0" / "manifest.json").read_text())["job"]
        argv = [sys.executable, "-m", "invoke", "deal", "--job", job, "--hosts", str(self.hosts_files[2]),
                "--timeout", str(timeout)]
        env = dict(os.environ, INVOKE_PATHS_VAR=str(self.root))  # <var>/client is the deployment's client folder
        return self.net.popen(1, argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def run(self, job_dir: Path, **kw) -> list[tuple[int, str]]:
        procs = [self.start(i, job_dir, **kw) for i in range(2)]
        dealer = self.start_dealer(job_dir, kw.get("timeout", 120))
        res = [(p.wait(timeout=300), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
        if dealer is not None:
            dealer.wait(timeout=300)
        return res

    def outputs(self, job: str) -> list[Path]:
        return [self.servers[i] / "outputs" / job for i in range(2)]

    def train(self, x, labels, params=None) -> client.Collected:
        sent = client.share_train(self.client, x, labels, params or PARAMS, self.root / "jobs" / "train",
                                  protocol=self.protocol)
        res = self.run(self.root / "jobs" / "train")
        assert all(rc == 0 for rc, _ in res), res
        return client.collect(self.client, sent.job, self.outputs(sent.job))

    def predict(self, x, threshold: float = 0.0) -> client.Collected:
        sent = client.share_predict(self.client, x, threshold, self.root / "jobs" / "predict", protocol=self.protocol)
        res = self.run(self.root / "jobs" / "predict")
        assert all(rc == 0 for rc, _ in res), res
        return client.collect(self.client, sent.job, self.outputs(sent.job))


@pytest.fixture(scope="module")
def data():
    return split(people=6, per=10, seed=4, every=5)


@pytest.fixture(scope="module")
def lan(net_ok, tmp_path_factory, data):
    """Two namespaces without added latency, a deployment in them, a model trained across them."""
    x, labels, tr, _ = data
    with netlab.TwoHosts(rtt_ms=0) as net:
        dep = Deployment(tmp_path_factory.mktemp("lan"), net)
        done = dep.train(x[tr], [labels[k] for k in tr])
        yield dep, done


def test_training_and_recognition_across_two_namespaces(lan, data):
    dep, trained = lan
    x, labels, tr, te = data
    assert (dep.client / "model.json").exists()
    classes = trained.record["classes"]
    idx = {n: k for k, n in enumerate(classes)}
    ref = reference.train(x[tr], np.array([idx[labels[k]] for k in tr]), len(classes), PARAMS)
    expected = np.argmax(reference.with_bias(x[te]) @ ref, axis=1)
    got = dep.predict(x[te]).predictions
    assert [p.best for p in got] == list(expected)
    assert [classes[p.best] for p in got] == [labels[k] for k in te]
    # each server holds only its own key
    for i in range(2):
        names = sorted(p.name for p in (dep.servers[i] / "certs").iterdir())
        assert names == sorted([f"P{i}.key", f"P{i}.pem", f"P{1 - i}.pem", "P2.pem"])


def test_servers_listen_only_on_their_hosts_file_address(lan, data):
    dep, _ = lan
    x, _, _, te = data
    sent = client.share_predict(dep.client, x[te[:2]], 0.0, dep.root / "jobs" / "listen")
    p0 = dep.start(0, dep.root / "jobs" / "listen")
    try:
        deadline = time.monotonic() + 60
        seen: list = []
        while time.monotonic() < deadline:
            seen = [ln for ln in dep.net.listeners(0) if ln[1] == PORTS[0]]
            if seen:
                break
            time.sleep(0.1)
        assert seen == [(dep.net.addr[0], PORTS[0])], f"server 0 listens at {seen}, not only {dep.net.addr[0]}"
        p1 = dep.start(1, dep.root / "jobs" / "listen")
        dealer = dep.start_dealer(dep.root / "jobs" / "listen")
        assert p1.wait(timeout=120) == 0 and p0.wait(timeout=120) == 0
        assert dealer is None or dealer.wait(timeout=60) == 0
    finally:
        for p in (p0,):
            if p.poll() is None:
                p.kill()
    client.collect(dep.client, sent.job, dep.outputs(sent.job))


def _run_captured(dep: Deployment, x, tmp: Path, env: dict | None = None) -> dict:
    sent = client.share_predict(dep.client, x, 0.0, tmp / "jobs", protocol=dep.protocol)
    cap = dep.net.capture(0, tmp / "veth.cap")
    try:
        res = dep.run(tmp / "jobs", env=env)
    finally:
        cap.terminate()
        cap.wait(timeout=10)
    assert all(rc == 0 for rc, _ in res), res
    client.collect(dep.client, sent.job, dep.outputs(sent.job))
    streams = netlab.tcp_streams(tmp / "veth.cap")
    between = {k: v for k, v in streams.items() if {k[0], k[2]} == set(dep.net.addr)}
    assert between, f"no traffic between {dep.net.addr} captured"
    return between


def test_traffic_between_servers_is_tls(lan, data, tmp_path):
    dep, _ = lan
    x, _, _, te = data
    streams = _run_captured(dep, x[te], tmp_path / "tls")
    total = app_data = 0
    for key, stream in streams.items():
        ident, stream = netlab.split_preamble(stream)
        assert re.fullmatch(rb"((machine|thread)[0-9]*(send|recv)?P[012])?", ident), f"{key}: cleartext {ident!r} before TLS"
        records = netlab.tls_records(stream)  # raises if any further byte is not inside a TLS record
        assert records[0][0] == 22, f"{key}: does not start with a TLS handshake"
        app_data += sum(n for t, n in records if t == 23)
        total += len(stream)
    # the protocol's traffic (about 140 kB for 12 queries), all inside TLS records; the rest is the handshakes
    assert app_data > 50_000 and app_data > 0.8 * total


SUPPORTED_VERSIONS = 43  # the extension through which TLS 1.3 is offered and chosen (RFC 8446, 4.2.1)


def test_tls_between_servers_is_exactly_version_1_2(lan, data, tmp_path):
    """README, *Two hosts*: MP-SPDZ speaks exactly TLS 1.2 (its Boost.Asio context is `tlsv12`, which sets both
    the lowest and the highest version). On the wire: no ClientHello offers TLS 1.3, every ServerHello picks
    TLS 1.2 with an ECDHE and AEAD cipher suite, and both certificates cross in the clear, which TLS 1.3 would
    encrypt."""
    dep, _ = lan
    x, _, _, te = data
    streams = _run_captured(dep, x[te], tmp_path / "version")
    clients, servers, certificates, chosen = 0, 0, 0, set()
    for key, stream in streams.items():
        _, stream = netlab.split_preamble(stream)
        for mtype, body in netlab.tls_handshake_messages(stream):
            if mtype in (1, 2):
                hello = netlab.hello_fields(mtype, body)
                assert hello["version"] == 0x0303, f"{key}: hello version {hello['version']:#06x}, not TLS 1.2"
                assert SUPPORTED_VERSIONS not in hello["extensions"], f"{key}: TLS 1.3 offered or chosen"
                if mtype == 1:
                    clients += 1
                    assert not [s for s in hello["suites"] if 0x1301 <= s <= 0x1305], f"{key}: TLS 1.3 suites"
                else:
                    servers += 1
                    chosen.add(hello["suites"][0])
            elif mtype == 11:
                certificates += 1
    # every connection: one ClientHello, one ServerHello, and both servers present their certificate
    assert clients > 0 and clients == servers and certificates == 2 * servers, (clients, servers, certificates)
    assert not [s for s in chosen if 0x1301 <= s <= 0x1305], chosen
    # ECDHE key exchange with an AEAD cipher (forward secrecy): TLS_ECDHE_ECDSA_WITH_AES_{128,256}_GCM_*
    # or _CHACHA20_POLY1305_*, the suites OpenSSL prefers for the servers' EC P-256 keys
    assert chosen <= {0xC02B, 0xC02C, 0xCCA9}, [f"{s:#06x}" for s in chosen]
    readme = (REPO / "README.md").read_text()
    assert "TLS 1.2+" not in readme and "exactly TLS 1.2" in readme


def test_plaintext_control_is_not_tls(net_ok, data, tmp_path):
    """The capture check can fail: with encryption switched off the same traffic is no TLS.

    semi2k, because MP-SPDZ's dealer binary has no plaintext mode to compare with."""
    x, labels, tr, te = data
    with netlab.TwoHosts() as net:
        dep = Deployment(tmp_path, net, protocol="semi2k")
        dep.train(x[tr], [labels[k] for k in tr])
        streams = _run_captured(dep, x[te], tmp_path / "plain", env={"INVOKE_MPSPDZ_ENCRYPTED": "0"})
    assert sum(map(len, streams.values())) > 10_000
    for key, stream in streams.items():
        _, stream = netlab.split_preamble(stream)
        with pytest.raises(ValueError):
            netlab.tls_records(stream)


def test_server_with_wrong_certificate_cannot_join(net_ok, tmp_path, data):
    x, labels, tr, te = data
    with netlab.TwoHosts() as net:
        dep = Deployment(tmp_path, net)
        # server 1 makes a new key; server 0 still holds (and trusts only) the old certificate
        invoke("certs", "--id", "1", "--server-dir", str(dep.servers[1]), "--force")
        client.share_train(dep.client, x[tr], [labels[k] for k in tr], PARAMS, tmp_path / "jobs")
        start = time.monotonic()
        res = dep.run(tmp_path / "jobs", timeout=60)
        assert time.monotonic() - start < 60
        for rc, out in res:
            assert rc == 1
            assert "TLS handshake" in out, out
        assert not (dep.servers[0] / "model").exists() and not (dep.servers[1] / "model").exists()


def test_client_with_wrong_certificate_cannot_deal(net_ok, tmp_path, data):
    """Dealer mode: the servers pin the client's certificate too; a re-keyed client cannot join."""
    x, labels, tr, _ = data
    with netlab.TwoHosts() as net:
        dep = Deployment(tmp_path, net)
        invoke("certs", "--id", "2", "--server-dir", str(dep.client), "--force")
        client.share_train(dep.client, x[tr], [labels[k] for k in tr], PARAMS, tmp_path / "jobs")
        start = time.monotonic()
        res = dep.run(tmp_path / "jobs", timeout=60)
        assert time.monotonic() - start < 90
        for rc, out in res:
            assert rc == 1, out
        assert any("TLS handshake" in out and "the dealer (the data owner's client)" in out for _, out in res), res
        assert not (dep.servers[0] / "model").exists() and not (dep.servers[1] / "model").exists()


def test_server_missing_certificate_fails_before_the_protocol(lan, data, tmp_path):
    dep, _ = lan
    x, _, _, te = data
    broken = tmp_path / "server1"
    shutil.copytree(dep.servers[1], broken, symlinks=True)
    (broken / "certs" / "P0.pem").unlink()
    client.share_predict(dep.client, x[te[:1]], 0.0, tmp_path / "jobs")
    r = invoke("party", "--id", "1", "--hosts", str(dep.hosts_files[1]), "--job", str(tmp_path / "jobs" / "server1"),
               "--server-dir", str(broken), ns=dep.net, i=1, check=False)
    assert r.returncode == 1
    assert "P0.pem missing" in r.stderr and "invoke certs" in r.stderr, r.stderr
    assert not list(broken.glob("run-*"))


def _protocol_pid(server_dir: Path, timeout: float = 60) -> int:
    """The MP-SPDZ party process working in ``server_dir`` once it is connected to its peer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cwd = os.readlink(proc / "cwd")
                exe = os.readlink(proc / "exe")
            except OSError:
                continue
            if exe.endswith(("semi2k-party.x", "dealer-ring-party.x")) and Path(cwd).parent == server_dir.resolve():
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no protocol process in {server_dir}")


def _wait_for_line(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in log.read_text(errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{log}: no {text!r} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def wan(net_ok, tmp_path_factory, data):
    """20 ms round trips, so that a run lasts long enough to be killed in the middle."""
    x, labels, tr, _ = data
    with netlab.TwoHosts(rtt_ms=20) as net:
        dep = Deployment(tmp_path_factory.mktemp("wan"), net)
        dep.train(x[tr], [labels[k] for k in tr])
        yield dep


@pytest.mark.parametrize("kind", ["train", "predict"])
@pytest.mark.parametrize("victim", [0, 1])
def test_killing_a_server_mid_run_keeps_the_model_and_a_rerun_succeeds(wan, data, kind, victim, tmp_path):
    dep = wan
    x, labels, tr, te = data
    before = [current_generation(Server(dep.servers[i], i)) for i in range(2)]
    files_before = [(dep.servers[i] / "model" / f"Transactions-P{i}.data").read_bytes() for i in range(2)]
    jobs = tmp_path / "jobs"
    if kind == "train":
        sent = client.share_train(dep.client, x[tr], [labels[k] for k in tr], PARAMS, jobs)
    else:
        # 384 queries: the dealer mode answers a few in about 15 round trips at 20 ms, too soon for a late kill
        sent = client.share_predict(dep.client, np.tile(x[te], (32, 1)), 0.0, jobs)
    procs = [dep.start(i, jobs, timeout=90) for i in range(2)]
    dealer = dep.start_dealer(jobs, timeout=90)
    pid = _protocol_pid(dep.servers[victim])
    _wait_for_line(dep.servers[victim] / "logs" / f"{sent.job}.log", "Setup took")  # connected, computing now
    assert procs[victim].poll() is None and procs[1 - victim].poll() is None, "the run ended before the kill"
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    if dealer is not None:
        dealer_out = dealer.communicate(timeout=120)[0]
        # the dealer only sends: it may have dealt all of its share before the kill and ended well;
        # if it did not, it says so, as the client
        assert dealer.returncode == 0 or (dealer.returncode == 1 and "the dealer (the data owner's client)" in dealer_out), dealer_out
    assert time.monotonic() - start < 90
    survivor = 1 - victim
    assert procs[survivor].returncode == 1 and procs[victim].returncode == 1
    assert f"lost the connection to server {victim}" in outs[survivor], outs[survivor]
    assert f"server {victim} was killed" in outs[victim], outs[victim]
    # the last good model is intact and current on both; nothing half-written is left
    for i in range(2):
        assert current_generation(Server(dep.servers[i], i)) == before[i]
        assert (dep.servers[i] / "model" / f"Transactions-P{i}.data").read_bytes() == files_before[i]
        assert not list(dep.servers[i].glob("run-*")) and not list(dep.servers[i].glob("models/.*"))
        assert not (dep.servers[i] / "outputs" / sent.job).exists()
    # the same bundles run again, and the client collects them
    res = dep.run(jobs)
    assert all(rc == 0 for rc, _ in res), res
    done = client.collect(dep.client, sent.job, dep.outputs(sent.job))
    if kind == "predict":
        assert [done.record["classes"][p.best] for p in done.predictions] == [labels[k] for k in te] * 32
    else:
        assert done.record["run_id"] == sent.job.split("-", 1)[1]
