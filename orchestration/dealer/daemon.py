"""Runs on the dealer's host: deal for the service and for every gallery job, until stopped.

``invoke deal --serve`` on the dealer's host runs :func:`run_dealer`. Its folder (``<var>/dealer``) holds
``certs/P2.key|pem`` (its MPC identity, pinned on both servers as party 2), ``certs/client.key|pem``
(role ``dealer``: how it asks server 0's gateway for its status) and both servers' certificates.

Server 0's status says which program the service runs (sizes, batch, names mode) and, while one runs,
which gallery job (program and arguments). For each, the dealer compiles the same program and runs
party 2 of it: the service's at the hosts-file ports, a job's at those ports plus the job offset. Two
runs may be in flight at once (a recognition session and a job), each in its own working folder.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocessing.fileio import destroy_tree

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.hosts import Hosts
from orchestration.mpspdz.launcher import PartySpec, _kill, bind_shim, exit_reason, start_party
from orchestration.mpspdz.rundir import prepare_run
from orchestration.mpspdz.toolchain import MPSPDZ, MPSPDZError, Protocol, compile_program
from orchestration.shared.model import PREDICT_PROGRAM
from orchestration.shared.ports import CLIENT_OFFSET, service_program_args, status_lanes
from orchestration.shared.wire import WireError, receive, send

logger = logging.getLogger(__name__)

JOB_OFFSET = 400  # as orchestration.server.gallery_jobs.JOB_OFFSET (the dealer imports no server code)
POLL = 0.1


def status_context(dealer_dir: Path) -> ssl.SSLContext:
    """TLS towards server 0's gateway: the dealer's client certificate, server 0's certificate pinned."""
    key, pem = certs_mod.client_files(dealer_dir)
    server0 = certs_mod.cert_dir(dealer_dir) / "P0.pem"
    for path, how in ((pem, "invoke certs --client NAME --role dealer"), (server0, "invoke certs --id 2 "
                                                                                   "--peer-cert P0.pem")):
        if not path.is_file():
            raise certs_mod.CertError(f"{path} missing: run `{how}` on the dealer's host")
    ctx = certs_mod.harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_cert_chain(pem, key)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(server0))
    return ctx


class StatusLink:
    """One TLS connection to server 0's gateway, kept open for the status polls (opened again when lost)."""

    def __init__(self, ctx: ssl.SSLContext, hosts: Hosts, timeout: float = 5.0):
        self.ctx, self.addr, self.timeout = ctx, (hosts[0].address, hosts[0].port + CLIENT_OFFSET), timeout
        self.sock: ssl.SSLSocket | None = None

    def status(self) -> dict[str, Any]:
        for attempt in (0, 1):
            try:
                if self.sock is None:
                    raw = socket.create_connection(self.addr, timeout=self.timeout)
                    self.sock = self.ctx.wrap_socket(raw)
                    self.sock.settimeout(self.timeout)
                send(self.sock, {"type": "status"})
                header, _ = receive(self.sock, max_body=0)
                break
            except (OSError, ssl.SSLError, WireError):
                self.close()
                if attempt:
                    raise
        if header.get("type") != "status":
            self.close()
            raise WireError(f"server 0 answered {str(header.get('type'))[:40]!r} to a status request: "
                            f"{str(header.get('message'))[:300]}")
        return header

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


@dataclass
class Run:
    key: tuple[Any, ...]
    proc: subprocess.Popen[bytes]
    log: Any
    folder: Path
    hosts_file: Path
    log_path: Path


class Dealer:
    """Party 2 of the service's session and of each gallery job server 0 announces."""

    def __init__(self, mp: MPSPDZ, dealer_dir: Path, build: Path, hosts: Hosts, proto: Protocol):
        if proto.dealer is None:
            raise ValueError(f"protocol {proto.name} has no dealer: the servers make their randomness by OT")
        certs_mod.refuse_to_deal_as_source(dealer_dir)
        self.mp, self.dir, self.build, self.hosts, self.proto = mp, Path(dealer_dir), Path(build), hosts, proto
        self.certs = certs_mod.check_party_certs(self.dir, proto.dealer, proto.n_parties)
        self.ctx = status_context(self.dir)
        self.runs: dict[str, Run | None] = {"service": None, "job": None}
        self.dealt = {"service": 0, "job": 0}
        self.last: dict[str, tuple[Any, ...]] = {}

    def _start(self, slot: str, key: tuple[Any, ...], program: str, args: list[str], offset: int) -> Run:
        full = compile_program(self.mp, program, args, self.build, proto=self.proto)
        hosts = Hosts(self.hosts.path, tuple(dataclasses.replace(e, port=e.port + offset)
                                             for e in self.hosts.parties[:self.proto.n_parties]))
        folder = self.dir / f"run-{slot}"
        hosts_file = prepare_run(folder, self.certs, self.build, self.proto, full, hosts)
        me = hosts[self.proto.dealer]
        log_path = self.dir / "logs" / f"dealer-{slot}.log"
        spec = PartySpec(self.proto.dealer, folder, log_path, me.address, me.port)
        proc, log = start_party(self.mp, spec, full, hosts_file, shim=bind_shim(self.build), proto=self.proto)
        logger.info("dealer: dealing for %s %s (pid %d)", slot, full, proc.pid)
        self.dealt[slot] += 1
        return Run(key, proc, log, folder, hosts_file, log_path)

    def _end(self, slot: str, kill: bool) -> None:
        run = self.runs[slot]
        if run is None:
            return
        if kill and run.proc.poll() is None:
            _kill(run.proc)
        run.log.close()
        if run.proc.returncode:
            why = exit_reason(run.log_path, self.proto.dealer, self.proto, hosts_file=run.hosts_file)
            logger.info("dealer: %s run ended with exit code %s%s", slot, run.proc.returncode, f": {why}" if why else "")
        destroy_tree(run.folder)
        self.runs[slot] = None

    def step(self, st: dict[str, Any]) -> None:
        """One look at server 0's status: start, keep or end the two runs."""
        wanted: dict[str, tuple[tuple[Any, ...], str, list[str], int] | None] = {"service": None, "job": None}
        if st.get("state") in ("starting", "serving") and st.get("protocol") == self.proto.name:
            args = service_program_args(int(st["batch"]), int(st["d1"]), int(st["c"]), int(st["exp_bits"]),
                                        st.get("names"), **status_lanes(st))
            wanted["service"] = (("service", *args), PREDICT_PROGRAM, args, 0)  # a RELOAD keeps the run
        job = st.get("job")
        if isinstance(job, dict):
            args = [str(a) for a in job.get("args", [])]
            wanted["job"] = (("job", job.get("id"), *args), str(job.get("program")), args, JOB_OFFSET)
        for slot, want in wanted.items():
            run = self.runs[slot]
            if run is not None and run.proc.poll() is not None:
                self._end(slot, kill=False)
                run = None
            if run is not None and want is not None and want[0] == run.key:
                continue  # dealing for it now
            if run is not None and (want is not None or slot == "service"):
                self._end(slot, kill=True)  # the servers moved on (a new session, a new job, no session)
            if want is None:
                continue
            # a job is dealt once; a session's dealer that ended is started again (the servers start a new
            # session after any failure, with the same program)
            if slot == "job" and want[0] == self.last.get(slot):
                continue
            key, program, args, offset = want
            self.runs[slot] = self._start(slot, key, program, args, offset)
            self.last[slot] = key

    def close(self) -> None:
        for slot in self.runs:
            self._end(slot, kill=True)


def run_dealer(mp: MPSPDZ, dealer_dir: Path, build: Path, hosts: Hosts, proto: Protocol,
               stop: threading.Event) -> None:
    """Deal until ``stop`` is set."""
    dealer = Dealer(mp, dealer_dir, build, hosts, proto)
    link = StatusLink(dealer.ctx, hosts)
    warned = False
    try:
        while not stop.is_set():
            try:
                st = link.status()
                warned = False
            except (OSError, ssl.SSLError, WireError) as exc:
                if not warned:
                    logger.info("dealer: waiting for server 0 (%s)", str(exc)[:200])
                    warned = True
                stop.wait(0.5)
                continue
            try:
                dealer.step(st)
            except (MPSPDZError, certs_mod.CertError, ValueError, KeyError, TypeError) as exc:
                logger.error("dealer: %s", exc)
                stop.wait(1.0)
            stop.wait(POLL)
    finally:
        link.close()
        dealer.close()


__all__ = ["Dealer", "JOB_OFFSET", "StatusLink", "run_dealer", "status_context"]
