"""Private training and recognition figures in local mode, both protocols side by side, same machine,
same run, beside the float64 reference:

    python benchmarks/mpc_bench.py devtrain    # lfw-devtrain/people: 291 people, 70 % of each person's faces
    python benchmarks/mpc_bench.py scale       # synthetic N=10,000 faces of C=1,000 people, d=128
    python benchmarks/mpc_bench.py queries     # recognition: one query at C=10 and C=291, a batch of 128 at C=291
    python benchmarks/mpc_bench.py small       # N=100, C=10 (the first issue's reference setting)

``--protocol dealer --protocol semi2k`` (default: both) picks the modes; training settings are the ones
`invoke train` uses (invoke.yaml: 1 SGD epoch, batch 32, lr 1, alpha 16 for FaceNet). Embeddings come from
the client pipeline (cached under --cache). Prints `key: value` lines, each prefixed by the protocol.
`mpspdz_rounds` is MP-SPDZ's count for server 0 (every send and every receive, the dealer's deliveries
included); round trips over a real link are measured by benchmarks/two_hosts.py.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from orchestration.shared import reference  # noqa: E402
from orchestration.mpspdz.toolchain import find_mpspdz  # noqa: E402
from orchestration.client.private import Layout, predict_private, train_private  # noqa: E402

FACES = REPO.parent / "shared" / "faces"
ENCRYPTED = True


def embeddings(root: Path, backend: str, cache: Path):
    from preprocessing.dataset import embed_gallery

    g = embed_gallery(root, backend=backend, detector="hog", cache_dir=cache, progress=True)
    return g.embeddings, np.array(g.labels)


def split(labels: np.ndarray, n_train: int | None, frac_test: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for name in sorted(set(labels)):
        idx = np.flatnonzero(labels == name)
        rng.shuffle(idx)
        k = n_train if n_train is not None else len(idx) - max(1, int(round(len(idx) * frac_test)))
        tr += list(idx[:k])
        te += list(idx[k:])
    return np.array(tr), np.array(te)


def synthetic(people: int, per: int, seed: int = 0, spread: float = 0.3):
    """Random unit embeddings clustered by person (d=128)."""
    from synthetic import clusters

    x, labels = clusters(people=people, per=per, d=128, spread=spread, seed=seed)
    return x, np.array(labels)


def run(proto: str, x, labels, tr, te, params, mp, batch: int = 128) -> None:
    p = f"{proto}."
    classes = sorted(set(labels[tr]))
    index = {n: k for k, n in enumerate(classes)}
    with tempfile.TemporaryDirectory(prefix=f"bench-{proto}-") as tmp:
        layout = Layout(Path(tmp), proto)
        t0 = time.monotonic()
        report = train_private(mp, layout, x[tr], list(labels[tr]), params, timeout=7200, encrypted=ENCRYPTED)
        total = time.monotonic() - t0
        print(f"{p}train_n: {len(tr)}\n{p}classes: {len(classes)}\n{p}epochs: {params.epochs}")
        print(f"{p}train_protocol_seconds: {report.run.wall_seconds:.2f}")
        print(f"{p}train_compile_seconds: {report.compile_seconds:.2f}")
        print(f"{p}train_wall_seconds_incl_sharing_compile_threshold: {total:.2f}")
        print(f"{p}train_data_mb_between_all_parties: {report.run.data_sent_mb:.1f}", flush=True)
        w = reference.train(x[tr], np.array([index[n] for n in labels[tr]]), len(classes), params)
        ref, _ = reference.predict(w, x[te], params.exp_bits)
        mpc, secs, mb = [], 0.0, 0.0
        for s in range(0, len(te), batch):
            pr = predict_private(mp, layout, x[te[s:s + batch]], threshold=0.0, timeout=3600, encrypted=ENCRYPTED)
            mpc += [q.best for q in pr.predictions]
            secs += pr.run.wall_seconds
            mb += pr.run.data_sent_mb
        mpc_a = np.array(mpc)
        truth = np.array([index[n] for n in labels[te]])
        print(f"{p}test_n: {len(te)}\n{p}recognition_protocol_seconds: {secs:.2f} ({len(te) / secs:.1f} queries/s, "
              f"batches of {batch})\n{p}recognition_data_mb: {mb:.1f}")
        print(f"{p}mpc_accuracy: {np.mean(mpc_a == truth):.4f}\n{p}plaintext_accuracy: {np.mean(ref == truth):.4f}")
        print(f"{p}mpc_plaintext_agreement: {np.mean(mpc_a == ref):.4f}", flush=True)


def queries(proto: str, mp, params, plan: list[tuple[int, list[int]]] | None = None) -> None:
    """Recognition: time, data and MP-SPDZ rounds per (classes, batch); by default one query at C=10 and C=291,
    and a batch of 128 at C=291 (throughput). Synthetic models (the size is what matters here)."""
    p = f"{proto}."
    for c, batches in plan or [(10, [1]), (291, [1, 128])]:
        x, labels = synthetic(c, 4 if c <= 300 else 2, seed=c)
        with tempfile.TemporaryDirectory(prefix=f"bench-q-{proto}-") as tmp:
            layout = Layout(Path(tmp), proto)
            train_private(mp, layout, x, list(labels), reference.TrainParams(**{**params.__dict__, "epochs": 0}),
                          timeout=7200, encrypted=ENCRYPTED)
            for q in batches:
                qx = x[np.arange(q) % len(x)]
                predict_private(mp, layout, qx, 0.5, encrypted=ENCRYPTED)  # compiles outside the timing
                runs = [predict_private(mp, layout, qx, 0.5, encrypted=ENCRYPTED) for _ in range(3)]
                secs = statistics.median(r.run.wall_seconds for r in runs)
                r0 = runs[0].run
                print(f"{p}C{c}_batch{q}_protocol_seconds: {secs:.3f} ({q / secs:.1f} queries/s)")
                print(f"{p}C{c}_batch{q}_data_mb: {r0.data_sent_mb:.2f}")
                print(f"{p}C{c}_batch{q}_mpspdz_rounds: {r0.parties[0].rounds}", flush=True)


def main() -> None:
    global ENCRYPTED
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["devtrain", "scale", "queries", "small"])
    ap.add_argument("--protocol", action="append", choices=["dealer", "semi2k"], help="default: both")
    ap.add_argument("--backend", default="facenet", choices=["facenet", "dlib"])
    ap.add_argument("--epochs", type=int, default=1, help="SGD epochs (invoke.yaml default: 1)")
    ap.add_argument("--plain", action="store_true", help="semi2k without TLS (to measure what TLS costs)")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--classes", type=int, nargs="+", help="queries: these gallery sizes (default: 10 291)")
    ap.add_argument("--batches", type=int, nargs="+", help="queries: these batch sizes at every size (default: "
                    "1 at C=10; 1 and 128 at C=291)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pfr-bench-cache")
    args = ap.parse_args()
    ENCRYPTED = not args.plain
    logging.basicConfig(level=logging.WARNING)
    mp = find_mpspdz()
    params = reference.TrainParams(epochs=args.epochs, batch=32, lr=1.0, alpha=args.alpha, exp_bits=8)
    for proto in args.protocol or ["dealer", "semi2k"]:
        print(f"{proto}.tls: {ENCRYPTED or proto == 'dealer'}", flush=True)
        if args.what == "queries":
            plan = None
            if args.classes or args.batches:
                plan = [(c, args.batches or [1]) for c in (args.classes or [10, 291])]
            queries(proto, mp, params, plan)
            continue
        if args.what == "scale":
            x, labels = synthetic(1000, 12, seed=7, spread=2.0)  # hard enough that accuracy is not 1.0
            tr, te = split(labels, 10, 0.0)
        else:
            x, labels = embeddings(FACES / "lfw-devtrain" / "people", args.backend, args.cache)
            if args.what == "small":
                names = [n for n in sorted(set(labels)) if np.sum(labels == n) >= 14][:10]
                keep = np.isin(labels, names)
                x, labels = x[keep], labels[keep]
                tr, te = split(labels, 10, 0.0)
            else:
                tr, te = split(labels, None, 0.3)
        run(proto, x, labels, tr, te, params, mp)


if __name__ == "__main__":
    main()
