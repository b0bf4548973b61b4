"""Every `invoke TASK --flag` the code's messages and the docs suggest exists, and the operator's messages tell
the truth (issue 20): what a plain service client is told and may do, which ports the local service names.

No MPC runs here: the task checks run `python3 -m invoke --help TASK` (once per task; `TASK --help` runs a task that has an iterable flag) and a few tasks that must
refuse before anything starts.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "tasks.py", *sorted((REPO / "orchestration").rglob("*.py")),
           *sorted((REPO / "preprocessing").rglob("*.py"))]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: `invoke TASK` then its flags and their values, up to the end of the command: a quote, backtick, `;`, `,`,
#: a bracket, `|`, `&`, `#` (a shell comment), a line end, or a full stop that ends a sentence
SUGGESTION = re.compile(r"(?<![\w.-])invoke ([a-z][a-z-]*)")
COMMAND_END = re.compile(r"[`'\";,()\[\]|&#\n]|\.(?:\s|$)")
FLAG = re.compile(r"^--?[a-z][a-z0-9-]*")
#: English after the word "invoke", not a suggestion ("the invoke tasks", "invoke finds it")
PROSE = {"tasks", "task", "finds", "import"}
#: flags named in messages that belong to other programs than invoke's tasks
FOREIGN_FLAGS = {
    "--no-cache",  # lint-imports (invoke test runs it)
    "--init", "--recursive",  # git submodule update (setup --from-source on a tree without its submodules)
    "--write",  # benchmarks/calibrate_threshold.py (a gallery of many sources: recalibrating a threshold)
}


def _strings(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Every str constant of a Python file, f-string parts one by one (line, text)."""
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def suggestions(text: str) -> list[tuple[str, list[str]]]:
    """(task, [flags]) of every `invoke TASK ...` in ``text``."""
    out = []
    for m in SUGGESTION.finditer(text):
        task = m.group(1).rstrip("-")
        if task in PROSE:
            continue
        rest = COMMAND_END.split(text[m.end():], maxsplit=1)[0]
        flags = [f.group(0) for tok in rest.split() if (f := FLAG.match(tok))]
        out.append((task, flags))
    return out


def bare_flags(text: str) -> list[str]:
    """Flags named anywhere in a message (prose: it has a space), with or without an `invoke TASK` before them."""
    if " " not in text.strip():
        return []  # an argv element ("--server-dir") or a single word
    return re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)


@functools.lru_cache(maxsize=None)
def task_flags(task: str) -> frozenset[str] | None:
    """The flags of `invoke TASK` from `invoke --help TASK`, as typed (``--id``, ``-i``, ``--no-models``), or
    None if there is no such task."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "invoke", "--help", task], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        return None
    flags = {"--help", "-h"}
    options = r.stdout.split("Options:", 1)[-1]
    for m in re.finditer(r"(?<![\w-])--(\[no-\])?([a-z][a-z0-9-]*)", options):
        flags.add("--" + m.group(2))
        if m.group(1):
            flags.add("--no-" + m.group(2))
    flags.update(re.findall(r"^\s+(-[a-z])\b", options, re.M))  # -n, and the short forms (-i for --id)
    flags.update(m.group(1) for m in re.finditer(r",\s(-[a-z])\b", options))
    return frozenset(flags)


@functools.lru_cache(maxsize=None)
def all_task_names() -> tuple[str, ...]:
    r = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=True)
    return tuple(m.group(1) for m in re.finditer(r"^\s+([a-z][a-z-]*)", r.stdout, re.M))


def wrong_suggestions(found: list[tuple[str, int, str, list[str]]]) -> list[str]:
    """What is wrong with each (file, line, task, flags): a task that does not exist, a flag it does not have."""
    bad = []
    for where, line, task, flags in found:
        have = task_flags(task)
        if have is None:
            bad.append(f"{where}:{line}: `invoke {task}`: no such task")
            continue
        bad += [f"{where}:{line}: `invoke {task} {f}`: {task} has no flag {f}" for f in flags if f not in have]
    return bad


def code_suggestions(path: Path, source: str | None = None) -> list[tuple[str, int, str, list[str]]]:
    return [(str(path.relative_to(REPO)), line, task, flags) for line, text in _strings(path, source)
            for task, flags in suggestions(text)]


def unknown_bare_flags(path: Path, source: str | None = None) -> list[str]:
    known = set(FOREIGN_FLAGS).union(*(task_flags(t) or () for t in all_task_names()))
    return [f"{path.relative_to(REPO)}:{line}: {f} is no flag of any task" for line, text in _strings(path, source)
            for f in bare_flags(text) if f not in known]


def test_every_invoke_suggestion_in_the_code_names_a_task_and_its_flags():
    found = [s for path in SOURCES for s in code_suggestions(path)]
    assert len(found) > 50 and {t for _, _, t, _ in found} >= {"certs", "serve", "party", "collect", "train"}
    assert wrong_suggestions(found) == []


def test_every_flag_a_message_names_is_a_flag_of_some_task():
    assert [bad for path in SOURCES for bad in unknown_bare_flags(path)] == []


def test_every_invoke_suggestion_in_the_docs_names_a_task_and_its_flags():
    found = [(str(doc.relative_to(REPO)), text.count("\n", 0, m.start()) + 1, task, flags)
             for doc in DOCS for text in [doc.read_text()]
             for m in SUGGESTION.finditer(text) for task, flags in suggestions(text[m.start():m.end() + 400])[:1]]
    assert len(found) > 50
    assert wrong_suggestions(found) == []


def test_the_checks_catch_the_old_no_service_advice():
    """c0dc281's `_service` ended with "recognise without it: --no-service", a flag no task has; and a made-up
    `invoke predict --no-service` is caught as well."""
    path = REPO / "orchestration" / "cli" / "common.py"
    old = subprocess.run(["git", "show", "c0dc281:orchestration/cli/common.py"], cwd=REPO, capture_output=True,
                         text=True)
    if old.returncode != 0:
        pytest.skip(f"no git history here: {old.stderr.strip()}")
    assert any("--no-service is no flag of any task" in bad for bad in unknown_bare_flags(path, old.stdout))
    assert wrong_suggestions([("x", 1, "predict", ["--one-job", "--no-service"])]) == [
        "x:1: `invoke predict --no-service`: predict has no flag --no-service"]
    assert wrong_suggestions([("x", 1, "no-such-task", [])]) == ["x:1: `invoke no-such-task`: no such task"]
    assert suggestions("run `invoke certs --id 2 --peer-cert P0.pem` then") == [("certs", ["--id", "--peer-cert"])]
    assert suggestions("invoke serve --id I --hosts FILE (on this machine: invoke serve), or") == [
        ("serve", ["--id", "--hosts"]), ("serve", [])]
    assert wrong_suggestions([("x", 1, "build-mpc", ["-n", "--classes"]), ("x", 2, "certs", ["-i", "--id"])]) == []
    assert wrong_suggestions([("x", 1, "build-mpc", ["--n"])]) == [
        "x:1: `invoke build-mpc --n`: build-mpc has no flag --n"]  # invoke spells a one-letter flag -n


# ---- what a plain service client is told, and may do ------------------------------------------------------

def invoke(var: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, INVOKE_PATHS_VAR=str(var), TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)


def _files(var: Path) -> set[str]:
    return {str(p.relative_to(var)) for p in var.rglob("*") if p.is_file()} if var.exists() else set()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers' certificates, made as their operators would (`invoke certs --id I` on each)."""
    root = tmp_path_factory.mktemp("servers")
    for i in range(2):
        r = invoke(root / f"host{i}", "certs", "--id", str(i))
        assert r.returncode == 0, r.stderr
    return [root / f"host{i}" / f"server{i}" / "certs" / f"P{i}.pem" for i in range(2)]


def test_a_plain_client_installs_the_servers_certificates_without_making_a_key(servers, tmp_path):
    """Finding 1: `invoke certs --client NAME --server-cert P0.pem --server-cert P1.pem` pins both servers'
    certificates and makes the client's own key only: no P2 (dealer) key, no server folder. Again: nothing changes;
    a different certificate where one is pinned needs --replace-pin and shows both fingerprints."""
    var = tmp_path / "var"
    r = invoke(var, "certs", "--client", "door1", "--server-cert", str(servers[0]), "--server-cert", str(servers[1]))
    assert r.returncode == 0, r.stderr
    assert _files(var) == {"client/certs/client.key", "client/certs/client.pem", "client/certs/P0.pem",
                           "client/certs/P1.pem"}
    assert "pinned server 0" in r.stdout and "pinned server 1" in r.stdout, r.stdout
    again = invoke(var, "certs", "--server-cert", str(servers[1]))
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr
    other = tmp_path / "rekeyed"
    assert invoke(other, "certs", "--id", "0").returncode == 0
    new_p0 = other / "server0" / "certs" / "P0.pem"
    kept = (var / "client" / "certs" / "P0.pem").read_bytes()
    r = invoke(var, "certs", "--server-cert", str(new_p0))
    assert r.returncode == 1 and "--replace-pin" in r.stderr and r.stderr.count("sha256") == 2, r.stderr
    assert (var / "client" / "certs" / "P0.pem").read_bytes() == kept
    r = invoke(var, "certs", "--server-cert", str(new_p0), "--replace-pin")
    assert r.returncode == 0, r.stderr
    assert (var / "client" / "certs" / "P0.pem").read_bytes() == new_p0.read_bytes()
    r = invoke(var, "certs", "--server-cert", str(var / "client" / "certs" / "client.pem"))
    assert r.returncode == 1 and "P0 or P1" in r.stderr, r.stderr  # a client's certificate is no server's
    assert not list(var.rglob("*.key"))[1:]  # still only the client's own key
    assert not (var / "client" / "certs" / "P2.key").exists() and not (var / "server0").exists()


def test_the_service_client_points_to_the_server_cert_command(tmp_path):
    """Finding 1: the error for a missing server certificate names `invoke certs --server-cert`, never
    `--id 2 --peer-cert` (which makes a dealer key)."""
    from orchestration.client.service import ServiceClient
    from orchestration.mpspdz import certs
    from orchestration.mpspdz.hosts import write_hosts

    certs.make_client_cert(tmp_path, "door1")
    cl = ServiceClient(tmp_path, write_hosts(tmp_path / "hosts", [("127.0.0.1", 9), ("127.0.0.1", 10)]))
    with pytest.raises(certs.CertError) as err:
        cl._context(0)
    assert "invoke certs --server-cert P0.pem" in str(err.value) and "--id 2" not in str(err.value)


def _plain_client(var: Path, servers) -> dict[str, str]:
    """A door camera's folder as the checklist leaves it (made by hand, so that the test needs no new flag: its
    key, the servers' certificates, the data owner's model record); returns the environment that points service.hosts at a hosts file."""
    import shutil

    from orchestration.mpspdz import certs

    certs.make_client_cert(var / "client", "door1")
    for pem in servers:
        shutil.copy(pem, var / "client" / "certs" / pem.name)
    (var / "client" / "model.json").write_text(json.dumps({"run_id": "r1", "gen": "r1", "classes": ["ann", "bob"],
                                                          "d": 128, "threshold": 0.5, "meta": {"backend": "dlib"},
                                                          "params": {"exp_bits": 8}}))
    hosts = var.parent / "service-hosts"
    hosts.write_text("127.0.0.1:9\n127.0.0.1:11\n")
    return {"INVOKE_SERVICE_HOSTS": str(hosts)}


def test_local_mode_is_refused_on_a_client_configured_for_two_hosts(servers, tmp_path, lfw10):
    """Finding 3: --one-job (predict, recognize), train and refresh-shares on a client whose service.hosts is a
    hosts file refuse before anything is written: they would run both servers here. Unsetting service.hosts is
    the way to do it on purpose, and the message says so."""
    var = tmp_path / "var"
    env = _plain_client(var, servers)
    before = _files(var)
    image = str(next((lfw10 / "Tony_Blair").glob("*.jpg")))
    runs = {"predict": ("predict", "--one-job", "--backend", "dlib", "--image", image),
            "recognize": ("recognize", "--one-job", "--backend", "dlib", "--video", image),
            "train": ("train", "--dataset", str(lfw10)),
            "refresh-shares": ("refresh-shares",)}
    for task, args in runs.items():
        r = invoke(var, *args, env=env)
        assert r.returncode == 1, (task, r.stdout, r.stderr)
        assert "would run both servers on this machine" in r.stderr and "service.hosts" in r.stderr, r.stderr
        assert f"INVOKE_SERVICE_HOSTS= invoke {task}" in r.stderr, r.stderr
        assert _files(var) == before, task  # no server key, no share, nothing
    # a plain client without service.hosts is no data owner and holds no servers: no local mode either
    r = invoke(var, "predict", "--image", image)
    assert r.returncode == 1 and "only asks the service" in r.stderr, r.stderr
    assert _files(var) == before


def test_a_service_that_does_not_run_is_told_apart_and_no_flag_is_made_up(servers, tmp_path, lfw10):
    """Finding 2: nothing listens at the client ports: "not running", how to start it, and no --no-service."""
    var = tmp_path / "var"
    env = _plain_client(var, servers)
    r = invoke(var, "predict", "--image", str(next((lfw10 / "Tony_Blair").glob("*.jpg"))), env=env)
    assert r.returncode == 1
    assert "not running or not reachable" in r.stderr and "invoke serve --id 0 --hosts" in r.stderr, r.stderr
    assert "--no-service" not in r.stderr and "--one-job" not in r.stderr, r.stderr  # two hosts: no local way


def test_a_missing_model_record_says_whose_record_to_copy(tmp_path):
    """Finding 2: a plain client is told to copy the data owner's var/client/model.json (and where); the data
    owner's client to train; a folder that cannot be told apart gets both."""
    from orchestration.client.jobs import load_model_record
    from orchestration.mpspdz import certs
    from orchestration.shared.model import ModelError

    plain = tmp_path / "door" / "client"
    certs.make_client_cert(plain, "door1")
    with pytest.raises(ModelError) as err:
        load_model_record(plain)
    msg = str(err.value)
    assert "copy the data owner's record, var/client/model.json" in msg and str(plain / "model.json") in msg
    assert "invoke train" not in msg
    owner = tmp_path / "owner" / "client"
    certs.make_party_cert(owner, 2)
    with pytest.raises(ModelError) as err:
        load_model_record(owner)
    assert "data owner's client" in str(err.value) and "invoke train" in str(err.value)
    assert "copy" not in str(err.value)
    unclear = tmp_path / "new" / "client"
    with pytest.raises(ModelError) as err:
        load_model_record(unclear)
    assert "invoke train" in str(err.value) and "copy the data owner's record" in str(err.value)


# ---- smaller ones ---------------------------------------------------------------------------------------

def test_the_local_service_names_the_client_ports():
    from orchestration.cli.twohosts import serving_line
    from orchestration.mpspdz.hosts import Endpoint, Hosts

    hosts = Hosts(Path("h"), (Endpoint("127.0.0.1", "127.0.0.1", 7300), Endpoint("127.0.0.1", "127.0.0.1", 7301)))
    line = serving_line({"gen": "g1", "c": 4}, "dealer", hosts)
    assert line.startswith("running service: model generation g1")
    assert "server 0's gateway at 127.0.0.1:7400" in line and "server 1's at 127.0.0.1:7401" in line, line
    assert "MPC port + 100" in line and "7300" in line


def test_docs_give_the_extra_client_checklist_and_the_dealers_inbound_port():
    service = (REPO / "docs" / "service.md").read_text()
    steps = ["invoke fetch-models", "invoke certs --client door1", "invoke certs --server-cert P0.pem",
             "var/client/model.json", "service.model_record"]
    at = [service.find(s) for s in steps]
    assert -1 not in at and at == sorted(at), dict(zip(steps, at))
    readme = (REPO / "README.md").read_text()
    assert "the client needs no inbound port" not in readme
    assert "reachable from both servers" in readme and "needs no inbound port" in readme


def test_messages_name_a_party_once_and_party_2_as_the_dealer(tmp_path):
    """Doubled prefixes ("server 0: server 0: port ... in use") and "server 2" for the data owner's client."""
    import socket

    from orchestration.cli.common import _said_by
    from orchestration.mpspdz import certs
    from orchestration.mpspdz.hosts import HostsError, check_can_listen, write_hosts

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hosts = write_hosts(tmp_path / "hosts", [("127.0.0.1", port), ("127.0.0.1", port + 1)])
        for party, label in ((0, "server 0"), (2, "the dealer (the data owner's client)")):
            with pytest.raises(HostsError) as err:
                check_can_listen(hosts[0], party)
            said = _said_by(label, err.value)
            assert said.count(label) == 2 and said.startswith(f"{label}: port"), said  # once, and "says X listens"
            assert "server 2" not in said
    certs.make_party_cert(tmp_path / "c", 2)
    with pytest.raises(certs.CertError) as err:
        certs.make_party_cert(tmp_path / "c", 2)
    assert "server 2" not in str(err.value) and "the dealer (the data owner's client)" in str(err.value)


def test_share_predict_prints_the_party_command_like_share_train(capsys):
    """share-predict and share-refresh print what each server runs and how to collect, as share-train does."""
    from types import SimpleNamespace

    from orchestration.cli.twohosts import _say_next

    tree = ast.parse((REPO / "orchestration" / "cli" / "twohosts.py").read_text())
    calls = {f.name: {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
             for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert all("_say_next" in calls[t] for t in ("share_train", "share_predict", "share_refresh")), calls
    _say_next(SimpleNamespace(job="j1", bundles=(Path("OUT/server0"), Path("OUT/server1")), protocol="dealer"))
    out = capsys.readouterr().out
    for i in range(2):
        assert f"send OUT/server{i} to server {i}; there: invoke party --id {i} --hosts HOSTS --job" in out, out
    assert "invoke deal --job j1 --hosts HOSTS" in out and "invoke collect --job j1 --result" in out, out
