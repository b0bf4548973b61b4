"""Runs on a server: the link between the two gateways (TLS 1.2, AEAD, the servers' certificates pinned).

Both parties must compute on the same queries in the same order, so server 0 *leads*: it forms each
batch from the requests both servers hold (:meth:`orchestration.server.requests.RequestTable.plan`),
sends the batch's plan (request ids and positions, model generation, lane) to server 1, and both feed
their party on that lane. With several lanes (the party's request loops, each an MP-SPDZ thread) a plan goes
out for every lane that is free, so that many batches are in flight; each lane runs its plans in order, and
server 1 answers each plan when it is computed, whatever the order of the lanes. Before a switch of model
generation server 0 waits until every plan is answered; then each lane's next plan re-reads the model. Each
gateway announces on the link every request that reaches it, with its sizes (``[id, n, d1]``): server 1 as
they arrive, server 0 with each plan. Server 1 checks every plan against its own copies before a share is used
(:meth:`~RequestTable.gather`).

Messages (each a frame of :mod:`orchestration.shared.wire`)::

    0 -> 1   hello {gen}                     at the start of a session
             plan  {seq, probe}              are you there, which generation do you hold?
             plan  {seq, restart}            both restart for a generation of other sizes
             plan  {seq, gen, lane, reload, slots, reject, have}
    1 -> 0   hello {ok, message}
             have  {ids}                     requests that reached server 1: [[id, n, d1], ...]
             done  {seq, current}            plan seq computed (any order); the generation server 1 holds now

A message that is not one of these, from either side, ends the session (both start a new one).
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from orchestration.server.connections import Outbox
from orchestration.server.lanes import LaneWorkers
from orchestration.server.party import CMD_RELOAD, CMD_SERVE, SessionEnded, Switching
from orchestration.shared.wire import WireError, encode, int_field, receive, send, str_field

if TYPE_CHECKING:
    from orchestration.server.gateway import ServiceServer

logger = logging.getLogger(__name__)

HEARTBEAT = 5.0  # seconds: an idle server 0 asks server 1 at least this often, which finds a dead link
MAX_LINK_HEADER = 4 << 20  # a link message holds ids and sizes only (a plan of 1,024 slots, 2,000 announcements)
ANNOUNCE_CHUNK = 2000  # requests announced in one message at most
REJECT_CHUNK = 500  # refusals sent with one plan at most


def link_receive(sock: ssl.SSLSocket) -> dict[str, Any]:
    """One message of the other gateway (a header; link messages have no body)."""
    header, _ = receive(sock, check=lambda h: 0, max_body=0, max_header=MAX_LINK_HEADER)
    return header


class LinkListener:
    """Server 1: takes server 0's link connections (only server 0's pinned certificate gets through)."""

    def __init__(self, context: Callable[[], ssl.SSLContext], stop: threading.Event):
        self.context, self.stop = context, stop
        self.lock = threading.Condition()
        self.fresh: ssl.SSLSocket | None = None
        self.renewed = threading.Event()  # server 0 opened a new link: the session in progress is over

    def accept(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        try:
            raw.settimeout(10.0)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context().wrap_socket(raw, server_side=True)
            sock.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            logger.warning("refused link connection from %s:%d: %s", addr[0], addr[1], str(exc).strip()[:300])
            raw.close()
            return
        with self.lock:
            if self.fresh is not None:
                self.fresh.close()
            self.fresh = sock
            self.lock.notify_all()
        self.renewed.set()

    def take(self) -> ssl.SSLSocket:
        with self.lock:
            while self.fresh is None and not self.stop.is_set():
                self.lock.wait(0.5)
            if self.fresh is None:
                raise SessionEnded("stopping")
            sock, self.fresh = self.fresh, None
            self.renewed.clear()
            return sock


def connect_link(addr: tuple[str, int], context: ssl.SSLContext, stop: threading.Event) -> ssl.SSLSocket:
    """Server 0: the link to server 1's gateway, tried until it answers or ``stop`` is set."""
    warned = False
    while not stop.is_set():
        try:
            raw = socket.create_connection(addr, timeout=2.0)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw)
            sock.settimeout(None)
            return sock
        except (OSError, ssl.SSLError) as exc:
            if not warned:
                logger.info("server 0: waiting for server 1's gateway at %s:%d (%s)", *addr, str(exc).strip()[:200])
                warned = True
            time.sleep(0.5)
    raise SessionEnded("stopping")


class Leader:
    """Server 0, the link's one reader and writer: plans batches of requests both servers hold, one per free lane."""

    def __init__(self, gw: "ServiceServer", link: ssl.SSLSocket, box: Outbox):
        self.gw, self.link, self.box, self.table = gw, link, box, gw.table
        self.seq = 0
        self.out: dict[int, int | None] = {}  # plans server 1 has not answered: seq -> lane (None: no batch)
        self.follower_gen: str | None = None  # the generation server 1 said it holds, in its latest answer
        self.reload: set[int] = set()  # lanes whose next batch re-reads the model (after a switch)

    def send_plan(self, msg: dict[str, Any], lane: int | None = None) -> int:
        """A message to server 1, with the requests that reached server 0 since the last one; returns its seq."""
        seq = msg["seq"] = self.seq
        self.seq += 1
        msg["have"] = self.table.take_announcements(ANNOUNCE_CHUNK)
        send(self.link, msg)
        self.out[seq] = lane
        return seq

    def read(self) -> None:
        """One message from server 1: an announcement, or the answer to one of the plans out."""
        msg = link_receive(self.link)
        kind = msg.get("type")
        if kind == "have":
            try:
                self.table.mark_held(msg.get("ids"))
            except ValueError as exc:
                raise SessionEnded(f"server 1: {exc}") from None
            return
        seq = msg.get("seq")
        if kind != "done" or not isinstance(seq, int) or isinstance(seq, bool) or seq not in self.out:
            raise SessionEnded(f"server 1 sent {kind} {seq} with plans {sorted(self.out)} out")
        del self.out[seq]
        current = msg.get("current")
        self.follower_gen = current if isinstance(current, str) else None

    def ack(self, seq: int) -> str | None:
        """Wait for server 1's answer to plan ``seq`` (taking what comes first on the way); what it holds now."""
        while seq in self.out:
            self.read()
        return self.follower_gen

    def drain(self, lanes: LaneWorkers) -> None:
        """Every plan answered by server 1 and computed by this server's lanes."""
        while self.out:
            self.read()
        if not lanes.wait_idle(self.gw.party_timeout):
            raise SessionEnded(f"server 0's party did not finish its batches within {self.gw.party_timeout:.0f} s")

    def pick_lane(self, free: list[int]) -> int:
        """Of the free lanes, the smallest whose batch holds every query waiting, else the largest: a face that
        comes alone takes the quick lane (a batch of one), a crowd the lanes of a whole batch."""
        batch = self.gw.lane_batch
        waiting = self.table.ready_queries()
        fits = [k for k in free if batch[k] >= waiting]
        return min(fits, key=lambda k: batch[k]) if fits else max(free, key=lambda k: batch[k])

    def run(self) -> None:
        lanes = LaneWorkers(len(self.gw.lane_batch), "server0")
        try:
            self._run(lanes)
        finally:
            lanes.close()

    def _run(self, lanes: LaneWorkers) -> None:
        gw, table = self.gw, self.table
        last_contact = time.monotonic()
        while not gw.stop.is_set():
            gw.driver.check_alive()
            lanes.check()
            free = [k for k in range(len(gw.lane_batch)) if k not in self.out.values()]
            if (not free or not table.ready()) and self.box.wait(self.link, 0.5):  # a request, an answer, news
                self.read()
                continue
            if not free:
                continue
            assert gw.serving is not None
            gen = gw.serving["gen"]
            mine = gw.current()
            idle = time.monotonic() - last_contact > HEARTBEAT or table.announcing() > ANNOUNCE_CHUNK
            if idle or (mine is not None and mine["gen"] != gen):
                self.drain(lanes)
                last_contact = time.monotonic()
                if idle or self.follower_gen != (mine or {}).get("gen"):  # what does server 1 hold now?
                    self.ack(self.send_plan({"type": "plan", "probe": True}))
                if mine is not None and mine["gen"] != gen and self.follower_gen == mine["gen"]:
                    if tuple(mine.get(k) for k in ("d1", "c", "exp_bits", "names")) != tuple(
                            gw.serving.get(k) for k in ("d1", "c", "exp_bits", "names")):
                        self.send_plan({"type": "plan", "restart": mine["gen"]})
                        raise Switching(f"switching to generation {mine['gen']}, of other sizes: restarting")
                    gw.driver.install_model(mine["gen"])  # no lane computes: every plan is answered
                    gw.serving, gen = mine, mine["gen"]
                    self.reload = set(range(len(gw.lane_batch)))
                    logger.info("server 0: switched to model generation %s between two batches", gen)
            lane = self.pick_lane(free)
            command = CMD_RELOAD if lane in self.reload else CMD_SERVE
            slots, held = table.plan(gen, pending=mine["gen"] if mine is not None else None,
                                     room=gw.lane_batch[lane])
            rejects = table.take_rejects(REJECT_CHUNK)
            if not slots and command == CMD_SERVE:
                if rejects:
                    self.send_plan({"type": "plan", "gen": gen, "slots": [], "reject": rejects})
                elif held:  # requests wait for a switch server 1 is not ready for yet
                    gw.stop.wait(0.05)
                continue
            self.send_plan({"type": "plan", "gen": gen, "lane": lane, "reload": command == CMD_RELOAD,
                            "slots": [[r.id, s, c] for r, s, c in slots if r is not None], "reject": rejects}, lane)
            self.reload.discard(lane)
            in_flight = sum(v is not None for v in self.out.values())
            if in_flight > gw.in_flight_peak:  # the operator's log, not the clients' status: it tells of others' load
                gw.in_flight_peak = in_flight
                logger.info("server 0: %d batches in flight at once (lanes of %s queries)", in_flight, gw.lane_batch)
            d1 = int(gw.serving["d1"])
            lanes.submit(lane, lambda c=command, sl=slots, g=gen, k=lane: gw.compute(c, sl, g, k, d1))
            last_contact = time.monotonic()


class Follower:
    """Server 1, the link's one reader: runs server 0's plans (checked) on their lanes, announces requests."""

    def __init__(self, gw: "ServiceServer", link: ssl.SSLSocket, box: Outbox, renewed: threading.Event):
        self.gw, self.link, self.box, self.table, self.renewed = gw, link, box, gw.table, renewed
        self.write = threading.Lock()  # the lanes answer plans while the main loop announces requests
        self.lanes: LaneWorkers | None = None

    def done(self, seq: int) -> None:
        with self.write:
            self.box.flush(self.link)  # announcements go out before anything else this server sends
            send(self.link, {"type": "done", "seq": seq, "current": self.gw.current_name()})

    def run(self) -> None:
        self.lanes = LaneWorkers(len(self.gw.lane_batch), "server1")
        try:
            self._run(self.lanes)
        finally:
            self.lanes.close()

    def _run(self, lanes: LaneWorkers) -> None:
        gw = self.gw
        silence = 3 * HEARTBEAT + gw.party_timeout  # server 0 writes at least every HEARTBEAT seconds
        self.link.settimeout(gw.party_timeout)  # within a message
        heard = time.monotonic()
        while not gw.stop.is_set():
            gw.driver.check_alive()
            lanes.check()
            if self.renewed.is_set():
                raise SessionEnded("server 0 opened a new link")
            readable = self.box.wait(self.link, 0.5)
            with self.write:
                self.box.flush(self.link)
            if not readable:
                if time.monotonic() - heard > silence:
                    raise SessionEnded(f"server 0 sent nothing for {silence:.0f} s")
                continue
            plan = link_receive(self.link)
            heard = time.monotonic()
            try:
                self.follow(plan)
            except (WireError, ValueError, KeyError, TypeError) as exc:
                raise SessionEnded(f"server 0 sent a plan this server cannot follow: {exc}") from None

    def follow(self, plan: dict[str, Any]) -> None:
        gw, table, lanes = self.gw, self.table, self.lanes
        assert lanes is not None
        if plan.get("type") != "plan":
            raise SessionEnded(f"server 0 sent {plan.get('type')!r} instead of a plan")
        seq = int_field(plan, "seq", 0, 1 << 62)
        table.mark_held(plan.get("have", []))
        if "restart" in plan:
            raise Switching(f"server 0 switches to generation {plan['restart']} of other sizes: restarting")
        if plan.get("probe"):
            self.done(seq)
            return
        table.apply_rejects(plan.get("reject", []))
        if not plan.get("slots") and not plan.get("reload"):
            self.done(seq)
            return
        gen = str_field(plan, "gen")
        lane = int_field(plan, "lane", 0, len(gw.lane_batch) - 1)
        command = CMD_SERVE
        if plan.get("reload"):
            if gw.serving is None or gw.serving["gen"] != gen:
                model = gw.generation(gen)
                # server 0 switches only once every plan is answered: no lane of this server computes now
                if not lanes.wait_idle(gw.party_timeout):
                    raise SessionEnded(f"server 1's party did not finish its batches within {gw.party_timeout:.0f} s")
                gw.driver.install_model(gen)
                gw.serving = model
                logger.info("server 1: switched to model generation %s between two batches", gen)
            command = CMD_RELOAD
        assert gw.serving is not None
        d1 = int(gw.serving["d1"])
        slots = table.gather(plan.get("slots", []), gen, d1, gw.lane_batch[lane])

        def job() -> None:
            gw.compute(command, slots, gen, lane, d1)
            self.done(seq)

        lanes.submit(lane, job)


def link_box_messages(items: list[list[Any]]) -> list[bytes]:
    """Server 1's announcements of requests that reached it, in messages of at most ANNOUNCE_CHUNK."""
    return [encode({"type": "have", "ids": items[k:k + ANNOUNCE_CHUNK]}) for k in range(0, len(items), ANNOUNCE_CHUNK)]


__all__ = ["HEARTBEAT", "Follower", "Leader", "LinkListener", "connect_link", "link_box_messages", "link_receive"]
