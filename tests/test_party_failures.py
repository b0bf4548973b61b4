"""What a party says when it cannot run: a certificate one side does not pin, a peer that is late or never comes.

Real MP-SPDZ runs of the tiny setup-check program (a second each), every party with its own certificates
folder and run folder, as on separate hosts: all parties in one :func:`run_parties` (local mode, both
sides' evidence) or one :func:`run_parties` per party in threads (two hosts: each sees only its own).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from orchestration.mpspdz import certs
from orchestration.mpspdz.install import CHECK_PROGRAM
from orchestration.mpspdz.launcher import PartyFailed, PartySpec, free_ports, run_parties
from orchestration.mpspdz.toolchain import PROTOCOLS, compile_program, programs_dir

pytestmark = [pytest.mark.mpc, pytest.mark.protocol]

#: MP-SPDZ's advice for its own default setup, which does not apply here and must not be shown
ADVICE = ("c_rehash", "setup-ssl", "Player-Data/P", "in the default configuration")


class Lab:
    """Parties 0..n-1 of ``protocol``, each with a certificates folder d<i> and a run folder run<i>."""

    def __init__(self, root: Path, mp, protocol: str = "dealer"):
        self.root, self.mp, self.proto = root, mp, PROTOCOLS[protocol]
        self.n = self.proto.n_parties
        self.program = compile_program(mp, CHECK_PROGRAM, [], root / "build", proto=self.proto)
        self.dirs = [root / f"d{i}" for i in range(self.n)]
        certs.make_local_pair(self.dirs)
        base = free_ports("127.0.0.1", self.n)
        self.hosts = root / "hosts"
        self.hosts.write_text("".join(f"127.0.0.1:{base + i}\n" for i in range(self.n)))
        self.addr = [f"127.0.0.1:{base + i}" for i in range(self.n)]

    def spec(self, i: int) -> PartySpec:
        run = self.root / f"run{i}"
        if not run.exists():
            (run / "Player-Data").mkdir(parents=True)
            (run / "Persistence").mkdir()
            os.symlink(programs_dir(self.root / "build", self.proto), run / "Programs")
            for j, v in ((0, 3), (1, 4)):
                (run / "Player-Data" / f"Input-P{j}-0").write_text(f"{v}\n")
            certs.install_for_run(certs.check_party_certs(self.dirs[i], i, self.n), run / "Player-Data")
        return PartySpec(i, run, self.root / f"P{i}.log", "127.0.0.1", int(self.addr[i].rsplit(":", 1)[1]))

    def fp(self, i: int, of: int) -> str:
        """The sha256 party i holds for party ``of`` (its own certificate when i == of), as `invoke certs` prints it."""
        return certs.inspect(self.dirs[i] / "certs" / f"P{of}.pem").fingerprint

    def together(self, timeout: float = 60) -> str:
        """All parties in one launcher (local mode): the error message."""
        with pytest.raises(PartyFailed) as err:
            run_parties(self.mp, self.program, [self.spec(i) for i in range(self.n)], self.hosts, proto=self.proto,
                        timeout=timeout)
        return str(err.value)

    def apart(self, parties: list[int] | None = None, timeout: float = 60,
              delay: dict[int, float] | None = None) -> dict[int, str]:
        """One launcher per party, as on separate hosts: {party: its error message, or "" if it succeeded}."""
        out: dict[int, str] = {}

        def one(i: int) -> None:
            time.sleep((delay or {}).get(i, 0.0))
            try:
                run_parties(self.mp, self.program, [self.spec(i)], self.hosts, proto=self.proto, timeout=timeout)
                out[i] = ""
            except PartyFailed as exc:
                out[i] = str(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in (range(self.n) if parties is None else parties)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


def _wrong_pin_on_server_0(lab: Lab) -> None:
    """Server 0 pins, as server 1's, a certificate that is not the one server 1 uses."""
    other = lab.root / "other"
    certs.make_party_cert(other, 1)
    certs.import_peer_cert(lab.dirs[0], 0, other / "certs" / "P1.pem", replace=True)


def _no_advice(msg: str) -> None:
    for word in ADVICE:
        assert word not in msg, f"MP-SPDZ's advice {word!r} shown:\n{msg}"


def test_a_wrong_pin_on_server_0_names_server_0_and_both_fingerprints(mp, tmp_path):
    lab = Lab(tmp_path, mp)
    _wrong_pin_on_server_0(lab)
    msg = lab.together()
    assert "server 0 refused server 1's certificate" in msg, msg
    assert "server 0's pin of server 1" in msg, msg
    assert f"server 0 pins sha256 {lab.fp(0, 1)}" in msg, msg
    assert f"server 1's certificate is sha256 {lab.fp(1, 1)}" in msg, msg
    assert "invoke certs --id 0 --peer-cert P1.pem --replace-pin" in msg, msg
    assert "server 1's pin" not in msg, msg
    _no_advice(msg)


def test_on_separate_hosts_each_side_names_the_party_whose_pin_failed_and_shows_what_it_holds(mp, tmp_path):
    lab = Lab(tmp_path, mp)
    _wrong_pin_on_server_0(lab)
    got = lab.apart()
    # server 1 was refused: it blames server 0's pin, never its own, and shows its own certificate's fingerprint
    assert "server 0 refused server 1's certificate" in got[1], got[1]
    assert "server 1's pin" not in got[1] and "certs/P0.pem of server 1" not in got[1], got[1]
    assert f"server 1's certificate is sha256 {lab.fp(1, 1)}" in got[1], got[1]
    assert "`invoke certs --id 0`" in got[1], got[1]
    # server 0 refused server 1: its own pin, with the fingerprint it holds, to compare with server 1's
    assert "server 0's pin of server 1" in got[0] and f"server 0 pins sha256 {lab.fp(0, 1)}" in got[0], got[0]
    assert "`invoke certs --id 1`" in got[0], got[0]
    # the dealer refused nobody and nobody refused it: it blames no pin of its own
    assert "the client's pin" not in got[2], got[2]
    for msg in got.values():
        _no_advice(msg)


def test_a_rekeyed_server_0_seen_from_the_dealer_alone_names_the_dealers_pin_with_its_fingerprint(mp, tmp_path):
    lab = Lab(tmp_path, mp)
    certs.make_party_cert(lab.dirs[0], 0, force=True)  # server 0 re-keyed: the others still pin the old one
    got = lab.apart()
    assert "the client refused server 0's certificate" in got[2] or "the dealer (the data owner's client) refused server 0's" in got[2], got[2]
    assert "the dealer (the data owner's client)'s pin of server 0" in got[2] and f"pins sha256 {lab.fp(2, 0)}" in got[2], got[2]
    # server 0 was refused by the client (and by server 1): it shows its own new certificate
    assert f"server 0's certificate is sha256 {lab.fp(0, 0)}" in got[0], got[0]
    _no_advice(got[2] + got[0])


def test_a_missing_peer_is_named_with_its_hosts_file_address(mp, tmp_path):
    lab = Lab(tmp_path, mp, "semi2k")
    start = time.monotonic()
    got = lab.apart([1], timeout=6)
    assert time.monotonic() - start < 30
    assert f"server 0 at {lab.addr[0]}" in got[1] and "never came" in got[1], got[1]
    lab3 = Lab(tmp_path / "dealer", mp)
    got = lab3.apart([0], timeout=6)
    assert f"server 1 at {lab3.addr[1]}" in got[0] and f"the dealer (the data owner's client) at {lab3.addr[2]}" in got[0], got[0]


def test_a_peer_later_than_mpspdz_s_own_60_s_still_joins_within_the_runs_timeout(mp, tmp_path):
    """MP-SPDZ gives up on a peer after 60 s; the run's timeout (mpspdz.timeout, --timeout) is what counts."""
    lab = Lab(tmp_path, mp, "semi2k")
    start = time.monotonic()
    got = lab.apart(timeout=150, delay={1: 66.0})
    assert got == {0: "", 1: ""}, got
    assert time.monotonic() - start > 66
    assert "setup-check: product 12 sum 7" in (tmp_path / "P0.log").read_text()
