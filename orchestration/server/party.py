"""Runs on a server: the gateway's driver of its own MP-SPDZ party (``face_predict.mpc`` in serve mode).

The party is MP-SPDZ's ``semi2k-party.x`` or ``dealer-ring-party.x``, started in a working folder of
its own (``<server>/service``, owner-only), with this server's model share as its persistence file.
The gateway is the party's one MP-SPDZ client (``C<i>``, TLS on loopback with a throw-away key), with one
connection per lane (the program's request loops, each an MP-SPDZ thread: batches in flight at once): per
batch it sends a command and ``batch`` x ``d1`` shares on the lane's connection, and reads back ``k * batch``
shares. This module knows the octetStream framing (MP-SPDZ's ExternalIO/client.py) and nothing about clients.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from preprocessing.fileio import copy_private, destroy_file, destroy_tree

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.launcher import PartySpec, _kill, _tail, bind_shim, exit_reason, start_party
from orchestration.mpspdz.rundir import prepare_run
from orchestration.mpspdz.toolchain import MPSPDZ, Protocol, compile_program
from orchestration.server.job import PREDICT_PROGRAM, Server
from orchestration.shared.ports import ServicePorts, service_program_args
from orchestration.shared.wire import recv_exact

logger = logging.getLogger(__name__)

CMD_SERVE, CMD_RELOAD = 1, 2


class SessionEnded(RuntimeError):
    """The party, the link or the other server went away: start a new session."""


class Switching(SessionEnded):
    """Both servers restart their parties for a model generation of other sizes (a planned end)."""


class PartyDriver:
    """Server ``server.party``'s MP-SPDZ party for one session at a time."""

    def __init__(self, mp: MPSPDZ, server: Server, build: Path, ports: ServicePorts, proto: Protocol, batch: int, *,
                 party_timeout: float, start_timeout: float, lanes: int = 1, quick: bool = False):
        self.mp, self.server, self.build, self.ports, self.proto = mp, server, Path(build), ports, proto
        self.party, self.batch, self.lanes, self.quick = server.party, batch, lanes, quick
        self.lane_batch = [1] * quick + [batch] * lanes  # queries per batch of each lane (the quick lane first)
        self.party_timeout, self.start_timeout = party_timeout, start_timeout
        self.rundir = server.root / "service"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.socks: list[ssl.SSLSocket] = []  # one per lane, in the order the party accepted them
        self.outputs = 3  # answer values per query of the program running: best, S, z_max (names mode: name words + 1)

    @property
    def log_path(self) -> Path:
        return self.server.logs / "service-party.log"

    def install_model(self, gen: str) -> None:
        """The service's copy of generation ``gen``'s share; the previous copy is overwritten, then unlinked."""
        src = self.server.model_file(self.server.models / gen)
        dest = self.rundir / "Persistence" / f"Transactions-P{self.party}.data"
        tmp = dest.with_name(f".{dest.name}.new")
        copy_private(src, tmp)
        if dest.exists():
            destroy_file(dest)
        os.replace(tmp, dest)

    def start(self, model: dict[str, Any], certs: certs_mod.PartyCerts) -> None:
        args = service_program_args(self.batch, model["d1"], model["c"], model["exp_bits"], model.get("names"),
                                    self.lanes, self.quick)
        self.outputs = 3 if model.get("names") is None else int(model["names"][0]) + 1
        program = compile_program(self.mp, PREDICT_PROGRAM, args, self.build, proto=self.proto)
        hosts_file = prepare_run(self.rundir, certs, self.build, self.proto, program, self.ports.hosts,
                                 self.ports.spdz(self.party)[1] - self.party)
        for lane in range(len(self.lane_batch)):
            certs_mod.make_gateway_cert(self.rundir / "Player-Data", self.client_id(lane))
        self.install_model(model["gen"])
        me = self.ports.hosts[self.party]
        spec = PartySpec(self.party, self.rundir, self.log_path, me.address, me.port)
        self.proc, self._log = start_party(self.mp, spec, program, hosts_file, shim=bind_shim(self.build),
                                           proto=self.proto)
        logger.info("server %d: party started (%s, program %s, pid %d)", self.party, self.proto.name, program,
                    self.proc.pid)

    def stop(self) -> None:
        for sock in self.socks:
            try:
                sock.close()
            except OSError:
                pass
        self.socks = []
        if self.proc is not None:
            _kill(self.proc)  # SIGTERM to its process group, SIGKILL after 3 s
            self.proc = None
            self._log.close()
        destroy_tree(self.rundir)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            # why, from its log and the certificates in its run folder (still there: stop() destroys it)
            why = exit_reason(self.log_path, self.party, self.proto, {self.party: self.rundir / "Player-Data"},
                              self.rundir / "hosts")
            tail = " | ".join(_tail(self.log_path, 3).splitlines())
            raise SessionEnded(f"party {self.party} exited with code {self.proc.returncode}: "
                               + (f"{why} (its last lines: {tail})" if why else tail))

    def client_id(self, lane: int) -> int:
        """Lane ``lane``'s MP-SPDZ client id (C<id>): MP-SPDZ refuses a second connection with an id it has, so
        each lane connects with its own, party + 2 * lane (lane 0: the party's number, as with one lane)."""
        return self.party + 2 * lane

    def connect(self, give_up: Callable[[], bool]) -> None:
        """Connect every lane to our party as MP-SPDZ client C<id> once it listens (after it met the other
        parties): one after the other, each TLS handshake done before the next connection, so that the party
        (which shakes hands as it accepts) accepts them in lane order."""
        self.socks = []
        for lane in range(len(self.lane_batch)):
            self.socks.append(self._connect_one(self.client_id(lane), give_up))

    def _connect_one(self, client_id: int, give_up: Callable[[], bool]) -> ssl.SSLSocket:
        addr = self.ports.spdz(self.party)
        pdata = self.rundir / "Player-Data"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(pdata / f"C{client_id}.pem", pdata / f"C{client_id}.key")
        ctx.load_verify_locations(cafile=str(pdata / f"P{self.party}.pem"))
        ctx.check_hostname = False
        deadline = time.monotonic() + self.start_timeout
        while True:
            self.check_alive()
            if give_up():
                raise SessionEnded("stopping")
            try:
                raw = socket.create_connection(addr, timeout=2.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SessionEnded(f"party {self.party} did not start listening within {self.start_timeout:.0f} s "
                                       f"(is the other server{' and the dealer' if self.proto.dealer else ''} up?)")
                time.sleep(0.1)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(octets(str(client_id).encode()))
        sock = ctx.wrap_socket(raw, server_hostname=f"P{self.party}")
        sock.settimeout(self.party_timeout)
        spec = octets_receive(sock)
        if spec[:4] != b"R\x00\x00\x00" or int.from_bytes(spec[4:8], "little") != 64:
            sock.close()
            raise SessionEnded(f"party {self.party} computes over an unexpected domain {spec[:12]!r}")
        return sock

    def run_batch(self, command: int, x: np.ndarray, lane: int = 0) -> np.ndarray:
        """One batch on ``lane``: ``x`` is ``batch`` x ``d1`` of this server's shares. Returns ``batch`` x k answer
        shares (k = 3: best, S, z_max; names mode: the L name words and accept * z_max). One caller per lane."""
        if not 0 <= lane < len(self.socks):
            raise SessionEnded(f"lane {lane}: the party has {len(self.socks)} connected")
        sock, batch = self.socks[lane], self.lane_batch[lane]
        if x.shape[0] != batch:
            raise SessionEnded(f"a batch of {x.shape[0]} queries, lane {lane} of the party takes {batch}")
        sock.sendall(octets(np.array([command, 0, 0], dtype="<i8").tobytes()))
        sock.sendall(octets(x.astype("<u8").tobytes()))
        try:
            out = octets_receive(sock)
        except socket.timeout:
            raise SessionEnded(f"party {self.party} did not answer within {self.party_timeout:.0f} s") from None
        vals = np.frombuffer(out, dtype="<u8").astype(np.uint64)
        k = self.outputs
        if len(vals) != k * batch:
            raise SessionEnded(f"party {self.party} answered {len(vals)} shares on lane {lane}, expected {k * batch}")
        # write_shares_to_socket interleaves its vectors: query 0's k values, then query 1's, ...
        return vals.reshape(batch, k)


# ---- MP-SPDZ's octetStream framing (ExternalIO/client.py) ----------------------------------------

def octets(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + payload


def octets_receive(sock: ssl.SSLSocket, limit: int = 1 << 30) -> bytes:
    n = int.from_bytes(recv_exact(sock, 4), "little")
    if n > limit:
        raise SessionEnded(f"the party announced {n} bytes")
    return recv_exact(sock, n)


__all__ = ["CMD_RELOAD", "CMD_SERVE", "PartyDriver", "SessionEnded", "Switching", "octets", "octets_receive"]
