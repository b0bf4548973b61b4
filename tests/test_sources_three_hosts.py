"""Many sources on three hosts (docs/sources.md): server 0, server 1 and the dealer, each an operator of its own
in a network namespace of its own (``netlab.ThreeHosts``); three sources and a door camera OUTSIDE them, in the
test's own namespace, reaching the servers over the veths. Every party has its own folder ``<party>/var``
(``INVOKE_PATHS_VAR``); every step is an ``invoke`` command taken verbatim from docs/sources.md (placeholders
replaced as in tests/test_operator.py), run in its host's namespace with ``ip netns exec``.

Real faces: lfw10's ten persons split 4/3/3 between the sources, two photos of each held out as queries;
strangers from lfw-devtrain. Checked: every held-out photo named right (and no worse than a single owner's
training on the union, in the clear), strangers unknown_person, no name or embedding value in any server's or
the dealer's files or logs, the dealer holds no share, a withdrawn person is unknown afterwards, a source cannot
deal nor be pinned as the dealer. Namespaces that cannot be made FAIL this test (nothing is skipped).
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import netlab
from test_operator import Step, doc_position, fill, rows

REPO = Path(__file__).resolve().parents[1]
DOC = "docs/sources.md"
S0, S1, DEALER = 0, 1, 2
SOURCES = ("bank", "clinic", "kiosk")
DOOR = "door"
PORT = 7000  # every host's line in the hosts file (each host has an address of its own)
HELD = 2  # photos per person held out as queries
N_STRANGERS = 5

THREE, SRC, QRY = (DOC, "Three hosts"), (DOC, "Sources"), (DOC, "Query clients")
STEPS: dict[str, Step] = {
    "certs-server": Step(*THREE, "invoke certs --id I"),
    "certs-dealer": Step(*THREE, "invoke certs --id 2 --server-dir var/dealer"),
    "certs-dealer-client": Step(*THREE, "invoke certs --client dealer1 --role dealer"),
    "peer": Step(*THREE, "invoke certs --id I --peer-cert PJ.pem"),
    "dealer-peer": Step(*THREE, "invoke certs --id 2 --server-dir var/dealer --peer-cert PJ.pem"),
    "allow": Step(*THREE, "invoke certs --id I --allow-client client.pem"),
    "serve": Step(*THREE, "invoke serve --sources --id I --hosts service-hosts"),
    "deal": Step(*THREE, "invoke deal --sources --hosts service-hosts"),
    "pin-p2-replace": Step(*THREE, "invoke certs --id I --peer-cert P2.pem --replace-pin"),
    "source-certs": Step(*SRC, "invoke certs --client NAME --role source"),
    "source-server-certs": Step(*SRC, "invoke certs --client NAME --role source --server-cert P0.pem --server-cert P1.pem"),
    "contribute": Step(*SRC, "invoke contribute --as NAME --dataset DIR"),
    "gallery": Step(*SRC, "invoke gallery --as NAME"),
    "withdraw": Step(*SRC, "invoke withdraw --as NAME --person P"),
    "query-certs": Step(*QRY, "invoke certs --client NAME --role query"),
    "query-server-certs": Step(*QRY, "invoke certs --server-cert P0.pem --server-cert P1.pem"),
    "predict": Step(*QRY, "invoke predict --as NAME --dir DIR"),
}


def test_every_step_is_in_docs_sources_verbatim():
    for name, step in STEPS.items():
        assert doc_position(step) >= 0, f"step {name}: `{step.text}` is not in {step.doc}, section {step.section}"


@pytest.fixture
def namespaces():
    """Network namespaces can be made here, or the test FAILS (a skip would prove nothing)."""
    reason = netlab.unavailable()
    if reason:
        pytest.fail(f"three hosts need network namespaces: {reason} (run as root, or with CAP_NET_ADMIN)")


class Three:
    """The parties' folders (server0, server1, dealer, the sources, the door camera) and how to run their steps."""

    def __init__(self, root: Path, net: netlab.ThreeHosts):
        self.root, self.net = root, net
        self.names = ["server0", "server1", "dealer", *SOURCES, DOOR]
        for n in self.names:
            (root / n / "var").mkdir(parents=True)
            (root / n / "inbox").mkdir()
        self.procs: list[subprocess.Popen] = []
        self.timings: list[tuple[str, str, float]] = []
        self.hosts = root / "service-hosts.txt"
        self.hosts.write_text("".join(f"{a}:{PORT}\n" for a in net.addr))

    def var(self, who: str) -> Path:
        return self.root / who / "var"

    def env(self, who: str) -> dict[str, str]:
        env = dict(os.environ, INVOKE_PATHS_VAR=str(self.var(who)), TF_CPP_MIN_LOG_LEVEL="3",
                   INVOKE_FACE_BACKEND="facenet", INVOKE_MPSPDZ_TIMEOUT="300")
        env.pop("INVOKE_SERVICE_MODEL_RECORD", None)
        if who in SOURCES or who == DOOR:
            env["INVOKE_SERVICE_HOSTS"] = str(self.hosts)  # service.hosts: service-hosts in its invoke.yaml
        else:
            env.pop("INVOKE_SERVICE_HOSTS", None)
        return env

    def _cmd(self, who: str, argv: list[str]) -> list[str]:
        i = self.names.index(who)
        return self.net.cmd(i, argv) if i < 3 else argv  # sources and the door camera: the test's own namespace

    def argv(self, step: str, subs: dict[str, str]) -> list[str]:
        doc = STEPS[step]
        assert doc_position(doc) >= 0, f"`{doc.text}` is no longer in {doc.doc}, {doc.section}"
        return fill(doc.text, {"var/dealer": str(self.var("dealer") / "dealer"), "service-hosts": str(self.hosts),
                               **subs})

    def run(self, who: str, step: str, subs: dict[str, str] | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(step, subs or {})
        t0 = time.monotonic()
        r = subprocess.run(self._cmd(who, argv), cwd=REPO, env=self.env(who), capture_output=True, text=True,
                           timeout=900)
        self.timings.append((step, who, time.monotonic() - t0))
        if check and r.returncode != 0:
            raise AssertionError(f"{who}: {' '.join(argv[2:])} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
                                 + self.tails())
        return r

    def start(self, who: str, step: str, subs: dict[str, str]) -> subprocess.Popen:
        log = self.root / f"{who}.log"
        with open(log, "a") as f:
            p = subprocess.Popen(self._cmd(who, self.argv(step, subs)), cwd=REPO, env=self.env(who), stdout=f,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 30) -> int:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return p.returncode

    def tails(self) -> str:
        return "".join(f"\n--- {f.name} ---\n{f.read_text()[-3000:]}" for f in sorted(self.root.glob("*.log")))

    def send(self, src: Path, to: str, name: str) -> Path:
        """A file handed to another operator (any file transfer): it lands in that party's inbox."""
        dst = self.root / to / "inbox" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        return dst

    def capture(self, i: int) -> tuple[subprocess.Popen, Path]:
        """Capture every TCP frame on host i's veth (all its traffic but its loopback) into a file."""
        out = self.root / f"host{i}.cap"
        return self.net.capture(i, out), out

    def pem(self, who: str, party: int) -> Path:
        if who == "dealer":
            return self.var("dealer") / "dealer" / "certs" / f"P{party}.pem"
        return self.var(who) / f"server{party}" / "certs" / f"P{party}.pem"


def _split(lfw10: Path, root: Path) -> tuple[dict[str, Path], dict[str, list[Path]], Path]:
    """Each source's dataset folder (symlinks), the held-out photos per person, and the query folder."""
    persons = sorted(p.name for p in lfw10.iterdir() if p.is_dir())
    assert len(persons) == 10, persons
    owner = dict(zip(persons, ["bank"] * 4 + ["clinic"] * 3 + ["kiosk"] * 3))
    datasets = {s: root / "data" / s for s in SOURCES}
    held: dict[str, list[Path]] = {}
    queries = root / "data" / "queries"
    queries.mkdir(parents=True)
    for person in persons:
        imgs = sorted((lfw10 / person).glob("*.jpg"))
        (datasets[owner[person]] / person).mkdir(parents=True)
        for img in imgs[:-HELD]:
            (datasets[owner[person]] / person / img.name).symlink_to(img)
        held[person] = [queries / img.name for img in imgs[-HELD:]]
        for img in imgs[-HELD:]:
            (queries / img.name).symlink_to(img)
    return datasets, held, queries


def _embed(folder: Path, cache: Path):
    from preprocessing.dataset import embed_gallery

    return embed_gallery(folder, backend="facenet", detector="hog", cache_dir=cache, progress=False)


@pytest.mark.mpc
def test_many_sources_on_three_hosts(namespaces, mp, lfw10, lfw_unknown, tmp_path):
    t_start = time.monotonic()
    with netlab.ThreeHosts(outside=True) as net:
        dep = Three(tmp_path, net)
        try:
            _flow(dep, lfw10, lfw_unknown)
        finally:
            for p in dep.procs:
                dep.stop(p)
            width = max((len(s) for s, _, _ in dep.timings), default=4)
            print("\nstep timings (s):")
            for step, who, secs in dep.timings:
                print(f"  {step:<{width}}  {who:<8} {secs:7.1f}")
            print(f"  total wall: {time.monotonic() - t_start:.1f} s")


def _flow(dep: Three, lfw10: Path, lfw_unknown: Path) -> None:
    from orchestration.shared import reference

    datasets, held, queries = _split(lfw10, dep.root)
    strangers = sorted(lfw_unknown.glob("*.jpg"))[:N_STRANGERS]
    for img in strangers:
        (queries / img.name).symlink_to(img)

    # -- certificates (docs/sources.md, Three hosts 1-4) -------------------------------------------------
    for i in (S0, S1):
        r = dep.run(f"server{i}", "certs-server", {"I": str(i)})
        assert "sha256" in r.stdout.lower(), r.stdout
    dep.run("dealer", "certs-dealer")
    r = dep.run("dealer", "certs-dealer-client")
    dealer_client = dep.var("dealer") / "dealer" / "certs" / "client.pem"
    assert str(dealer_client) in r.stdout, r.stdout
    for i in (S0, S1):
        for j in (1 - i, 2):
            got = dep.send(dep.pem("dealer" if j == 2 else f"server{j}", j), f"server{i}", f"P{j}.pem")
            dep.run(f"server{i}", "peer", {"I": str(i), "PJ.pem": str(got)})
        got = dep.send(dep.pem(f"server{i}", i), "dealer", f"P{i}.pem")
        dep.run("dealer", "dealer-peer", {"PJ.pem": str(got)})

    def pin(pem: Path, name: str) -> None:
        for i in (S0, S1):
            got = dep.send(pem, f"server{i}", f"{name}/client.pem")
            r = dep.run(f"server{i}", "allow", {"I": str(i), "client.pem": str(got)})
            assert f"accepts service client {name}" in r.stdout, r.stdout

    pin(dealer_client, "dealer1")
    server_pems = {who: [dep.send(dep.pem(f"server{i}", i), who, f"P{i}.pem") for i in (S0, S1)]
                   for who in (*SOURCES, DOOR)}
    for s in SOURCES:
        r = dep.run(s, "source-certs", {"NAME": s})
        pem = Path(r.stdout.strip().splitlines()[-1])
        assert pem == dep.var(s) / "clients" / s / "certs" / "client.pem", r.stdout
        pin(pem, s)
        p0, p1 = server_pems[s]
        dep.run(s, "source-server-certs", {"NAME": s, "P0.pem": str(p0), "P1.pem": str(p1)})
        assert sorted(p.name for p in pem.parent.iterdir()) == ["P0.pem", "P1.pem", "client.key", "client.pem"]
    r = dep.run(DOOR, "query-certs", {"NAME": DOOR})
    door_pem = Path(r.stdout.strip().splitlines()[-1])
    pin(door_pem, DOOR)
    p0, p1 = server_pems[DOOR]
    dep.run(DOOR, "query-server-certs", {"P0.pem": str(p0), "P1.pem": str(p1)})
    for i in (S0, S1):
        names = sorted(p.name for p in (dep.var(f"server{i}") / f"server{i}" / "clients").iterdir())
        assert names == sorted(["dealer1.pem", "door.pem", *(f"{s}.pem" for s in SOURCES)]), names

    # -- a source may not deal, nor be pinned as the dealer ---------------------------------------------
    bank_dir = dep.var("bank") / "clients" / "bank"
    r = subprocess.run([sys.executable, "-m", "invoke", "deal", "--sources", "--hosts", str(dep.hosts),
                        "--dealer-dir", str(bank_dir)], cwd=REPO, env=dep.env("bank"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "a source never deals" in r.stdout + r.stderr, r.stdout + r.stderr
    fake = dep.root / "bank" / "P2.pem"  # the dealer's common name on the bank's own key
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(bank_dir / "certs" / "client.key"), "-out",
                    str(fake), "-subj", "/CN=P2", "-days", "2"], check=True, capture_output=True)
    got = dep.send(fake, "server0", "from-bank/P2.pem")
    before = (dep.var("server0") / "server0" / "certs" / "P2.pem").read_bytes()
    r = dep.run("server0", "pin-p2-replace", {"I": "0", "P2.pem": str(got)}, check=False)
    assert r.returncode != 0 and "a source client never deals" in r.stdout + r.stderr, r.stdout + r.stderr
    assert (dep.var("server0") / "server0" / "certs" / "P2.pem").read_bytes() == before  # the dealer's pin stays

    # -- the service: Three hosts 5 (every frame of both servers captured until the first query is answered) --
    caps = [dep.capture(i) for i in (S0, S1)]
    for i in (S0, S1):
        dep.start(f"server{i}", "serve", {"I": str(i)})
    dep.start("dealer", "deal", {})
    _wait_up(dep)

    # -- the sources enrol -------------------------------------------------------------------------------
    for s in SOURCES:
        r = dep.run(s, "contribute", {"NAME": s, "DIR": str(datasets[s])})
        got = rows_of(r.stdout)
        assert sorted(got) == sorted(p.name for p in datasets[s].iterdir()), r.stdout + r.stderr
        assert all(v[3].startswith("enrolled") for v in got.values()), r.stdout
    for s in SOURCES:
        listed = rows_of(dep.run(s, "gallery", {"NAME": s}).stdout)
        assert sorted(listed) == sorted(p.name for p in datasets[s].iterdir()), listed  # its own persons only

    # -- a query client asks -------------------------------------------------------------------------------
    r = dep.run(DOOR, "predict", {"NAME": DOOR, "DIR": str(queries)})
    answers = rows(r.stdout)
    truth = {str(p): person for person, ps in held.items() for p in ps}
    known = {p: answers[p] for p in truth}
    _all_tls(dep, caps)
    right = np.mean([known[p] == truth[p] for p in truth])
    unknown = [answers[str(queries / s.name)] for s in strangers]
    rejected = np.mean([a == "unknown_person" for a in unknown])
    # the reference: a single owner's training on the union of the same embeddings, in the clear
    cache = dep.root / "ref-cache"
    union = [_embed(datasets[s], cache) for s in SOURCES]
    x = np.concatenate([g.embeddings for g in union])
    labels = [lab for g in union for lab in g.labels]
    classes = sorted(set(labels))
    params = reference.TrainParams(epochs=1, batch=32, lr=1.0, alpha=16.0, exp_bits=8, seed=1)
    w = reference.train(x, np.array([classes.index(n) for n in labels]), len(classes), params)
    q = _embed(_as_gallery(queries, dep.root / "qg"), cache)
    best, _, zmax = reference.predict_scores(w, q.embeddings, 8)  # the servers decide on the top logit
    from preprocessing.models import open_set_threshold

    thr = open_set_threshold("facenet", len(classes))  # the servers' public threshold (models/thresholds.json)
    ref = {str(queries / Path(pth).name): (classes[b] if z >= thr else "unknown_person")
           for pth, b, z in zip(q.paths, best, zmax)}
    ref_right = np.mean([ref[p] == truth[p] for p in truth])
    ref_rejected = np.mean([ref[str(queries / s.name)] == "unknown_person" for s in strangers])
    print(f"\nheld-out photos named right: {right:.3f} ({len(truth)}), single owner in the clear {ref_right:.3f}; "
          f"strangers unknown_person: {rejected:.3f} ({len(strangers)}), in the clear {ref_rejected:.3f}")
    assert right >= ref_right and right == 1.0, (known, ref)
    assert rejected == 1.0, unknown

    # -- privacy by value on this deployment ---------------------------------------------------------------
    from test_mpc import assert_no_plaintext
    from test_sources import _pair_needles

    files = [p for who in ("server0", "server1", "dealer") for p in dep.var(who).rglob("*")
             if p.is_file() and not p.is_symlink()]
    files += [dep.root / f"{who}.log" for who in ("server0", "server1", "dealer")]
    needles: set[bytes] = set()
    for g in union:
        needles |= _pair_needles(g.embeddings[:, :32])
    assert_no_plaintext(files, [c.encode() for c in classes], needles)
    dealer_var = sorted(p.name for p in dep.var("dealer").iterdir())
    assert not [n for n in dealer_var if n.startswith("server") or n in ("gallery", "models")], dealer_var
    assert not list(dep.var("dealer").rglob("gallery")) and not list(dep.var("dealer").rglob("models"))

    # -- withdrawal ---------------------------------------------------------------------------------------------
    gone = sorted(p.name for p in datasets["clinic"].iterdir())[0]
    r = dep.run("clinic", "withdraw", {"NAME": "clinic", "P": gone})
    assert "receipts" in r.stdout, r.stdout
    assert gone not in rows_of(dep.run("clinic", "gallery", {"NAME": "clinic"}).stdout)
    after = rows(dep.run(DOOR, "predict", {"NAME": DOOR, "DIR": str(queries)}).stdout)
    for p, person in truth.items():
        assert after[p] == ("unknown_person" if person == gone else answers[p]), (p, person, after[p])
    for s in strangers:
        assert after[str(queries / s.name)] == "unknown_person"

    for p in list(dep.procs):
        assert dep.stop(p) == 0, dep.tails()


def _all_tls(dep: Three, caps) -> None:
    """Every TCP stream to or from either server, in either direction, is TLS from its first byte (after
    MP-SPDZ's cleartext party name): the sources', the door camera's, the gateways', the registry's, the MPC
    of the service and of every gallery job, the dealer's."""
    import re

    peers: set[tuple[str, str]] = set()
    app_data = 0
    for p, out in caps:
        p.terminate()
        p.wait(timeout=10)
        for key, stream in netlab.tcp_streams(out).items():
            ident, rest = netlab.split_preamble(stream)
            assert re.fullmatch(rb"((machine|thread)[0-9]*(send|recv)?P[012])?", ident), f"{key}: cleartext {ident!r}"
            records = netlab.tls_records(rest)  # raises at any byte outside a TLS record
            assert records and records[0][0] == 22, f"{key}: does not start with a TLS handshake"
            app_data += sum(n for t, n in records if t == 23)
            peers.add((key[0], key[2]))
    a0, a1, ad = dep.net.addr
    out_ = dep.net.outside_addr
    for pair in [(a1, a0), (ad, a0), (ad, a1), (out_, a0), (out_, a1), (a0, a1)]:
        assert pair in peers, f"no traffic {pair[0]} -> {pair[1]} captured: {sorted(peers)}"
    assert app_data > 100_000, app_data


def _as_gallery(queries: Path, root: Path) -> Path:
    """The query photos as a one-person-per-photo gallery folder (embed_gallery wants DIR/<label>/<image>)."""
    for img in queries.iterdir():
        (root / img.stem).mkdir(parents=True)
        (root / img.stem / img.name).symlink_to(img.resolve())
    return root


def rows_of(csv_text: str) -> dict[str, list[str]]:
    """name -> row of contribute's / gallery's CSV (person,name,...)."""
    lines = list(csv.reader(csv_text.strip().splitlines()))
    assert lines[0][:2] == ["person", "name"], csv_text
    return {ln[1]: ln for ln in lines[1:]}


def _wait_up(dep: Three, timeout: float = 300) -> None:
    """Both servers answer the door camera's status request (from the test's namespace, over the veths)."""
    from orchestration.client.service import ServiceClient
    from orchestration.mpspdz.hosts import load_hosts
    from orchestration.shared.wire import ServiceError

    deadline, last = time.monotonic() + timeout, None
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        for p in dep.procs:
            if p.poll() is not None:
                raise AssertionError(f"a service process exited with {p.returncode}" + dep.tails())
        try:
            with ServiceClient(dep.var(DOOR) / "client", load_hosts(dep.hosts), timeout=5.0) as cl:
                last = cl.status()
                dep.timings.append(("serve + deal: until both answer", "all", time.monotonic() - t0))
                return
        except (ServiceError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"the service did not answer within {timeout:.0f} s ({last})" + dep.tails())
