"""Capture raw frames on one interface (AF_PACKET) into a file of length-prefixed frames.

Run inside a network namespace: ``python capture.py IFACE OUT``; prints "ready" once listening,
stops on SIGTERM. Only IPv4 TCP frames are kept. On exit it writes ``OUT.stats``: the kernel's count of
frames it handed over and of frames it dropped (the socket's buffer was full), and the count of frames longer
than the receive buffer, so that a reader can tell a harness that fell behind from a stream that is not TLS.

The tests that read these captures run beside CPU-heavy MPC parties on a small machine: the capture asks for a
higher scheduling priority and a large socket buffer (both need root, which the namespaces need anyway) so
that a few hundred milliseconds without the CPU cost no frames.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from pathlib import Path

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
BUFFER = 512 * 1024 * 1024
FRAME_MAX = 1 << 20  # far above a veth's GSO frame (64 KiB unless BIG TCP is configured)


def stats_path(out: Path) -> Path:
    return out.with_name(out.name + ".stats")


def read_stats(out: Path) -> dict[str, int] | None:
    """The counts a finished capture of ``out`` wrote (None if it wrote none)."""
    p = stats_path(Path(out))
    if not p.exists():
        return None
    return {k: int(v) for k, v in (item.split("=") for item in p.read_text().split())}


def main() -> None:
    iface, out = sys.argv[1], Path(sys.argv[2])
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -15)
    except OSError:
        pass
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    s.bind((iface, 0))
    s.settimeout(0.2)
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    buf = bytearray(FRAME_MAX)
    view = memoryview(buf)
    truncated = 0
    with open(out, "wb", buffering=8 * 1024 * 1024) as fh:
        print("ready", flush=True)
        while not stop:
            try:
                n = s.recv_into(buf, 0, socket.MSG_TRUNC)  # n: the frame's real length
            except (socket.timeout, InterruptedError):
                continue
            if n > FRAME_MAX:
                truncated += 1
                n = FRAME_MAX
            if n > 23 and buf[12:14] == b"\x08\x00" and buf[23] == 6:
                fh.write(struct.pack("<I", n))
                fh.write(view[:n])
    packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))  # packets counts drops
    stats_path(out).write_text(f"packets={packets} drops={drops} truncated={truncated}\n")


if __name__ == "__main__":
    main()
