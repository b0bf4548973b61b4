"""The service's frames: what a gateway accepts and what it refuses before any share is touched."""
from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest

from orchestration.shared.wire import (MAX_FRAME, MAX_HEADER, WireError, body_shares, encode, int_field, receive,
                                        shares_body, str_field)


def _pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_a_frame_round_trips_with_its_shares():
    a, b = _pair()
    shares = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    a.sendall(encode({"type": "recognize", "id": "ab", "n": 4}, shares_body(shares)))
    head, body = receive(b)
    assert head == {"type": "recognize", "id": "ab", "n": 4}
    assert np.array_equal(body_shares(body, 4, "x"), shares)


@pytest.mark.parametrize("raw, why", [
    (struct.pack("<I", MAX_FRAME + 1), "frame of"),
    (struct.pack("<II", 10, 100) + b"x" * 10, "header of"),
    (struct.pack("<II", 7, 3) + b"{x}", "not JSON"),
    (struct.pack("<II", 6, 2) + b"[]", "no type"),
    (b"GET / HTTP/1.1\r\n", "frame of"),
])
def test_malformed_frames_are_refused_with_the_reason(raw, why):
    a, b = _pair()
    a.sendall(raw)
    with pytest.raises(WireError, match=why):
        receive(b)


def test_a_peer_that_hangs_up_mid_frame_is_named():
    a, b = _pair()
    head = b'{"type":"status"}'  # a header that passes: the body is read, and is not there
    a.sendall(struct.pack("<II", 100, len(head)) + head)
    a.close()
    with pytest.raises(WireError, match="connection closed"):
        receive(b)


def test_fields_are_checked_by_type_and_range():
    assert int_field({"n": 3}, "n", 1, 10) == 3
    for bad in ({"n": 0}, {"n": 11}, {"n": "3"}, {"n": True}, {}):
        with pytest.raises(WireError, match="'n'"):
            int_field(bad, "n", 1, 10)
    assert str_field({"id": "abc"}, "id") == "abc"
    for bad in ({"id": ""}, {"id": "a\nb"}, {"id": 5}, {"id": "x" * 200}):
        with pytest.raises(WireError, match="'id'"):
            str_field(bad, "id")
    with pytest.raises(WireError, match="expected 16"):
        body_shares(b"\0" * 8, 2, "answer")


def _frame(head: bytes, body_len: int = 0) -> bytes:
    """The prefix and header of a frame announcing ``body_len`` body bytes (the body is not included)."""
    return struct.pack("<II", 4 + len(head) + body_len, len(head)) + head


# -- regressions: what a hostile (but authorised) client could do to a connection thread -------------

@pytest.mark.parametrize("head, why", [
    (b'{"type":"status","x":' + b"[" * 20_000 + b"]" * 20_000 + b"}", "deeper than"),  # was RecursionError
    (b"[" * 60_000, "deeper than"),
    (b'{"type":"recognize","n":' + b"9" * 5000 + b"}", "number"),  # was ValueError (int of 5,000 digits)
    (b'{"type":"recognize","n":-' + b"9" * 30 + b"}", "number"),
    (b'{"type":"status","x":NaN}', "number"),  # were accepted, as float nan / inf
    (b'{"type":"status","x":-Infinity}', "number"),
    (b'{"type":"status","x":1e999}', "number"),
    (b'{"type":"status","type":"recognize"}', "twice"),  # was accepted, as the last one
    (b'{"type":"status","x":"\xff"}', "UTF-8"),
    (b'{"type":5}', "no type"),
    (b'"status"', "no type"),
], ids=["nested-20000", "nested-60000-unclosed", "int-5000-digits", "int-31-digits", "nan", "infinity", "1e999",
        "duplicate-key", "not-utf8", "type-not-str", "not-an-object"])
def test_hostile_headers_are_wire_errors(head, why):
    a, b = _pair()
    a.sendall(_frame(head))
    with pytest.raises(WireError, match=why):
        receive(b)


def test_a_header_that_is_refused_is_refused_before_its_body_is_read():
    """The frame announces a 64 MiB body; the header fails, so receive answers at once instead of
    waiting for (and buffering) 64 MiB. The old receive read the body first: it blocked until the
    socket's timeout."""
    a, b = _pair()
    b.settimeout(2)
    head = b'{"type":5}'
    a.sendall(_frame(head, MAX_FRAME - 4 - len(head)))  # prefix and header only
    t0 = time.monotonic()
    with pytest.raises(WireError, match="no type"):
        receive(b)
    assert time.monotonic() - t0 < 1


def test_check_sees_the_header_first_and_sets_the_body_size():
    a, b = _pair()
    b.settimeout(2)
    seen = []

    def check(header):
        seen.append(header)
        n = int_field(header, "n", 1, 4)  # a refusal here is a WireError too
        return 8 * n

    head = b'{"type":"recognize","n":1}'
    a.sendall(_frame(head, MAX_FRAME - 4 - len(head)))  # announces 64 MiB where 8 bytes are accepted
    t0 = time.monotonic()
    with pytest.raises(WireError, match="expected 8"):
        receive(b, check)
    assert time.monotonic() - t0 < 1 and seen == [{"type": "recognize", "n": 1}]

    a, b = _pair()
    a.sendall(_frame(b'{"type":"recognize","n":9}', 72))
    with pytest.raises(WireError, match="'n'"):
        receive(b, check)

    a, b = _pair()
    a.sendall(encode({"type": "recognize", "n": 2}, b"\1" * 16) + encode({"type": "status"}))
    assert receive(b, check) == ({"type": "recognize", "n": 2}, b"\1" * 16)
    assert receive(b, lambda h: 0) == ({"type": "status"}, b"")  # nothing of the next frame was taken


def test_max_body_bounds_a_frame_without_check():
    a, b = _pair()
    a.sendall(encode({"type": "status"}, b"\0" * 17))
    with pytest.raises(WireError, match="body of 17 bytes"):
        receive(b, max_body=16)
    a, b = _pair()
    a.sendall(struct.pack("<I", 4 + MAX_HEADER + 17))  # too long for any header and 16 bytes of body
    with pytest.raises(WireError, match="frame of"):
        receive(b, max_body=16)


def test_memory_follows_what_arrives_not_what_is_announced():
    """socket.recv(n) allocates n bytes before anything arrives: the old recv_exact asked for the
    whole announced body at once (64 MiB for a frame of 1 KiB that says it is 64 MiB)."""
    a, b = _pair()
    head = b'{"type":"status"}'
    a.sendall(_frame(head, MAX_FRAME - 4 - len(head)) + b"\0" * 1024)
    threading.Timer(0.2, a.close).start()
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="connection closed after 1024"):
            receive(b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated for 1 KiB received"
