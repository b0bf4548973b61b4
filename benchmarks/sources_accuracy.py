"""Many sources on real faces: three sources enrol lfw10 (split 4/3/3) and 30 lfw-devtrain persons, a query
client recognises held-out photos and strangers; beside single-owner training on the union of the same photos.

    python benchmarks/sources_accuracy.py [--faces ../shared/faces] [--devtrain 30] [--held 2] [--strangers 50]

Runs the many-source service locally (both servers and the dealer with its own key, as `invoke serve
--sources`), each source with its own certificate. Measured:

* after the contributions (each person's warm-start column on shares, no SGD): held-out photos named right,
  enrolled persons' photos rejected as unknown, strangers rejected;
* after `train --on-servers` (warm start + one SGD epoch on the servers' gallery);
* single owner, the same photos: the float64 reference trained on the union (closed-set accuracy, and the open
  set with the threshold the single owner would choose on its own data);
* withdrawal: one person withdrawn, their held-out photos come back unknown_person, the others as before.

Prints one JSON line per measurement, then a table. Embeddings are cached under var/cache/.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from sources_lab import SourcesLab  # noqa: E402

from orchestration.client.sources import QueryClient, SourceClient  # noqa: E402
from orchestration.mpspdz.toolchain import find_mpspdz  # noqa: E402
from orchestration.shared import reference  # noqa: E402
from preprocessing.dataset import embed_gallery  # noqa: E402
from preprocessing.models import open_set_calibration  # noqa: E402

SOURCES = ("bank", "clinic", "kiosk")


def emit(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def rates(got: list[str], truth: list[str]) -> dict:
    known = [(g, t) for g, t in zip(got, truth) if t != "unknown_person"]
    strangers = [g for g, t in zip(got, truth) if t == "unknown_person"]
    return {"named_right": float(np.mean([g == t for g, t in known])),
            "known_rejected": float(np.mean([g == "unknown_person" for g, _ in known])),
            "known_wrong_name": float(np.mean([g not in (t, "unknown_person") for g, t in known])),
            "strangers_rejected": float(np.mean([g == "unknown_person" for g in strangers])) if strangers else None,
            "known": len(known), "strangers": len(strangers)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    ap.add_argument("--devtrain", type=int, default=30, help="lfw-devtrain persons added to lfw10's ten")
    ap.add_argument("--held", type=int, default=2, help="photos per person held out for queries")
    ap.add_argument("--strangers", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the servers' folders and logs here")
    a = ap.parse_args()
    cache = REPO / "var" / "cache" / "sources-accuracy"
    rng = np.random.default_rng(a.seed)
    lfw10 = embed_gallery(a.faces / "lfw10", backend="facenet", cache_dir=cache)
    dev = embed_gallery(a.faces / "lfw-devtrain" / "people", backend="facenet", cache_dir=cache)
    strangers = embed_gallery(a.faces / "lfw-devtrain" / "unknown", backend="facenet", cache_dir=cache) \
        if any(p.is_dir() for p in (a.faces / "lfw-devtrain" / "unknown").iterdir()) else None
    persons: list[tuple[str, np.ndarray]] = []
    for g, names in ((lfw10, sorted(set(lfw10.labels))), (dev, None)):
        if names is None:
            counts = {n: g.labels.count(n) for n in set(g.labels)}
            pool = sorted(n for n, k in counts.items() if k >= a.held + 4 and n not in set(lfw10.labels))
            names = sorted(rng.choice(pool, size=a.devtrain, replace=False).tolist())
        for n in names:
            persons.append((n, g.embeddings[[k for k, lab in enumerate(g.labels) if lab == n]]))
    if strangers is not None:
        sx = strangers.embeddings[rng.permutation(len(strangers.embeddings))[:a.strangers]]
    else:  # unknown/ holds images directly: embed them as one flat folder
        from preprocessing import detect_faces, get_embedder, load_image_file

        emb = get_embedder("facenet")
        rows = []
        for p in sorted((a.faces / "lfw-devtrain" / "unknown").glob("*.jpg"))[:a.strangers]:
            img = load_image_file(p)
            f = detect_faces(img)
            if f:
                rows.append(emb.embed(img, f[:1])[0])
        sx = np.asarray(rows)
    enrol, held, truth = {}, [], []
    for n, x in persons:
        order = rng.permutation(len(x))
        held += [x[k] for k in order[:a.held]]
        truth += [n] * a.held
        enrol[n] = x[order[a.held:]]
    queries = np.vstack([np.asarray(held), sx])
    truth += ["unknown_person"] * len(sx)
    owner_of = {}
    for k, (n, _) in enumerate(persons):
        owner_of[n] = SOURCES[k % 3] if k >= 10 else SOURCES[0 if k < 4 else 1 if k < 7 else 2]
    rows = []
    table = open_set_calibration("facenet")["threshold_by_gallery_size"]
    settings = {"d": 128, "name_words": 8, "alpha": 16.0, "exp_bits": 8, "embedder": "facenet", "score": "zmax",
                "thresholds": sorted([int(n), float(t)] for n, t in table.items())}
    mp = find_mpspdz(None)
    with tempfile.TemporaryDirectory() as tmp:
        lab = SourcesLab(mp, a.workdir or Path(tmp), settings=settings, batch=16).start()
        try:
            srcs = {s: SourceClient(lab.client(s, "source"), lab.hosts, timeout=600) for s in SOURCES}
            for n, x in enrol.items():
                srcs[owner_of[n]].contribute(n, x)
            door = QueryClient(lab.client("door", "query"), lab.hosts, timeout=120)
            got = [g[0] for g in door.recognise(queries)]
            rows.append(emit(what="many sources, after contributing (warm start)", persons=len(enrol),
                             **rates(got, truth)))
            with SourceClient(lab.layout.client, lab.hosts, timeout=1800) as op:
                r = op.train(epochs=1, batch=32, lr=1.0)
            got_t = [g[0] for g in door.recognise(queries)]
            rows.append(emit(what="many sources, after train --on-servers", persons=r.get("persons"),
                             **rates(got_t, truth)))
            # single owner on the union of the same photos (float64 reference of the same algorithm)
            names = sorted(enrol)
            x = np.concatenate([enrol[n] for n in names])
            y = np.concatenate([[j] * len(enrol[n]) for j, n in enumerate(names)])
            params = reference.TrainParams(epochs=1, batch=32, lr=1.0, alpha=16.0, exp_bits=8, seed=1)
            order = reference.training_order(len(x), params.seed)
            w = reference.train(x[order], y[order], len(names), params)
            thr = reference.choose_threshold(x, y, len(names), params).threshold
            best, _, zmax = reference.predict_scores(w, queries, 8)
            closed = [names[b] for b in best]
            openset = [names[b] if z >= thr else "unknown_person" for b, z in zip(best, zmax)]
            known = [k for k, t in enumerate(truth) if t != "unknown_person"]
            rows.append(emit(what="single owner, union (float64 reference)", persons=len(names),
                             closed_set_accuracy=float(np.mean([closed[k] == truth[k] for k in known])),
                             threshold=thr, **rates(openset, truth)))
            rows.append(emit(what="many sources vs single owner: same closed-set decision",
                             agreement=float(np.mean([got_t[k] in (closed[k], "unknown_person") for k in known]))))
            gone = persons[5][0]
            srcs[owner_of[gone]].withdraw(gone)
            got_w = [g[0] for g in door.recognise(queries)]
            mine = [k for k, t in enumerate(truth) if t == gone]
            others = [k for k in range(len(truth)) if truth[k] != gone]
            rows.append(emit(what=f"withdrawal of {gone}", their_photos_unknown=float(np.mean(
                [got_w[k] == "unknown_person" for k in mine])), others_unchanged=float(np.mean(
                    [got_w[k] == got_t[k] for k in others]))))
            for cl in [*srcs.values(), door]:
                cl.close()
        finally:
            lab.stop()
    print("\n| measurement | figures |\n|---|---|")
    for r in rows:
        figs = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "what")
        print(f"| {r['what']} | {figs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
