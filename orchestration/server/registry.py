"""Runs on a server: the gallery's front desk, beside the recognition gateway (``invoke serve --sources``).

Sources send each server its shares of a contribution, ask for their own listing, withdraw their own
persons; an operator asks for a retraining. Every such operation reaches both servers from the client,
and server 0 *leads* it: it opens the registry link to server 1 (TLS, the servers' certificates pinned,
server 1 listens on its hosts-file port + :data:`REGISTRY_LINK_OFFSET`), and per operation::

    0 -> 1   op      {op, kind, source, person, n, base, plan}   what server 0 will do
    1 -> 0   ready   {ok, message}        server 1 holds the same operation (waited for up to HALF_WAIT s)
             (both run the operation's MPC job, the dealer as party 2, then install the same generation)
    1 -> 0   done    {ok, gen, message}
    0 -> 1   confirm {gen}                both hold gen: each destroys every older generation

One operation at a time on each server, in the order server 0 takes them. An operation that reaches
one server only is refused there after HALF_WAIT seconds and changes nothing. Every id is used once
(a replay is refused), a source addresses only its own persons (its certificate's name is the folder),
and every answer to a contribution or withdrawal carries a receipt signed with the server's key.
"""
from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from orchestration.mpspdz.hosts import Hosts
from orchestration.server import gallery_ops
from orchestration.server.connections import ClientConn, Refused
from orchestration.server.link import link_receive
from orchestration.server.gallery import MAX_PERSONS, MAX_PHOTOS, Gallery, GalleryError, check_id
from orchestration.shared import reference
from orchestration.shared.roles import ACTIONS, RoleError, require_role
from orchestration.shared.wire import WireError, body_shares, int_field, send, shares_body, str_field

logger = logging.getLogger(__name__)

REGISTRY_LINK_OFFSET = 500
HALF_WAIT = 20.0  # seconds one server waits for the other half of an operation
KINDS = ("contribute", "gallery", "withdraw", "train")
ACTION_OF = {"contribute": "contribute", "gallery": "gallery", "withdraw": "withdraw", "train": "train-on-servers"}


@dataclass
class Op:
    id: str
    kind: str
    source: str
    fields: dict[str, Any]
    started: threading.Event = field(default_factory=threading.Event)  # server 1: server 0 leads it now
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    t0: float = field(default_factory=time.monotonic)


class Registry:
    """One server's registry; :meth:`check` and :meth:`handle` are called by the gateway for the kinds in KINDS."""

    def __init__(self, env: gallery_ops.Env, link_context: Callable[[bool], ssl.SSLContext],
                 serving_gen: Callable[[], str | None], wake: Callable[[], None], stop: threading.Event,
                 half_wait: float = HALF_WAIT):
        self.env, self.link_context, self.serving_gen, self.wake, self.stop = env, link_context, serving_gen, wake, stop
        self.party = env.server.party
        self.half_wait = half_wait
        self.gallery: Gallery = env.gallery
        self.lock = threading.Lock()  # one operation at a time
        self.ops: dict[str, Op] = {}
        self.ops_lock = threading.Condition()
        self.job: dict[str, Any] | None = None  # the MPC job running now (server 0 tells the dealer in its status)
        for cid in self.gallery.pending_ids() if self.gallery.root.exists() else []:
            self.gallery.drop_pending(cid)  # halves of operations a stop cut short: never committed, gone

    # -- the dealer's view ------------------------------------------------------------------------------

    def announce(self, job: dict[str, Any] | None) -> None:
        self.job = job

    def status(self, role: str) -> dict[str, Any]:
        out: dict[str, Any] = {"sources": True, "job": self.job, "settings": self.env.settings.as_dict()}
        if role == "owner":
            out["gallery"] = self.gallery.counts()
        return out

    # -- client frames ----------------------------------------------------------------------------------

    def check(self, conn: ClientConn, header: dict[str, Any]) -> int:
        kind = header["type"]
        rid = header.get("id") if isinstance(header.get("id"), str) else None
        try:
            require_role(getattr(conn, "role", "owner"), ACTIONS[ACTION_OF[kind]], ACTION_OF[kind], conn.name)
        except RoleError as exc:
            raise Refused(str(exc), "refused", rid) from None
        s = self.env.settings
        if kind != "contribute":
            return 0
        n = int_field(header, "n", 1, MAX_PHOTOS)
        if int_field(header, "d", 1, 4096) != s.d:
            raise Refused(f"contribution of {header['d']}-value embeddings: this gallery holds {s.d}-value ones "
                          f"({s.embedder})", "bad-request", rid)
        new = header.get("new")
        if not isinstance(new, bool):
            raise Refused("contribution: 'new' must be true or false", "bad-request", rid)
        return 8 * (n * s.d + (s.name_words if new else 0))

    def handle(self, conn: ClientConn, header: dict[str, Any], body: bytes) -> None:
        kind = header["type"]
        rid = header.get("id")
        try:
            op_id = check_id(rid, f"{kind} id")
            if kind == "gallery":
                conn.reply(*self._listing(conn.name, op_id))
                return
            if self.gallery.seen(op_id):
                raise GalleryError(f"{kind} {op_id} was already received by server {self.party}: an id is used "
                                   "once (a replay is refused)")
            self.gallery.mark_seen(op_id)
            op = self._take(conn.name, kind, op_id, header, body)
            result = self._lead(op) if self.party == 0 else self._follow_wait(op)
        except (GalleryError, WireError, ValueError) as exc:
            self._drop(rid)
            conn.reply({"type": "error", "id": rid if isinstance(rid, str) else None, "code": "bad-request",
                        "message": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - the operation failed here; the gateway goes on
            logger.exception("server %d: %s %s failed", self.party, kind, str(rid)[:12])
            self._drop(rid)
            conn.reply({"type": "error", "id": rid, "code": "failed", "message": f"server {self.party}: {exc}"})
            return
        finally:
            with self.ops_lock:
                self.ops.pop(str(rid), None)
        if not result.get("ok"):
            conn.reply({"type": "error", "id": rid, "code": result.get("code", "bad-request"),
                        "message": result.get("message", "refused")})
            return
        conn.reply({"type": kind, "id": rid, **{k: v for k, v in result.items() if k != "ok"},
                    "receipt": self._receipt(kind, conn.name, op, result)})

    def _listing(self, source: str, rid: str) -> tuple[dict[str, Any], bytes]:
        persons = self.gallery.persons(source)
        names = [self.gallery.name(source, p.person) for p in persons]
        body = shares_body(np.concatenate(names)) if names else b""
        return ({"type": "gallery", "id": rid, "persons": [[p.person, p.photos, p.added] for p in persons]}, body)

    def _take(self, source: str, kind: str, op_id: str, header: dict[str, Any], body: bytes) -> Op:
        """Check the operation against this server's gallery and hold it (a contribution: aside, as pending)."""
        s, g = self.env.settings, self.gallery
        fields: dict[str, Any] = {}
        if kind == "contribute":
            person = check_id(header.get("person"), "person id")
            n, new = header["n"], header["new"]
            old = g.person(source, person)
            if new and old is not None:
                raise GalleryError(f"person {person} is already enrolled by {source}: send more photos with new=false")
            if not new and old is None:
                raise GalleryError(f"source {source} holds no person {person} on server {self.party}")
            if new and len(g.persons()) >= MAX_PERSONS:
                raise GalleryError(f"the gallery holds {MAX_PERSONS} persons, the most it takes")
            if old is not None and old.photos + n > MAX_PHOTOS:
                raise GalleryError(f"person {person} would have {old.photos + n} photos; at most {MAX_PHOTOS}")
            values = body_shares(body, n * s.d + (s.name_words if new else 0), f"contribution {op_id}")
            photos = values[:n * s.d].reshape(n, s.d)
            name = values[n * s.d:] if new else None
            g.hold_pending(op_id, {"source": source, "person": person, "n": n, "new": new}, photos, name)
            fields = {"person": person, "n": n, "new": new}
        elif kind == "withdraw":
            target = str_field(header, "person", 40)
            mine = [p.person for p in g.persons(source)]
            if target == "all":
                fields = {"persons": sorted(mine)}
            else:
                check_id(target, "person id")
                if target not in mine:
                    raise GalleryError(f"source {source} holds no person {target} on server {self.party} (a source "
                                       "withdraws only its own persons)")
                fields = {"persons": [target]}
        elif kind == "train":
            # at least one epoch: the warm start alone is what every enrolment already put in the model
            fields = {"epochs": int_field(header, "epochs", 1, 100), "batch": int_field(header, "batch", 1, 4096),
                      "lr": float(header.get("lr", 1.0))}
            if not 0 < fields["lr"] <= 100:
                raise GalleryError(f"train: lr {fields['lr']} out of range (0, 100]")
        op = Op(op_id, kind, source, fields)
        with self.ops_lock:
            self.ops[op_id] = op
            self.ops_lock.notify_all()
        return op

    def _drop(self, rid: Any) -> None:
        if isinstance(rid, str):
            try:
                self.gallery.drop_pending(check_id(rid, "id"))
            except GalleryError:
                pass

    # -- running an operation (both servers) -----------------------------------------------------------

    def _run(self, op: Op) -> dict[str, Any]:
        env = self.env
        if op.kind == "contribute":
            r = gallery_ops.enrol(env, op.id, op.id[:16])
            if not r["ok"]:
                bad = ", ".join(str(j) for j in r["bad"][:20])
                return {"ok": False, "code": "bad-request",
                        "message": f"contribution {op.id} refused whole: photo(s) {bad} of it are not unit-length "
                                   "embeddings with every value in (-1, 1) (checked on shares); nothing was stored"}
            return r
        if op.kind == "withdraw":
            return gallery_ops.withdraw(env, op.id, op.source, op.fields["persons"])
        s = env.settings
        params = reference.TrainParams(epochs=op.fields["epochs"], batch=op.fields["batch"], lr=op.fields["lr"],
                                       alpha=s.alpha, exp_bits=s.exp_bits, seed=int(op.id[:8], 16))
        return gallery_ops.retrain(env, op.id, op.id[:16], params)

    def _plan(self, op: Op) -> dict[str, Any]:
        """What both servers must agree on before they run ``op``."""
        cur = gallery_ops.current_model(self.env)[1]
        plan: dict[str, Any] = {"type": "op", "op": op.id, "kind": op.kind, "source": op.source, "base": cur,
                                "settings": self.env.settings.as_dict(), "fields": op.fields}
        if op.kind == "train":
            plan["plan"] = gallery_ops.train_plan(self.gallery)
        return plan

    def _lead(self, op: Op) -> dict[str, Any]:
        with self.lock:
            plan = self._plan(op)
            link = self._connect()
            try:
                send(link, plan)
                ready = self._receive(link)
                if ready.get("type") != "ready" or ready.get("ok") is not True:
                    self._drop(op.id)
                    return {"ok": False, "code": "bad-request",
                            "message": f"server 1: {str(ready.get('message'))[:500]}"}
                mine = self._run(op)
                theirs = self._receive(link, timeout=self.env.timeout + 60)
                if theirs.get("type") != "done" or theirs.get("gen") != mine.get("gen") \
                        or theirs.get("ok") != mine.get("ok"):
                    raise GalleryError(f"server 1 ended {op.kind} {op.id} otherwise ({theirs.get('message')}); "
                                       "the generations differ: the service stays on the previous one")
                if mine.get("gen"):
                    send(link, {"type": "confirm", "gen": mine["gen"]})
                    self._finish(op, mine)
                return mine
            finally:
                link.close()

    def _follow_wait(self, op: Op) -> dict[str, Any]:
        """Server 1: wait until server 0 led ``op`` on the registry link: HALF_WAIT seconds for it to start
        (longer while this server runs an earlier operation: server 0 takes them in order), then its run."""
        deadline = time.monotonic() + self.half_wait
        while not op.started.wait(0.5):
            if self.lock.locked():
                deadline = time.monotonic() + self.half_wait
            if time.monotonic() > deadline or self.stop.is_set():
                with self.ops_lock:
                    self.ops.pop(op.id, None)
                if op.started.is_set():
                    break
                self._drop(op.id)
                return {"ok": False, "code": "unavailable",
                        "message": f"server 1 holds {op.kind} {op.id}, but server 0 did not start it within "
                                   f"{self.half_wait:.0f} s: it reached this server only (or server 0 is down); nothing "
                                   "was changed, send it again with a new id"}
        if not op.done.wait(self.env.timeout + 60):
            return {"ok": False, "code": "failed", "message": f"{op.kind} {op.id} did not finish in time"}
        assert op.result is not None
        return op.result

    def _finish(self, op: Op, result: dict[str, Any]) -> None:
        """Both servers hold the new generation: older ones go; withdrawals wait for the service's switch."""
        destroyed = gallery_ops.destroy_older(self.env, result["gen"])
        logger.info("server %d: %s %s: generation %s (destroyed %d older)", self.party, op.kind, op.id[:12],
                    result["gen"], len(destroyed))
        self.wake()
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and self.serving_gen() not in (None, result["gen"]):
            time.sleep(0.05)

    # -- the registry link ---------------------------------------------------------------------------------

    def _connect(self) -> ssl.SSLSocket:
        hosts: Hosts = self.env.hosts
        addr = (hosts[1].address, hosts[1].port + REGISTRY_LINK_OFFSET)
        try:
            raw = socket.create_connection(addr, timeout=10.0)
            return self.link_context(False).wrap_socket(raw)
        except (OSError, ssl.SSLError) as exc:
            raise GalleryError(f"server 0 cannot reach server 1's registry at {addr[0]}:{addr[1]} ({exc}); "
                               "nothing was changed, try again once both servers run") from None

    @staticmethod
    def _receive(sock: ssl.SSLSocket, timeout: float = HALF_WAIT + 10) -> dict[str, Any]:
        sock.settimeout(timeout)
        return link_receive(sock)  # headers only, as on the gateways' link

    def follow(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        """Server 1: one registry connection of server 0 (one operation), in a thread of its own."""
        try:
            raw.settimeout(10.0)
            link = self.link_context(True).wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            logger.warning("server 1: refused registry connection from %s:%d: %s", *addr, str(exc)[:200])
            raw.close()
            return
        op: Op | None = None
        try:
            plan = self._receive(link)
            op_id = check_id(plan.get("op"), "operation id")
            try:
                op = self._await(op_id)
            except GalleryError as exc:
                send(link, {"type": "ready", "ok": False, "message": f"{exc}: it reached server 0 only"})
                return
            op.started.set()
            with self.lock:
                why = self._disagree(op, plan)
                if why:
                    send(link, {"type": "ready", "ok": False, "message": why})
                    op.result = {"ok": False, "code": "bad-request", "message": f"server 0 and server 1 disagree: {why}"}
                    self._drop(op.id)
                    return
                send(link, {"type": "ready", "ok": True})
                try:
                    result = self._run(op)
                except Exception as exc:  # noqa: BLE001 - reported to server 0 and to the client
                    result = {"ok": False, "code": "failed", "message": f"server 1: {exc}"}
                send(link, {"type": "done", "ok": result.get("ok"), "gen": result.get("gen"),
                            "message": result.get("message")})
                if result.get("gen"):
                    confirm = self._receive(link, timeout=30.0)
                    if confirm.get("type") == "confirm" and confirm.get("gen") == result["gen"]:
                        self._finish(op, result)
                op.result = result
        except (WireError, GalleryError, OSError, ValueError) as exc:
            logger.warning("server 1: registry operation from server 0 failed: %s", exc)
            if op is not None and op.result is None:
                op.result = {"ok": False, "code": "failed", "message": f"server 1: {exc}"}
        finally:
            if op is not None:
                if op.result is None:
                    op.result = {"ok": False, "code": "failed", "message": "server 0 broke off the operation"}
                op.done.set()
            link.close()

    def _await(self, op_id: str) -> Op:
        deadline = time.monotonic() + self.half_wait
        with self.ops_lock:
            while op_id not in self.ops or self.ops[op_id].started.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GalleryError(f"operation {op_id} did not reach server 1 within {self.half_wait:.0f} s")
                self.ops_lock.wait(left)
            return self.ops[op_id]

    def _disagree(self, op: Op, plan: dict[str, Any]) -> str | None:
        mine = self._plan(op)
        for key in ("kind", "source", "base", "settings", "fields", "plan"):
            if mine.get(key) != plan.get(key):
                return f"{key}: server 0 has {str(plan.get(key))[:200]}, server 1 {str(mine.get(key))[:200]}"
        return None

    # -- receipts ------------------------------------------------------------------------------------------

    def _receipt(self, kind: str, source: str, op: Op, result: dict[str, Any]) -> dict[str, Any]:
        """What this server did, signed with its key (the source checks it with the server's certificate)."""
        body = {"kind": kind, "server": self.party, "source": source, "id": op.id, "gen": result.get("gen"),
                "time": time.time(), **{k: v for k, v in op.fields.items() if k in ("person", "persons", "n")}}
        text = json.dumps(body, sort_keys=True)
        return {"statement": text, "signature": sign(self.env.server.root / "certs" / f"P{self.party}.key", text)}


def sign(key_path: Path, text: str) -> str:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    data = text.encode()
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        sig = key.sign(data)  # type: ignore[call-arg]
    return base64.b64encode(sig).decode()


__all__ = ["HALF_WAIT", "KINDS", "REGISTRY_LINK_OFFSET", "Registry", "sign"]
