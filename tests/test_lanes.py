"""The service's lanes without MP-SPDZ: the per-lane workers, server 0's choice of lane, what a dealer reads from a
server's status about lanes, and the serve program's arguments (issue 19's pipelining; the lanes on the real
protocol are tests/test_service.py's test_a_request_of_several_batches_runs_on_several_lanes_at_once)."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from orchestration.mpspdz.launcher import party_args
from orchestration.mpspdz.toolchain import protocol
from orchestration.server.lanes import LaneWorkers
from orchestration.server.link import Leader
from orchestration.shared.ports import service_program_args, status_lanes


def test_each_lane_runs_its_jobs_in_order_and_lanes_run_side_by_side():
    workers = LaneWorkers(2, "test")
    seen: list[tuple[int, int]] = []
    both = threading.Barrier(2, timeout=5)  # passes only if a job of each lane runs at the same time

    def job(lane: int, k: int) -> None:
        if k == 0:
            both.wait()
        seen.append((lane, k))

    try:
        for k in range(5):
            for lane in range(2):
                workers.submit(lane, lambda lane=lane, k=k: job(lane, k))
        assert workers.wait_idle(10)
        assert [k for lane, k in seen if lane == 0] == list(range(5))
        assert [k for lane, k in seen if lane == 1] == list(range(5))
        assert workers.busy == [0, 0]
    finally:
        workers.close()


def test_a_failed_job_is_raised_at_the_next_check_and_stops_the_lanes():
    workers = LaneWorkers(2, "test")
    ran: list[int] = []
    try:
        workers.submit(1, lambda: (_ for _ in ()).throw(RuntimeError("party 1 exited")))
        with pytest.raises(RuntimeError, match="party 1 exited"):
            workers.wait_idle(5)
        with pytest.raises(RuntimeError, match="party 1 exited"):
            workers.submit(0, lambda: ran.append(0))
        assert ran == []
    finally:
        workers.close()


def test_wait_idle_times_out_while_a_job_runs():
    workers = LaneWorkers(1, "test")
    release = threading.Event()
    try:
        workers.submit(0, lambda: release.wait(5))
        t0 = time.monotonic()
        assert workers.wait_idle(0.2) is False
        assert time.monotonic() - t0 < 2
        release.set()
        assert workers.wait_idle(5) is True
    finally:
        workers.close()


@pytest.mark.parametrize("waiting,free,expect", [
    (1, [0, 1, 2], 0),   # a face alone: the quick lane
    (0, [0, 1, 2], 0),   # nothing counted yet (a request not announced by both): the smallest lane
    (5, [0, 1, 2], 1),   # more than one query: the first lane of a whole batch
    (40, [0, 2], 2),     # a crowd, lane 1 busy: the other batch lane
    (40, [0], 0),        # only the quick lane free: it takes one query of the crowd
    (1, [1, 2], 1),      # the quick lane busy: a batch lane takes the face
])
def test_server_0_picks_the_smallest_free_lane_that_holds_what_waits(waiting, free, expect):
    leader = Leader.__new__(Leader)
    leader.gw = SimpleNamespace(lane_batch=[1, 16, 16])
    leader.table = SimpleNamespace(ready_queries=lambda: waiting)
    assert leader.pick_lane(free) == expect


@pytest.mark.parametrize("status,expect", [
    ({}, {"lanes": 1, "quick": False}),  # a server from before lanes
    ({"lanes": 2, "quick": True}, {"lanes": 2, "quick": True}),
    ({"lanes": 8, "quick": False}, {"lanes": 8, "quick": False}),
])
def test_the_dealer_reads_the_lanes_a_server_announces(status, expect):
    assert status_lanes(status) == expect


@pytest.mark.parametrize("status", [{"lanes": 0}, {"lanes": 9}, {"lanes": "2"}, {"lanes": True}, {"lanes": 2.0},
                                    {"quick": "yes"}, {"quick": 1}, {"lanes": -(2 ** 70)}])
def test_a_status_with_lanes_out_of_range_is_refused(status):
    with pytest.raises(ValueError, match="expected"):
        status_lanes(status)


def test_the_serve_program_arguments_name_the_lanes():
    assert service_program_args(16, 129, 291, 8) == ["16", "129", "291", "8", "serve"]
    assert service_program_args(16, 129, 291, 8, lanes=2, quick=True) == \
        ["16", "129", "291", "8", "serve", "lanes", "2", "quick"]
    assert service_program_args(16, 129, 320, 8, [8, -1.5], 2, True)[5:] == \
        ["lanes", "2", "quick", "names", "8", "m1.5"]


@pytest.mark.parametrize("seq", [True, "1", 1.0, 7, None])
def test_server_0_refuses_an_answer_to_no_plan_it_has_out(monkeypatch, seq):
    """Server 1's "done" must name a plan out by its integer seq (True == 1 in Python, and must not pass for it):
    anything else ends the session, never completes another plan."""
    from orchestration.server import link as link_mod
    from orchestration.server.party import SessionEnded

    leader = Leader.__new__(Leader)
    leader.out = {1: 0}
    leader.follower_gen = None
    monkeypatch.setattr(link_mod, "link_receive", lambda _sock: {"type": "done", "seq": seq, "current": "g"})
    leader.link = None
    with pytest.raises(SessionEnded, match="server 1 sent done"):
        leader.read()
    assert leader.out == {1: 0}


def test_long_lived_dealer_runs_multiply_matrices_with_matrix_triples():
    """A request loop has no known count of matrix products: without the option MP-SPDZ multiplies Q.W with a
    triple per scalar product (C=10,000: 3.4 s a batch of 16 instead of 0.6 s). One-job runs keep MP-SPDZ's choice,
    and semi2k has no matrix triples to force."""
    dealer, semi2k = protocol("dealer"), protocol("semi2k")
    assert "force_matrix_triples" in party_args(dealer, long_lived=True)
    assert "force_matrix_triples" not in party_args(dealer)
    assert party_args(semi2k, long_lived=True) == party_args(semi2k)
