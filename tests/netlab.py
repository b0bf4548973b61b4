"""Two hosts on one machine: network namespaces joined by a veth pair, with optional netem latency; or three
(:class:`ThreeHosts`: server 0, server 1 and the data owner's client) on one bridge.

Used by the two-host tests, tests/test_operator.py and ``benchmarks/two_hosts.py``. Needs root (or CAP_NET_ADMIN) and
iproute2; :func:`unavailable` says why not, so callers can skip with the reason printed.
"""
from __future__ import annotations

import secrets
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from capture import read_stats

CAPTURE = Path(__file__).with_name("capture.py")
RELAY = Path(__file__).with_name("delay_relay.py")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    name = f"frprobe{secrets.token_hex(3)}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"the kernel or sandbox forbids network namespaces: `ip netns add` said {r.stderr.strip()!r}"
    _ip("netns", "del", name, check=False)
    return None


_NETEM: bool | None = None


def netem_available() -> bool:
    """Whether this kernel has tc's netem qdisc (some VM kernels are built without it)."""
    global _NETEM
    if _NETEM is None:
        name = f"frprobe{secrets.token_hex(3)}"
        _ip("netns", "add", name)
        try:
            r = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                "delay", "1ms"], capture_output=True, text=True)
            _NETEM = r.returncode == 0
        finally:
            _ip("netns", "del", name, check=False)
    return _NETEM


class _Namespaces:
    """Running commands in namespace ``self.ns[i]`` and looking at its listeners."""

    ns: tuple[str, ...]
    veth: tuple[str, ...]  # the interface inside namespace i

    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i], *argv]

    def run(self, i: int, argv: Sequence[str], **kw) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", True)
        return subprocess.run(self.cmd(i, argv), **kw)

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(i, argv), **kw)

    def listeners(self, i: int) -> list[tuple[str, int]]:
        """(address, port) of every listening TCP socket in namespace i."""
        text = self.run(i, ["cat", "/proc/net/tcp"]).stdout
        out = []
        for line in text.splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                ip_hex, port_hex = f[1].split(":")
                ip = ".".join(str(b) for b in struct.pack("<I", int(ip_hex, 16)))
                out.append((ip, int(port_hex, 16)))
        return out

    def capture(self, i: int, out: Path) -> subprocess.Popen:
        """Start capturing TCP frames on namespace i's veth into ``out`` (stop with terminate())."""
        p = self.popen(i, [sys.executable, str(CAPTURE), self.veth[i], str(out)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()  # "ready" once the socket is bound
        if line.strip() != "ready":
            p.kill()
            raise RuntimeError(f"capture on {self.veth[i]} did not start: {line} {p.stderr.read() if p.stderr else ''}")
        return p


class ThreeHosts(_Namespaces):
    """``with ThreeHosts() as net:`` gives namespaces net.ns[0..2] at net.addr[0..2] (server 0, server 1, the
    client), each with a veth into one bridge that lives in a fourth namespace (the "switch"), no added delay.
    Every host reaches every other one at its address; nothing is routed to or from the machine's own network.

    ``outside=True`` also plugs the test's own namespace into the bridge (at ``net.outside_addr``, its veth
    ``net.outside_veth``): clients that run in the test process reach the hosts over the veths, as from a
    fourth machine on the same LAN."""

    def __init__(self, outside: bool = False):
        tag = secrets.token_hex(3)
        self.outside = outside
        self.outside_veth = f"vfr{tag}o"
        self.ns = tuple(f"fr{tag}{c}" for c in "abc")
        self.switch = f"fr{tag}s"
        self.veth = tuple(f"vfr{tag}{c}" for c in "abc")  # inside host i; its peer in the switch is ...s<i>
        octet = 16 + secrets.randbelow(200)
        self.addr = tuple(f"10.232.{octet}.{k + 1}" for k in range(3))
        self.outside_addr = f"10.232.{octet}.9"

    def __enter__(self) -> "ThreeHosts":
        try:
            for ns in (*self.ns, self.switch):
                _ip("netns", "add", ns)
            sw = ["ip", "netns", "exec", self.switch]
            subprocess.run([*sw, "ip", "link", "add", "br0", "type", "bridge"], check=True, capture_output=True)
            subprocess.run([*sw, "ip", "link", "set", "br0", "up"], check=True, capture_output=True)
            for i in range(3):
                port = f"{self.veth[i]}s"
                _ip("link", "add", self.veth[i], "type", "veth", "peer", "name", port)
                _ip("link", "set", self.veth[i], "netns", self.ns[i])
                _ip("link", "set", port, "netns", self.switch)
                subprocess.run([*sw, "ip", "link", "set", port, "master", "br0"], check=True, capture_output=True)
                subprocess.run([*sw, "ip", "link", "set", port, "up"], check=True, capture_output=True)
                self.run(i, ["ip", "addr", "add", f"{self.addr[i]}/24", "dev", self.veth[i]])
                self.run(i, ["ip", "link", "set", self.veth[i], "up"])
                self.run(i, ["ip", "link", "set", "lo", "up"])
            if self.outside:
                port = f"{self.outside_veth}s"
                _ip("link", "add", self.outside_veth, "type", "veth", "peer", "name", port)
                _ip("link", "set", port, "netns", self.switch)
                subprocess.run([*sw, "ip", "link", "set", port, "master", "br0"], check=True, capture_output=True)
                subprocess.run([*sw, "ip", "link", "set", port, "up"], check=True, capture_output=True)
                _ip("addr", "add", f"{self.outside_addr}/24", "dev", self.outside_veth)
                _ip("link", "set", self.outside_veth, "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.outside:
            _ip("link", "del", self.outside_veth, check=False)  # its peer in the switch goes with it
        for ns in (*self.ns, self.switch):
            _ip("netns", "del", ns, check=False)  # removes the veth pairs and the bridge too

    def hosts_text(self, ports: tuple[int, int, int]) -> str:
        """The hosts file every party uses (the same on all three): one ``address:port`` line per party."""
        return "".join(f"{self.addr[i]}:{ports[i]}\n" for i in range(3))


class TwoHosts(_Namespaces):
    """``with TwoHosts(rtt_ms=20) as net:`` gives namespaces net.ns[0], net.ns[1] at net.addr[0], net.addr[1]."""

    def __init__(self, rtt_ms: float = 0.0):
        tag = secrets.token_hex(3)
        self.ns = (f"fr{tag}a", f"fr{tag}b")
        self.veth = (f"vfr{tag}a", f"vfr{tag}b")
        octet = 16 + secrets.randbelow(200)
        self.addr = (f"10.231.{octet}.1", f"10.231.{octet}.2")
        self.netem_rtt_ms = rtt_ms
        self.delay = "none" if not rtt_ms else ("netem" if netem_available() else "relay")
        self.relay: subprocess.Popen | None = None
        self.relay_port: int | None = None
        self.extra_relays: list[subprocess.Popen] = []
        self.relayed: set[int] = set()

    def __enter__(self) -> "TwoHosts":
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
            _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
            for i in range(2):
                _ip("link", "set", self.veth[i], "netns", self.ns[i])
                self.run(i, ["ip", "addr", "add", f"{self.addr[i]}/24", "dev", self.veth[i]])
                self.run(i, ["ip", "link", "set", self.veth[i], "up"])
                self.run(i, ["ip", "link", "set", "lo", "up"])
                if self.delay == "netem":
                    # half the round trip each way
                    self.run(i, ["tc", "qdisc", "add", "dev", self.veth[i], "root", "netem", "delay",
                                 f"{self.netem_rtt_ms / 2:g}ms"])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for r in [self.relay, *self.extra_relays]:
            if r is None:
                continue
            r.terminate()
            try:
                r.wait(timeout=5)
            except subprocess.TimeoutExpired:
                r.kill()
        for ns in self.ns:
            _ip("netns", "del", ns, check=False)  # removes the veth pair too

    def hosts_text(self, i: int, ports: tuple[int, ...]) -> str:
        """The hosts file for party i. Without netem, server 1 reaches server 0 through a delaying relay
        in its own namespace (MP-SPDZ's connections all go from higher to lower party numbers).

        With three ports (dealer mode) a third line places the client: it runs in server 1's namespace,
        at server 1's address on ports[2], and reaches server 0 the way server 1 does."""
        if len(ports) == 3:
            return self.hosts_text(1 if i == 2 else i, ports[:2]) + f"{self.addr[1]}:{ports[2]}\n"
        if i == 1 and self.delay == "relay":
            if self.relay is None:
                self.relay_port = ports[0] + 1000
                self.relay = self.popen(1, [sys.executable, str(RELAY), f"127.0.0.1:{self.relay_port}",
                                            f"{self.addr[0]}:{ports[0]}", f"{self.netem_rtt_ms / 2:g}"],
                                        stdout=subprocess.PIPE, text=True)
                assert self.relay.stdout is not None
                if self.relay.stdout.readline().strip() != "ready":
                    raise RuntimeError("delay relay did not start")
            elif self.relay_port != ports[0] + 1000:  # another set of ports (the service beside the jobs)
                if ports[0] + 1000 not in self.relayed:
                    self.add_relay(1, ports[0] + 1000, (self.addr[0], ports[0]))
                    self.relayed.add(ports[0] + 1000)
                return f"127.0.0.1:{ports[0] + 1000}\n{self.addr[1]}:{ports[1]}\n"
            return f"127.0.0.1:{self.relay_port}\n{self.addr[1]}:{ports[1]}\n"
        return f"{self.addr[0]}:{ports[0]}\n{self.addr[1]}:{ports[1]}\n"

    def add_relay(self, i: int, local_port: int, target: tuple[str, int]) -> None:
        """In namespace i, 127.0.0.1:local_port forwards to ``target`` with this lab's delay (relay mode only)."""
        r = self.popen(i, [sys.executable, str(RELAY), f"127.0.0.1:{local_port}", f"{target[0]}:{target[1]}",
                           f"{self.netem_rtt_ms / 2:g}"], stdout=subprocess.PIPE, text=True)
        assert r.stdout is not None
        if r.stdout.readline().strip() != "ready":
            raise RuntimeError("delay relay did not start")
        self.extra_relays.append(r)

    def rtt_ms(self) -> float:
        """Median round trip from namespace 0 to 1: a TCP connect to a closed port (SYN, RST).
        (With the relay, the delay is on server 1's path to server 0 only: see :meth:`hosts_text`.)"""
        code = ("import socket,time,statistics\nts=[]\nfor _ in range(7):\n s=socket.socket();t=time.perf_counter()\n"
                f" try: s.connect(('{self.addr[1]}', 9))\n except OSError: pass\n"
                " ts.append(time.perf_counter()-t); s.close()\nprint(statistics.median(ts)*1000)")
        return float(self.run(0, [sys.executable, "-c", code]).stdout)


def tcp_streams(capture_file: Path) -> dict[tuple[str, int, str, int], bytes]:
    """Reassemble the TCP payload of each direction of each connection in a capture (by sequence number).

    Raises ValueError if the capture itself lost frames (the counts tests/capture.py wrote on exit) or if a
    stream has a hole."""
    stats = read_stats(Path(capture_file))
    if stats and (stats["drops"] or stats["truncated"]):
        raise ValueError(f"the capture {capture_file} lost frames ({stats}): the harness fell behind, "
                         "the streams cannot be checked")
    # Per direction: offset from its first captured sequence number (modulo 2**32, so a stream may wrap) ->
    # the longest payload seen there. A retransmission starts where the lost segment started but may be
    # shorter (after a timeout TCP resends one MSS of a 64 KiB GSO frame): keeping the last one seen would
    # open a hole in the stream.
    base: dict[tuple[str, int, str, int], int] = {}
    segs: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
    data = Path(capture_file).read_bytes()
    pos = 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        frame = data[pos + 4:pos + 4 + n]
        pos += 4 + n
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack_from(">H", ip, 2)[0] or len(ip)  # 0: a BIG TCP frame over 64 KiB
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from(">HHI", tcp, 0)
        off = (tcp[12] >> 4) * 4
        payload = bytes(tcp[off:])
        if payload:
            key = (src, sport, dst, dport)
            rel = (seq - base.setdefault(key, seq)) % 2**32
            rel = rel - 2**32 if rel >= 2**31 else rel  # a retransmission of bytes sent before the first frame
            held = segs.setdefault(key, {})
            if len(payload) > len(held.get(rel, b"")):
                held[rel] = payload
    streams = {}
    for key, by_off in segs.items():
        offs = sorted(by_off)
        buf = bytearray()
        nxt = offs[0]
        for s in offs:
            p = by_off[s]
            if s > nxt:
                at = (base[key] + nxt) % 2**32
                raise ValueError(f"capture misses bytes of {key} at sequence {at} (capture counts: {stats})")
            if s + len(p) <= nxt:
                continue
            buf += p[nxt - s:]
            nxt = s + len(p)
        streams[key] = bytes(buf)
    return streams


def tls_records(stream: bytes) -> list[tuple[int, int]]:
    """Split a byte stream into TLS records [(content type, length)]; ValueError if it is not TLS."""
    out = []
    pos = 0
    while pos < len(stream):
        if pos + 5 > len(stream):
            raise ValueError(f"{len(stream) - pos} trailing bytes are no TLS record header")
        ctype, major, minor, length = struct.unpack_from(">BBBH", stream, pos)
        if ctype not in (20, 21, 22, 23) or major != 3 or minor > 4 or length > 2 ** 14 + 2048:
            raise ValueError(f"bytes at offset {pos} are no TLS record (type {ctype}, version {major}.{minor}, "
                             f"length {length})")
        out.append((ctype, length))
        pos += 5 + length
    return out


def split_preamble(stream: bytes) -> tuple[bytes, bytes]:
    """MP-SPDZ names the connecting party in the clear before TLS starts: a 4-byte length and an
    ASCII id such as ``machineP1``. Returns (that id, the rest); (b"", stream) if there is none."""
    if not stream or stream[0] == 22:
        return b"", stream
    n = int.from_bytes(stream[:4], "little")
    ident = stream[4:4 + n]
    if 0 < n <= 64 and len(ident) == n and ident.isascii() and ident.decode().isprintable():
        return ident, stream[4 + n:]
    return b"", stream


def tls_handshake_messages(stream: bytes) -> list[tuple[int, bytes]]:
    """The handshake messages sent in the clear at the start of a TLS stream: [(type, body)].

    Reassembles handshake records up to the first ChangeCipherSpec (after which TLS 1.2 encrypts);
    type 1 is ClientHello, 2 ServerHello, 11 Certificate. ValueError if the stream is not TLS."""
    buf = bytearray()
    pos = 0
    while pos + 5 <= len(stream):
        ctype, _, _, length = struct.unpack_from(">BBBH", stream, pos)
        if ctype not in (20, 21, 22, 23):
            raise ValueError(f"bytes at offset {pos} are no TLS record (type {ctype})")
        if ctype != 22:
            break
        buf += stream[pos + 5:pos + 5 + length]
        pos += 5 + length
    out = []
    k = 0
    while k + 4 <= len(buf):
        mtype = buf[k]
        n = int.from_bytes(buf[k + 1:k + 4], "big")
        if k + 4 + n > len(buf):
            break
        out.append((mtype, bytes(buf[k + 4:k + 4 + n])))
        k += 4 + n
    return out


def hello_fields(mtype: int, body: bytes) -> dict:
    """version, cipher suites (ClientHello: offered; ServerHello: chosen) and extensions {type: data} of a hello."""
    version = body[0] << 8 | body[1]
    k = 2 + 32
    k += 1 + body[k]  # session id
    if mtype == 1:
        n = int.from_bytes(body[k:k + 2], "big")
        suites = [int.from_bytes(body[k + 2 + j:k + 4 + j], "big") for j in range(0, n, 2)]
        k += 2 + n
        k += 1 + body[k]  # compression methods
    else:
        suites = [int.from_bytes(body[k:k + 2], "big")]
        k += 3  # cipher suite, compression method
    ext: dict[int, bytes] = {}
    if k + 2 <= len(body):
        end = k + 2 + int.from_bytes(body[k:k + 2], "big")
        k += 2
        while k + 4 <= end:
            etype, elen = struct.unpack_from(">HH", body, k)
            ext[etype] = body[k + 4:k + 4 + elen]
            k += 4 + elen
    return {"version": version, "suites": suites, "extensions": ext}
