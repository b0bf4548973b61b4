"""Many sources: the tasks of a source (contribute, gallery, withdraw) and what the other tasks need for them.

A source or query client is named with ``--as NAME``. In local mode (service.hosts unset or ``local``)
its folder is ``<var>/sources/clients/NAME``, made and pinned on the local servers on first use, and the
service is the one ``invoke serve --sources`` runs here. With service.hosts a file, its folder is
``<var>/clients/NAME``, made with ``invoke certs --client NAME --role source|query`` and pinned by both
servers' operators.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from invoke import Exit, task

from orchestration.cli.common import _cfg, _face, _layout, _logging

SOURCE_HELP = {
    "as_": "this source's name (its certificate: role source)",
    "hosts": "the service's hosts file (default service.hosts; unset or local: the local `invoke serve --sources`)",
    "timeout": "seconds to wait for both servers' answers",
    "verbose": "debug logging",
}


def _is_local(c, hosts=None) -> bool:
    value = _cfg(c, "service", "hosts", hosts)
    return not value or str(value) == "local"


def sources_hosts(c, hosts=None):
    """The many-source service's hosts: the local one's file, or service.hosts / --hosts."""
    from orchestration.mpspdz.hosts import HostsError, load_hosts

    if _is_local(c, hosts):
        from orchestration.client.local_sources import sources_layout

        path = sources_layout(_layout(c)).root / "service-hosts"
        if not path.is_file():
            raise Exit("no many-source service runs on this machine: start it with `invoke serve --sources` (or set "
                       "service.hosts to the service's hosts file)", code=1)
        print(f"service: the local many-source service ({path}, started by invoke serve --sources)", file=sys.stderr)
        return load_hosts(path)
    try:
        return load_hosts(Path(_cfg(c, "service", "hosts", hosts)))
    except HostsError as exc:
        raise Exit(f"service.hosts: {exc}", code=1)


def client_folder(c, name: str, role: str, hosts=None) -> Path:
    """The folder of the client ``name`` (role ``role``); made and pinned in local mode."""
    from orchestration.client.local_sources import ensure_local_client, sources_layout
    from orchestration.mpspdz import certs as certs_mod

    if not name:
        raise Exit(f"--as NAME is required: the {role} client's name (its certificate)", code=1)
    try:
        if _is_local(c, hosts):
            return ensure_local_client(sources_layout(_layout(c)), name, role)
        folder = _layout(c).root / "clients" / certs_mod.check_client_name(name)
        pem = certs_mod.client_files(folder)[1]
        single = certs_mod.client_files(_layout(c).client)[1]  # a query client made as <var>/client
        if not pem.is_file() and single.is_file() and certs_mod.inspect(single).common_name == f"client-{name}":
            folder, pem = _layout(c).client, single
        if not pem.is_file():
            raise Exit(f"client {name} has no certificate ({pem}): run `invoke certs --client {name} --role {role}` "
                       "and give the certificate to both servers' operators", code=1)
        held = certs_mod.client_role(pem.read_text())
        if held != role:
            raise Exit(f"client {name}'s certificate ({pem}) has role {held}; this task needs a {role} client", code=1)
        return folder
    except certs_mod.CertError as exc:
        raise Exit(str(exc), code=1)


def _source(c, as_, hosts, timeout):
    from orchestration.client.sources import SourceClient

    folder = client_folder(c, as_, "source", hosts)
    return SourceClient(folder, sources_hosts(c, hosts), timeout=float(timeout or 120))


def _fail(what: str, exc: BaseException) -> Exit:
    return Exit(f"{what}: {exc}", code=1)


@task(help={**SOURCE_HELP, "dataset": "folder of this source's persons: DIR/<person name>/<image>",
            "backend": "embedder: facenet | dlib (must be the gallery's)", "detector": "face detector: hog | cnn | cascade (HOG, the CNN only where HOG finds no face)"})
def contribute(c, as_=None, dataset=None, hosts=None, backend=None, detector=None, timeout=None, verbose=False):
    """A source enrols its persons: embeds DIR's photos here and sends each server only its shares.

    A person this source enrolled before (same name) gets the new photos only; photos sent before are
    skipped. Each person is refused whole when any photo fails a check (here first, then on shares on
    the servers). Prints CSV `person,name,photos,status`; both servers' signed receipts are kept in the
    source's folder (receipts/)."""
    _logging(verbose)
    from preprocessing.dataset import embed_gallery
    from preprocessing.errors import PreprocessingError
    from preprocessing.fileio import atomic_write_json
    from orchestration.client.sources import SourceError
    from orchestration.shared.wire import ServiceError

    if not dataset or not Path(dataset).is_dir():
        raise Exit(f"--dataset {dataset!r}: expected a folder DIR/<person name>/<image>", code=1)
    face = _face(c, backend, detector)
    src = _source(c, as_, hosts, timeout)
    try:
        gal = embed_gallery(Path(dataset), backend=face.backend, detector=face.detector,
                            cache_dir=src.dir / "cache", progress=True)
    except (PreprocessingError, OSError, ValueError) as exc:
        raise _fail(f"cannot embed {dataset}", exc)
    for path, reason in gal.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    sent_path = src.dir / "contributed.json"
    sent: dict[str, str] = json.loads(sent_path.read_text()) if sent_path.exists() else {}
    out = csv.writer(sys.stdout)
    out.writerow(["person", "name", "photos", "status"])
    failed = 0
    with src:
        try:
            if src.settings()["embedder"] != face.backend:
                raise Exit(f"the gallery holds {src.settings()['embedder']} embeddings; this source embeds with "
                           f"{face.backend} (face.backend / --backend)", code=1)
            known = {p.name: p.person for p in src.gallery()}
        except ServiceError as exc:
            raise _fail("the service", exc)
        for name in sorted(set(gal.labels)):
            rows = [k for k, label in enumerate(gal.labels) if label == name
                    and gal.digests[k] not in sent] if gal.digests else \
                [k for k, label in enumerate(gal.labels) if label == name]
            if not rows:
                out.writerow([known.get(name, ""), name, 0, "nothing new"])
                continue
            t0 = time.monotonic()
            try:
                r = src.contribute(name, gal.embeddings[rows], known.get(name))
            except (SourceError, ServiceError) as exc:
                print(f"error: {name}: {exc}", file=sys.stderr)
                out.writerow([known.get(name, ""), name, len(rows), "refused"])
                failed += 1
                continue
            for k in rows:
                if gal.digests:
                    sent[gal.digests[k]] = r["person"]
            atomic_write_json(sent_path, sent)
            out.writerow([r["person"], name, len(rows), f"enrolled ({time.monotonic() - t0:.2f} s, generation "
                                                         f"{r['gen']})"])
            sys.stdout.flush()
    if failed:
        raise Exit(f"{failed} person(s) refused (see above); nothing of them was stored", code=1)


@task(help=SOURCE_HELP)
def gallery(c, as_=None, hosts=None, timeout=None, verbose=False):
    """A source lists its own persons (names rebuilt here from both servers' shares); CSV
    `person,name,photos,added`. Without --as, the operator's view: counts only."""
    _logging(verbose)
    from orchestration.shared.wire import ServiceError

    if not as_:
        from orchestration.client.service import ServiceClient

        folder = _layout(c).root / "sources" / "client" if _is_local(c, hosts) else _layout(c).client
        try:
            with ServiceClient(folder, sources_hosts(c, hosts), timeout=float(timeout or 30)) as cl:
                st = cl.status()
        except ServiceError as exc:
            raise _fail("the service", exc)
        g = st[0].get("gallery")
        if g is None:
            raise Exit("the servers show counts only to an operator's client (role owner)", code=1)
        print(f"sources,persons,photos\n{g['sources']},{g['persons']},{g['photos']}")
        return
    src = _source(c, as_, hosts, timeout)
    with src:
        try:
            listed = src.gallery()
        except ServiceError as exc:
            raise _fail("the service", exc)
    out = csv.writer(sys.stdout)
    out.writerow(["person", "name", "photos", "added"])
    for p in listed:
        out.writerow([p.person, p.name, p.photos, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.added))])


@task(help={**SOURCE_HELP, "person": "the person to withdraw: its id or name, or `all` for every person of this "
                                     "source"})
def withdraw(c, as_=None, person=None, hosts=None, timeout=None, verbose=False):
    """A source withdraws a person (GDPR Art. 17): both servers destroy the person's shares, take the person
    out of the model and destroy every older model generation; prints each server's signed receipt."""
    _logging(verbose)
    from orchestration.client.sources import SourceError
    from orchestration.shared.wire import ServiceError

    if not person:
        raise Exit("--person is required: an id or name of this source's persons (see invoke gallery --as NAME), "
                   "or all", code=1)
    src = _source(c, as_, hosts, timeout)
    with src:
        try:
            done = src.withdraw(str(person))
        except (SourceError, ServiceError) as exc:
            raise _fail("withdraw", exc)
    out = csv.writer(sys.stdout)
    out.writerow(["person", "generation", "receipts"])
    for d in done:
        out.writerow([d["person"], d["gen"] or "", str(Path(src.dir / "receipts"))])


def predict_as(c, name: str, queries, hosts=None, timeout=None):
    """Recognise ``queries`` (app.FaceQuery, in order) as query client ``name``; yields CSV rows."""
    from orchestration.client.sources import QueryClient

    folder = client_folder(c, name, "query", hosts)
    with QueryClient(folder, sources_hosts(c, hosts), timeout=float(timeout or 30)) as qc:
        for q in queries:
            if q.embedding is None:
                yield [str(q.path), "no_face_found", ""]
                continue
            (label, conf), = qc.recognise(q.embedding[None, :])
            yield [str(q.path), label, f"{conf:.4f}" if label != "unknown_person" else ""]  # nothing to learn


def sources_settings(c, backend: str) -> dict:
    """The gallery's public settings for `invoke serve --sources`: invoke.yaml's training settings and the
    thresholds calibrated for the embedder on public faces (models/thresholds.json)."""
    from preprocessing.models import OPEN_SET_SCORE, open_set_calibration

    alpha = (c.config.get("train", {}).get("alpha") or {}).get(backend)
    if alpha is None:
        raise Exit(f"train.alpha.{backend} missing in invoke.yaml", code=1)
    try:
        cal = open_set_calibration(backend)
    except (KeyError, ValueError, OSError) as exc:
        raise Exit(str(exc), code=1)
    if float(cal["alpha"]) != float(alpha):
        raise Exit(f"models/thresholds.json calibrates {backend} at alpha {cal['alpha']}, invoke.yaml trains with "
                   f"train.alpha.{backend} {alpha}: recalibrate (python benchmarks/calibrate_threshold.py --backend "
                   f"{backend} --write) or use the calibrated alpha", code=1)
    if cal.get("score", "confidence") != OPEN_SET_SCORE:
        raise Exit(f"models/thresholds.json: the thresholds of {backend} are on the score {cal.get('score', 'confidence')!r}, "
                   f"the servers compare the top logit ({OPEN_SET_SCORE!r}): recalibrate (python "
                   f"benchmarks/calibrate_threshold.py --backend {backend} --write)", code=1)
    table = sorted([int(n), float(t)] for n, t in cal["threshold_by_gallery_size"].items())
    return {"d": 128, "name_words": 8, "alpha": float(alpha), "thresholds": table,
            "exp_bits": int(_cfg(c, "train", "exp_bits", None)), "embedder": backend, "score": OPEN_SET_SCORE}


def train_on_servers(c, epochs=None, batch=None, lr=None, hosts=None, timeout=None) -> None:
    """`invoke train --on-servers`: a full retraining on the servers' gallery, asked by the operator's client."""
    from orchestration.client.sources import SourceClient
    from orchestration.shared.wire import ServiceError

    n_epochs = int(_cfg(c, "train", "epochs", epochs))
    if n_epochs < 1:
        raise Exit(f"train --on-servers: epochs is {n_epochs}; retraining the servers' gallery needs at least 1 SGD "
                   f"epoch (the warm start alone is what every enrolment already put in the model)", code=1)
    folder = _layout(c).root / "sources" / "client" if _is_local(c, hosts) else _layout(c).client
    t0 = time.monotonic()
    try:
        with SourceClient(folder, sources_hosts(c, hosts), timeout=float(timeout or 1800)) as cl:
            r = cl.train(n_epochs, int(_cfg(c, "train", "batch", batch)),
                         float(_cfg(c, "train", "lr", lr)))
    except ServiceError as exc:
        raise _fail("training on the servers", exc)
    print(f"trained on the servers' gallery: {r.get('persons')} persons, {r.get('photos')} photos, generation "
          f"{r.get('gen')}, {time.monotonic() - t0:.1f} s ({r.get('seconds')} s of MPC, {r.get('rounds')} rounds)")


__all__ = ["contribute", "gallery", "predict_as", "sources_hosts", "sources_settings", "train_on_servers",
           "withdraw"]
