"""The gallery's front desk under hostile input, in process (no MPC): every header and body a client can send
is either refused with one of the gateway's errors or held as a pending contribution of the right size, and
nothing is written outside the gallery's folder. Hypothesis draws the inputs."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from orchestration.server import gallery_ops
from orchestration.server.connections import Refused
from orchestration.server.gallery import Gallery, GalleryError, Settings, check_id
from orchestration.server.job import Server
from orchestration.server.registry import Registry
from orchestration.client.sources import decode_name, encode_name, SourceError
from orchestration.shared.wire import WireError


@dataclass
class FakeConn:
    name: str
    role: str


def _registry(root: Path) -> Registry:
    server = Server(root, 1)
    g = Gallery(server)
    s = g.init(Settings(d=8, name_words=2, thresholds=((1, 0.9),)))
    env = gallery_ops.Env(None, server, None, None, g, s)  # type: ignore[arg-type]
    return Registry(env, lambda side: None, lambda: None, lambda: None, threading.Event())  # type: ignore[arg-type]


values = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                   st.text(max_size=40), st.lists(st.integers(), max_size=3))
headers = st.fixed_dictionaries({"type": st.sampled_from(["contribute", "gallery", "withdraw", "train"])},
                                optional={"id": st.one_of(values, st.just("a" * 32)), "person": st.one_of(
                                    values, st.just("b" * 32)), "new": values, "n": values, "d": values,
                                    "epochs": values, "batch": values, "lr": values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, role=st.sampled_from(["owner", "source", "query", "dealer"]), body=st.binary(max_size=300))
def test_any_header_and_body_is_refused_or_held_whole(tmp_path, header, role, body):
    reg = _registry(tmp_path / "s1")
    conn = FakeConn("src", role)
    try:
        size = reg.check(conn, header)
    except (Refused, WireError):
        return
    assert role in ("source", "owner") and (role == "source") == (header["type"] != "train")
    if len(body) != size:
        body = body[:size].ljust(size, b"\0")
    try:
        op_id = check_id(header.get("id"), "id")
        if header["type"] == "gallery":
            return
        reg._take(conn.name, header["type"], op_id, header, body)
    except (GalleryError, WireError, ValueError):
        pass
    files = [p for p in (tmp_path / "s1").rglob("*") if p.is_file()]
    assert all(p.is_relative_to(tmp_path / "s1" / "gallery") for p in files), files
    for cid in reg.gallery.pending_ids():
        meta, photos, name = reg.gallery.pending(cid)
        assert photos.shape == (meta["n"], 8) and (name is None or name.shape == (2,))


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_any_reconstructed_name_decodes_or_is_refused(raw):
    words = np.frombuffer(raw, dtype="<u8")
    try:
        name = decode_name(words)
    except (ValueError, UnicodeDecodeError):
        return
    assert name is None or (name and "\0" not in name and encode_name(name, 2).tobytes() == raw)


@given(st.text(max_size=20))
def test_names_round_trip_or_are_refused(name):
    try:
        words = encode_name(name, 2)
    except SourceError:
        assert not name or "\0" in name or len(name.encode()) > 16
        return
    assert decode_name(words) == name


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["d", "name_words", "alpha", "thresholds", "exp_bits", "embedder"]), values))
def test_settings_are_checked(raw):
    try:
        s = Settings.from_dict(raw)
    except (ValueError, KeyError, TypeError):
        return
    assert 1 <= s.d <= 4096 and s.thresholds


def test_a_source_cannot_reach_outside_its_folder(tmp_path):
    reg = _registry(tmp_path / "s1")
    for bad in ("../x", "a" * 31, "A" * 32, "/" + "a" * 31):
        with pytest.raises(GalleryError, match="32 lower-case hexadecimal digits"):
            check_id(bad, "person id")
