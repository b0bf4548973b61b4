"""Capture raw frames on one interface (AF_PACKET) into a file of length-prefixed frames.

Run inside a network namespace: ``python capture.py IFACE OUT``; prints "ready" once listening,
stops on SIGTERM. Only IPv4 TCP frames are kept.
"""
from __future__ import annotations

import signal
import socket
import struct
import sys

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33


def main() -> None:
    iface, out = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024 * 1024)
    s.bind((iface, 0))
    s.settimeout(0.2)
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with open(out, "wb") as fh:
        print("ready", flush=True)
        while not stop:
            try:
                frame, addr = s.recvfrom(262144)
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            if len(frame) > 23 and frame[12:14] == b"\x08\x00" and frame[23] == 6:
                fh.write(struct.pack("<I", len(frame)) + frame)


if __name__ == "__main__":
    main()
