"""Runs on a source (an enrolment station) or a query client: the gallery of many sources, through the service.

A **source** holds its own persons' photos and names in the clear and nothing of anyone else's. It
sends each server its additive shares of a person's embeddings and name (:meth:`SourceClient.contribute`),
lists its own persons, reconstructing their names from both servers' shares (:meth:`~SourceClient.gallery`),
and withdraws them (:meth:`~SourceClient.withdraw`). Each server answers with a receipt signed with its key,
checked here against the server's pinned certificate and kept in ``<client>/receipts/``.

A **query client** sends shares of face embeddings and gets back shares of the winner's name and of its
score, the top logit z_max (accepted when z_max >= the gallery's public logit threshold), both zero when the
face is nobody's: it learns a name or ``unknown_person``, never the class
index, another class's score or how many persons anyone enrolled (:meth:`QueryClient.recognise`).

Both talk to the servers through :class:`orchestration.client.service.ServiceClient`.
"""
from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from preprocessing import sharing
from preprocessing.fileio import atomic_write_json, private_dir
from preprocessing.sharing import FRAC_BITS

from orchestration.client.jobs import ZMAX_BOUND
from orchestration.client.service import ServiceClient
from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.hosts import Hosts
from orchestration.shared.wire import ServiceError, WireError, body_shares, shares_body

logger = logging.getLogger(__name__)

UNKNOWN_PERSON = "unknown_person"
NORM_RANGE = (0.9, 1.1)  # the servers check the same on shares


class SourceError(ValueError):
    """Bad input on the source, refused before anything is sent (names the value and what is expected)."""


# ---- names as ring elements -------------------------------------------------------------------------

def encode_name(name: str, words: int) -> np.ndarray:
    """A name as ``words`` 64-bit words of UTF-8, zero-padded (what the servers hold shares of)."""
    raw = name.encode("utf-8")
    if not name or "\0" in name:
        raise SourceError(f"person name {name!r}: expected a non-empty name without NUL characters")
    if len(raw) > 8 * words:
        raise SourceError(f"person name {name!r}: {len(raw)} bytes of UTF-8, at most {8 * words} fit the gallery")
    return np.frombuffer(raw.ljust(8 * words, b"\0"), dtype="<u8").astype(np.uint64)


def decode_name(words: np.ndarray) -> str | None:
    """The name in ``words``; None for all zeros; ValueError for anything that is no encoded name."""
    raw = np.asarray(words, dtype="<u8").tobytes()
    if not raw.strip(b"\0"):
        return None
    text = raw.rstrip(b"\0")
    if b"\0" in text:
        raise ValueError("a NUL inside the name")
    return text.decode("utf-8")


def check_embeddings(x: np.ndarray, d: int, what: str) -> np.ndarray:
    """The client's checks before sharing: shape, finite, every value in (-1, 1), unit length."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d:
        raise SourceError(f"{what}: embeddings of shape {x.shape}, expected (photos, {d}) for this gallery")
    if len(x) == 0:
        raise SourceError(f"{what}: no photo")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise SourceError(f"{what}: photo(s) {', '.join(map(str, bad[:10]))} hold NaN or infinite values")
    bad = np.flatnonzero((np.abs(x) >= 1).any(axis=1))
    if bad.size:
        raise SourceError(f"{what}: photo(s) {', '.join(map(str, bad[:10]))} hold values outside (-1, 1)")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero((norms < NORM_RANGE[0]) | (norms > NORM_RANGE[1]))
    if bad.size:
        raise SourceError(f"{what}: photo(s) {', '.join(map(str, bad[:10]))} are not unit-length embeddings "
                          f"(norms {', '.join(f'{v:.3f}' for v in norms[bad[:5]])}; expected {NORM_RANGE[0]}.."
                          f"{NORM_RANGE[1]})")
    return x


def verify_receipt(receipt: Any, server_pem: Path, party: int) -> dict[str, Any]:
    """A server's receipt: its statement, checked against the server's pinned certificate."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        text, sig = str(receipt["statement"]), base64.b64decode(receipt["signature"])
        key = x509.load_pem_x509_certificate(server_pem.read_bytes()).public_key()
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, text.encode(), padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, text.encode(), ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(sig, text.encode())  # type: ignore[call-arg]
        body = json.loads(text)
    except (KeyError, TypeError, ValueError, InvalidSignature) as exc:
        raise ServiceError(f"server {party}'s receipt does not verify against {server_pem} ({exc or 'bad signature'})",
                           "failed") from None
    if body.get("server") != party:
        raise ServiceError(f"server {party}'s receipt is signed for server {body.get('server')}", "failed")
    return body


@dataclass(frozen=True)
class Enrolled:
    person: str
    name: str
    photos: int
    added: float


class _Gallery:
    """What sources and query clients share: the service connection and the gallery's settings."""

    def __init__(self, client_dir: Path, hosts: Hosts, *, timeout: float = 120.0):
        self.dir = Path(client_dir)
        self.svc = ServiceClient(self.dir, hosts, timeout=timeout)

    def close(self) -> None:
        self.svc.close()

    def __enter__(self) -> "_Gallery":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def status(self) -> list[dict[str, Any]]:
        st = self.svc.status()
        if not all(s.get("sources") for s in st):
            raise ServiceError("the service keeps no gallery of many sources: start it with `invoke serve --sources`",
                               "refused")
        return st

    def settings(self) -> dict[str, Any]:
        st = self.status()
        if st[0].get("settings") != st[1].get("settings"):
            raise ServiceError(f"the servers' galleries have other settings: {st[0].get('settings')} and "
                               f"{st[1].get('settings')}", "failed")
        return dict(st[0]["settings"])

    def _both(self, frames: Sequence[tuple[dict[str, Any], bytes]], kind: str) -> list[tuple[dict[str, Any], bytes]]:
        answers = self.svc._exchange(frames)
        for i, (h, _) in enumerate(answers):
            if h.get("type") == "error":
                raise ServiceError(f"server {i}: {h.get('message')}", str(h.get("code") or "failed"))
            if h.get("type") != kind or h.get("id") != frames[i][0].get("id"):
                raise ServiceError(f"server {i} answered {h.get('type')} {h.get('id')}; expected {kind} "
                                   f"{frames[i][0].get('id')}", "failed")
        return answers


class SourceClient(_Gallery):
    """A source's side: contribute, list, withdraw (its own persons only)."""

    def _receipts(self, answers: list[tuple[dict[str, Any], bytes]], op: str) -> list[dict[str, Any]]:
        out = []
        for i, (h, _) in enumerate(answers):
            body = verify_receipt(h.get("receipt"), certs_mod.cert_dir(self.dir) / f"P{i}.pem", i)
            if body.get("id") != op:
                raise ServiceError(f"server {i}'s receipt is for {body.get('id')}, not {op}", "failed")
            out.append(h["receipt"])
        private_dir(self.dir / "receipts")
        atomic_write_json(self.dir / "receipts" / f"{op}.json", {"servers": out, "received": time.time()})
        return out

    def contribute(self, name: str, embeddings: np.ndarray, person: str | None = None) -> dict[str, Any]:
        """Add a person (``person`` None) or photos of one of this source's persons; returns the answer of
        server 0 with both receipts. Refused whole, changing nothing, when any photo fails a check."""
        s = self.settings()
        x = check_embeddings(embeddings, int(s["d"]), f"contribution for {name!r}")
        new = person is None
        pid = secrets.token_hex(16) if new else person
        words = encode_name(name, int(s["name_words"]))
        cid = secrets.token_hex(16)
        values = sharing.encode_fixed(x, FRAC_BITS).reshape(-1)
        if new:
            values = np.concatenate([values, words])
        halves = sharing.share(values)
        head = {"type": "contribute", "id": cid, "person": pid, "new": new, "n": int(len(x)), "d": int(s["d"])}
        answers = self._both([(head, shares_body(h)) for h in halves], "contribute")
        receipts = self._receipts(answers, cid)
        self._remember(pid, name)
        return {"person": pid, "name": name, "photos": answers[0][0].get("photos"), "gen": answers[0][0].get("gen"),
                "contribution": cid, "receipts": receipts}

    def _remember(self, pid: str, name: str) -> None:
        path = self.dir / "persons.json"
        known = json.loads(path.read_text()) if path.exists() else {}
        known[pid] = name
        atomic_write_json(path, known)

    def gallery(self) -> list[Enrolled]:
        """This source's persons, names reconstructed here from both servers' shares."""
        s = self.settings()
        L = int(s["name_words"])
        rid = secrets.token_hex(16)
        answers = self._both([({"type": "gallery", "id": rid}, b"")] * 2, "gallery")
        lists = [h.get("persons") or [] for h, _ in answers]
        if [p[:2] for p in lists[0]] != [p[:2] for p in lists[1]]:
            raise ServiceError("the two servers list this source's persons differently (an operation reached one "
                               "server only?): " + f"{len(lists[0])} and {len(lists[1])} persons", "failed")
        try:
            parts = [body_shares(b, L * len(lists[0]), f"server {i}'s listing") for i, (_, b) in enumerate(answers)]
        except WireError as exc:
            raise ServiceError(str(exc), "failed") from None
        words = sharing.reconstruct(parts[0], parts[1]).reshape(-1, L) if lists[0] else np.zeros((0, L), np.uint64)
        out = []
        for (pid, photos, added), w in zip(lists[0], words):
            try:
                name = decode_name(w) or "?"
            except ValueError:
                raise ServiceError("the servers' name shares do not belong together", "failed") from None
            out.append(Enrolled(str(pid), name, int(photos), float(added)))
        return out

    def resolve(self, person: str) -> list[str]:
        """A person given by id or by name (of this source): their ids; ``all`` for every one."""
        if person == "all":
            return ["all"]
        listed = self.gallery()
        ids = [p.person for p in listed if p.person == person] or [p.person for p in listed if p.name == person]
        if not ids:
            names = ", ".join(sorted({p.name for p in listed})[:20]) or "none"
            raise SourceError(f"person {person!r}: this source enrolled no such person (its persons: {names})")
        return ids

    def withdraw(self, person: str) -> list[dict[str, Any]]:
        """Withdraw one person (id or name) or ``all`` of this source's; one answer per person."""
        out = []
        for pid in self.resolve(person):
            wid = secrets.token_hex(16)
            head = {"type": "withdraw", "id": wid, "person": pid}
            answers = self._both([(head, b"")] * 2, "withdraw")
            out.append({"person": pid, "gen": answers[0][0].get("gen"), "receipts": self._receipts(answers, wid)})
        return out

    def train(self, epochs: int, batch: int, lr: float) -> dict[str, Any]:
        """Ask for a full retraining on the servers' gallery (an operator's client, role owner)."""
        rid = secrets.token_hex(16)
        head = {"type": "train", "id": rid, "epochs": int(epochs), "batch": int(batch), "lr": float(lr)}
        answers = self._both([(head, b"")] * 2, "train")
        return dict(answers[0][0])


class QueryClient(_Gallery):
    """Who is this face: a name or unknown_person, and the score (top logit z_max) of a name (0.0 for unknown)."""

    _held: tuple[float, dict[str, Any]] | None = None  # the last status that served, and when it was read

    def _serving(self) -> dict[str, Any]:
        """Server 0's status once both servers serve the gallery (a session may be starting: waited for); a status
        read within the last second is used again (a request for an older generation is refused and asked anew)."""
        if self._held is not None and time.monotonic() - self._held[0] < 1.0:
            return self._held[1]
        deadline = time.monotonic() + self.svc.timeout
        while True:
            st = self.status()
            if all(s.get("state") == "serving" and s.get("names") is not None for s in st):
                self._held = (time.monotonic(), st[0])
                return st[0]
            if time.monotonic() > deadline:
                raise ServiceError(f"the service serves no gallery of names within {self.svc.timeout:.0f} s (state "
                                   f"{st[0].get('state')}: no person enrolled yet, or the servers are starting)",
                                   "unavailable")
            time.sleep(0.2)

    def recognise(self, embeddings: np.ndarray) -> list[tuple[str, float]]:
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise SourceError(f"queries of shape {x.shape}: expected finite embeddings, one row per face")
        for wraps in range(3):
            s0 = self._serving()
            L, c = int(s0["names"][0]), int(s0["c"])
            padded = np.hstack([x, np.ones((len(x), 1))])
            if padded.shape[1] != int(s0["d1"]):
                raise SourceError(f"queries have {x.shape[1]} values, the gallery holds {int(s0['d1']) - 1}")
            rid = secrets.token_hex(16)
            frames = self.svc.request_frames(padded, str(s0["gen"]), rid)
            try:
                answers = self._both(frames, "result")
            except ServiceError as exc:
                self._held = None
                if exc.code in ("generation", "unavailable") and wraps < 2:
                    time.sleep(0.3)
                    continue
                raise
            n = len(x)
            parts = [body_shares(b, (L + 1) * n, f"server {i}'s answer") for i, (_, b) in enumerate(answers)]
            total = sharing.reconstruct(parts[0], parts[1]).reshape(L + 1, n)
            zmax = sharing.decode_fixed(total[L])  # accept * z_max: exactly 0 for a rejected query
            # an accepted one has z_max >= the threshold, up to the fixed point's resolution
            floor = float(s0["names"][1]) - 2.0 ** -FRAC_BITS
            out: list[tuple[str, float]] = []
            try:
                for k in range(n):
                    name = decode_name(total[:L, k])
                    if name is None and zmax[k] == 0.0:
                        out.append((UNKNOWN_PERSON, 0.0))
                    elif name is not None and floor <= zmax[k] < ZMAX_BOUND:
                        out.append((name, float(zmax[k])))
                    else:
                        raise ValueError("out of range")
            except (ValueError, UnicodeDecodeError):
                logger.warning("an answer out of range (a rare truncation wrap?): asking again")
                continue
            return out
        raise ServiceError("reconstructed answers out of range three times: the two servers' shares do not belong "
                           "together", "failed")


__all__ = ["Enrolled", "QueryClient", "SourceClient", "SourceError", "UNKNOWN_PERSON", "check_embeddings",
           "decode_name", "encode_name", "verify_receipt"]
