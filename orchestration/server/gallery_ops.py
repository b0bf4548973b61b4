"""Runs on a server: what one gallery operation does to this server's shares (both servers do the same).

Every function here is deterministic given the operation and the two servers' agreed state, so both
servers reach the same model generation (its name is derived from the previous one and the
operation's id) without exchanging anything but the job's MPC:

* :func:`enrol`: a contribution's range check on shares and the person's nearest-class-mean column
  (``gallery_enrol.mpc``), placed at the person's slot; a refused contribution changes nothing;
* :func:`retrain`: the warm start and SGD of ``face_train.mpc`` on every stored photo;
* :func:`withdraw`: the persons' slots overwritten with inactive ones, their files destroyed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from preprocessing import sharing
from preprocessing.fileio import destroy_file
from preprocessing.sharing import FRAC_BITS

from orchestration.mpspdz.hosts import Hosts
from orchestration.mpspdz.toolchain import MPSPDZ, Protocol
from orchestration.server.gallery import Gallery, GalleryError, Settings, SlotModel, capacity
from orchestration.server.gallery_jobs import run_job_party
from orchestration.server.job import Server, _install_generation, confirm_generation, current_generation
from orchestration.shared import reference
from orchestration.shared.model import ENROL_PROGRAM, TRAIN_PROGRAM

logger = logging.getLogger(__name__)

ROW_BUCKETS = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Env:
    """What a gallery operation runs with on this server."""

    mp: MPSPDZ
    server: Server
    proto: Protocol
    hosts: Hosts
    gallery: Gallery
    settings: Settings
    timeout: float = 600.0
    announce: Callable[[dict[str, Any] | None], None] | None = None  # server 0: the job, for the dealer


def next_gen(base: str | None, op_id: str) -> str:
    """The generation an operation makes: the same name on both servers."""
    return "g" + hashlib.sha256(f"{base}:{op_id}".encode()).hexdigest()[:23]


def current_model(env: Env) -> tuple[SlotModel | None, str | None]:
    """This server's served names-mode model and its generation (None, None before the first person)."""
    gen = current_generation(env.server)
    if gen is None:
        return None, None
    meta = json.loads((env.server.models / gen / "manifest.json").read_text())
    if meta.get("mode") != "names":
        raise GalleryError(f"server {env.server.party} serves a single-owner model ({gen}): a gallery of many "
                           "sources needs a server folder of its own")
    s = env.settings
    return SlotModel.read(env.server.model_file(env.server.models / gen), s.d1, int(meta["c"]), s.name_words,
                          meta["classes"]), gen


def install(env: Env, gen: str, model: SlotModel, header_from: Path, n_photos: int, how: str) -> None:
    """Install ``model`` as generation ``gen`` (the service switches to it once both servers hold it)."""
    s = env.settings
    tmp = env.server.root / f".gallery-{gen}.data"
    model.write(tmp, header_from)
    meta = {"run_id": gen, "gen": gen, "d1": s.d1, "c": model.cap, "n": n_photos, "frac_bits": FRAC_BITS,
            "exp_bits": s.exp_bits, "mode": "names", "name_words": s.name_words,
            "threshold": s.threshold_for(sum(k is not None for k in model.classes)),
            "classes": model.classes, "made_by": how, "created": time.time()}
    try:
        _install_generation(env.server, gen, tmp, meta)
    finally:
        destroy_file(tmp)


def destroy_older(env: Env, gen: str) -> list[str]:
    """Both servers hold ``gen``: every older generation is destroyed (overwritten, then unlinked)."""
    return confirm_generation(env.server, gen)


def _header_file(env: Env) -> Path:
    return env.server.root / ".gallery-header.data"


# ---- contributions ----------------------------------------------------------------------------------

def enrol(env: Env, cid: str, job: str) -> dict[str, Any]:
    """Run contribution ``cid``'s check and column job; on success commit it and install the new model.

    Returns {"ok", "gen", "photos", "bad" (indices of refused photos of this contribution)}."""
    g, s, party = env.gallery, env.settings, env.server.party
    held = g.pending(cid)
    if held is None:
        raise GalleryError(f"contribution {cid} is not held on server {party}")
    meta, new_photos, name = held
    source, person = meta["source"], meta["person"]
    old = g.person(source, person)
    photos = np.concatenate([g.photos(source, person), new_photos]) if old is not None else new_photos
    m = len(photos)
    k = next(b for b in ROW_BUCKETS if b >= m)
    x = np.zeros((k, s.d), dtype=np.uint64)
    x[:m] = photos
    head = np.zeros(2 + k, dtype=np.uint64)
    if party == 0:  # public values: server 0 inputs them, server 1 inputs zeros
        head[0] = sharing.encode_fixed(np.array([s.alpha]), FRAC_BITS)[0]
        head[1] = np.uint64(round(2 ** FRAC_BITS / m))
        head[2:2 + m] = 1
    out = run_job_party(env.mp, env.server, env.proto, env.hosts, ENROL_PROGRAM, [str(k), str(s.d)],
                        np.concatenate([head, x.reshape(-1)]), s.d1, job, timeout=env.timeout,
                        keep_header=_header_file(env), announce=env.announce)
    bits = out.rows_ok or ""
    if len(bits) < m:
        raise GalleryError(f"gallery job {job}: the range check printed {len(bits)} bits for {m} photos")
    first_new = m - len(new_photos)
    bad = [j - first_new for j in range(first_new, m) if bits[j] != "1"]
    bad_old = [j for j in range(first_new) if bits[j] != "1"]
    if bad or bad_old:
        g.drop_pending(cid)
        return {"ok": False, "bad": bad, "photos": int(len(new_photos))}
    model, base = current_model(env)
    key = f"{source}/{person}"
    if model is None:
        model = SlotModel.empty(party, s, capacity(1))
    slot = model.slot_of(key)
    if slot is None:
        if None not in model.classes:
            model = model.grown(party, s, capacity(model.cap))
        slot = model.classes.index(None)
    committed = g.commit(cid)
    name_shares = g.name(source, person)
    model.put(slot, key, out.outputs, name_shares)
    gen = next_gen(base, cid)
    install(env, gen, model, _header_file(env), sum(p.photos for p in g.persons()), f"contribution {cid}")
    return {"ok": True, "gen": gen, "photos": committed.photos, "bad": [], "slot_count": model.cap}


# ---- retraining -------------------------------------------------------------------------------------

def train_plan(g: Gallery) -> list[list[Any]]:
    """Who is trained, in class order: [[source/person, photos], ...] (both servers must agree)."""
    return [[p.key, p.photos] for p in sorted(g.persons(), key=lambda p: p.key)]


def retrain(env: Env, op: str, job: str, params: reference.TrainParams) -> dict[str, Any]:
    """Warm start and SGD on every stored photo of every source; the result replaces the model."""
    g, s, party = env.gallery, env.settings, env.server.party
    plan = train_plan(g)
    c = len(plan)
    if c < 2:
        raise GalleryError(f"the gallery holds {c} person(s): training needs at least 2")
    xs, labels = [], []
    for j, (key, _) in enumerate(plan):
        src, person = key.split("/")
        ph = g.photos(src, person)
        xs.append(ph)
        labels += [j] * len(ph)
    x = np.concatenate(xs)
    n = len(x)
    order = reference.training_order(n, params.seed)
    x, lab = x[order], np.asarray(labels)[order]
    bias = np.zeros((n, 1), dtype=np.uint64)
    y = np.zeros((n, c), dtype=np.uint64)
    alpha = np.zeros(1, dtype=np.uint64)
    if party == 0:
        bias[:] = np.uint64(1 << FRAC_BITS)
        y[np.arange(n), lab] = 1
        alpha[0] = sharing.encode_fixed(np.array([s.alpha]), FRAC_BITS)[0]
    inputs = np.concatenate([alpha, np.hstack([x, bias]).reshape(-1), y.reshape(-1)])
    out = run_job_party(env.mp, env.server, env.proto, env.hosts, TRAIN_PROGRAM, params.program_args(n, s.d1, c),
                        inputs, s.d1 * c, job, timeout=env.timeout, keep_header=_header_file(env),
                        announce=env.announce)
    w = out.outputs.reshape(s.d1, c)
    model = SlotModel.empty(party, s, capacity(c))
    for j, (key, _) in enumerate(plan):
        src, person = key.split("/")
        model.put(j, key, w[:, j], g.name(src, person))
    _, base = current_model(env)
    gen = next_gen(base, op)
    install(env, gen, model, _header_file(env), n, f"retraining {op}")
    return {"ok": True, "gen": gen, "persons": c, "photos": n, "seed": params.seed, "seconds": out.stats.seconds,
            "rounds": out.stats.rounds, "data_sent_mb": out.stats.data_sent_mb}


# ---- withdrawal -------------------------------------------------------------------------------------

def withdraw(env: Env, op: str, source: str, persons: list[str]) -> dict[str, Any]:
    """Take ``persons`` of ``source`` out of the model (a new generation) and destroy their files."""
    party = env.server.party
    model, base = current_model(env)
    gen = None
    if model is not None:
        for person in persons:
            slot = model.slot_of(f"{source}/{person}")
            if slot is not None:
                model.clear(party, slot)
        gen = next_gen(base, op)
        header = env.server.model_file(env.server.models / str(base))
        install(env, gen, model, header, sum(p.photos for p in env.gallery.persons() if p.source != source
                                             or p.person not in persons), f"withdrawal {op}")
    for person in persons:
        env.gallery.destroy_person(source, person)
    return {"ok": True, "gen": gen, "persons": len(persons)}


__all__ = ["Env", "ROW_BUCKETS", "current_model", "destroy_older", "enrol", "install", "next_gen", "retrain",
           "train_plan", "withdraw"]
