"""The recognition service's messages, shared by the client and both servers' gateways.

Every message is one frame::

    u32 length (little-endian, of what follows) | u32 header length | header (JSON, UTF-8) | body

The header says what the message is; the body is raw little-endian u64 shares (or empty). A frame
longer than :data:`MAX_FRAME`, a header that is not a JSON object with a known ``type``, or a body
that does not have the size its header announces is a :class:`WireError`: the gateway logs it,
answers with an error frame if it still can, and closes that one connection.

What crosses the wire (see the README's security section): from the client to server i only its
additive shares of the queries, a request id (random), the model generation it expects and sizes;
back only server i's shares of the answer. Nothing in a header is derived from a face.

Messages (``type``):

    client -> server   status                          what does the service serve?
                       recognize  id gen n d1 + body    n x d1 query shares (u64)
    server -> client   status     party gen d1 c batch
                       result     id gen n + body       n best-class shares, then n denominator shares
                       error      id code message       code: see ERROR_CODES
    server 0 <-> 1     hello / plan / done / have       the gateways' own link (orchestration.server.gateway)
"""
from __future__ import annotations

import json
import socket
import struct
from typing import Any, Callable

import numpy as np

MAX_FRAME = 64 << 20  # 64 MiB: 8,000 queries of 129 shares fit many times over
MAX_HEADER = 64 << 10
ERROR_CODES = ("generation", "bad-request", "unavailable", "failed", "busy", "refused")


class WireError(RuntimeError):
    """A frame that breaks the protocol (the connection is dropped) or a peer that went away."""


class ServiceError(RuntimeError):
    """The service answered a request with an error (``code`` is one of :data:`ERROR_CODES`)."""

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError("connection closed" if not buf else f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<II", 4 + len(head) + len(body), len(head)) + head + body


def send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    sock.sendall(encode(header, body))


def receive(sock: socket.socket, check: Callable[[dict[str, Any]], int] | None = None,
            max_body: int = MAX_FRAME) -> tuple[dict[str, Any], bytes]:
    """One frame: (header, body). The header is parsed first; ``check(header)`` returns the body size the
    caller accepts. Raises WireError on anything malformed."""
    (length,) = struct.unpack("<I", recv_exact(sock, 4))
    if length < 4 or length > MAX_FRAME:
        raise WireError(f"frame of {length} bytes (expected 4..{MAX_FRAME}): not this service's protocol")
    (hlen,) = struct.unpack("<I", recv_exact(sock, 4))
    if hlen > min(MAX_HEADER, length - 4):
        raise WireError(f"header of {hlen} bytes in a frame of {length}: not this service's protocol")
    head = recv_exact(sock, hlen)
    try:
        header = json.loads(head.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        raise WireError("frame header is not JSON: not this service's protocol") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WireError("frame header has no type: not this service's protocol")
    blen = length - 4 - hlen
    want = check(header) if check is not None else None
    if (want is not None and blen != want) or blen > max_body:
        raise WireError(f"a body of {blen} bytes, expected {want if want is not None else max_body}")
    body = recv_exact(sock, blen)
    return header, body


def shares_body(shares: np.ndarray) -> bytes:
    return np.ascontiguousarray(shares, dtype="<u8").tobytes()


def body_shares(body: bytes, count: int, what: str) -> np.ndarray:
    if len(body) != 8 * count:
        raise WireError(f"{what}: body of {len(body)} bytes, expected {8 * count} ({count} shares)")
    return np.frombuffer(body, dtype="<u8").astype(np.uint64)


def int_field(header: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise WireError(f"field {key!r} is {v!r}, expected an integer in {lo}..{hi}")
    return v


def str_field(header: dict[str, Any], key: str, max_len: int = 128) -> str:
    v = header.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= max_len or not v.isprintable():
        raise WireError(f"field {key!r} is {v!r}, expected a printable string of 1..{max_len} characters")
    return v


__all__ = ["ERROR_CODES", "MAX_FRAME", "ServiceError", "WireError", "body_shares", "encode", "int_field", "receive",
           "recv_exact", "send", "shares_body", "str_field"]
