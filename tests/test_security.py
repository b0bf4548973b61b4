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

from orchestration import certs, client, reference
from orchestration.launcher import PartyFailed, PartySpec, _blame
from orchestration.private import Layout, predict_private, refresh_private, run_local, train_private
from orchestration.server import Server, check_bundle, model_generations, read_shares
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


@pytest.mark.parametrize("key", ["job", "run_id", "model_gen"])
@pytest.mark.parametrize("value", ["../../victim", "/tmp/victim", "a/b", "..", ""])
def test_bundle_ids_that_name_server_folders_are_plain_names(tmp_path, key, value):
    """job, run_id and model_gen become folder names on the server (outputs/<job>, models/<gen>)."""
    bundle = _bundle(tmp_path)
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m[key] = value
    mf.write_text(json.dumps(m))
    with pytest.raises(SharingError, match=rf"manifest.json: {key} {value!r} must be"):
        check_bundle(bundle, 0)


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


def test_killed_server_is_named_even_when_the_survivors_output_lags(mp, trained, data, tmp_path):
    """Real runs: server 1 is SIGKILLed at several moments while server 0's output reaches its log late (its
    reader thread starved, as on a loaded machine). Every time server 1 must be named, never server 0."""
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
            predict_private(mp, layout, queries, 0.0, timeout=60, on_spawn=kill_server_1, on_line=slow_reader)
        first = str(err.value).splitlines()[0]
        seen.append((delay, err.value.party, first))
    wrong = [s for s in seen if s[1] != 1 or "server 1 was killed (signal 9)" not in s[2]]
    assert not wrong, wrong
