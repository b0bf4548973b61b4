"""What the README's security section promises about the servers' disks, bundles and failures.

Each test here backs a sentence of README.md (*What a server holds*): a leaked share is useless after a
refresh (or retraining) that the client confirmed, every file a server or the client writes is
owner-only, a bundle cannot make a server read a file outside it, and a killed server is the one named.
Synthetic embeddings only (no faces, no models), the real MP-SPDZ protocol.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from synthetic import split

from orchestration.mpspdz import certs
from orchestration.client import jobs as client
from orchestration.shared import reference
from orchestration.mpspdz.launcher import PartyFailed, PartySpec, _blame
from orchestration.client.private import Layout, predict_private, refresh_private, run_local, train_private
from orchestration.server.job import ModelError, Server, check_bundle, model_generations, prepare_job, read_shares
from preprocessing import sharing
from preprocessing.sharing import FRAC_BITS, SharingError

pytestmark = [pytest.mark.mpc, pytest.mark.protocol]

REPO = Path(__file__).resolve().parents[1]
PARAMS = reference.TrainParams(epochs=1, batch=16, lr=1.0, alpha=16.0, exp_bits=8, seed=3)


@pytest.fixture(scope="module")
def data():
    return split(people=4, per=8, seed=11, every=4)


@pytest.fixture(scope="module")
def trained(mp, data, tmp_path_factory):
    x, labels, tr, _ = data
    layout = Layout(tmp_path_factory.mktemp("var"))
    train_private(mp, layout, x[tr], [labels[k] for k in tr], PARAMS, timeout=300)
    return layout


def _copy(layout: Layout, dest: Path) -> Layout:
    shutil.copytree(layout.root, dest, symlinks=True)
    return Layout(dest)


def _n(layout: Layout) -> int:
    rec = client.load_model_record(layout.client)
    return (rec["d"] + 1) * len(rec["classes"])


def _current_share(layout: Layout, i: int) -> np.ndarray:
    return read_shares(layout.model_dir(i) / f"Transactions-P{i}.data", 0, _n(layout)).copy()


def _share_candidates(folder: Path, n: int):
    """Every run of ``n`` shares a file under ``folder`` could hold: after a persistence header, or raw."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        blob = path.read_bytes()
        offsets = {0}
        if len(blob) >= 8:
            offsets.add(8 + int.from_bytes(blob[:8], "little"))
        for off in sorted(offsets):
            if off + 8 * n <= len(blob):
                yield path, np.frombuffer(blob[off:off + 8 * n], dtype="<u8").astype(np.uint64)


def _leaks(old_share: np.ndarray, later_disk: Path, model: np.ndarray) -> list[Path]:
    """Files on ``later_disk`` that, added to ``old_share``, give the model."""
    return [p for p, cand in _share_candidates(later_disk, len(model))
            if np.array_equal(sharing.reconstruct(old_share, cand), model)]


# ---- finding 1: one refresh (or retraining) makes a leaked share useless ------------------------

def test_refresh_then_confirmation_makes_an_old_share_useless(mp, trained, data, tmp_path):
    """A leak of server i's disk from before a refresh plus server j's disk from after it (confirmed) gives
    nothing: each server destroys the previous generation once the client confirms the new one."""
    layout = _copy(trained, tmp_path / "var")
    old = [_current_share(layout, i) for i in range(2)]
    model = sharing.reconstruct(*old)
    assert _leaks(old[0], layout.server(1), model)  # the attack works on the same generation
    gen, _ = refresh_private(mp, layout)  # local mode: collect, then confirm at once
    for i in range(2):
        found = _leaks(old[i], layout.server(1 - i), model)
        assert not found, (f"server {i}'s share from before the refresh + {found[0]} (server {1 - i}'s disk after "
                           "the refresh) reconstructs the model")
        assert set(model_generations(Server(layout.server(i), i))) == {gen}, f"server {i} kept an old generation"
    # the model itself did not change
    assert np.array_equal(sharing.reconstruct(*[_current_share(layout, i) for i in range(2)]), model)


def test_retraining_destroys_the_previous_model_once_confirmed(mp, trained, data, tmp_path):
    x, labels, tr, te = data
    layout = _copy(trained, tmp_path / "var")
    old_gen = client.load_model_record(layout.client)["gen"]
    old = [_current_share(layout, i) for i in range(2)]
    # a second name for each old share file: shows whether its bytes were overwritten before the unlink
    links = []
    for i in range(2):
        f = layout.server(i) / "models" / old_gen / f"Transactions-P{i}.data"
        links.append(tmp_path / f"old-P{i}.link")
        os.link(f, links[-1])
    rep = train_private(mp, layout, x[tr][::-1], [labels[k] for k in tr][::-1], PARAMS, timeout=300)
    for i in range(2):
        found = _leaks(old[i], layout.server(1 - i), sharing.reconstruct(*old))
        assert not found, f"server {i}'s old share + {found[0]} (server {1 - i}'s disk, retrained) gives the old model"
        assert set(model_generations(Server(layout.server(i), i))) == {rep.run_id}
        blob = links[i].read_bytes()
        assert len(blob) > 8 * _n(layout) and blob == bytes(len(blob)), f"{links[i]}: old shares not overwritten"


def test_both_generations_stay_until_the_client_confirms(mp, trained, data, tmp_path):
    """Two hosts: a refresh collected but not confirmed leaves both generations on both servers; the next job
    naming the new generation, or `invoke share-confirm` + `invoke confirm` on each server, destroys the old."""
    x, _, _, te = data
    layout = _copy(trained, tmp_path / "var")
    old_gen = client.load_model_record(layout.client)["gen"]
    sent = client.share_refresh(layout.client, tmp_path / "jobs")
    _, outs = run_local(mp, layout, sent)
    # as if one receipt never reached the client: it still holds the old generation, and both servers serve it
    assert len(predict_private(mp, layout, x[te[:2]], 0.0).predictions) == 2
    done = client.collect(layout.client, sent.job, outs)
    new_gen = done.record["gen"]
    for i in range(2):
        assert set(model_generations(Server(layout.server(i), i))) == {old_gen, new_gen}
    # until then each server's disk alone gives the refresh's sharing of zero: S = new1 - old1 = old0 - new0
    share = {(i, g): read_shares(layout.server(i) / "models" / g / f"Transactions-P{i}.data", 0, _n(layout))
             for i in range(2) for g in (old_gen, new_gen)}
    with np.errstate(over="ignore"):
        s_from_1 = share[1, new_gen] - share[1, old_gen]
        s_from_0 = share[0, old_gen] - share[0, new_gen]
    assert np.array_equal(s_from_0, s_from_1) and np.all(s_from_1 != 0)
    # the operators confirm with the tasks (a ticket per server, as with any bundle)
    env = dict(os.environ, INVOKE_PATHS_VAR=str(layout.root))
    r = subprocess.run([sys.executable, "-m", "invoke", "share-confirm", "--out", str(tmp_path / "confirm")],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    ticket0 = str(tmp_path / "confirm" / "server0")
    r = subprocess.run([sys.executable, "-m", "invoke", "confirm", "--id", "0", "--job", ticket0],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert f"destroyed generation {old_gen}" in r.stdout, r.stdout
    assert set(model_generations(Server(layout.server(0), 0))) == {new_gen}
    assert set(model_generations(Server(layout.server(1), 1))) == {old_gen, new_gen}
    # server 1 never got its ticket: the next job names the new generation, which is confirmation enough
    rep = predict_private(mp, layout, x[te[:2]], 0.0)
    assert len(rep.predictions) == 2
    assert set(model_generations(Server(layout.server(1), 1))) == {new_gen}
    # a ticket for a generation a server does not hold changes nothing and says so
    r = subprocess.run([sys.executable, "-m", "invoke", "confirm", "--id", "1", "--job", ticket0],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "for server 0, not server 1" in r.stderr, r.stderr


def test_after_a_local_job_a_server_holds_only_its_certificates_model_shares_and_logs(mp, trained, data, tmp_path):
    """README, *What a server holds*: a run's scratch folder, its input shares and (local mode) its output shares
    do not outlive the job; what stays is the key and certificates, one confirmed model generation, and logs."""
    x, _, _, te = data
    layout = _copy(trained, tmp_path / "var")
    predict_private(mp, layout, x[te], 0.0)
    gen, _ = refresh_private(mp, layout)
    predict_private(mp, layout, x[te[:1]], 0.0)
    for i in range(2):
        root = layout.server(i)
        kept = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink())
        expect = {f"certs/P{i}.key", f"certs/P{i}.pem", f"certs/P{1 - i}.pem", "certs/P2.pem", "jobs-done", "model",
                  f"models/{gen}/Transactions-P{i}.data", f"models/{gen}/manifest.json"}
        assert set(kept) - expect == {k for k in kept if k.startswith("logs/") and k.endswith(".log")}, kept
        assert expect <= set(kept), kept
        assert not list((root / "inputs").iterdir()) and not list((root / "outputs").iterdir())


# ---- finding 2: every file a server or the client writes is owner-only --------------------------

def _tree(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        out.append(root)
        out += sorted(root.rglob("*"))
    return out


def _group_or_other_bits(paths: list[Path]) -> list[str]:
    bad = []
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue  # a symlink's own mode means nothing; its target is checked
        if st.st_mode & 0o077:
            bad.append(f"{p} {stat.filemode(st.st_mode)}")
    return bad


_PROBE = 'for p in "$@"; do if [ -d "$p" ]; then ls -- "$p" >/dev/null 2>&1 && echo "$p"; ' \
         'else head -c1 -- "$p" >/dev/null 2>&1 && echo "$p"; fi; done; exit 0'


def _readable_by_nobody(paths: list[Path]) -> list[str]:
    """Which of ``paths`` an unprivileged uid (nobody, 65534) can read or list."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    r = subprocess.run(["/bin/sh", "-c", _PROBE, "probe", *map(str, paths)], capture_output=True, text=True,
                       preexec_fn=drop, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as an unprivileged uid (nobody)")
def test_server_and_client_files_are_owner_only(mp, data):
    x, labels, tr, te = data
    base = Path(tempfile.mkdtemp(prefix="facerec-modes-", dir="/tmp"))
    try:
        base.chmod(0o755)  # reachable by anyone, like a deployment's var/ folder
        control = base / "control"
        control.write_text("readable")
        control.chmod(0o644)
        layout = Layout(base / "var")
        layout.root.mkdir(mode=0o755)
        during: list[str] = []

        def look_during_the_run(procs) -> None:  # inputs, model copy and keys sit in run-<job>/ now
            for p in procs:
                umask = next(ln for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                             if ln.startswith("Umask"))
                if umask.split()[1] != "0077":
                    during.append(f"party process {p.pid}: {umask}")
            during.extend(_group_or_other_bits(_tree(layout.server(0), layout.server(1))))
            during.extend(_readable_by_nobody(_tree(layout.server(0), layout.server(1))))

        train_private(mp, layout, x[tr], [labels[k] for k in tr], PARAMS, timeout=300, on_spawn=look_during_the_run)
        sent = client.share_predict(layout.client, x[te], 0.0,
                                    [layout.server(i) / "inputs" / "{job}" for i in range(2)])
        _, outs = run_local(mp, layout, sent, on_spawn=look_during_the_run)
        assert all((o / "receipt.json").is_file() for o in outs) and all((o / "shares.bin").is_file() for o in outs)
        after = _tree(layout.server(0), layout.server(1), layout.client)  # outputs/<job>/ still there
        client.collect(layout.client, sent.job, outs)
        bundles = client.share_predict(layout.client, x[te[:1]], 0.0, base / "out").bundles  # two hosts: --out
        tickets = client.share_confirm(layout.client, base / "confirm").bundles
        after += _tree(*bundles, base / "out", *tickets, base / "confirm")
        refresh_private(mp, layout)
        after += _tree(layout.server(0), layout.server(1), layout.client)
        after = [p for p in dict.fromkeys(after) if os.path.lexists(p)]
        names = {p.name for p in after}
        for expect in ("Transactions-P0.data", "Transactions-P1.data", "shares.bin", "receipt.json", "P0.key",
                       "model.json", "Input-Binary-P0-0", "manifest.json", "confirm.json"):
            assert expect in names, f"{expect} not among the files checked"
        assert any(p.suffix == ".log" for p in after)
        assert not during, "during a run: " + "; ".join(during)
        assert not _group_or_other_bits(after), "\n".join(_group_or_other_bits(after))
        assert _readable_by_nobody([control]) == [str(control)]  # the probe can read what is readable
        readable = _readable_by_nobody(after)
        assert not readable, "an unprivileged user can read: " + ", ".join(readable)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_folders_left_open_by_an_older_version_are_closed_at_the_next_job(mp, trained, data, tmp_path):
    x, _, _, te = data
    layout = _copy(trained, tmp_path / "var")
    for d in (layout.client, layout.server(0), layout.server(1)):
        d.chmod(0o755)
    predict_private(mp, layout, x[te[:1]], 0.0)
    for d in (layout.client, layout.server(0), layout.server(1)):
        assert d.stat().st_mode & 0o777 == 0o700, f"{d}: {oct(d.stat().st_mode & 0o777)}"


def test_keys_are_never_readable_by_others_not_even_for_a_moment(tmp_path, monkeypatch):
    """Under umask 0 (the worst case) the private key is 0600 from its first byte: checked whenever its mode is
    changed, and at the end."""
    seen: list[str] = []
    real_chmod = os.chmod

    def watching_chmod(path, mode, *a, **kw):
        p = Path(path)
        if p.name.endswith(".key") or p.name == "key":
            seen.append(f"{p} was {oct(p.stat().st_mode & 0o777)} before chmod {oct(mode)}")
        return real_chmod(path, mode, *a, **kw)

    monkeypatch.setattr(os, "chmod", watching_chmod)
    old = os.umask(0)
    try:
        made = certs.make_local_pair((tmp_path / "s0", tmp_path / "s1"))
        pc = certs.check_party_certs(tmp_path / "s0", 0)
        certs.install_for_run(pc, tmp_path / "run" / "Player-Data")
    finally:
        os.umask(old)
    assert made
    loose = [s for s in seen if not s.split(" was ")[1].startswith("0o600")]
    assert not loose, loose
    for key in (tmp_path / "s0" / "certs" / "P0.key", tmp_path / "s1" / "certs" / "P1.key",
                tmp_path / "run" / "Player-Data" / "P0.key"):
        assert key.stat().st_mode & 0o777 == 0o600, f"{key}: {oct(key.stat().st_mode & 0o777)}"
    for d in (tmp_path / "s0", tmp_path / "s0" / "certs", tmp_path / "run" / "Player-Data"):
        assert d.stat().st_mode & 0o777 == 0o700, f"{d}: {oct(d.stat().st_mode & 0o777)}"


# ---- finding 3: a bundle's names stay inside the bundle ----------------------------------------

def _bundle(tmp_path: Path) -> Path:
    dirs = (tmp_path / "job" / "server0", tmp_path / "job" / "server1")
    sharing.write_share_bundle([(np.zeros((2, 3)), FRAC_BITS)], dirs, program="face_predict", program_version="x",
                               kind="predict", n=2, d=3, n_classes=2, run_id="r1", job="predict-r1",
                               program_args=["2", "3", "2", "8"], model_gen="r1")
    return dirs[0]


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "subfolder"])
def test_bundle_share_file_must_be_a_plain_name_inside_the_bundle(tmp_path, how):
    """A manifest cannot point the server at another file of the same size and checksum."""
    bundle = _bundle(tmp_path)
    secret = tmp_path / "secret.data"  # any file on the server, e.g. another job's or another server's shares
    secret.write_bytes(os.urandom(48))
    name = {"absolute": str(secret), "dotdot": "../../secret.data", "symlink": "link", "subfolder": "sub/secret"}[how]
    if how == "symlink":
        (bundle / "link").symlink_to(secret)
    if how == "subfolder":
        (bundle / "sub").mkdir()
        shutil.copyfile(secret, bundle / "sub" / "secret")
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m.update(file=name, n_values=6, sha256=sharing.sha256_bytes(secret.read_bytes()))
    mf.write_text(json.dumps(m))
    with pytest.raises(SharingError, match=r"manifest.json: file .* must be .*name of a file in the bundle folder"):
        check_bundle(bundle, 0)


@pytest.mark.parametrize("key,value", [(k, v) for k in ("job", "run_id", "model_gen")
                                       for v in ("../../victim", "/tmp/victim", "a/b", "..", "")
                                       if (k, v) != ("job", "")])  # no job id: prepare_job refuses it
def test_bundle_ids_that_name_server_folders_are_plain_names(tmp_path, key, value):
    """job, run_id and model_gen become folder names on the server (outputs/<job>, models/<gen>)."""
    bundle = _bundle(tmp_path)
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m[key] = value
    mf.write_text(json.dumps(m))
    with pytest.raises(SharingError, match=rf"manifest.json: {key} {value!r} must be"):
        check_bundle(bundle, 0)


def test_a_bundle_without_a_job_id_is_refused_before_anything_runs(mp, tmp_path):
    bundle = _bundle(tmp_path)
    mf = bundle / "manifest.json"
    mf.write_text(json.dumps(dict(json.loads(mf.read_text()), job="")))
    with pytest.raises(SharingError, match="manifest.json: no job id"):
        prepare_job(mp, Server(tmp_path / "server0", 0), bundle)
    assert not list((tmp_path / "server0").iterdir())


def test_a_well_formed_bundle_still_passes(tmp_path):
    assert check_bundle(_bundle(tmp_path), 0).file == "Input-Binary-P0-0"


# ---- finding 6: the server that failed first is named, not the one that lost its peer -----------

def _specs(tmp_path: Path, texts: list[str]) -> list[PartySpec]:
    specs = []
    for i, text in enumerate(texts):
        log = tmp_path / f"p{i}.log"
        log.write_text(text)
        specs.append(PartySpec(i, tmp_path, log, "127.0.0.1", 5000 + i))
    return specs


SETUP = "Truncation error probability 2^-40\nTrying to run 64-bit computation\nSetup took 0.05 seconds.\n"
ABORT = ("terminate called after throwing an instance of 'boost::wrapexcept<boost::system::system_error>'\n"
         "  what():  read_some: stream truncated [asio.ssl.stream:1]\n")


def test_blame_names_the_killed_server_when_the_survivors_abort_message_is_not_in_its_log_yet(tmp_path):
    """The failure seen in a full run: server 1 SIGKILLed, server 0 aborted (SIGABRT) after losing it, and
    server 0's last lines had not reached its log when the launcher looked."""
    specs = _specs(tmp_path, [SETUP, SETUP])
    party, why = _blame(specs, [-signal.SIGABRT, -signal.SIGKILL])
    assert party == 1 and why.startswith("server 1 was killed (signal 9)"), why


@pytest.mark.parametrize("codes,texts,order,expect", [
    # the survivor's abort message made it to its log
    ([-signal.SIGABRT, -signal.SIGKILL], [SETUP + ABORT, SETUP], [1, 0], 1),
    # server 0 stopped from outside (SIGTERM), server 1 then exits 1 having lost it
    ([-signal.SIGTERM, 1], [SETUP, SETUP + "Fatal error in communication: End of file\n"], [0, 1], 0),
    # a real crash of server 0 (SIGSEGV): server 1 only lost its peer
    ([-signal.SIGSEGV, -signal.SIGABRT], [SETUP, SETUP + ABORT], [0, 1], 0),
    # no message either side: the one that exited first
    ([1, 1], [SETUP, SETUP], [1, 0], 1),
    ([1, 1], [SETUP, SETUP], [0, 1], 0),
    # both killed from outside: the first
    ([-signal.SIGKILL, -signal.SIGKILL], [SETUP, SETUP], [1, 0], 1),
    # server 1 still running, server 0 lost it: server 1 is at fault
    ([-signal.SIGABRT, None], [SETUP + ABORT, SETUP], [0], 1),
])
def test_blame_uses_signals_messages_and_exit_order(tmp_path, codes, texts, order, expect):
    party, why = _blame(_specs(tmp_path, texts), codes, order=order)
    assert party == expect and f"server {expect} " in why, why


@pytest.mark.parametrize("code,text,expect,words", [
    (-signal.SIGKILL, SETUP, 0, "server 0 was killed (signal 9)"),
    (-signal.SIGABRT, SETUP + ABORT, 1, "lost the connection to server 1"),
    (1, SETUP + "Fatal error in communication: write_some: Connection reset by peer\n", 1, "lost the connection"),
    (-signal.SIGSEGV, SETUP, 0, "server 0 was killed (signal 11)"),
])
def test_blame_with_one_server_on_this_host(tmp_path, code, text, expect, words):
    party, why = _blame(_specs(tmp_path, [text]), [code], order=[0])
    assert party == expect and words in why, why


def test_an_illegal_instruction_says_the_binaries_were_built_for_another_cpu(tmp_path):
    """What the offline archive (built -march=native with AVX-512) does on a CPU without it: both servers
    die of SIGILL at their first such instruction, and setup's message must say so and how to build here."""
    party, why = _blame(_specs(tmp_path, [SETUP, SETUP]), [-signal.SIGILL, -signal.SIGILL], order=[0, 1])
    assert party == 0 and why.startswith("server 0 was killed (signal 4): illegal instruction"), why
    assert "invoke setup --from-source DIR --force" in why
    party, why = _blame(_specs(tmp_path, [SETUP]), [-signal.SIGSEGV], order=[0])
    assert "illegal instruction" not in why, why  # only SIGILL says so


def test_killed_server_is_named_even_when_the_survivors_output_lags(mp, trained, data, tmp_path):
    """Real runs: server 1 is SIGKILLed at several moments while server 0's output reaches its log late (its
    reader thread starved, as on a loaded machine). Every time server 1 must be named, never server 0.

    semi2k, where the reported race happened and a 256-query run lasts about two seconds (the dealer mode
    finishes it in a tenth of that; its kills are tested with the process held: test_protocol.py)."""
    x, _, _, te = data
    layout = _copy(trained, tmp_path / "var")
    seen = []
    queries = np.tile(x[te], (256 // len(te), 1))  # a run of about two seconds here
    for delay in (0.15, 0.4, 0.8, 1.2):
        def slow_reader(party: int, line: str) -> None:
            if party == 0:
                threading.Event().wait(0.7)

        def kill_server_1(procs, delay=delay) -> None:
            threading.Timer(delay, os.killpg, args=(procs[1].pid, signal.SIGKILL)).start()

        with pytest.raises(PartyFailed) as err:
            predict_private(mp, layout, queries, 0.0, timeout=60, on_spawn=kill_server_1, on_line=slow_reader,
                            protocol="semi2k")
        first = str(err.value).splitlines()[0]
        seen.append((delay, err.value.party, first))
    wrong = [s for s in seen if s[1] != 1 or "server 1 was killed (signal 9)" not in s[2]]
    assert not wrong, wrong


def test_a_wrapped_share_in_a_recognition_answer_is_an_error_never_a_name(mp, trained, data, tmp_path):
    """README, *Local truncation in recognition*: a wrap puts one server's share of the softmax
    denominator off by 2^(64-16); the client's range check refuses the answer instead of naming anyone."""
    x, _, _, te = data
    layout = _copy(trained, tmp_path / "var")
    sent = client.share_predict(layout.client, x[te[:2]], 0.0,
                                [layout.server(i) / "inputs" / "{job}" for i in range(2)])
    _, outs = run_local(mp, layout, sent)
    blob = (outs[0] / "shares.bin").read_bytes()
    shares = np.frombuffer(blob, "<u8").copy()
    shares[len(shares) // 2] += np.uint64(1 << 48)  # the first query's denominator
    wrapped = shares.tobytes()
    (outs[0] / "shares.bin").write_bytes(wrapped)
    receipt = json.loads((outs[0] / "receipt.json").read_text())
    receipt["sha256"] = sharing.sha256_bytes(wrapped)
    (outs[0] / "receipt.json").write_text(json.dumps(receipt))
    with pytest.raises(ModelError, match="out of range"):
        client.collect(layout.client, sent.job, outs)


# ---- a certificate's name never becomes a path; no pin is replaced silently --------------------

def _self_signed(tmp_path: Path, cn: str) -> Path:
    """A certificate with any common name (a '/' inside it escaped for openssl -subj)."""
    d = tmp_path / f"made-{len(list(tmp_path.glob('made-*')))}"
    d.mkdir()
    subj = "/CN=" + cn.replace("/", "\\/")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", subj, "-keyout", str(d / "key"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    assert certs.inspect(d / "cert.pem").common_name == cn
    return d / "cert.pem"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cn", ["client-../certs/P1", "client-../../../../escaped", "client-a/b", "client-..",
                                "client-.hidden", "client-", "client-" + "x" * 49, "client-sp ace"])
def test_allow_client_refuses_a_common_name_that_is_no_client_name(tmp_path, cn):
    """`--allow-client` named the pin after the certificate's CN: CN client-../certs/P1 overwrote server 1's pin of
    server 0. Only names `invoke certs --client` accepts are pinned, and nothing is written anywhere."""
    var = tmp_path / "var"
    certs.make_local_pair((var / "server0", var / "server1"))
    bad = _self_signed(tmp_path, cn)
    before = _snapshot(tmp_path)
    with pytest.raises(certs.CertError) as err:
        certs.allow_client(var / "server1", bad)
    msg = str(err.value)
    assert str(bad) in msg and repr(cn) in msg and "letters, digits" in msg, msg
    assert _snapshot(tmp_path) == before
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(certs.CertError, match="letters, digits"):  # the same rule makes names
        certs.make_client_cert(tmp_path / "c", cn[len("client-"):])


def test_allow_client_accepts_what_make_client_cert_makes(tmp_path):
    certs.make_client_cert(tmp_path / "c", "door-cam_2.v1")
    info = certs.allow_client(tmp_path / "s0", tmp_path / "c" / "certs" / "client.pem")
    assert info.path == tmp_path / "s0" / "clients" / "door-cam_2.v1.pem"


def test_a_pin_is_replaced_only_on_request_and_the_same_certificate_again_is_a_no_op(tmp_path):
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    certs.make_party_cert(s0, 0)
    certs.make_party_cert(s1, 1)
    new1 = s1 / "certs" / "P1.pem"
    certs.import_peer_cert(s0, 0, new1)
    pin = s0 / "certs" / "P1.pem"
    first = pin.read_bytes()
    old_fp = certs.inspect(pin).fingerprint
    certs.import_peer_cert(s0, 0, new1)  # the same again: nothing changes, no error
    assert pin.read_bytes() == first
    certs.make_party_cert(s1, 1, force=True)  # server 1 re-keys
    new_fp = certs.inspect(new1).fingerprint
    with pytest.raises(certs.CertError) as err:
        certs.import_peer_cert(s0, 0, new1)
    msg = str(err.value)
    assert old_fp in msg and new_fp in msg and str(pin) in msg and "--replace-pin" in msg and "'P1'" in msg, msg
    assert pin.read_bytes() == first
    certs.import_peer_cert(s0, 0, new1, replace=True)
    assert certs.inspect(pin).fingerprint == new_fp

    # clients: the same rules, and one certificate has one name
    c = tmp_path / "c"
    certs.make_client_cert(c, "owner")
    certs.allow_client(s0, c / "certs" / "client.pem")
    owner = s0 / "clients" / "owner.pem"
    kept = owner.read_bytes()
    certs.allow_client(s0, c / "certs" / "client.pem")
    assert owner.read_bytes() == kept
    other = tmp_path / "other"
    certs.make_client_cert(other, "owner")  # another key claiming the same name
    with pytest.raises(certs.CertError, match=r"already pins client 'owner' .*--replace-pin") as err:
        certs.allow_client(s0, other / "certs" / "client.pem")
    assert certs.inspect(owner).fingerprint in str(err.value)
    assert certs.inspect(other / "certs" / "client.pem").fingerprint in str(err.value)
    assert owner.read_bytes() == kept
    certs.allow_client(s0, other / "certs" / "client.pem", replace=True)
    assert certs.inspect(owner).fingerprint == certs.inspect(other / "certs" / "client.pem").fingerprint
    # a pin renamed by hand: pinning that certificate under its own name again would give it two names
    owner.rename(s0 / "clients" / "alias.pem")
    with pytest.raises(certs.CertError, match=r"already pinned as client 'alias' .*delete .*alias.pem"):
        certs.allow_client(s0, other / "certs" / "client.pem")
    assert not owner.exists()


# ---- the Python side's TLS: exactly 1.2, ECDHE with AEAD suites only ------------------------------

def _is_aead_ecdhe(name: str) -> bool:
    return name.startswith("ECDHE-") and ("-GCM-" in name or "CHACHA20-POLY1305" in name)


def test_the_service_clients_tls_context_offers_only_aead_suites(tmp_path):
    import ssl

    from orchestration.client.service import ServiceClient
    from orchestration.mpspdz.hosts import write_hosts

    client_dir = tmp_path / "client"
    certs.make_local_pair((tmp_path / "s0", tmp_path / "s1", client_dir))
    certs.make_client_cert(client_dir, "owner")
    hosts = write_hosts(tmp_path / "hosts", [("127.0.0.1", 7300), ("127.0.0.1", 7301)])
    ctx = ServiceClient(client_dir, hosts)._context(0)
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"]  # 1.3 is off (maximum_version)
    assert tls12 and all(_is_aead_ecdhe(c["name"]) for c in tls12), [c["name"] for c in tls12]
    assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12), tls12


def _handshake(server_ctx, client_ctx) -> tuple[str | None, str | None]:
    """One loopback TLS handshake: (cipher the client got or None, the server's error or None)."""
    import socket
    import ssl

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    result: dict[str, str | None] = {"error": None}

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(10)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cipher = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                cipher = tls.cipher()[0]
                tls.sendall(b"x")
    except (ssl.SSLError, OSError):
        pass
    t.join(10)
    srv.close()
    return cipher, result["error"]


def test_a_tls_server_made_with_harden_tls_refuses_a_client_that_offers_only_cbc(tmp_path):
    """The gateways' client and link ports accepted CBC suites; harden_tls (which the gateway uses) refuses them,
    while an AEAD client still connects. The control (a plain TLS 1.2 server) accepts the CBC client, so the test
    can fail."""
    import ssl

    certs.make_local_pair((tmp_path / "s0", tmp_path / "s1"))
    key, pem = tmp_path / "s0" / "certs" / "P0.key", tmp_path / "s0" / "certs" / "P0.pem"

    def server(hardened: bool):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if hardened:
            ctx = certs.harden_tls(ctx)
        ctx.load_cert_chain(pem, key)
        return ctx

    def client(ciphers: str | None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(pem))
        if ciphers:
            ctx.set_ciphers(ciphers)
        return ctx

    # every CBC suite an EC (prime256v1) certificate can serve, with and without ECDHE, SHA-1 and SHA-2 MACs
    cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA"
    assert not any(c["aead"] for c in client(cbc).get_ciphers() if c["protocol"] != "TLSv1.3")
    got, _ = _handshake(server(False), client(cbc))
    assert got is not None and not _is_aead_ecdhe(got), got  # control: without harden_tls CBC is accepted
    got, err = _handshake(server(True), client(cbc))
    assert got is None and err is not None and "no shared cipher" in err.lower(), (got, err)
    got, err = _handshake(server(True), client(None))
    assert got is not None and _is_aead_ecdhe(got) and err is None, (got, err)
    got, err = _handshake(server(True), client("ECDHE-ECDSA-CHACHA20-POLY1305"))
    assert got == "ECDHE-ECDSA-CHACHA20-POLY1305", (got, err)


# ---- a TLS handshake that failed: refused certificate, or cut short? -----------------------------

#: MP-SPDZ 0.4's output (semi2k-party.x -e), recorded here: server 1 re-keyed, server 0 still pins the old key
_HS_ADVICE = ("-side handshake with P{j} failed. Make sure both sides  have the necessary certificate "
              "(Player-Data/P{i}.pem in the default configuration on their side and Player-Data/P{j}.pem on ours), "
              "and run `c_rehash <directory>` on its location.\n"
              "The certificates should be the same on every host. Also make sure that it's still valid. Certificates "
              "generated with `Scripts/setup-ssl.sh` expire after a month.\n"
              "See also https://mp-spdz.readthedocs.io/en/latest/troubleshooting.html#handshake-failures\n"
              "Signature (should match the other side): 1eeac7caf794b8dc79e7708610475719/"
              "dfcc791fcb623fa13c1d57ec4dda8adb\n")


def _hs(side: str, i: int, j: int, error: str | None) -> str:
    return (SETUP.split("Setup")[0] + side + _HS_ADVICE.format(i=i, j=j)
            + (f"SSL error: handshake: {error}\n" if error else ""))


WRONG_CERT_0 = _hs("Server", 0, 1, "certificate verify failed (SSL routines) [asio.ssl:167772294]")
WRONG_CERT_1 = _hs("Client", 1, 0, "tlsv1 alert unknown ca (SSL routines) [asio.ssl:167773208]")
#: recorded too: the TCP connection cut at the first TLS record (the peer gone in the middle of the handshake)
CUT_1 = _hs("Client", 1, 0, "stream truncated [asio.ssl.stream:1]")


@pytest.mark.parametrize("text,cause", [
    (WRONG_CERT_0, "certificate"),
    (WRONG_CERT_1, "certificate"),
    (_hs("Client", 1, 0, "sslv3 alert bad certificate (SSL routines) [asio.ssl:167773202]"), "certificate"),
    (CUT_1, "cut"),
    (_hs("Server", 0, 1, "End of file [asio.misc:2]"), "cut"),
    (_hs("Client", 1, 0, "Connection reset by peer [system:104]"), "cut"),
    (_hs("Server", 0, 1, "unexpected eof while reading (SSL routines) [asio.ssl:167772454]"), "cut"),
    (_hs("Server", 0, 1, None), "cut"),  # killed before it said why: no evidence against the certificates
], ids=["verify-failed", "unknown-ca", "bad-certificate", "stream-truncated", "eof", "reset", "unexpected-eof",
        "no-reason"])
def test_handshake_cause_blames_certificates_only_when_one_was_refused(text, cause):
    from orchestration.mpspdz.launcher import handshake_cause

    assert handshake_cause(text) == cause


def test_a_server_killed_during_the_handshake_is_not_reported_as_a_certificate_problem(tmp_path):
    """Server 1 killed while server 0 shakes hands with it: the right blame, and no talk of certificates."""
    party, why = _blame(_specs(tmp_path, [_hs("Server", 0, 1, "stream truncated [asio.ssl.stream:1]"), SETUP]),
                        [1, -signal.SIGKILL], order=[1, 0])
    assert party == 1 and why.startswith("server 1 was killed (signal 9)"), why
    assert "certificate" not in why.replace("no certificate was refused", ""), why
    assert "during the TLS handshake" in why, why
    # server 0 alone on this host (two hosts): its handshake with server 1 cut, server 1 is named
    party, why = _blame(_specs(tmp_path, [CUT_1.replace("Client", "Server").replace("P0", "P1")]), [1], order=[0])
    assert party == 1 and "lost the connection to server 1 during the TLS handshake" in why, why
    assert "does not hold" not in why, why


def test_a_refused_certificate_is_still_reported_as_one(tmp_path):
    party, why = _blame(_specs(tmp_path, [WRONG_CERT_0, WRONG_CERT_1]), [1, 1], order=[0, 1])
    # server 0's log: it refused server 1's certificate; server 1's: server 0's alert. Both say server 0's pin is wrong
    assert party == 0 and "server 0's pin of server 1 (certs/P1.pem" in why, why
    assert "server 1's pin" not in why, why


# ---- owner-only also where no job runs: the embedding cache, the dealers' run folders, var/build --------

@pytest.fixture
def loose_umask():
    """The usual login umask (022): only the code's own care makes files owner-only."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_the_embedding_cache_and_the_shim_build_are_owner_only(tmp_path, loose_umask):
    from preprocessing.dataset import _Cache, _settings_key
    from orchestration.mpspdz.launcher import bind_shim

    var = tmp_path / "var"
    cache = _Cache(var / "client" / "cache", _settings_key("fake-model", "hog", 1, 40))
    for k, digest in enumerate(("ab" + "0" * 62, "cd" + "1" * 62)):
        cache.put(digest, "ok", np.full(4, k, np.float32), 1)
    cache.put("ab" + "2" * 62, "no_face", None, 0)
    assert cache.get("ab" + "0" * 62, 4) is not None
    bind_shim(var / "build")
    paths = _tree(var / "client", var / "build")
    assert len([p for p in paths if p.suffix == ".npz"]) == 3 and any(p.suffix == ".so" for p in paths)
    bad = _group_or_other_bits(paths)
    assert not bad, "\n".join(bad)


def test_the_dealers_run_folders_are_owner_only(tmp_path, loose_umask, monkeypatch):
    """One-job mode (prepare_dealer) and the service (run_service_dealer): the dealer's run folder, its
    Player-Data (a copy of the client's key), Persistence and Programs, checked while the dealer would run."""
    from orchestration.client import dealer, service
    from orchestration.mpspdz.hosts import write_hosts
    from orchestration.mpspdz.toolchain import protocol

    var = tmp_path / "var"
    client_dir = var / "client"
    certs.make_local_pair((var / "server0", var / "server1", client_dir))
    proto = protocol("dealer")
    monkeypatch.setattr(dealer, "load_pending", lambda client, job: {"protocol": "dealer", "program": "face_predict",
                                                                     "program_args": []})
    monkeypatch.setattr(dealer, "compile_program", lambda *a, **kw: "face_predict-x")
    run = dealer.prepare_dealer(None, client_dir, var / "build", "job1")
    try:
        assert (run.rundir / "Player-Data" / "P2.key").is_file()
        bad = _group_or_other_bits(_tree(run.rundir))
        assert not bad, "\n".join(bad)
    finally:
        dealer.cleanup_dealer(run)

    hosts = write_hosts(tmp_path / "hosts", [("127.0.0.1", 7300), ("127.0.0.1", 7301), ("127.0.0.1", 7302)])
    stop = threading.Event()
    seen: list[str] = []
    status = {"state": "serving", "protocol": proto.name, "batch": 4, "d1": 3, "c": 2, "exp_bits": 8, "gen": "g1"}
    monkeypatch.setattr(service.ServiceClient, "status", lambda self: [status, status])
    monkeypatch.setattr(service, "compile_program", lambda *a, **kw: "face_predict-x")
    monkeypatch.setattr(service, "bind_shim", lambda build: tmp_path / "shim.so")

    def start_party(mp, spec, program, hosts_file, *, shim, proto):
        seen.extend(_group_or_other_bits(_tree(spec.workdir)))
        seen.append(f"ran in {spec.workdir}")
        stop.set()
        proc = subprocess.Popen(["true"])
        proc.wait()
        return proc, open(os.devnull, "w")

    monkeypatch.setattr(service, "start_party", start_party)
    service.run_service_dealer(None, client_dir, var / "build", hosts, proto, stop)
    assert seen and seen[-1].startswith("ran in"), seen
    assert seen == [seen[-1]], "\n".join(seen)
