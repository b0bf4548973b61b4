"""Runs on a server: the gallery of many data owners (sources), held as shares only.

Each source (a client certificate of role ``source``) enrols its own persons through both servers.
A server keeps, per source and person, its additive shares of the person's photo embeddings and of the
person's name, and the public facts a server cannot help seeing: the source's name (its certificate),
the person's random id, the number of photos and when they were added. Its folder::

    gallery/settings.json                  the gallery's public parameters (dimension, name width, alpha,
                                           threshold, exp_bits, embedder), the same on both servers
    gallery/seen                           every contribution and withdrawal id used: a replay is refused
    gallery/persons/<source>/<person>/     meta.json, photos.bin (k x d shares), name.bin (L shares)
    gallery/pending/<contribution>/        a contribution waiting for its range check on shares

The model the service serves is built from it (:mod:`orchestration.server.registry`): one column per
person at a slot, padded to a capacity with inactive slots (zero weights, bias -200, no name) so that a
new person takes a free slot and the service only re-reads its share file. A withdrawal overwrites the
person's slot with an inactive one in a new generation and destroys every older generation and the
person's files (overwritten, then unlinked).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import math

import numpy as np

from preprocessing import sharing
from preprocessing.fileio import atomic_write_bytes, atomic_write_json, destroy_tree, open_private, private_dir
from preprocessing.sharing import FRAC_BITS

from orchestration.server.job import Server, read_shares, write_model_file
from orchestration.shared.model import ModelError
from orchestration.shared.reference import OLD_SCORE, SCORE

logger = logging.getLogger(__name__)

INACTIVE_BIAS = -200.0  # an empty slot's logit: never the maximum, and exp(-200 - zmax) is 0 in fixed point
MAX_PHOTOS = 256  # photos of one person, all contributions together
MAX_PERSONS = 20000  # persons of one gallery
_ID = re.compile(r"[0-9a-f]{32}")


class GalleryError(ModelError):
    """A contribution, withdrawal or listing the gallery refuses; nothing was changed."""


def check_id(value: Any, what: str) -> str:
    """A contribution, person or withdrawal id: 32 lower-case hex digits (random, chosen by the source)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise GalleryError(f"{what} {str(value)[:40]!r}: expected 32 lower-case hexadecimal digits")
    return value


@dataclass(frozen=True)
class Settings:
    """The gallery's public parameters: both servers must hold the same (checked on the registry link)."""

    d: int = 128
    name_words: int = 8  # 64 bytes of UTF-8
    alpha: float = 16.0
    # (gallery size n, threshold from n persons on): logit thresholds on the top logit z_max (``score``)
    thresholds: tuple[tuple[int, float], ...] = ((1, 0.0),)
    exp_bits: int = 8
    embedder: str = "facenet"
    score: str = SCORE  # what the thresholds are on: z_max; settings.json from before issue 18: 1/S (OLD_SCORE)

    @property
    def d1(self) -> int:
        return self.d + 1

    def threshold_for(self, persons: int) -> float:
        """The public logit threshold on z_max of a gallery of ``persons``: the entry of the smallest calibrated
        size >= persons, the largest size's above them (models/thresholds.json: strangers' top logit rises as the
        gallery grows). GalleryError for settings whose thresholds are on the old confidence 1/S: face_predict's
        names mode compares z_max with it."""
        if self.score != SCORE:
            raise GalleryError(f"the gallery's thresholds {list(self.thresholds)} are on the score {self.score!r} (the "
                               f"confidence 1/S); the servers' open-set score is {SCORE!r}, allowed: {SCORE!r}: restart "
                               "the service with --sources and the thresholds of models/thresholds.json (the gallery "
                               "takes them over)")
        above = [t for n, t in sorted(self.thresholds) if n >= persons]
        return above[0] if above else max(self.thresholds)[1]

    def as_dict(self) -> dict[str, Any]:
        return {"d": self.d, "name_words": self.name_words, "alpha": self.alpha,
                "thresholds": [list(t) for t in self.thresholds], "exp_bits": self.exp_bits,
                "embedder": self.embedder, "score": self.score}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Settings":
        """Settings from JSON (settings.json, --sources); ValueError/KeyError/TypeError when malformed."""
        score = raw.get("score", OLD_SCORE)  # settings written before issue 18 name no score: 1/S
        if score not in (SCORE, OLD_SCORE):
            raise ValueError(f"score {score!r}: expected {SCORE!r} (the top logit; or {OLD_SCORE!r} in an old gallery)")
        table = tuple(sorted((int(n), float(t)) for n, t in raw["thresholds"]))
        if score == SCORE and not (table and all(n >= 1 and math.isfinite(t) and abs(t) < 2 ** 10 for n, t in table)):
            raise ValueError(f"thresholds {raw['thresholds']!r}: expected [[gallery size >= 1, logit threshold on "
                             "z_max, a finite real with |threshold| < 1024], ...]")
        if score == OLD_SCORE and not (table and all(n >= 1 and 0 < t < 1 for n, t in table)):
            raise ValueError(f"thresholds {raw['thresholds']!r}: expected [[gallery size >= 1, 0 < threshold < 1], ...] "
                             f"(score {OLD_SCORE!r})")
        out = cls(int(raw["d"]), int(raw["name_words"]), float(raw["alpha"]), table, int(raw["exp_bits"]),
                  str(raw["embedder"]), score)
        if not (1 <= out.d <= 4096 and 1 <= out.name_words <= 64 and 0 < out.alpha < 1000 and 4 <= out.exp_bits <= 12):
            raise ValueError(f"gallery settings out of range: {raw}")
        return out


def capacity(c: int) -> int:
    """Slots of a model for ``c`` persons: at least one free slot, few sizes (each one compiled once)."""
    for cap in (8, 16, 32, 64):
        if c + 1 <= cap:
            return cap
    return 64 * -(-(c + 1) // 64)


@dataclass(frozen=True)
class Person:
    source: str
    person: str
    photos: int
    added: float

    @property
    def key(self) -> str:
        return f"{self.source}/{self.person}"


class Gallery:
    """One server's gallery folder. Not thread-safe: the registry serialises every change."""

    def __init__(self, server: Server):
        self.server = server
        self.root = server.root / "gallery"

    # -- settings -------------------------------------------------------------------------------------

    def settings(self) -> Settings:
        path = self.root / "settings.json"
        try:
            return Settings.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise GalleryError(f"{path}: no gallery here (start the service with --sources)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise GalleryError(f"{path}: not a gallery's settings ({exc})") from None

    def init(self, settings: Settings) -> Settings:
        """Create the gallery, or check that an existing one has ``settings`` (an embedder cannot change under
        enrolled photos: their embeddings would no longer compare with the queries')."""
        private_dir(self.root)
        path = self.root / "settings.json"
        if path.exists():
            held = self.settings()
            if held.score != settings.score and held == replace(settings, thresholds=held.thresholds, score=held.score):
                # thresholds are public policy, not bound to the enrolled photos: an old gallery's 1/S ones are replaced
                logger.warning("%s: thresholds %s on %s replaced by %s on %s", path, list(held.thresholds), held.score,
                               list(settings.thresholds), settings.score)
                atomic_write_json(path, settings.as_dict())
                return settings
            if held != settings:
                diff = ", ".join(f"{k} {held.as_dict()[k]} (asked: {v})" for k, v in settings.as_dict().items()
                                 if held.as_dict()[k] != v)
                raise GalleryError(f"{path}: this gallery was made with other settings: {diff}. Withdraw every "
                                   "person and remove the gallery folder to start another")
            return held
        atomic_write_json(path, settings.as_dict())
        return settings

    # -- replay ---------------------------------------------------------------------------------------

    def seen(self, op_id: str) -> bool:
        try:
            return op_id in (self.root / "seen").read_text().split()
        except FileNotFoundError:
            return False

    def mark_seen(self, op_id: str) -> None:
        with open_private(self.root / "seen", "a") as fh:
            fh.write(op_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- persons --------------------------------------------------------------------------------------

    def _dir(self, source: str, person: str) -> Path:
        return self.root / "persons" / source / person

    def person(self, source: str, person: str) -> Person | None:
        try:
            meta = json.loads((self._dir(source, person) / "meta.json").read_text())
        except FileNotFoundError:
            return None
        return Person(source, person, int(meta["photos"]), float(meta["added"]))

    def persons(self, source: str | None = None) -> list[Person]:
        """Every person (of ``source``), in the order they were added."""
        base = self.root / "persons"
        out = []
        sources = [source] if source is not None else sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        for s in sources:
            d = base / s
            if not d.is_dir():
                continue
            for p in d.iterdir():
                got = self.person(s, p.name) if not p.name.startswith(".") else None
                if got is not None:
                    out.append(got)
        return sorted(out, key=lambda p: (p.added, p.key))

    def photos(self, source: str, person: str) -> np.ndarray:
        """This server's shares of the person's photos (k x d)."""
        d = self.settings().d
        raw = np.fromfile(self._dir(source, person) / "photos.bin", dtype="<u8").astype(np.uint64)
        return raw.reshape(-1, d)

    def name(self, source: str, person: str) -> np.ndarray:
        return np.fromfile(self._dir(source, person) / "name.bin", dtype="<u8").astype(np.uint64)

    def counts(self) -> dict[str, Any]:
        """What an operator may see: numbers only."""
        persons = self.persons()
        by_source: dict[str, int] = {}
        for p in persons:
            by_source[p.source] = by_source.get(p.source, 0) + 1
        return {"sources": len(by_source), "persons": len(persons), "photos": sum(p.photos for p in persons)}

    # -- contributions --------------------------------------------------------------------------------

    def hold_pending(self, cid: str, meta: dict[str, Any], photos: np.ndarray, name: np.ndarray | None) -> Path:
        """Keep a contribution aside until its range check; nothing of the gallery changes yet."""
        d = self.root / "pending" / cid
        destroy_tree(d)
        tmp = self.root / "pending" / f".{cid}.tmp"
        destroy_tree(tmp)
        private_dir(tmp)
        atomic_write_bytes(tmp / "photos.bin", photos.astype("<u8").tobytes())
        if name is not None:
            atomic_write_bytes(tmp / "name.bin", name.astype("<u8").tobytes())
        atomic_write_json(tmp / "meta.json", dict(meta, held=time.time()))
        os.replace(tmp, d)
        return d

    def pending(self, cid: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None] | None:
        d = self.root / "pending" / cid
        try:
            meta = json.loads((d / "meta.json").read_text())
        except FileNotFoundError:
            return None
        photos = np.fromfile(d / "photos.bin", dtype="<u8").astype(np.uint64).reshape(-1, self.settings().d)
        name = np.fromfile(d / "name.bin", dtype="<u8").astype(np.uint64) if (d / "name.bin").exists() else None
        return meta, photos, name

    def drop_pending(self, cid: str) -> None:
        destroy_tree(self.root / "pending" / cid)

    def pending_ids(self) -> list[str]:
        d = self.root / "pending"
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def commit(self, cid: str) -> Person:
        """The contribution passed its check: its photos join the person (a new one, or one of its source's)."""
        got = self.pending(cid)
        if got is None:
            raise GalleryError(f"contribution {cid} is not held on server {self.server.party}")
        meta, photos, name = got
        source, person = meta["source"], meta["person"]
        d = self._dir(source, person)
        old = self.person(source, person)
        if old is not None:
            photos = np.concatenate([self.photos(source, person), photos])
        tmp = d.with_name(f".{person}.tmp")
        destroy_tree(tmp)
        private_dir(tmp)
        atomic_write_bytes(tmp / "photos.bin", photos.astype("<u8").tobytes())
        if old is not None:
            atomic_write_bytes(tmp / "name.bin", self.name(source, person).astype("<u8").tobytes())
        else:
            assert name is not None
            atomic_write_bytes(tmp / "name.bin", name.astype("<u8").tobytes())
        added = old.added if old is not None else time.time()
        atomic_write_json(tmp / "meta.json", {"photos": int(len(photos)), "added": added,
                                              "updated": time.time()})
        private_dir(d.parent)
        if d.exists():
            doomed = d.with_name(f".{person}.old")
            destroy_tree(doomed)
            os.replace(d, doomed)
            os.replace(tmp, d)
            destroy_tree(doomed)  # the earlier shares of this person: overwritten, then unlinked
        else:
            os.replace(tmp, d)
        self.drop_pending(cid)
        return Person(source, person, int(len(photos)), added)

    def destroy_person(self, source: str, person: str) -> None:
        d = self._dir(source, person)
        if d.exists():
            doomed = d.with_name(f".{person}.withdrawn")
            destroy_tree(doomed)
            os.replace(d, doomed)
            destroy_tree(doomed)


# ---- the served model: columns at slots --------------------------------------------------------------

def inactive_column(party: int, d1: int) -> np.ndarray:
    """This server's share of an empty slot's column: zero weights, bias INACTIVE_BIAS (server 0 holds it)."""
    col = np.zeros(d1, dtype=np.uint64)
    if party == 0:
        col[-1] = sharing.encode_fixed(np.array([INACTIVE_BIAS]), FRAC_BITS)[0]
    return col


@dataclass
class SlotModel:
    """This server's shares of a names-mode model: W (d1 x cap), names (cap x L) and who is at each slot."""

    w: np.ndarray
    names: np.ndarray
    classes: list[str | None]  # "source/person" per slot, None when free

    @property
    def cap(self) -> int:
        return len(self.classes)

    @classmethod
    def empty(cls, party: int, settings: Settings, cap: int) -> "SlotModel":
        w = np.tile(inactive_column(party, settings.d1)[:, None], (1, cap))
        return cls(w, np.zeros((cap, settings.name_words), dtype=np.uint64), [None] * cap)

    def slot_of(self, key: str) -> int | None:
        return self.classes.index(key) if key in self.classes else None

    def grown(self, party: int, settings: Settings, cap: int) -> "SlotModel":
        extra = SlotModel.empty(party, settings, cap - self.cap)
        return SlotModel(np.concatenate([self.w, extra.w], axis=1), np.concatenate([self.names, extra.names]),
                         self.classes + extra.classes)

    def put(self, slot: int, key: str | None, column: np.ndarray, name: np.ndarray) -> None:
        self.w[:, slot] = column
        self.names[slot] = name
        self.classes[slot] = key

    def clear(self, party: int, slot: int) -> None:
        self.put(slot, None, inactive_column(party, self.w.shape[0]), np.zeros(self.names.shape[1], dtype=np.uint64))

    def shares(self) -> np.ndarray:
        """The persistence file's content: W row-major (as MP-SPDZ's sfix Matrix d1 x c), then names row-major."""
        return np.concatenate([self.w.reshape(-1), self.names.reshape(-1)])

    def write(self, path: Path, header_from: Path) -> None:
        write_model_file(path, header_from, self.shares())

    @classmethod
    def read(cls, path: Path, d1: int, cap: int, name_words: int, classes: list[str | None]) -> "SlotModel":
        w = read_shares(path, 0, d1 * cap).reshape(d1, cap)
        names = read_shares(path, d1 * cap, cap * name_words).reshape(cap, name_words)
        return cls(w.copy(), names.copy(), list(classes))


__all__ = ["INACTIVE_BIAS", "MAX_PERSONS", "MAX_PHOTOS", "Gallery", "GalleryError", "Person", "Settings",
           "SlotModel", "capacity", "check_id", "inactive_column"]
