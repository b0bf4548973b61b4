"""One server on its own host: ``invoke party`` runs this.

It is the launcher's single-party case: the other server runs the same on its own host, and the
two meet at the addresses of the hosts file, over TLS with the certificates both hold.
"""
from __future__ import annotations

import logging
from pathlib import Path

from preprocessing.fileio import owner_only
from preprocessing.sharing import SharingError

from orchestration.mpspdz.certs import CertError
from orchestration.mpspdz.hosts import HostsError, check_can_listen, check_hosts_for, load_hosts
from orchestration.mpspdz.launcher import PartySpec, bind_shim, run_parties
from orchestration.mpspdz.toolchain import MPSPDZ, MPSPDZError
from orchestration.server.job import Server, cleanup_job, finish_job, prepare_job

logger = logging.getLogger(__name__)

#: what ``invoke party`` turns into a one-line error and exit code 1
ERRORS = (MPSPDZError, SharingError, CertError, HostsError, OSError, ValueError)


@owner_only()
def run_party_job(mp: MPSPDZ, server_dir: Path, party: int, hosts_file: Path, bundle: Path, *,
                  timeout: float = 1800.0, encrypted: bool = True, on_spawn=None) -> Path:
    """Run server ``party``'s side of the job in ``bundle``; returns its ``outputs/<job>`` folder."""
    hosts = load_hosts(hosts_file)
    me = hosts[party]
    check_can_listen(me, party)
    server = Server(Path(server_dir), party)
    prep = prepare_job(mp, server, bundle, encrypted=encrypted)
    try:
        check_hosts_for(hosts, prep.proto, prep.job)
        shim = bind_shim(server.build_dir)
        logger.info("server %d: job %s (%s, protocol %s: %s), listening on %s, peer at %s", party, prep.job,
                    prep.kind, prep.proto.name, prep.proto.summary, me, hosts[1 - party])
        result = run_parties(mp, prep.program, [PartySpec(party, prep.rundir, prep.log, me.address, me.port)], hosts.path,
                             encrypted=encrypted, shim=shim, timeout=timeout, on_spawn=on_spawn, proto=prep.proto)
        return finish_job(prep, result.parties[0])
    finally:
        cleanup_job(prep)
