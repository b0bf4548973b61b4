"""The servers' hosts file, in MP-SPDZ's format: line i is ``host[:port]`` of party i.

MP-SPDZ reads every line (a blank one counts as a party) and, for a line without a port,
uses its default port base 5000 + i. We accept two lines (the servers) or three (the servers,
then the client that deals preprocessing in the dealer mode), resolve each host to an IPv4
address once, and name the line at fault when something is wrong.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from preprocessing.fileio import atomic_write_text

from orchestration.mpspdz.toolchain import Protocol

logger = logging.getLogger(__name__)

DEFAULT_PORT_BASE = 5000  # MP-SPDZ's default
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class HostsError(ValueError):
    """The hosts file is missing or malformed, or names an address this machine cannot use."""


@dataclass(frozen=True)
class Endpoint:
    host: str  # as written in the file
    address: str  # resolved IPv4 address
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Hosts:
    path: Path
    parties: tuple[Endpoint, ...]

    def __getitem__(self, i: int) -> Endpoint:
        return self.parties[i]

    def __len__(self) -> int:
        return len(self.parties)


def parse_line(text: str, i: int, where: str) -> tuple[str, int]:
    host, sep, port_s = text.rpartition(":") if ":" in text else (text, "", "")
    if not sep:
        host, port = text, DEFAULT_PORT_BASE + i
    else:
        try:
            port = int(port_s)
        except ValueError:
            raise HostsError(f"{where}: port {port_s!r} is not a number (expected host[:port])") from None
    if not 1 <= port <= 65535:
        raise HostsError(f"{where}: port {port} out of range 1..65535")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise HostsError(f"{where}: {host!r} is neither an IPv4 address nor a host name") from None
    return host, port


def load_hosts(path: str | Path) -> Hosts:
    """Read and check a hosts file of 2 or 3 parties (see :func:`check_hosts_for`); names resolved to IPv4."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HostsError(f"hosts file {path} not found (expected two lines: host[:port] of server 0, then server 1)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HostsError(f"hosts file {path} unreadable: {exc}") from None
    lines = text.splitlines()
    allowed = (2, 3)
    if len(lines) not in allowed or any(not ln.strip() for ln in lines):
        want = {2: "two non-empty lines (host[:port] of server 0, then server 1)",
                3: "three non-empty lines (host[:port] of server 0, server 1, then the client that deals)"}
        raise HostsError(f"hosts file {path}: expected {' or '.join(want[n] for n in allowed)}, got {len(lines)} "
                         "line(s); MP-SPDZ counts every line, blank ones too")
    parties = []
    for i, raw in enumerate(lines):
        if raw != raw.strip():
            raise HostsError(f"hosts file {path}, line {i + 1}: remove the spaces around {raw.strip()!r}")
        host, port = parse_line(raw, i, f"hosts file {path}, line {i + 1}")
        try:
            address = socket.gethostbyname(host)
        except OSError as exc:
            raise HostsError(f"hosts file {path}, line {i + 1}: cannot resolve {host!r} ({exc})") from None
        parties.append(Endpoint(host, address, port))
    seen: dict[tuple[str, int], int] = {}
    for i, p in enumerate(parties):
        if (p.address, p.port) in seen:
            raise HostsError(f"hosts file {path}: lines {seen[p.address, p.port] + 1} and {i + 1} are both "
                             f"{p.address}:{p.port}")
        seen[p.address, p.port] = i
    return Hosts(path, tuple(parties))


def write_hosts(path: Path, endpoints: list[tuple[str, int]]) -> Hosts:
    atomic_write_text(Path(path), "".join(f"{h}:{p}\n" for h, p in endpoints))
    return load_hosts(path)


def check_can_listen(ep: Endpoint, party: int) -> None:
    """Fail now, with the reason, if this machine cannot listen at party ``party``'s address and port.

    MP-SPDZ itself would retry a failed bind every second for ten minutes.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as MP-SPDZ does: TIME_WAIT is no conflict
        try:
            s.bind((ep.address, ep.port))
        except OSError as exc:
            import errno

            from orchestration.mpspdz.certs import DEALER, party_label

            me = party_label(party)
            if exc.errno == errno.EADDRINUSE:
                raise HostsError(f"{me}: port {ep.port} on {ep.address} is already in use (hosts file "
                                 f"says {me} listens at {ep}); stop what uses it or pick another port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                run = "`invoke deal`" if party == DEALER else f"`invoke party --id {party}`"
                raise HostsError(f"{me}: address {ep.address} ({ep.host}) from the hosts file is not an "
                                 f"address of this machine; run {run} on that host or fix the file") from None
            raise HostsError(f"{me}: cannot listen at {ep}: {exc}") from None


def check_hosts_for(hosts: Hosts, proto: Protocol, job: str) -> None:
    """The hosts file must list exactly the parties of the job's protocol."""
    if len(hosts) != proto.n_parties:
        who = "server 0, server 1 and the client that deals" if proto.n_parties == 3 else "server 0 and server 1"
        raise HostsError(f"hosts file {hosts.path}: job {job} runs protocol {proto.name}, which needs {proto.n_parties} "
                         f"lines ({who}); the file has {len(hosts)}")
