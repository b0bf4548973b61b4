"""The service's frames: what a gateway accepts and what it refuses before any share is touched."""
from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from orchestration.shared.wire import (MAX_FRAME, WireError, body_shares, encode, int_field, receive, shares_body,
                                        str_field)


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
    a.sendall(struct.pack("<II", 100, 2) + b"{}")
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
