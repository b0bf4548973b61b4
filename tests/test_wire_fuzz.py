"""Property tests of the wire parser (Hypothesis): whatever a peer sends, the parser answers a frame
or a WireError, reads no byte beyond what the frame announces and returns no body larger than the
caller accepts. Fixed budgets, derandomised and without an example database, so CI runs the same
examples every time, in a few seconds."""
from __future__ import annotations

import json
import socket
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.shared.wire import (MAX_DEPTH, MAX_HEADER, FrameTruncated, WireError, encode, int_field,
                                        parse_frame, parse_header, receive, str_field)

FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SOCKETS = settings(FUZZ, max_examples=150)

# -- strategies --------------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-(2**64), 2**64)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))


def json_values(depth: int) -> st.SearchStrategy[Any]:
    """JSON values nested at most ``depth`` containers deep."""
    if depth == 0:
        return SCALARS
    inner = json_values(depth - 1)
    return SCALARS | st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


HEADERS = st.builds(lambda t, rest: {**rest, "type": t}, st.text(max_size=12),
                    st.dictionaries(st.text(max_size=8), json_values(MAX_DEPTH - 1), max_size=5))
BODIES = st.binary(max_size=64)


@st.composite
def mutated_frames(draw) -> bytes:
    """A valid frame, then bit flips, a length field rewritten, truncation or extension."""
    data = bytearray(encode(draw(HEADERS), draw(BODIES)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "length", "hlen", "truncate", "extend", "splice"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind in ("length", "hlen") and len(data) >= 8:
            at = 0 if kind == "length" else 4
            (old,) = struct.unpack_from("<I", data, at)
            new = draw(st.integers(0, 2**32 - 1) | st.integers(max(0, old - 16), old + 16))
            struct.pack_into("<I", data, at, new)
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "extend":
            data += draw(st.binary(max_size=32))
        elif kind == "splice" and len(data) > 8:
            i = draw(st.integers(8, len(data) - 1))
            data[i:i] = draw(st.sampled_from([b"[" * 50, b"9" * 40, b"NaN", b"\xff\xfe", b'"', b"\\", b"{}"]))
    return bytes(data)


STREAMS = mutated_frames() | st.binary(max_size=200)
CHECKS = st.none() | st.integers(0, 80)  # None: no check; n: the caller accepts bodies of n bytes
MAX_BODIES = st.integers(0, 80) | st.just(64 << 20)


def _announced(data: bytes) -> int:
    """The most bytes a reader of ``data`` may take: the frame's own, as its length field says."""
    return 4 + struct.unpack_from("<I", data)[0] if len(data) >= 4 else 4


def _check_of(accepts: int | None):
    return None if accepts is None else (lambda header: accepts)


# -- (a) anything: a frame or a WireError, never beyond the announced sizes ----------------------------

@FUZZ
@given(STREAMS, CHECKS, MAX_BODIES)
def test_parse_frame_answers_anything_with_a_frame_or_a_wire_error(data, accepts, max_body):
    try:
        header, body, used = parse_frame(data, _check_of(accepts), max_body)
    except FrameTruncated as exc:
        assert len(data) < exc.needed <= _announced(data)
    except WireError:
        pass
    else:
        assert isinstance(header, dict) and isinstance(header["type"], str)
        assert used == _announced(data) <= len(data)
        assert len(body) <= max_body and (accepts is None or len(body) == accepts)
        assert data[used - len(body):used] == body


@SOCKETS
@given(STREAMS, CHECKS, MAX_BODIES)
def test_receive_over_a_socket_agrees_with_parse_frame_and_leaves_the_rest_unread(data, accepts, max_body):
    a, b = socket.socketpair()
    try:
        b.settimeout(5)
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)  # a frame that announces more than was sent meets the end, not a wait
        try:
            got = receive(b, _check_of(accepts), max_body)
        except WireError as exc:
            got = exc
        b.setblocking(False)
        rest = b""
        try:
            while chunk := b.recv(4096):
                rest += chunk
        except BlockingIOError:
            pass
        used = len(data) - len(rest)
        assert used <= _announced(data) and data[used:] == rest
        try:
            header, body, parsed = parse_frame(data, _check_of(accepts), max_body)
        except FrameTruncated:  # the socket saw the same end: "connection closed"
            assert isinstance(got, WireError) and "connection closed" in str(got)
        except WireError as exc:  # refused on the same grounds (one implementation), its body unread
            assert isinstance(got, WireError) and str(got) == str(exc)
            assert used <= 8 + struct.unpack_from("<I", data, 4)[0] if len(data) >= 8 else used <= len(data)
        else:
            assert got == (header, body) and used == parsed
    finally:
        a.close()
        b.close()


# -- (b) valid frames round-trip -------------------------------------------------------------------------

@FUZZ
@given(HEADERS, BODIES, st.binary(max_size=16))
def test_valid_frames_round_trip(header, body, after):
    data = encode(header, body)
    got, got_body, used = parse_frame(data + after)
    assert (got, got_body, used) == (header, body, len(data))
    assert parse_frame(data, lambda h: len(body), max_body=len(body))[:2] == (header, body)


# -- (c) headers the parser refuses -------------------------------------------------------------------

def _nested(depth: int) -> str:
    return '{"type":"x","v":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


BAD_HEADERS = st.one_of(
    st.integers(MAX_DEPTH + 1, 30_000).map(_nested).map(str.encode),
    st.integers(MAX_DEPTH + 1, 60_000).map(lambda d: b"[" * d),
    st.integers(25, 6000).map(lambda k: b'{"type":"x","n":' + b"7" * k + b"}"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]).map(
        lambda c: b'{"type":"x","v":[' + c.encode() + b"]}"),
    json_values(2).filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),  # not an object
    json_values(2).filter(lambda v: not isinstance(v, str)).map(lambda t: json.dumps({"type": t}).encode()),
    st.binary(min_size=1, max_size=40).filter(lambda b: not _utf8(b)).map(lambda b: b'{"type":"' + b + b'"}'),
    st.text(min_size=1, max_size=8).map(json.dumps).map(lambda k: f'{{"type":"x",{k}:1,{k}:2}}'.encode()),
)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeError:
        return False


@FUZZ
@given(BAD_HEADERS, BODIES)
def test_hostile_headers_are_wire_errors(head, body):
    with pytest.raises(WireError):
        parse_header(head)
    if len(head) <= MAX_HEADER:
        frame = struct.pack("<II", 4 + len(head) + len(body), len(head)) + head + body
        with pytest.raises(WireError) as exc:
            parse_frame(frame)
        assert not isinstance(exc.value, FrameTruncated)


# -- (d) field accessors -------------------------------------------------------------------------------

ANY_VALUES = (json_values(2) | st.floats() | st.integers(0, 6000).map(lambda k: -(10**k) if k % 2 else 10**k)
              | st.text(alphabet=st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=300)  # surrogates
              | st.text(max_size=300))


@FUZZ
@given(ANY_VALUES, st.integers(-(2**70), 2**70), st.integers(-(2**70), 2**70), st.integers(0, 300))
def test_field_accessors_answer_a_value_or_a_wire_error(value, lo, hi, max_len):
    header = {"type": "x", "f": value}
    try:
        v = int_field(header, "f", lo, hi)
        assert type(v) is int and lo <= v <= hi
    except WireError as exc:
        assert len(str(exc)) < 300  # the message is echoed to the peer and logged: short, whatever the value
    try:
        s = str_field(header, "f", max_len)
        assert isinstance(s, str) and 0 < len(s) <= max_len and s.isprintable()
    except WireError as exc:
        assert len(str(exc)) < 300
    with pytest.raises(WireError):
        int_field({}, "f", lo, hi)
    with pytest.raises(WireError):
        str_field({}, "f", max_len)
