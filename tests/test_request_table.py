"""The gateways' request state machine (orchestration.server.requests), fuzzed with Hypothesis.

Two tables, server 0's and server 1's, wired by in-memory announcements and plans exactly as the
gateways' link wires them (orchestration.server.link), with a fake clock and fake clients. Hostile
clients send halves, mismatched halves, reused ids, requests of the wrong size, and go away; time
passes; links break. Whatever the sequence, the invariants below hold: nothing raises, every request
is answered exactly once and within the documented timeout, memory stays within max_queued and the
per-client bound, both servers compute only requests that both hold with the same sizes, and server 1
never takes a share of a request that does not fit the plan.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from orchestration.server.requests import MAX_QUERIES, Request, RequestTable

D1 = 5
BATCH = 8
MAX_QUEUED = 3 * MAX_QUERIES
PER_CLIENT = MAX_QUERIES + 100
HALF, TIMEOUT = 20.0, 60.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeConn:
    def __init__(self, name: str):
        self.name = name
        self.frames: list[dict[str, Any]] = []

    def reply(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.frames.append(header)


def test_a_request_of_one_server_alone_is_failed_after_the_half_timeout() -> None:
    clock = Clock()
    t = RequestTable(0, BATCH, max_queued=MAX_QUEUED, max_per_client=PER_CLIENT, half_timeout=HALF,
                     request_timeout=TIMEOUT, clock=clock)
    conn = FakeConn("a")
    assert t.take(Request("r", "g", 3, np.zeros((3, D1), np.uint64), conn, t0=clock()), D1)
    clock.t += HALF - 1
    t.expire()
    assert not conn.frames
    clock.t += 2
    t.expire()
    assert conn.frames[0]["code"] == "unavailable" and t.queued == 0


def test_halves_with_other_sizes_are_refused_at_both() -> None:
    clock = Clock()
    t0 = RequestTable(0, BATCH, max_queued=MAX_QUEUED, max_per_client=PER_CLIENT, clock=clock)
    t1 = RequestTable(1, BATCH, max_queued=MAX_QUEUED, max_per_client=PER_CLIENT, clock=clock)
    a, b = FakeConn("a"), FakeConn("a")
    t0.take(Request("r", "g", 16, np.zeros((16, D1), np.uint64), a, t0=clock()), D1)
    t1.take(Request("r", "g", 2, np.zeros((2, D1), np.uint64), b, t0=clock()), D1)
    t0.mark_held(t1.take_announcements())
    t1.mark_held(t0.take_announcements())
    assert a.frames[0]["code"] == b.frames[0]["code"] == "bad-request"
    assert "different sizes" in a.frames[0]["message"]
    assert t0.queued == t1.queued == 0 and t0.plan("g", None) == ([], 0)


def test_a_plan_that_does_not_fit_server_1s_copy_fails_that_request_only() -> None:
    clock = Clock()
    t1 = RequestTable(1, BATCH, max_queued=MAX_QUEUED, max_per_client=PER_CLIENT, clock=clock)
    a, b = FakeConn("a"), FakeConn("b")
    t1.take(Request("r", "g", 2, np.ones((2, D1), np.uint64), a, t0=clock()), D1)
    t1.take(Request("s", "g", 2, np.ones((2, D1), np.uint64), b, t0=clock()), D1)
    slots = t1.gather([["r", 0, 6], ["s", 0, 2]], "g", D1)  # r has 2 queries here
    assert slots[0][0] is None and slots[1][0] is not None
    assert a.frames[0]["type"] == "error" and not b.frames
    x = t1.batch_input(slots, D1)
    assert x[:6].sum() == 0 and x[6:8].sum() == 2 * D1
    with pytest.raises(ValueError):
        t1.gather([["s", 0, BATCH + 1]], "g", D1)  # more than a batch: the link is dropped


class TwoGateways(RuleBasedStateMachine):
    """Random sequences of client actions, link events and time on both servers' tables."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.t = [RequestTable(i, BATCH, max_queued=MAX_QUEUED, max_per_client=PER_CLIENT, half_timeout=HALF,
                               request_timeout=TIMEOUT, pending_wait=5.0, clock=self.clock) for i in (0, 1)]
        self.conns = [[FakeConn(f"c{k}"), FakeConn(f"c{k}")] for k in range(3)]
        self.sent: dict[tuple[int, str], tuple[FakeConn, float, int]] = {}  # (server, id) -> conn, when, n
        self.linked = True
        self.k = 0

    # -- clients ----------------------------------------------------------------------------------------

    def _send(self, server: int, who: int, rid: str, n: int, d1: int) -> None:
        conn = self.conns[who][server]
        shares = np.full((n, d1), server + 1, dtype=np.uint64)
        before = len(conn.frames)
        held = self.t[server].take(Request(rid, "g", n, shares, conn, t0=self.clock()), D1)
        if held:
            self.sent[(server, rid)] = (conn, self.clock(), n)
        else:
            assert len(conn.frames) == before + 1 and conn.frames[-1]["type"] == "error"

    @rule(who=st.integers(0, 2), n=st.integers(1, 40), at=st.sampled_from(["both", "0", "1"]))
    def request(self, who: int, n: int, at: str) -> None:
        self.k += 1
        rid = f"r{self.k}"
        for server in (0, 1):
            if at in ("both", str(server)):
                self._send(server, who, rid, n, D1)

    @rule(who=st.integers(0, 2), n0=st.integers(1, MAX_QUERIES), n1=st.integers(1, MAX_QUERIES),
          d1=st.sampled_from([D1, D1, 2, 129]))
    def mismatched(self, who: int, n0: int, n1: int, d1: int) -> None:
        self.k += 1
        rid = f"m{self.k}"
        self._send(0, who, rid, n0, d1)
        self._send(1, who, rid, n1, D1)

    @rule()
    def reuse_an_id(self) -> None:
        held = [rid for (s, rid) in self.sent if s == 0 and rid in self.t[0].requests]
        if held:
            thief = FakeConn("c0")
            assert not self.t[0].take(Request(held[0], "g", 1, np.zeros((1, D1), np.uint64), thief), D1)
            assert thief.frames[-1]["code"] == "bad-request"

    @rule(who=st.integers(0, 2), server=st.integers(0, 1))
    def client_leaves(self, who: int, server: int) -> None:
        self.t[server].drop_client(self.conns[who][server])
        self.conns[who][server] = FakeConn(f"c{who}")

    # -- the link, the party, time ---------------------------------------------------------------------

    @rule()
    def announce(self) -> None:
        if self.linked:
            self.t[0].mark_held(self.t[1].take_announcements())

    @rule()
    def batch(self) -> None:
        """One round of the leader: plan, server 1 follows (checked), both compute and deliver."""
        if not self.linked:
            return
        t0, t1 = self.t
        slots, _ = t0.plan("g", None)
        plan = {"have": t0.take_announcements(), "reject": t0.take_rejects(),
                "slots": [[r.id, s, c] for r, s, c in slots if r is not None]}
        t1.mark_held(plan["have"])
        t1.apply_rejects(plan["reject"])
        if not plan["slots"]:
            return
        s1 = t1.gather(plan["slots"], "g", D1)
        x0, x1 = t0.batch_input(slots, D1), t1.batch_input(s1, D1)
        # server 1 feeds a request's shares only where server 0 feeds the same request's
        for (r0, _, c0), (r1, _, c1) in zip(slots, s1):
            assert c0 == c1
            if r1 is not None:
                assert r0 is not None and r0.id == r1.id and (r0.n, r0.d1) == (r1.n, r1.d1)
        assert x0.shape == x1.shape == (BATCH, D1)
        out = np.stack([np.arange(BATCH, dtype=np.uint64)] * 2, axis=1)  # (best, S) per query
        t0.deliver(slots, out, "g")
        t1.deliver(s1, out, "g")

    @rule()
    def plan_lost(self) -> None:
        """Server 0 computes a plan that never reaches server 1 (out of step): server 1's copies are left
        held by both and never planned again, which only the request timeout ends."""
        slots, _ = self.t[0].plan("g", None)
        self.t[0].deliver(slots, np.zeros((BATCH, 2), dtype=np.uint64), "g")

    @rule(dt=st.sampled_from([0.5, 3.0, 15.0, 30.0]))
    def time_passes(self, dt: float) -> None:
        self.clock.t += dt
        for t in self.t:
            t.expire()

    @rule()
    def link_breaks(self) -> None:
        self.linked = False
        for t in self.t:
            t.fail_all("unavailable", "session ended")

    @precondition(lambda self: not self.linked)
    @rule()
    def link_back(self) -> None:
        self.linked = True
        self.t[0].new_link(announce_all=True)
        self.t[0].mark_held(self.t[1].new_link(announce_all=False))

    # -- invariants ------------------------------------------------------------------------------------

    @invariant()
    def memory_is_bounded(self) -> None:
        for t in self.t:
            assert 0 <= t.queued <= t.max_queued
            assert t.queued == sum(r.n for r in t.requests.values())
            for name, q in t.per_client.items():
                assert 0 < q <= t.max_per_client
            assert len(t.partner_has) <= 2 * t.max_queued and len(t.verdicts) <= 10000

    @invariant()
    def every_request_is_answered_once_and_in_time(self) -> None:
        for (server, rid), (conn, when, n) in self.sent.items():
            answers = [f for f in conn.frames if f.get("id") == rid]
            held = rid in self.t[server].requests and self.t[server].requests[rid].conn is conn
            assert len(answers) <= 1, answers
            if not held:
                assert len(answers) == 1, (rid, answers)
            else:
                assert self.clock() - when <= TIMEOUT + 30.0, f"request {rid} held for {self.clock() - when} s"


TestTwoGateways = TwoGateways.TestCase
TestTwoGateways.settings = settings(max_examples=150, stateful_step_count=40, derandomize=True, database=None,
                                    deadline=None, suppress_health_check=[HealthCheck.too_slow])
