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
import fcntl
import logging
import os
import select
import socket
import ssl
import termios
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
    """One authenticated client connection, owned by its thread; replies from other threads are queued.

    ``name`` and ``role`` are the pinned certificate's (``clients/<name>.pem``, its ``OU=role-<role>``;
    see orchestration.shared.roles for what each role may ask)."""

    def __init__(self, sock: ssl.SSLSocket, name: str, fp: str, not_after: float, peer: str,
                 role: str = certs_mod.DEFAULT_ROLE):
        self.sock, self.name, self.fp, self.not_after, self.peer = sock, name, fp, not_after, peer
        self.role = role
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
            entries = sorted((e.name, st.st_mtime_ns, st.st_size) for e in os.scandir(self.folder)
                             for st in (e.stat(),))
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
        # the pins a context was built for, kept (not their id(): a later dict can reuse a freed one's id, and
        # then a context without the newest pins would be taken for current)
        self._ctx: tuple[dict[str, certs_mod.PinnedClient], ssl.SSLContext] | None = None

    def context(self) -> ssl.SSLContext:
        """The context for a new client connection: this server's certificate (``own()``: certificate and
        key files), TLS 1.2 with AEAD suites, trusting exactly the clients pinned right now."""
        allowed = self.pins.current()
        cached = self._ctx
        if cached is not None and cached[0] is allowed:
            return cached[1]
        ctx = certs_mod.harden_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.load_cert_chain(*self.own())
        ctx.verify_mode = ssl.CERT_REQUIRED
        if allowed:
            ctx.load_verify_locations(cadata="".join(c.pem for c in allowed.values()))
        self._ctx = (allowed, ctx)
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
        seen: list[bytes] = []
        try:
            sock = watched_handshake(self.context(), raw, self.limits.handshake_timeout, seen)
            der = sock.getpeercert(binary_form=True)
            if der is None:
                raise ssl.SSLError("no client certificate")
            fp = certs_mod.fingerprint(ssl.DER_cert_to_PEM_cert(der))
            pinned = self.pins.current().get(fp)
            info = sock.getpeercert() or {}
            not_after = ssl.cert_time_to_seconds(info["notAfter"]) if "notAfter" in info else float("inf")
            late = (f"this client's certificate (sha256 {colon(fp)}) is not pinned on server {self.party}" if pinned
                    is None else f"client {pinned.name}'s certificate expired" if time.time() >= not_after else None)
            if late is not None:  # the handshake passed (the pins changed meanwhile): say so to the client
                logger.warning("server %d refused client connection from %s: %s", self.party, peer, late)
                try:
                    sock.settimeout(2.0)
                    sock.sendall(encode({"type": "error", "id": None, "code": "refused", "message": late}))
                    sock.close()
                except OSError:
                    pass
                raw.close()
                return None
        except (ssl.SSLError, OSError, ValueError, KeyError, certs_mod.CertError) as exc:
            logger.warning("server %d refused client connection from %s: %s", self.party, peer,
                           self._refusal(exc, seen))
            raw.close()
            return None
        return ClientConn(sock, pinned.name, fp, not_after, peer, role=pinned.role)

    def _refusal(self, exc: BaseException, seen: list[bytes]) -> str:
        """Why, and whom: the certificate the client sent (read from its handshake bytes, since OpenSSL
        keeps a refused certificate to itself), its name and fingerprint, and how to pin it."""
        why = _one_line(exc)
        der = client_certificate(seen) if isinstance(exc, ssl.SSLError) else None
        if der is None:
            if isinstance(exc, ssl.SSLError) and "did not return a certificate" in why:
                return f"{why}: the client sent no certificate (make one with `invoke certs --client NAME`)"
            return why
        fp = certs_mod.fingerprint(ssl.DER_cert_to_PEM_cert(der))
        cn = common_name(der)
        held = self.pins.current().get(fp)
        who = f"certificate {cn!r}" if cn else "a certificate without a common name"
        if held is not None:  # pinned, refused all the same (expired, say): the reason is OpenSSL's
            return f"client {held.name}'s pinned {who} (sha256 {colon(fp)}) was refused: {why}"
        return (f"{who} (sha256 {colon(fp)}) is not pinned in {self.pins.folder} ({why}); if this client is to "
                f"be served, pin its certificate (its certs/client.pem) on both servers: "
                f"invoke certs --id {self.party} --allow-client FILE")

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
        # the dealer asks server 0's status ten times a second, each time on a new connection: at INFO that
        # is most of the log (about 860,000 lines a day), so its connections are logged at DEBUG only
        logger.log(logging.DEBUG if conn.role == certs_mod.DEALER_ROLE else logging.INFO,
                   "client %s (role %s) connected from %s", conn.name, conn.role, peer)
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


# ---- the client's certificate as it sent it -----------------------------------------------------------
#
# A refused certificate never reaches Python (ssl gives no peer certificate when verification fails), so the
# gateway reads the client's handshake itself: OpenSSL shakes hands over one end of a socket pair, and the
# gateway relays between the client and the other end, one whole TLS record at a time and only when OpenSSL
# asks for more, keeping a copy of what the client sent. On a failure the TLS 1.2 Certificate message is
# looked up in that copy. On success nothing of the client's is left unread (OpenSSL read every record it was
# given), and the connection's own socket is put under the SSLSocket's descriptor (dup2): from then on it is
# an ordinary ssl.SSLSocket over the client's TCP connection, as if wrap_socket had been given it.

_MAX_RECORD = 5 + (1 << 14) + 2048  # a TLS 1.2 record's header and its largest body


def _recv_exact(raw: socket.socket, n: int, deadline: float) -> bytes:
    out = b""
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([raw], [], [], left)[0]:
            raise socket.timeout("TLS handshake not done in time")
        part = raw.recv(n - len(out))
        if not part:
            raise ConnectionError("the client closed the connection during the TLS handshake")
        out += part
    return out


def _client_record(raw: socket.socket, deadline: float) -> bytes:
    """The client's next TLS record, whole (or the next bytes, if they are no TLS record)."""
    head = _recv_exact(raw, 5, deadline)
    if head[0] not in (20, 21, 22, 23) or head[1] != 3:
        return head  # no TLS: OpenSSL says what is wrong with it
    n = int.from_bytes(head[3:5], "big")
    return head + _recv_exact(raw, min(n, _MAX_RECORD), deadline)


def _to_client(inner: socket.socket, raw: socket.socket) -> None:
    """Everything OpenSSL wrote so far, to the client."""
    while True:
        try:
            data = inner.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return
        raw.sendall(data)


def watched_handshake(ctx: ssl.SSLContext, raw: socket.socket, timeout: float, seen: list[bytes]) -> ssl.SSLSocket:
    """A server-side TLS handshake on ``raw`` within ``timeout`` that keeps, in ``seen``, each record the client
    sent; returns the SSLSocket on ``raw``'s connection with ``timeout`` set, as ``ctx.wrap_socket`` would."""
    deadline = time.monotonic() + timeout
    outer, inner = socket.socketpair()
    sock = ctx.wrap_socket(outer, server_side=True, do_handshake_on_connect=False)
    try:
        inner.setblocking(False)
        sock.setblocking(False)
        raw.settimeout(timeout)
        while True:
            try:
                sock.do_handshake()
                done = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                done = False
            except ssl.SSLError:
                _to_client(inner, raw)  # OpenSSL's alert: the client learns why, as with wrap_socket
                raise
            _to_client(inner, raw)
            if done:
                break
            record = _client_record(raw, deadline)
            seen.append(record)
            inner.sendall(record)
        try:
            left = outer_unread(sock)
        except OSError:
            left = 0
        if left:
            raise ssl.SSLError(f"{left} bytes of the client's left unread after the handshake")
        os.dup2(raw.fileno(), sock.fileno())  # the SSLSocket now speaks over the client's connection itself
        raw.close()  # its descriptor only: the connection stays open under sock's
        sock.settimeout(timeout)
        return sock
    except BaseException:
        sock.close()
        raise
    finally:
        inner.close()


def outer_unread(sock: ssl.SSLSocket) -> int:
    """Bytes waiting, unread by OpenSSL, in the socket under ``sock`` (FIONREAD)."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little") + sock.pending()


def client_certificate(seen: list[bytes]) -> bytes | None:
    """The first certificate (DER) of a TLS 1.2 Certificate message in the client's bytes, or None.

    Records: type 22 (handshake), version 3.x, 2-byte length; in them handshake messages: type 11
    (Certificate), 3-byte length, then the list's 3-byte length and each certificate's 3-byte length."""
    for data in seen:
        at = data.find(b"\x16\x03")
        while at != -1:
            body = data[at + 5:at + 5 + int.from_bytes(data[at + 3:at + 5], "big")]
            j = 0
            while j + 4 <= len(body):
                n = int.from_bytes(body[j + 1:j + 4], "big")
                msg = body[j + 4:j + 4 + n]
                if body[j] == 11 and len(msg) == n and n >= 6:
                    size = int.from_bytes(msg[3:6], "big")
                    der = msg[6:6 + size]
                    if size and len(der) == size and der[:1] == b"\x30":
                        return der
                j += 4 + n
            at = data.find(b"\x16\x03", at + 1)
    return None


_CN_OID = b"\x06\x03\x55\x04\x03"


def common_name(der: bytes) -> str:
    """The subject's common name of a DER certificate (the last CN: the issuer's comes first), printable
    ASCII only and at most 64 characters, for a log line; "" if none. The client chose it: it proves nothing."""
    at = der.rfind(_CN_OID)
    if at == -1 or at + 7 > len(der):
        return ""
    n = der[at + 6]
    if n & 0x80:
        return ""
    raw = der[at + 7:at + 7 + n]
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in raw.decode("latin-1"))[:64]


def colon(hex_fp: str) -> str:
    """A hex fingerprint as `invoke certs` prints it: upper case, colon-separated pairs."""
    return ":".join(hex_fp[k:k + 2] for k in range(0, len(hex_fp), 2)).upper()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text.splitlines()) == 1 else " ".join(text.split())[:300]


__all__ = ["ClientConn", "ClientConnections", "Limits", "Outbox", "Pins", "Refused"]
