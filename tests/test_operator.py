"""An operator's first deployment (issue 20): the documented commands, in the documented order, one party per host.

Three network namespaces on one bridge (``netlab.ThreeHosts``): server 0, server 1 and the data owner's client
(which deals, MP-SPDZ party 2); a door camera, a plain service client, in a folder of its own in the client's
namespace. Every party has its own folder ``<party>/var`` (``INVOKE_PATHS_VAR``) and its own settings
(``INVOKE_*`` variables standing for its own invoke.yaml). Every step is an ``invoke`` command run in that party's
namespace, taken from the docs:

* :data:`STEPS` holds each command as the docs write it, with the doc and section it comes from.
  :func:`test_every_step_is_in_the_docs_verbatim` checks that each is there verbatim (as an inline code span,
  or a line of a fenced block with its ``# comment`` cut), and that the numbered steps of README's *Two hosts*
  and the door camera's checklist in docs/service.md come in the order this test runs them: a doc change that
  breaks the flow fails here.
* To run a step, its placeholders are replaced, whole words only (:func:`fill`): ``I``, ``J`` by the party's
  number, ``PJ.pem``/``P0.pem``/``client.pem``/``face.jpg``/``P`` by the received file, ``hosts`` and
  ``service-hosts`` by that party's hosts file, ``OUT``/``DIR`` by a folder, ``JOB`` by the job id that
  share-train/share-predict printed, ``<its bundle>``, ``DIR/serverI``, ``<server 0's folder>`` by the folder the
  other party sent. ``invoke`` is ``python -m invoke`` run in the checkout (tasks.py lives there).
* What crosses between operators (certificates, bundles, results, tickets, ``model.json``) is copied between the
  parties' folders by :meth:`Deployment.send`, standing for any file transfer.

Not run as documented (no such thing here): ``invoke recognize --camera 0`` on the door camera (it runs the
documented ``invoke predict --image face.jpg`` through the service instead), systemd and compose.
Timings of every step are printed at the end (``pytest -s``).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import netlab
from test_two_hosts import net_ok  # noqa: F401 - a fixture: namespaces can be made here

REPO = Path(__file__).resolve().parents[1]
PEOPLE = ["Colin_Powell", "George_W_Bush", "Tony_Blair"]
NEW_PERSON = "Vladimir_Putin"  # enrolled later: the retrain while the service runs
PER_PERSON = 5  # gallery images per person; image 9 of each is held out as a query
JOB_PORTS = (7000, 7001, 7002)  # hosts: one job per run (server 0, server 1, the client's dealer)
SERVICE_PORTS = (7300, 7301, 7302)  # service-hosts: the running service (p, p+100, p+200, p+300 per server)
OWNER, DOOR = 2, 3  # party numbers of this test: 0, 1 the servers, 2 the data owner's client, 3 the door camera


@dataclass(frozen=True)
class Step:
    doc: str  # file in the repository
    section: str  # its "## " section
    text: str  # the command exactly as the docs write it


README_TWO, README_SERVICE = ("README.md", "Two hosts"), ("README.md", "Recognition as a service")
SERVICE_RUN = ("docs/service.md", "Running it")

#: every command the operators run, as the docs write it (placeholders and all), in the order of this test
STEPS: dict[str, Step] = {
    # README *Two hosts*, step 1 "Certificates": each server makes its key...
    "certs-server": Step(*README_TWO, "invoke certs --id I"),
    # ... and installs the others' certificates (step 1, and "Dealer mode: the client is party 2 and does the same")
    "certs-peer": Step(*README_TWO, "invoke certs --id I --peer-cert PJ.pem"),
    # step 1, dealer mode: the client's key as party 2
    "certs-dealer": Step(*README_TWO, "invoke certs --id 2"),
    # docs/service.md, *Running it*, the table's client row: the data owner's service key
    "certs-owner-client": Step(*SERVICE_RUN, "invoke certs --client owner"),
    # README *Recognition as a service* and docs/service.md: each server pins a client
    "allow-client": Step(*README_SERVICE, "invoke certs --id I --allow-client client.pem"),
    # README *Two hosts*, the table's client row: a training job's bundles
    "share-train": Step(*README_TWO, "invoke share-train --out OUT"),
    # step 3 "A job": each server runs its bundle, the client deals meanwhile, then collects
    "party": Step(*README_TWO, "invoke party --id I --hosts hosts --job <its bundle>"),
    "deal": Step(*README_TWO, "invoke deal --job JOB --hosts hosts"),
    "collect": Step(*README_TWO, "invoke collect --job JOB --result <server 0's folder> --result <server 1's folder>"),
    # step 5 "Confirmation"
    "share-confirm": Step(*README_TWO, "invoke share-confirm --out DIR"),
    "confirm": Step(*README_TWO, "invoke confirm --id I --job DIR/serverI"),
    # the table's client row: a recognition job's bundles (then party, deal, collect as above)
    "share-predict": Step(*README_TWO, "invoke share-predict --out OUT --image P"),
    # docs/service.md, *Running it*, the two-hosts table: each server, and the client's dealer
    "serve": Step(*SERVICE_RUN, "invoke serve --id I --hosts service-hosts"),
    "deal-serve": Step(*SERVICE_RUN, "invoke deal --serve --hosts service-hosts"),
    # docs/service.md, *Running it*, the first block: predict through the service (with service.hosts set)
    "predict": Step(*SERVICE_RUN, "invoke predict --image face.jpg"),
    # docs/service.md, the door camera's checklist: 1. the models, 2. its key, 3. the servers' certificates
    "door-fetch-models": Step(*SERVICE_RUN, "invoke fetch-models"),
    "door-certs": Step(*SERVICE_RUN, "invoke certs --client door1"),
    "door-server-certs": Step(*SERVICE_RUN, "invoke certs --server-cert P0.pem --server-cert P1.pem"),
}

#: settings that the docs tell an operator to put into invoke.yaml, as they write them
SETTINGS = [
    Step(*SERVICE_RUN, "service.hosts: service-hosts"),  # the data owner's and the door camera's
    Step(*SERVICE_RUN, "service.model_record"),  # the door camera, after a retrain
]

#: sections whose commands this test runs in the order the docs give them (numbered steps, the checklist)
ORDERED = {
    README_TWO: ["certs-server", "certs-peer", "certs-dealer", "party", "deal", "collect", "share-confirm", "confirm"],
    SERVICE_RUN: ["door-fetch-models", "door-certs", "allow-client", "door-server-certs"],
}


def _sections(doc: str) -> dict[str, str]:
    text = (REPO / doc).read_text()
    out: dict[str, str] = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        out[title.strip()] = body
    return out


def _commands(body: str) -> list[tuple[int, str]]:
    """(position, text) of every inline code span and every line of a fenced block (``# comment`` cut),
    whitespace collapsed: the places a command may be written."""
    out = []
    fences = list(re.finditer(r"^```[^\n]*\n(.*?)^```", body, flags=re.M | re.S))
    for m in fences:
        pos = m.start(1)
        for line in m.group(1).splitlines(keepends=True):
            out.append((pos, " ".join(line.split("#", 1)[0].split())))
            pos += len(line)
    outside = body
    for m in reversed(fences):  # blank the blocks, keeping positions
        outside = outside[:m.start()] + " " * (m.end() - m.start()) + outside[m.end():]
    for m in re.finditer(r"`([^`]+)`", outside):
        out.append((m.start(), " ".join(m.group(1).split())))
    return sorted(out)


def doc_position(step: Step, after: int = -1) -> int:
    """Where in its section the docs write ``step.text`` verbatim (the first place after ``after``), or -1."""
    body = _sections(step.doc).get(step.section)
    assert body is not None, f"{step.doc} has no section '## {step.section}'"
    return next((p for p, t in _commands(body) if t == step.text and p > after), -1)


def test_every_step_is_in_the_docs_verbatim():
    for name, step in STEPS.items():
        assert doc_position(step) >= 0, f"step {name}: `{step.text}` is not in {step.doc}, section {step.section}"
    for s in SETTINGS:
        body = " ".join(_sections(s.doc)[s.section].split())
        assert f"`{s.text}`" in body, f"setting `{s.text}` is not in {s.doc}, section {s.section}"
    for (doc, section), names in ORDERED.items():
        pos = -1
        for name in names:
            got = doc_position(Step(doc, section, STEPS[name].text), pos)
            assert got > pos, f"{doc}, section {section}: `{STEPS[name].text}` ({name}) does not come after " \
                              f"the step before it ({' -> '.join(names)})"
            pos = got


def fill(text: str, subs: dict[str, str]) -> list[str]:
    """The documented command with its placeholders replaced (whole words only, longest first) as argv."""
    for key in sorted(subs, key=len, reverse=True):
        text = re.sub(rf"(?<!\S){re.escape(key)}(?!\S)", lambda _m, v=subs[key]: shlex.quote(v), text)
    argv = shlex.split(text)
    assert argv[0] == "invoke", argv
    return [sys.executable, "-m", "invoke", *argv[1:]]


class Deployment:
    """The four parties' folders and settings in three namespaces, and a log of every step's time."""

    NAMES = ("server0", "server1", "owner", "door1")

    def __init__(self, root: Path, net: netlab.ThreeHosts):
        self.root, self.net = root, net
        self.dirs = [root / n for n in self.NAMES]
        self.ns = [0, 1, 2, 2]  # the door camera sits in the client's namespace
        self.extra: list[dict[str, str]] = [{} for _ in self.NAMES]
        for d in self.dirs:
            (d / "var").mkdir(parents=True)
            (d / "inbox").mkdir()
        self.timings: list[tuple[str, str, float]] = []
        self.procs: list[subprocess.Popen] = []

    def var(self, p: int) -> Path:
        return self.dirs[p] / "var"

    def env(self, p: int) -> dict[str, str]:
        """Party p's own settings: its var, and what its invoke.yaml would say."""
        env = dict(os.environ, INVOKE_PATHS_VAR=str(self.var(p)), TF_CPP_MIN_LOG_LEVEL="3",
                   INVOKE_FACE_BACKEND="dlib",  # the embedder of the whole deployment (fast; FaceNet works alike)
                   INVOKE_MPSPDZ_TIMEOUT="300")
        env.pop("INVOKE_SERVICE_HOSTS", None)
        env.pop("INVOKE_SERVICE_MODEL_RECORD", None)
        env.update(self.extra[p])
        return env

    def send(self, src: Path, to: int, name: str | None = None) -> Path:
        """A file or folder handed to party ``to`` (any file transfer): it lands in its inbox."""
        dst = self.dirs[to] / "inbox" / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        return dst

    def _argv(self, step: str, subs: dict[str, str]) -> list[str]:
        doc = STEPS[step]
        assert doc_position(doc) >= 0, f"`{doc.text}` is no longer in {doc.doc}, {doc.section}"
        return fill(doc.text, subs)

    def run(self, p: int, step: str, subs: dict[str, str] | None = None, check: bool = True, label: str = ""
            ) -> subprocess.CompletedProcess[str]:
        argv = self._argv(step, subs or {})
        t0 = time.monotonic()
        r = subprocess.run(self.net.cmd(self.ns[p], argv), cwd=REPO, env=self.env(p), capture_output=True,
                           text=True, timeout=600, check=False)
        self.timings.append((label or step, self.NAMES[p], time.monotonic() - t0))
        if check and r.returncode != 0:
            raise AssertionError(f"{self.NAMES[p]}: {' '.join(argv[2:])} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def start(self, p: int, step: str, subs: dict[str, str], log: Path) -> subprocess.Popen:
        argv = self._argv(step, subs)
        with open(log, "a") as f:
            proc = self.net.popen(self.ns[p], argv, cwd=REPO, env=self.env(p), stdout=f, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    # -- a job by bundles: README *Two hosts*, step 3 ------------------------------------------------------

    def job(self, label: str, share_step: str, subs: dict[str, str]) -> tuple[str, subprocess.CompletedProcess]:
        """share-train/share-predict on the client, both bundles sent, `invoke party` on each server while the
        client deals, results sent back, `invoke collect`: (the job id, collect's output)."""
        out = self.dirs[OWNER] / label
        r = self.run(OWNER, share_step, {"OUT": str(out), **subs}, label=f"{label}: {share_step}")
        job = re.search(r"^job (\S+):", r.stdout, flags=re.M)
        assert job, r.stdout
        job_id = job.group(1)
        assert f"invoke deal --job {job_id} --hosts HOSTS" in r.stdout, r.stdout  # it says what comes next
        bundles = [self.send(out / f"server{i}", i, f"{label}/server{i}") for i in range(2)]
        t0 = time.monotonic()
        logs = [self.root / f"{label}-{n}.log" for n in ("party0", "party1", "deal")]
        procs = [self.start(i, "party", {"I": str(i), "hosts": str(self.dirs[i] / "hosts"),
                                         "<its bundle>": str(bundles[i])}, logs[i]) for i in range(2)]
        procs.append(self.start(OWNER, "deal", {"JOB": job_id, "hosts": str(self.dirs[OWNER] / "hosts")}, logs[2]))
        for p, log in zip(procs, logs):
            try:
                p.wait(timeout=400)
            except subprocess.TimeoutExpired:
                p.kill()
            assert p.returncode == 0, f"{log.name} exited {p.returncode}:\n{log.read_text()}"
        self.timings.append((f"{label}: party on both servers + deal on the client", "all", time.monotonic() - t0))
        assert f"server 0: job done; send {self.var(0) / 'server0' / 'outputs' / job_id}" in logs[0].read_text()
        results = [self.send(self.var(i) / f"server{i}" / "outputs" / job_id, OWNER, f"{label}-result{i}")
                   for i in range(2)]
        done = self.run(OWNER, "collect", {"JOB": job_id, "<server 0's folder>": str(results[0]),
                                           "<server 1's folder>": str(results[1])}, label=f"{label}: collect")
        return job_id, done

    def confirm(self, label: str) -> None:
        """README *Two hosts*, step 5: the client's tickets, `invoke confirm` on each server."""
        out = self.dirs[OWNER] / label
        self.run(OWNER, "share-confirm", {"DIR": str(out)}, label=f"{label}: share-confirm")
        for i in range(2):
            ticket = self.send(out / f"server{i}", i, f"{label}/server{i}")
            r = self.run(i, "confirm", {"I": str(i), "DIR/serverI": str(ticket)}, label=f"{label}: confirm")
            assert f"server {i}: generation" in r.stdout and "confirmed" in r.stdout, r.stdout

    def train(self, label: str) -> dict:
        _, done = self.job(label, "share-train", {})
        assert "now confirm it" in done.stdout, done.stdout
        self.confirm(f"{label}-confirm")
        return json.loads((self.var(OWNER) / "client" / "model.json").read_text())


def rows(csv_text: str) -> dict[str, str]:
    """path -> name of predict's / collect's CSV."""
    lines = [ln.split(",") for ln in csv_text.strip().splitlines()]
    # the data owner's predict/collect: confidence 1/S and score z_max; a query client (--as): its score only
    assert lines[0] in (["path", "name", "confidence", "score"], ["path", "name", "score"]), csv_text
    return {ln[0]: ln[1] for ln in lines[1:]}


def wait_serving(dep: Deployment, gen: str, timeout: float = 240) -> None:
    """Both servers serve generation ``gen`` (asked as the data owner's client, from its namespace)."""
    from orchestration.client.service import ServiceClient
    from orchestration.mpspdz.hosts import load_hosts
    from orchestration.shared.wire import ServiceError
    from service_lab import NsClients

    clients = NsClients(dep.net.ns[OWNER])
    cl = ServiceClient(dep.var(OWNER) / "client", load_hosts(dep.dirs[OWNER] / "service-hosts"), timeout=5.0)
    deadline, last = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline:
            for p in dep.procs:
                if p.poll() is not None and p.returncode != 0:
                    raise AssertionError(f"a service process exited with {p.returncode}: see {dep.root}/serve*.log\n"
                                         + "\n".join(f.read_text()[-3000:] for f in dep.root.glob("serve*.log")))
            try:
                st = clients.call(cl.status)
                if all(s.get("state") == "serving" and s.get("gen") == gen for s in st):
                    return
                last = st
            except ServiceError as exc:
                last = exc
            time.sleep(0.5)
    finally:
        clients.call(cl.close)
        clients.close()
    raise AssertionError(f"the service does not serve generation {gen} within {timeout:.0f} s ({last}):\n"
                         + "\n".join(f.read_text()[-3000:] for f in dep.root.glob("serve*.log")))




def pin_on_both_servers(dep, pem: Path, name: str) -> None:
    """docs/service.md: a client's certificate, handed to each server's operator, pinned with --allow-client."""
    for i in (0, 1):  # server 0's and server 1's party index in the deployment
        got = dep.send(pem, i, f"{name}/client.pem")
        dep.run(i, "allow-client", {"I": str(i), "client.pem": str(got)}, label=f"certs --allow-client {name}")


@pytest.mark.mpc
def test_an_operators_first_deployment(net_ok, mp, lfw10, tmp_path):
    root = tmp_path
    with netlab.ThreeHosts() as net:
        dep = Deployment(root, net)
        # the data owner's gallery: <var>/gallery/<person>/<image>, as `invoke enroll` leaves it (paths.gallery)
        held: dict[str, Path] = {}
        for person in PEOPLE + [NEW_PERSON]:
            imgs = sorted((lfw10 / person).glob("*.jpg"))
            held[person] = imgs[8]
            if person != NEW_PERSON:
                (dep.var(OWNER) / "gallery" / person).mkdir(parents=True)
                for img in imgs[:PER_PERSON]:
                    (dep.var(OWNER) / "gallery" / person / img.name).symlink_to(img)
        try:
            _first_deployment(dep, held)
        finally:
            for p in dep.procs:
                dep.stop(p)
            width = max(len(s) for s, _, _ in dep.timings)
            print("\nstep timings (s):")
            for step, who, secs in dep.timings:
                print(f"  {step:<{width}}  {who:<8} {secs:7.1f}")
            print(f"  {'total':<{width}}  {'':<8} {sum(t for _, _, t in dep.timings):7.1f}")


def _first_deployment(dep: Deployment, held: dict[str, Path]) -> None:
    S0, S1 = 0, 1

    def pem(p: int, i: int) -> Path:
        """Party p's copy of party i's certificate."""
        return dep.var(p) / ("client" if i == 2 else f"server{i}") / "certs" / f"P{i}.pem"

    # README *Two hosts* 1: each party's key ...
    for i in (S0, S1):
        r = dep.run(i, "certs-server", {"I": str(i)}, label="certs --id I")
        assert "SHA-256" in r.stdout or "sha256" in r.stdout.lower(), r.stdout  # a fingerprint to check out of band
    dep.run(OWNER, "certs-dealer", label="certs --id 2")
    # ... and every party pins the other two (the .pem files exchanged)
    for i in (S0, S1, OWNER):
        for j in (S0, S1, OWNER):
            if j != i:
                got = dep.send(pem(j, j), i)
                dep.run(i, "certs-peer", {"I": str(i), "PJ.pem": str(got)}, label="certs --peer-cert")
    # docs/service.md, the client row: the data owner's service key, pinned on both servers
    r = dep.run(OWNER, "certs-owner-client", label="certs --client owner")
    owner_pem = dep.var(OWNER) / "client" / "certs" / "client.pem"
    assert str(owner_pem) in r.stdout, r.stdout
    pin_on_both_servers(dep, owner_pem, "owner")
    for i in (S0, S1):
        names = sorted(p.name for p in (dep.var(i) / f"server{i}" / "certs").iterdir())
        assert names == sorted([f"P{i}.key", f"P{i}.pem", f"P{1 - i}.pem", "P2.pem"]), names

    # README *Two hosts* 2: the hosts files (the same on all three hosts), one for jobs, one for the service
    for p in (S0, S1, OWNER, DOOR):
        (dep.dirs[p] / "hosts").write_text(dep.net.hosts_text(JOB_PORTS))
        (dep.dirs[p] / "service-hosts").write_text(dep.net.hosts_text(SERVICE_PORTS))

    # README *Two hosts* 3 and 5: training by bundles, then confirmation
    record = dep.train("train1")
    assert sorted(record["classes"]) == PEOPLE, record

    # a recognition job by bundles: share-predict, party on both, deal, collect (CSV)
    queries = [held[p] for p in PEOPLE]
    _, done = dep.job("predict1", "share-predict", {"P": str(queries[0])})
    assert rows(done.stdout) == {str(queries[0]): PEOPLE[0]}, done.stdout

    # the service: docs/service.md *Running it*, two hosts
    for i in (S0, S1):
        dep.start(i, "serve", {"I": str(i), "service-hosts": str(dep.dirs[i] / "service-hosts")},
                  dep.root / f"serve{i}.log")
    dep.start(OWNER, "deal-serve", {"service-hosts": str(dep.dirs[OWNER] / "service-hosts")},
              dep.root / "serve-dealer.log")
    t0 = time.monotonic()
    wait_serving(dep, record["gen"])
    dep.timings.append(("serve on both servers + deal --serve: until serving", "all", time.monotonic() - t0))
    # the data owner predicts through it: service.hosts: service-hosts in its invoke.yaml
    dep.extra[OWNER]["INVOKE_SERVICE_HOSTS"] = str(dep.dirs[OWNER] / "service-hosts")
    r = dep.run(OWNER, "predict", {"face.jpg": str(queries[1])}, label="predict through the service (owner)")
    assert "recognition: through the running service" in r.stderr, r.stderr
    assert rows(r.stdout) == {str(queries[1]): PEOPLE[1]}, r.stdout

    # the door camera, docs/service.md's checklist: 1. the models ...
    r = dep.run(DOOR, "door-fetch-models", label="door: fetch-models")
    assert "checksum ok" in r.stdout or "written" in r.stdout, r.stdout
    # 2. its key, its certificate pinned on both servers ...
    r = dep.run(DOOR, "door-certs", label="door: certs --client door1")
    door_pem = dep.var(DOOR) / "client" / "certs" / "client.pem"
    assert str(door_pem) in r.stdout, r.stdout
    pin_on_both_servers(dep, door_pem, "door1")
    # 3. the servers' certificates (from each server's operator) ...
    p0, p1 = (dep.send(pem(i, i), DOOR) for i in (S0, S1))
    dep.run(DOOR, "door-server-certs", {"P0.pem": str(p0), "P1.pem": str(p1)}, label="door: certs --server-cert")
    certs = sorted(p.name for p in (dep.var(DOOR) / "client" / "certs").iterdir())
    assert not [n for n in certs if n.endswith(".key") and n != "client.key"], certs  # no party key
    # 4. the model record, and service.hosts in its invoke.yaml; then it asks the service
    dep.send(dep.var(OWNER) / "client" / "model.json", DOOR)
    shutil.copy2(dep.dirs[DOOR] / "inbox" / "model.json", dep.var(DOOR) / "client" / "model.json")
    dep.extra[DOOR]["INVOKE_SERVICE_HOSTS"] = str(dep.dirs[DOOR] / "service-hosts")
    r = dep.run(DOOR, "predict", {"face.jpg": str(queries[2])}, label="door: predict through the service")
    assert "recognition: through the running service" in r.stderr, r.stderr
    assert rows(r.stdout) == {str(queries[2]): PEOPLE[2]}, r.stdout

    # a retrain while serving: a new person enrolled, trained and confirmed by bundles (the jobs' hosts file)
    imgs = sorted(held[NEW_PERSON].parent.glob("*.jpg"))
    (dep.var(OWNER) / "gallery" / NEW_PERSON).mkdir()
    for img in imgs[:PER_PERSON]:
        (dep.var(OWNER) / "gallery" / NEW_PERSON / img.name).symlink_to(img)
    new = dep.train("train2")
    assert sorted(new["classes"]) == sorted(PEOPLE + [NEW_PERSON]) and new["gen"] != record["gen"], new
    t0 = time.monotonic()
    wait_serving(dep, new["gen"])  # the service switches (other sizes: both parties restart)
    dep.timings.append(("service switches to the new generation", "all", time.monotonic() - t0))
    log0 = (dep.root / "serve0.log").read_text()
    assert f"switching to generation {new['gen']}, of other sizes: restarting" in log0, log0[-3000:]
    r = dep.run(OWNER, "predict", {"face.jpg": str(held[NEW_PERSON])}, label="predict new person (owner)")
    assert rows(r.stdout) == {str(held[NEW_PERSON]): NEW_PERSON}, r.stdout
    # the door camera's record is stale: told which record to copy ...
    r = dep.run(DOOR, "predict", {"face.jpg": str(held[NEW_PERSON])}, check=False, label="door: predict, stale")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "generation" in r.stderr and "Copy the data owner's var/client/model.json" in r.stderr, r.stderr
    # ... or it fetches the record where the data owner publishes it (service.model_record: a shared folder)
    published = dep.root / "shared" / "model.json"
    published.parent.mkdir()
    shutil.copy2(dep.var(OWNER) / "client" / "model.json", published)
    dep.extra[DOOR]["INVOKE_SERVICE_MODEL_RECORD"] = str(published)
    r = dep.run(DOOR, "predict", {"face.jpg": str(held[NEW_PERSON])}, label="door: predict, service.model_record")
    assert rows(r.stdout) == {str(held[NEW_PERSON]): NEW_PERSON}, r.stdout + r.stderr
    assert json.loads((dep.var(DOOR) / "client" / "model.json").read_text())["gen"] == new["gen"]

    # everything stops cleanly on SIGTERM
    for p in list(dep.procs):
        assert dep.stop(p) == 0, [f.read_text()[-2000:] for f in dep.root.glob("serve*.log")]
