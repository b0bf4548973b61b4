"""Runs on a server: the gateway's client connections (TLS 1.2, AEAD suites, client certificates pinned).

Every client is hostile until checked, an authorised one included (it may be someone else's). So:

* at most ``max_handshakes`` TLS handshakes are in progress at once, each within ``handshake_timeout``;
  at most ``max_connections`` authenticated connections in all and ``max_per_client`` per client
  certificate; beyond, the connection is closed (after a handshake, with the error ``busy``);
* a frame's header is read and checked (type, id, sizes against the model served and the bounds of
  :mod:`orchestration.server.requests`) before its body is read, so no connection buffers more than
  one request of the served model's size; a frame must arrive within ``frame_timeout``;
* the pinned certificates and the certificate's notAfter are checked on every frame, and
  :meth:`ClientConnections.sweep` closes, within a second, the connections of a client whose pin was
  removed or whose certificate expired, and connections idle for ``idle_timeout``;
* anything malformed ends that one connection with an error frame, never the gateway.

OpenSSL forbids reading and writing one connection from two threads at once, so every connection
has an owner thread that alone reads and writes it; other threads queue frames in its
:class:`Outbox` (never blocking on the network: a client that stops reading delays only itself).
"""
from __future__ import annotations

import collections
import logging
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestration.mpspdz import certs as certs_mod
from orchestration.shared.wire import WireError, encode, receive

logger = logging.getLogger(__name__)

MAX_HANDSHAKES = 32
MAX_CONNECTIONS = 128
MAX_PER_CLIENT = 8
HANDSHAKE_TIMEOUT = 5.0
FRAME_TIMEOUT = 30.0
IDLE_TIMEOUT = 300.0


class Refused(WireError):
    """A frame the gateway will not read on: the connection is answered with ``code`` and closed."""

    def __init__(self, message: str, code: str = "bad-request", rid: str | None = None):
        super().__init__(message)
        self.code, self.rid = code, rid


@dataclass(frozen=True)
class Limits:
    max_handshakes: int = MAX_HANDSHAKES
    max_connections: int = MAX_CONNECTIONS
    max_per_client: int = MAX_PER_CLIENT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    frame_timeout: float = FRAME_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT


class Outbox:
    """Frames other threads want written on a TLS connection that one thread owns; the owner is woken
    through a socket pair and writes them with :meth:`flush`."""

    def __init__(self) -> None:
        self._frames: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def put(self, frame: bytes | None = None) -> None:
        """Queue ``frame`` (None: only wake the owner)."""
        with self._lock:
            if frame is not None:
                self._frames.append(frame)
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):  # already woken, or closed with its connection
            pass

    def wait(self, sock: ssl.SSLSocket, timeout: float) -> bool:
        """Wait until ``sock`` has data or a frame (or wake-up) is queued; True when ``sock`` has data."""
        if sock.pending():
            return True
        ready = select.select([sock, self._r], [], [], timeout)[0]
        if self._r in ready:
            try:
                while self._r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        return sock in ready

    def flush(self, sock: ssl.SSLSocket) -> None:
        """Owner only: write every queued frame."""
        while True:
            with self._lock:
                if not self._frames:
                    return
                frame = self._frames.popleft()
            sock.sendall(frame)

    def close(self) -> None:
        self._r.close()
        self._w.close()


class ClientConn:
    """One authenticated client connection, owned by its thread; replies from other threads are queued."""

    def __init__(self, sock: ssl.SSLSocket, name: str, fp: str, not_after: float, peer: str):
        self.sock, self.name, self.fp, self.not_after, self.peer = sock, name, fp, not_after, peer
        self.outbox = Outbox()
        self.open = True
        self.last_frame = time.monotonic()
        self.cut: str | None = None  # why the gateway closes it (revoked, expired, idle)

    def reply(self, header: dict[str, Any], body: bytes = b"") -> None:
        if self.open:
            self.outbox.put(encode(header, body))

    def close_soon(self, why: str) -> None:
        """Ask the owner thread to close the connection (any thread)."""
        self.cut = why
        self.outbox.put(None)

    def close(self) -> None:
        self.open = False
        try:
            self.sock.close()
        except OSError:
            pass
        self.outbox.close()


class Pins:
    """The client certificates pinned in ``<server>/clients``, read again whenever the folder changes."""

    def __init__(self, server_dir: Path):
        self.server_dir = server_dir
        self.folder = certs_mod.client_dir_of(server_dir)
        self._stamp: tuple[Any, ...] | None = None
        self._pins: dict[str, certs_mod.PinnedClient] = {}
        self._lock = threading.Lock()

    def _stamp_now(self) -> tuple[Any, ...]:
        try:
            st = os.stat(self.folder)
            entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(self.folder))
        except OSError:
            return ()
        return (st.st_mtime_ns, tuple(entries))

    def current(self) -> dict[str, certs_mod.PinnedClient]:
        stamp = self._stamp_now()
        with self._lock:
            if stamp != self._stamp:
                self._pins = certs_mod.allowed_clients(self.server_dir)
                self._stamp = stamp
            return self._pins


class ClientConnections:
    """Accepts, authenticates and serves client connections for one gateway. ``handle(conn, header,
    body)`` takes a checked frame; ``check(conn, header)`` returns the body size it accepts or raises
    :class:`Refused`; ``on_close(conn)`` runs when a connection ends."""

    def __init__(self, party: int, server_dir: Path, own: Callable[[], tuple[Path, Path]], *,
                 check: Callable[[ClientConn, dict[str, Any]], int],
                 handle: Callable[[ClientConn, dict[str, Any], bytes], None],
                 on_close: Callable[[ClientConn], None], stop: threading.Event, limits: Limits = Limits()):
        self.party, self.server_dir, self.own = party, server_dir, own
        self.check, self.handle, self.on_close, self.stop, self.limits = check, handle, on_close, stop, limits
        self.pins = Pins(server_dir)
        self.lock = threading.Lock()
        self.conns: set[ClientConn] = set()
        self.handshakes = threading.BoundedSemaphore(limits.max_handshakes)
        self._ctx: tuple[int, ssl.SSLContext] | None = None

    def context(self) -> ssl.SSLContext:
        """The context for a new client connection: this server's certificate (``own()``: certificate and
        key files), TLS 1.2 with AEAD suites, trusting exactly the clients pinned right now."""
        allowed = self.pins.current()
        cached = self._ctx
        if cached is not None and cached[0] == id(allowed):
            return cached[1]
        ctx = certs_mod.harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.load_cert_chain(*self.own())
        ctx.verify_mode = ssl.CERT_REQUIRED
        if allowed:
            ctx.load_verify_locations(cadata="".join(c.pem for c in allowed.values()))
        self._ctx = (id(allowed), ctx)
        return ctx

    def forget_context(self) -> None:
        """This server's own certificate may have changed: build the next context afresh."""
        self._ctx = None

    # -- accepting --------------------------------------------------------------------------------------

    def accept_loop(self, lsock: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                raw, addr = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stop.is_set():
                    return
                time.sleep(0.05)  # out of file descriptors, say: do not spin
                continue
            if not self.handshakes.acquire(blocking=False):
                logger.warning("refused client connection from %s:%d: %d TLS handshakes in progress already "
                               "(the most this gateway allows)", addr[0], addr[1], self.limits.max_handshakes)
                raw.close()
                continue
            threading.Thread(target=self._serve, args=(raw, addr), daemon=True).start()

    def _handshake(self, raw: socket.socket, peer: str) -> ClientConn | None:
        try:
            raw.settimeout(self.limits.handshake_timeout)
            sock = self.context().wrap_socket(raw, server_side=True)
            der = sock.getpeercert(binary_form=True)
            if der is None:
                raise ssl.SSLError("no client certificate")
            fp = certs_mod.fingerprint(ssl.DER_cert_to_PEM_cert(der))
            pinned = self.pins.current().get(fp)
            if pinned is None:
                raise ssl.SSLError(f"certificate {fp[:16]}... is not pinned in {self.pins.folder}")
            info = sock.getpeercert() or {}
            not_after = ssl.cert_time_to_seconds(info["notAfter"]) if "notAfter" in info else float("inf")
            if time.time() >= not_after:
                raise ssl.SSLError(f"certificate of client {pinned.name} expired")
        except (ssl.SSLError, OSError, ValueError, KeyError, certs_mod.CertError) as exc:
            logger.warning("refused client connection from %s: %s", peer, _one_line(exc))
            raw.close()
            return None
        return ClientConn(sock, pinned.name, fp, not_after, peer)

    def _admit(self, conn: ClientConn) -> str | None:
        """Count ``conn`` in, or say why not."""
        with self.lock:
            mine = sum(1 for c in self.conns if c.name == conn.name)
            if len(self.conns) >= self.limits.max_connections:
                return f"server {self.party} holds {len(self.conns)} client connections (the most it allows)"
            if mine >= self.limits.max_per_client:
                return (f"client {conn.name} holds {mine} connections to server {self.party} already (at most "
                        f"{self.limits.max_per_client})")
            self.conns.add(conn)
        return None

    def _serve(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            conn = self._handshake(raw, peer)
        finally:
            self.handshakes.release()
        if conn is None:
            return
        why = self._admit(conn)
        if why is not None:
            logger.warning("client %s (%s): %s; connection closed", conn.name, peer, why)
            try:
                conn.sock.settimeout(2.0)
                conn.sock.sendall(encode({"type": "error", "id": None, "code": "busy", "message": why}))
            except OSError:
                pass
            conn.close()
            return
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        logger.info("client %s connected from %s", conn.name, peer)
        try:
            self._loop(conn)
        except Refused as exc:
            logger.warning("client %s (%s): %s; connection dropped", conn.name, peer, exc)
            self._last_word(conn, {"type": "error", "id": exc.rid, "code": exc.code, "message": str(exc)})
        except WireError as exc:
            if str(exc) != "connection closed":
                logger.warning("client %s (%s): %s; connection dropped", conn.name, peer, exc)
                self._last_word(conn, {"type": "error", "id": None, "code": "bad-request", "message": str(exc)})
        except (OSError, ssl.SSLError) as exc:
            logger.info("client %s (%s): connection lost (%s)", conn.name, peer, _one_line(exc))
        except Exception as exc:  # a bug must cost one connection, never the gateway
            logger.exception("client %s (%s): unexpected %s; connection dropped", conn.name, peer, type(exc).__name__)
            self._last_word(conn, {"type": "error", "id": None, "code": "failed", "message": "internal error"})
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()
            self.on_close(conn)

    @staticmethod
    def _last_word(conn: ClientConn, header: dict[str, Any]) -> None:
        try:
            conn.sock.settimeout(2.0)
            conn.outbox.flush(conn.sock)
            conn.sock.sendall(encode(header))
        except OSError:
            pass

    def _loop(self, conn: ClientConn) -> None:
        sock = conn.sock
        while not self.stop.is_set():
            readable = conn.outbox.wait(sock, 0.5)
            sock.settimeout(self.limits.frame_timeout)
            conn.outbox.flush(sock)
            if conn.cut is not None:
                raise Refused(conn.cut, "refused")
            if not readable:
                continue
            header, body = receive(sock, check=lambda h: self._check_frame(conn, h),
                                   deadline=time.monotonic() + self.limits.frame_timeout)
            conn.last_frame = time.monotonic()
            self.handle(conn, header, body)

    def _check_frame(self, conn: ClientConn, header: dict[str, Any]) -> int:
        why = self.standing(conn)
        if why is not None:
            raise Refused(why, "refused")
        return self.check(conn, header)

    def standing(self, conn: ClientConn) -> str | None:
        """Why ``conn`` may not go on (its pin removed, its certificate expired), or None."""
        if conn.fp not in self.pins.current():
            return f"client {conn.name}'s certificate is no longer pinned on server {self.party}"
        if time.time() >= conn.not_after:
            return f"client {conn.name}'s certificate expired"
        return None

    def sweep(self) -> None:
        """Close revoked, expired and idle connections (the janitor calls this every second)."""
        now = time.monotonic()
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            why = self.standing(conn)
            if why is None and now - conn.last_frame > self.limits.idle_timeout:
                why = f"connection idle for {self.limits.idle_timeout:.0f} s"
            if why is not None and conn.cut is None:
                logger.info("client %s (%s): %s; closing the connection", conn.name, conn.peer, why)
                conn.close_soon(why)

    def count(self) -> int:
        with self.lock:
            return len(self.conns)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text.splitlines()) == 1 else " ".join(text.split())[:300]


__all__ = ["ClientConn", "ClientConnections", "Limits", "Outbox", "Pins", "Refused"]
