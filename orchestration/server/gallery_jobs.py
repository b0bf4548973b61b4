"""Runs on a server: one MP-SPDZ party of a gallery job (a person's range check and column, a retraining).

The registry of each server runs its own party; the two meet, with the dealer on its own host (dealer
mode) as party 2, at the job ports: every hosts-file line's port plus :data:`JOB_OFFSET`. The job's
working folder is owner-only and destroyed afterwards (it holds copies of input shares and the key).
What a job prints is public by construction: the one line of revealed range-check bits of
``gallery_enrol`` (``ROWS_OK ...``) and MP-SPDZ's statistics.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from preprocessing.fileio import atomic_write_bytes, destroy_tree, open_private

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.hosts import Hosts
from orchestration.mpspdz.launcher import PartyResult, PartySpec, _kill, _parse, _tail, bind_shim, exit_reason, \
    start_party
from orchestration.mpspdz.rundir import prepare_run
from orchestration.mpspdz.toolchain import MPSPDZ, MPSPDZError, Protocol, compile_program
from orchestration.server.job import Server, header_length, read_shares

logger = logging.getLogger(__name__)

JOB_OFFSET = 400  # a gallery job's MPC port: the hosts-file port + this (the service's own MPC keeps the port)
_ROWS_OK = re.compile(r"^ROWS_OK ([01]+)\s*$", re.M)


def job_hosts(hosts: Hosts, n_parties: int) -> Hosts:
    """The hosts of a gallery job: the service's, each port moved by JOB_OFFSET."""
    return Hosts(hosts.path, tuple(dataclasses.replace(e, port=e.port + JOB_OFFSET) for e in hosts.parties[:n_parties]))


@dataclass
class JobOutput:
    outputs: np.ndarray  # this party's shares written by the program (its persistence file)
    header_from: Path | None  # a copy of the persistence file, for its header (caller destroys it)
    rows_ok: str | None  # the revealed range-check bits, when the program prints them
    stats: PartyResult


def run_job_party(mp: MPSPDZ, server: Server, proto: Protocol, hosts: Hosts, program: str, args: list[str],
                  inputs: np.ndarray, n_out: int, job: str, *, timeout: float = 600.0,
                  keep_header: Path | None = None,
                  announce: Callable[[dict[str, Any] | None], None] | None = None) -> JobOutput:
    """Run this server's party of ``program args`` on ``inputs`` (its shares, in program order); read back
    ``n_out`` shares of its persistence file. Raises MPSPDZError naming the party at fault.

    ``announce`` is told the job (id, program, arguments) before the party starts and None after it ended:
    server 0 shows it in its status, where the dealer learns which program to deal for."""
    party = server.party
    full = compile_program(mp, program, args, server.build_dir, proto=proto)
    certs = certs_mod.check_party_certs(server.root, party, proto.n_parties)
    run = server.root / f"run-gallery-{job}"
    hosts_j = job_hosts(hosts, proto.n_parties)
    try:
        hosts_file = prepare_run(run, certs, server.build_dir, proto, full, hosts_j)
        with open_private(run / "Player-Data" / f"Input-Binary-P{party}-0", "wb") as fh:
            fh.write(np.asarray(inputs, dtype="<u8").tobytes())
        log_path = server.logs / f"gallery-{job}.log"
        me = hosts_j[party]
        spec = PartySpec(party, run, log_path, me.address, me.port)
        proc, log = start_party(mp, spec, full, hosts_file, shim=bind_shim(server.build_dir), proto=proto,
                                every_party_prints=True)
        if announce is not None:
            announce({"id": job, "program": program, "args": list(args)})
        t0 = time.monotonic()
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    _kill(proc)
                    raise MPSPDZError(f"server {party}: gallery job {job} ({program}) did not finish within "
                                      f"{timeout:.0f} s (is the other server{' and the dealer' if proto.dealer else ''} "
                                      "up?)")
                time.sleep(0.02)
        finally:
            log.close()
        text = log_path.read_text(errors="replace")
        if proc.returncode != 0:
            why = exit_reason(log_path, party, proto, {party: run / "Player-Data"}, hosts_file)
            raise MPSPDZError(f"server {party}: gallery job {job} ({program}) failed with exit code "
                              f"{proc.returncode}: {why or ' | '.join(_tail(log_path, 3).splitlines())}")
        stats = PartyResult(party, 0, log_path)
        for line in text.splitlines():
            _parse(line, stats)
        pers = run / "Persistence" / f"Transactions-P{party}.data"
        out = read_shares(pers, 0, n_out)
        if keep_header is not None:  # only the file's signature (no share): new model files start with it
            with open(pers, "rb") as fh:
                atomic_write_bytes(keep_header, fh.read(header_length(pers)))
        m = _ROWS_OK.search(text)
        return JobOutput(out, keep_header, m.group(1) if m else None, stats)
    finally:
        if announce is not None:
            announce(None)
        destroy_tree(run)


__all__ = ["JOB_OFFSET", "JobOutput", "job_hosts", "run_job_party"]
