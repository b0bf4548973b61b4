"""The recognition service's messages, shared by the client and both servers' gateways.

Every message is one frame::

    u32 length (little-endian, of what follows) | u32 header length | header (JSON, UTF-8) | body

The header says what the message is; the body is raw little-endian u64 shares (or empty).

Reading a frame (:func:`receive` on a socket, :func:`parse_frame` on bytes: one implementation,
:func:`_read_frame`) checks, in this order, and reads nothing beyond what has been checked:

1. the length: 4 .. :data:`MAX_FRAME`, and no more than a header of :data:`MAX_HEADER` bytes plus
   ``max_body`` bytes of body (refused after the first 4 bytes);
2. the header length: at most :data:`MAX_HEADER` and at most what the length leaves, and the body
   length that follows from the two at most ``max_body`` (refused after 8 bytes);
3. the header, read and parsed (:func:`parse_header`): strict UTF-8; JSON nested at most
   :data:`MAX_DEPTH` levels (counted before parsing, outside strings); numbers of at most
   :data:`MAX_NUMBER` characters, no NaN or Infinity; no key twice in one object; a JSON object
   whose ``type`` is a string;
4. if the caller gave ``check``, ``check(header)``: it may refuse the header (a :class:`WireError`)
   and returns the number of body bytes it accepts for it; a frame announcing any other body
   length is refused *before a byte of its body is read*, so a peer cannot make a gateway hold
   64 MiB for a header that is refused anyway;
5. the body, read in chunks of at most :data:`RECV_CHUNK` bytes, so memory follows what arrives.

Anything malformed is a :class:`WireError` (never a RecursionError, ValueError, ... from the JSON
parser): the gateway logs it, answers with an error frame if it still can, and closes that one
connection. A peer that hangs up is a :class:`WireError` "connection closed" too; a socket timeout
stays ``socket.timeout`` (an OSError).

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

import itertools
import json
import math
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MAX_FRAME = 64 << 20  # 64 MiB: 8,000 queries of 129 shares fit many times over
MAX_HEADER = 64 << 10
MAX_DEPTH = 4  # a plan's slots, [[id, position, count], ...] in the header object, are 3 deep
MAX_NUMBER = 24  # characters of one JSON number: a u64 has 20 digits
RECV_CHUNK = 256 << 10  # socket.recv(n) allocates n bytes up front, whatever arrives
ERROR_CODES = ("generation", "bad-request", "unavailable", "failed", "busy", "refused")

Check = Callable[[dict[str, Any]], int]
"""``check(header)``: the number of body bytes accepted for that header, or a WireError."""


class WireError(RuntimeError):
    """A frame that breaks the protocol (the connection is dropped) or a peer that went away."""


class FrameTruncated(WireError):
    """:func:`parse_frame`: the bytes end before the frame does (``needed`` bytes would be read)."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


class ServiceError(RuntimeError):
    """The service answered a request with an error (``code`` is one of :data:`ERROR_CODES`)."""

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


def _show(v: Any, limit: int = 80) -> str:
    """``repr(v)`` for an error message: short, and never an error itself (an int of more than
    4,300 digits has no repr)."""
    try:
        text = repr(v)
    except ValueError:
        text = f"<int of {v.bit_length()} bits>" if isinstance(v, int) else f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- reading ---------------------------------------------------------------------------------------

def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Exactly ``n`` bytes from ``sock``, asked for :data:`RECV_CHUNK` at a time (``recv(n)`` would
    allocate ``n`` bytes before the first one arrives); a WireError if the peer hangs up first, or if
    the bytes have not all come by ``deadline`` (a ``time.monotonic()`` value: a peer that trickles
    a frame byte by byte cannot hold the reader longer)."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WireError(f"frame not complete in time ({len(buf)} of {n} bytes came)")
            sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(buf), RECV_CHUNK))
        except socket.timeout:
            if deadline is None:
                raise
            raise WireError(f"frame not complete in time ({len(buf)} of {n} bytes came)") from None
        if not chunk:
            raise WireError("connection closed" if not buf else f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _refuse_number(text: str) -> Any:
    raise WireError(f"frame header has the number {_show(text, 40)}: not this service's protocol")


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER:
        _refuse_number(text)
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_NUMBER else math.inf
    if not math.isfinite(value):
        _refuse_number(text)
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    header = dict(pairs)
    if len(header) != len(pairs):
        seen = [k for k, _ in pairs]
        dup = next(k for k in seen if seen.count(k) > 1)
        raise WireError(f"frame header has the key {_show(dup, 40)} twice: not this service's protocol")
    return header


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_number,
                            object_pairs_hook=_unique_keys)
# A string runs to its closing quote or, unterminated, to the end of the text (json refuses it then):
# every match succeeds at its first try, so the scan is linear (one that must fail and restart at the
# next quote is quadratic: 17 s for 64 KiB of \" after one quote).
_TOKEN = re.compile(r'"(?:[^"\\]|\\.?)*(?:"|\Z)|[\[\]{}]', re.DOTALL)
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth(text: str) -> int:
    """How deep ``text``'s brackets nest, strings left out: what json would recurse into."""
    steps = (_STEP.get(m.group(), 0) for m in _TOKEN.finditer(text))
    return max(itertools.accumulate(steps, initial=0))


def parse_header(raw: bytes, max_header: int = MAX_HEADER) -> dict[str, Any]:
    """A frame's header bytes as a dict, or a WireError (see the module's docstring, step 3)."""
    if len(raw) > max_header:
        raise WireError(f"header of {len(raw)} bytes (at most {max_header}): not this service's protocol")
    try:
        text = raw.decode("utf-8")
    except UnicodeError:
        raise WireError("frame header is not UTF-8: not this service's protocol") from None
    if _depth(text) > MAX_DEPTH:
        raise WireError(f"frame header nests deeper than {MAX_DEPTH} levels: not this service's protocol")
    try:
        header = _DECODER.decode(text)
    except (ValueError, RecursionError, OverflowError, MemoryError, UnicodeError, TypeError):
        raise WireError("frame header is not JSON: not this service's protocol") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WireError("frame header has no type: not this service's protocol")
    return header


def _read_frame(read: Callable[[int], bytes], check: Check | None, max_body: int, max_header: int = MAX_HEADER
                ) -> tuple[dict[str, Any], bytes]:
    """The one implementation of :func:`receive` and :func:`parse_frame`: ``read(n)`` returns exactly
    ``n`` more bytes (or raises WireError) and is asked for no byte before the ones before it passed."""
    (length,) = struct.unpack("<I", read(4))
    limit = min(MAX_FRAME, 4 + max_header + max(max_body, 0))
    if length < 4 or length > limit:
        raise WireError(f"frame of {length} bytes (expected 4..{limit}): not this service's protocol")
    (hlen,) = struct.unpack("<I", read(4))
    if hlen > min(max_header, length - 4):
        raise WireError(f"header of {hlen} bytes in a frame of {length}: not this service's protocol")
    blen = length - 4 - hlen
    if blen > max_body:
        raise WireError(f"body of {blen} bytes (at most {max_body}): not this service's protocol")
    header = parse_header(read(hlen), max_header)
    if check is not None:
        accepted = check(header)
        if not isinstance(accepted, int) or isinstance(accepted, bool) or accepted < 0:
            raise TypeError(f"check({header['type']!r} header) returned {_show(accepted)}, not a byte count")
        if blen != accepted:
            raise WireError(f"{_show(header['type'], 40)} frame with a body of {blen} bytes, expected {accepted}")
    return header, read(blen)


def receive(sock: socket.socket, check: Check | None = None, max_body: int = MAX_FRAME, *,
            max_header: int = MAX_HEADER, deadline: float | None = None) -> tuple[dict[str, Any], bytes]:
    """One frame from ``sock``: (header, body). Raises WireError on anything malformed.

    ``check(header)``, if given, is called once the header is parsed and before the body is read:
    it returns the number of body bytes it accepts for that header (or raises WireError); a frame
    with another body length is refused unread. ``max_body`` bounds the body in any case. Reads
    exactly the frame's bytes, nothing of the next one. What else ``check`` raises is the caller's
    and passes through; a ``check`` that returns no byte count is a TypeError. A gateway, say::

        def accept(header):  # the body a client may send with this header
            if header["type"] == "recognize":
                return 8 * int_field(header, "n", 1, MAX_QUERIES) * int_field(header, "d1", 1, 4096)
            if header["type"] == "status":
                return 0
            raise WireError(f"unknown message type {header['type']!r}")

        header, body = receive(sock, accept)
    """
    return _read_frame(lambda n: recv_exact(sock, n, deadline), check, max_body, max_header)


def parse_frame(data: bytes, check: Check | None = None, max_body: int = MAX_FRAME
                ) -> tuple[dict[str, Any], bytes, int]:
    """The frame at the start of ``data``: (header, body, bytes it takes), with :func:`receive`'s
    checks. Bytes after the frame are left alone; if ``data`` ends before the frame does (as far as
    the checks got), :class:`FrameTruncated`."""
    view = memoryview(data)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise FrameTruncated(f"frame truncated: {len(view) - pos} of {n} bytes", pos + n)
        chunk = bytes(view[pos:pos + n])
        pos += n
        return chunk

    header, body = _read_frame(read, check, max_body)
    return header, body, pos


# -- writing ---------------------------------------------------------------------------------------

def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<II", 4 + len(head) + len(body), len(head)) + head + body


def send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    sock.sendall(encode(header, body))


# -- fields and bodies -----------------------------------------------------------------------------

def shares_body(shares: np.ndarray) -> bytes:
    return np.ascontiguousarray(shares, dtype="<u8").tobytes()


def body_shares(body: bytes, count: int, what: str) -> np.ndarray:
    if len(body) != 8 * count:
        raise WireError(f"{what}: body of {len(body)} bytes, expected {8 * count} ({count} shares)")
    return np.frombuffer(body, dtype="<u8").astype(np.uint64)


def int_field(header: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise WireError(f"field {key!r} is {_show(v)}, expected an integer in {lo}..{hi}")
    return v


def str_field(header: dict[str, Any], key: str, max_len: int = 128) -> str:
    v = header.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= max_len or not v.isprintable():
        raise WireError(f"field {key!r} is {_show(v)}, expected a printable string of 1..{max_len} characters")
    return v


__all__ = ["ERROR_CODES", "MAX_DEPTH", "MAX_FRAME", "MAX_HEADER", "MAX_NUMBER", "RECV_CHUNK", "Check", "FrameTruncated",
           "ServiceError", "WireError", "body_shares", "encode", "int_field", "parse_frame", "parse_header", "receive",
           "recv_exact", "send", "shares_body", "str_field"]
