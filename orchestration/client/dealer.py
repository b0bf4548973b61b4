"""The client's dealer party (dealer mode): correlated randomness for one job, nothing else.

In the dealer mode the client, trusted data owner, joins each protocol run as the third party
(MP-SPDZ's ``dealer-ring-party.x``, party 2). It draws multiplication and matrix triples, random
bits and edaBits from its own CSPRNG for this run only and sends each server its shares of them;
the servers use them once and only ever open values masked by them. The dealer holds no data
input; openings run between the two servers only (MP-SPDZ's DealerMC leaves the dealer out).
MP-SPDZ's dealer binary always speaks TLS, so the client's certificates are always needed.

Its run folder, under the client's folder::

    run-<job>/Programs -> the compiled program (the same bytecode the servers run)
    run-<job>/Player-Data/  P2.key, P2.pem and the servers' P0.pem, P1.pem (pinned)
    logs/<job>.log          MP-SPDZ's output of the dealer

Nothing of a run is kept: randomness lives in the dealer's memory for the run and is gone
with the process, so no triple can be dealt twice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from preprocessing.fileio import destroy_tree, owner_only, private_dir

from orchestration.mpspdz import certs as certs_mod
from orchestration.client.jobs import CollectError, load_pending
from orchestration.mpspdz.hosts import check_can_listen, check_hosts_for, load_hosts
from orchestration.mpspdz.launcher import PartySpec, RunResult, bind_shim, run_parties
from orchestration.mpspdz.toolchain import MPSPDZ, Protocol, compile_program, programs_dir, protocol

logger = logging.getLogger(__name__)


@dataclass
class DealerRun:
    job: str
    proto: Protocol
    program: str  # compiled program name
    rundir: Path
    log: Path

    @property
    def party(self) -> int:
        assert self.proto.dealer is not None
        return self.proto.dealer


@owner_only()
def prepare_dealer(mp: MPSPDZ, client: Path, build: Path, job: str) -> DealerRun:
    """The dealer's run folder for the pending job ``job`` of the client in ``client`` (owner-only)."""
    pending = load_pending(client, job)
    proto = protocol(pending.get("protocol", "semi2k"))
    if proto.dealer is None:
        raise CollectError(f"job {job} runs protocol {proto.name}, which has no dealer: nothing for the client to run")
    party_certs = certs_mod.check_party_certs(client, proto.dealer, proto.n_parties)
    program = compile_program(mp, pending["program"], [str(a) for a in pending["program_args"]], build, proto=proto)
    private_dir(client)
    run = Path(client) / f"run-{job}"
    destroy_tree(run)
    (run / "Player-Data").mkdir(parents=True)
    (run / "Persistence").mkdir()
    (run / "Programs").symlink_to(programs_dir(Path(build).resolve(), proto))
    certs_mod.install_for_run(party_certs, run / "Player-Data")
    return DealerRun(job, proto, program, run, Path(client) / "logs" / f"{job}.log")


def cleanup_dealer(run: DealerRun) -> None:
    """Destroy the run folder (it holds a copy of the client's key), as the servers do with theirs."""
    destroy_tree(run.rundir)


@owner_only()
def run_dealer(mp: MPSPDZ, client: Path, build: Path, hosts_file: Path, job: str, *, timeout: float = 1800.0,
               on_spawn=None) -> RunResult:
    """Two hosts: the client's dealer party of job ``job``, run while both servers run ``invoke party``.

    The hosts file is the servers' one with a third line for the client's address."""
    run = prepare_dealer(mp, client, build, job)
    try:
        hosts = load_hosts(hosts_file)
        check_hosts_for(hosts, run.proto, job)
        me = hosts[run.party]
        check_can_listen(me, run.party)
        logger.info("client: dealing for job %s, servers at %s and %s", job, hosts[0], hosts[1])
        return run_parties(mp, run.program, [PartySpec(run.party, run.rundir, run.log, me.address, me.port)],
                           hosts.path, encrypted=True, shim=bind_shim(build), timeout=timeout, on_spawn=on_spawn,
                           proto=run.proto)
    finally:
        cleanup_dealer(run)
