"""The capture reader the TLS-on-the-wire tests rely on: it must rebuild every stream exactly, whatever TCP did
on the way (segments out of order, resent with another length, sequence numbers that wrap), and must refuse a
stream with a hole rather than check half of it."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import netlab

SRC, DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
KEY = ("10.0.0.1", 40000, "10.0.0.2", 7000)


def frame(seq: int, payload: bytes) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", 40000, 7000, seq % 2**32, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, SRC, DST) + tcp
    eth = b"\x00" * 12 + b"\x08\x00" + ip
    return struct.pack("<I", len(eth)) + eth


def write(path: Path, frames: list[bytes]) -> Path:
    path.write_bytes(b"".join(frames))
    return path


@st.composite
def sent_stream(draw):
    """A stream, the cuts TCP made of it, and what the capture saw: every segment at least once (some resent
    from the same start with a shorter length, as after a timeout), in a shuffled order, from a random ISN."""
    data = draw(st.binary(min_size=1, max_size=4000))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data)), max_size=12))) | {len(data)})
    isn = draw(st.integers(0, 2**32 - 1))
    segs, start = [], 0
    for end in cuts:
        segs.append((start, data[start:end]))
        if draw(st.booleans()):  # resent: the same start, one "MSS" or all of it
            segs.append((start, data[start:start + draw(st.integers(1, end - start))]))
        start = end
    return data, isn, draw(st.permutations(segs))  # the first frame captured may lie anywhere in the stream


@settings(max_examples=200, deadline=None)
@given(sent_stream())
def test_reassembly_rebuilds_the_stream(tmp_path_factory, case):
    data, isn, segs = case
    path = write(tmp_path_factory.mktemp("cap") / "x.cap", [frame(isn + s, p) for s, p in segs])
    assert netlab.tcp_streams(path) == {KEY: data}


def test_a_resent_head_shorter_than_the_original_leaves_no_hole(tmp_path):
    data = bytes(range(256)) * 40
    cap = write(tmp_path / "x.cap", [frame(100, data), frame(100, data[:1448])])  # the RTO's one-MSS resend
    assert netlab.tcp_streams(cap) == {KEY: data}


def test_sequence_numbers_that_wrap(tmp_path):
    data = b"a" * 3000
    cap = write(tmp_path / "x.cap", [frame(2**32 - 1000, data[:2000]), frame(1000, data[2000:])])
    assert netlab.tcp_streams(cap) == {KEY: data}


def test_a_hole_is_refused(tmp_path):
    data = b"b" * 3000
    cap = write(tmp_path / "x.cap", [frame(5, data[:1000]), frame(2005, data[2000:])])
    with pytest.raises(ValueError, match="misses bytes"):
        netlab.tcp_streams(cap)


def test_frames_the_capture_lost_are_refused(tmp_path):
    cap = write(tmp_path / "x.cap", [frame(5, b"c" * 10)])
    (tmp_path / "x.cap.stats").write_text("packets=10 drops=1 truncated=0\n")
    with pytest.raises(ValueError, match="lost frames"):
        netlab.tcp_streams(cap)
