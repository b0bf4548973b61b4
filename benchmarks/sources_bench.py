"""Many sources (`invoke serve --sources`), locally: enrolling a person, retraining from the servers' gallery,
and recognition with names returned as shares; beside the single-owner figures of the same sizes.

    python benchmarks/sources_bench.py [--persons 291] [--photos 10] [--singles 30] [--protocol dealer]
                                       [--no-baseline]

Persons are synthetic unit embeddings around random centres (the MPC's cost depends on sizes only),
spread over three sources. Measured from the clients' side:

* **add a person**: a source contributes a new person with ``--photos`` photos to the gallery of
  ``--persons``; from the first byte sent until a query client gets that person's name back (the range
  check and the person's column on shares, the new generation on both servers, the service's switch);
* **recognition**: one face at a time through the service, names and scores (top logits) as shares (median, p95);
* **retraining**: `train --on-servers` (warm start + one SGD epoch on every stored photo);
* **baseline** (single owner, the same embeddings): `invoke train`'s private training in local mode, then its
  service beside the many-source one, one face on each in turn (this machine's speed drifts within minutes).

Prints one JSON line per measurement, then a summary.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from sources_lab import SETTINGS, People, SourcesLab  # noqa: E402

from orchestration.client.sources import QueryClient, SourceClient  # noqa: E402
from orchestration.mpspdz.toolchain import find_mpspdz  # noqa: E402
from orchestration.shared import reference  # noqa: E402

SOURCES = ("bank", "clinic", "kiosk")


def emit(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def baseline(mp, a, sent, tmp: Path, door, people) -> list[dict]:
    """The single owner with the same embeddings: its private training, then its service beside the
    many-source one, one face at a time on each in turn (this machine's speed drifts: only turns compare)."""
    from orchestration.client.local_service import LocalService
    from orchestration.client.private import Layout, train_private
    from orchestration.client.service import ServiceClient
    from orchestration.mpspdz.toolchain import protocol

    rows = []
    x = np.concatenate([sent[j] for j in range(a.persons)])
    labels = [f"person {j:05d}" for j in range(a.persons) for _ in range(a.photos)]
    params = reference.TrainParams(epochs=1, batch=32, lr=1.0, alpha=SETTINGS["alpha"], exp_bits=8, seed=1)
    layout = Layout(tmp / "owner", a.protocol)
    t = time.monotonic()
    rep = train_private(mp, layout, x, labels, params)
    rows.append(emit(what="single-owner training (baseline)", persons=a.persons, photos=len(x),
                     seconds=time.monotonic() - t, mpc_seconds=rep.run.wall_seconds))
    with LocalService(mp, layout, protocol(a.protocol), batch=16, port=random.randrange(20000, 32000, 10),
                      log_dir=layout.root / "logs") as svc:
        svc.wait_ready()
        owner, names_ms, owner_ms = ServiceClient(layout.client, svc.hosts), [], []
        try:
            for k in range(a.singles):
                q = people.photos(k % a.persons, 1)
                for fn, out in ((lambda: door.recognise(q), names_ms), (lambda: owner.recognise(q, 0.0), owner_ms)):
                    t = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t)
        finally:
            owner.close()
    rows.append(emit(what="one face in turns: many sources (names as shares) / single owner", classes=a.persons,
                     names_p50_ms=1000 * statistics.median(names_ms), owner_p50_ms=1000 * statistics.median(owner_ms),
                     ratio=statistics.median(names_ms) / statistics.median(owner_ms),
                     names_p95_ms=1000 * float(np.percentile(names_ms, 95)),
                     owner_p95_ms=1000 * float(np.percentile(owner_ms, 95))))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--persons", type=int, default=291)
    ap.add_argument("--photos", type=int, default=10)
    ap.add_argument("--singles", type=int, default=30)
    ap.add_argument("--adds", type=int, default=3, help="new persons added (and timed) once the gallery is full")
    ap.add_argument("--protocol", default="dealer")
    ap.add_argument("--no-baseline", action="store_true")
    a = ap.parse_args()
    mp = find_mpspdz(None)
    people = People(a.persons + a.adds + 20, seed=11)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lab = SourcesLab(mp, Path(tmp), proto=a.protocol, batch=16).start()
        try:
            clients = {s: SourceClient(lab.client(s, "source"), lab.hosts, timeout=600) for s in SOURCES}
            door = QueryClient(lab.client("door", "query"), lab.hosts, timeout=120)
            sent: dict[int, np.ndarray] = {}
            t0 = time.monotonic()
            per = []
            for j in range(a.persons):
                x = people.photos(j, a.photos)
                t = time.monotonic()
                clients[SOURCES[j % 3]].contribute(f"person {j:05d}", x)
                per.append(time.monotonic() - t)
                sent[j] = x
                if (j + 1) % 50 == 0:
                    print(f"# enrolled {j + 1} persons ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
            rows.append(emit(what="enrol the gallery", persons=a.persons, photos=a.photos * a.persons,
                             seconds=time.monotonic() - t0, median_person_s=statistics.median(per)))
            for k in range(a.adds):
                j = a.persons + k
                x = people.photos(j, a.photos)
                t = time.monotonic()
                clients[SOURCES[k % 3]].contribute(f"person {j:05d}", x)
                contributed = time.monotonic() - t
                probe = people.photos(j, 1)
                while door.recognise(probe)[0][0] != f"person {j:05d}":
                    if time.monotonic() - t > 60:
                        raise SystemExit(f"person {j} not recognised 60 s after the contribution")
                    time.sleep(0.01)
                rows.append(emit(what="add a person", gallery=a.persons + k, photos=a.photos,
                                 contribute_s=contributed, recognisable_s=time.monotonic() - t))
            lat, right = [], 0
            for k in range(a.singles):
                j = k % a.persons
                q = people.photos(j, 1)
                t = time.perf_counter()
                name = door.recognise(q)[0][0]
                lat.append(time.perf_counter() - t)
                right += name == f"person {j:05d}"
            rows.append(emit(what="recognise one face", classes=a.persons + a.adds, median_ms=1000 * statistics.median(lat),
                             p95_ms=1000 * float(np.percentile(lat, 95)), right=right, of=a.singles))
            op = SourceClient(lab.layout.client, lab.hosts, timeout=1800)
            t = time.monotonic()
            r = op.train(epochs=1, batch=32, lr=1.0)
            rows.append(emit(what="retrain on the servers", persons=r.get("persons"), photos=r.get("photos"),
                             seconds=time.monotonic() - t, mpc_seconds=r.get("seconds"), rounds=r.get("rounds"),
                             data_sent_mb=r.get("data_sent_mb")))
            lat = []
            for k in range(a.singles):
                q = people.photos(k % a.persons, 1)
                t = time.perf_counter()
                door.recognise(q)
                lat.append(time.perf_counter() - t)
            rows.append(emit(what="recognise one face after retraining", median_ms=1000 * statistics.median(lat),
                             p95_ms=1000 * float(np.percentile(lat, 95))))
            if not a.no_baseline:
                rows += baseline(mp, a, sent, Path(tmp), door, people)
            for cl in [*clients.values(), door, op]:
                cl.close()
        finally:
            lab.stop()
    print("\n| measurement | figure |\n|---|---|")
    for r in rows:
        figs = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "what")
        print(f"| {r['what']} | {figs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
