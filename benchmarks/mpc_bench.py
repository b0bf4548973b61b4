"""Private training and recognition figures: time and data sent, beside the plaintext reference.

    python benchmarks/mpc_bench.py small        # N=100, d=128, C=10 (the issue's reference setting)
    python benchmarks/mpc_bench.py query        # one query, and a batch of 100
    python benchmarks/mpc_bench.py devtrain     # all of lfw-devtrain/people (291 people)

Embeddings come from the client pipeline (cached under --cache). Prints `key: value` lines.
Reference figure for `small` (measured on this 2-core machine with MP-SPDZ's own ml.Dense +
ml.MultiOutput softmax regression, semi2k, 40 epochs, batch 10): 184 s and 23 GB per party.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestration import reference  # noqa: E402
from orchestration.mpspdz import find_mpspdz  # noqa: E402
from orchestration.private import Layout, predict_private, train_private  # noqa: E402

FACES = REPO.parent / "shared" / "faces"
REF_SECONDS, REF_GB_PER_PARTY = 184.0, 23.0


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


def run_train(x, labels, tr, te, params, layout, mp):
    classes = sorted(set(labels[tr]))
    index = {n: k for k, n in enumerate(classes)}
    t0 = time.monotonic()
    report = train_private(mp, layout, x[tr], list(labels[tr]), params, timeout=7200, encrypted=ENCRYPTED)
    total = time.monotonic() - t0
    w = reference.train(x[tr], np.array([index[n] for n in labels[tr]]), len(classes), params)
    pr = predict_private(mp, layout, x[te], threshold=0.0, timeout=3600, encrypted=ENCRYPTED)
    mpc = np.array([p.label for p in pr.predictions])
    ref, _ = reference.predict(w, x[te], params.exp_bits)
    truth = np.array([index[n] for n in labels[te]])
    print(f"train_n: {len(tr)}\nclasses: {len(classes)}\ndim: {x.shape[1]}\nepochs: {params.epochs}")
    print(f"train_protocol_seconds: {report.run.wall_seconds:.2f}")
    print(f"train_total_seconds_incl_compile_and_sharing: {total:.2f}")
    print(f"train_data_mb_both_parties: {report.run.data_sent_mb:.1f}")
    print(f"train_data_mb_per_party: {report.run.data_sent_mb / 2:.1f}")
    print(f"test_n: {len(te)}")
    print(f"mpc_accuracy: {np.mean(mpc == truth):.4f}\nplaintext_accuracy: {np.mean(ref == truth):.4f}")
    print(f"mpc_plaintext_agreement: {np.mean(mpc == ref):.4f}")
    return report


ENCRYPTED = True


def main() -> None:
    global ENCRYPTED
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["small", "query", "devtrain"])
    ap.add_argument("--backend", default="facenet", choices=["facenet", "dlib"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="without TLS between the servers (to measure its cost)")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pfr-bench-cache")
    args = ap.parse_args()
    ENCRYPTED = not args.plain
    print(f"tls: {ENCRYPTED}")
    logging.basicConfig(level=logging.WARNING)
    mp = find_mpspdz()
    params = reference.TrainParams(epochs=args.epochs, batch=32, lr=1.0, alpha=args.alpha, exp_bits=8)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp))
        if args.what in ("small", "query"):
            x, labels = embeddings(FACES / "lfw-devtrain" / "people", args.backend, args.cache)
            names = [n for n in sorted(set(labels)) if np.sum(labels == n) >= 14][:10]
            keep = np.isin(labels, names)
            x, labels = x[keep], labels[keep]
            tr, te = split(labels, 10, 0.0)
            report = run_train(x, labels, tr, te, params, layout, mp)
            if args.what == "small":
                print(f"reference_seconds: {REF_SECONDS}\nreference_gb_per_party: {REF_GB_PER_PARTY}")
                print(f"time_ratio_vs_reference: {report.run.wall_seconds / REF_SECONDS:.4f}")
                print(f"data_ratio_vs_reference: {report.run.data_sent_mb / 2 / 1000 / REF_GB_PER_PARTY:.4f}")
            else:
                for q in (1, 100):
                    queries = np.resize(x[te], (q, x.shape[1]))
                    predict_private(mp, layout, queries, threshold=0.5, encrypted=ENCRYPTED)  # compile outside the timing
                    runs = [predict_private(mp, layout, queries, threshold=0.5, encrypted=ENCRYPTED) for _ in range(3)]
                    secs = sorted(r.run.wall_seconds for r in runs)[1]
                    mb = runs[0].run.data_sent_mb
                    print(f"batch_{q}_seconds: {secs:.3f}\nbatch_{q}_seconds_per_query: {secs / q:.4f}")
                    print(f"batch_{q}_data_mb: {mb:.2f}\nbatch_{q}_data_mb_per_query: {mb / q:.3f}")
        else:
            x, labels = embeddings(FACES / "lfw-devtrain" / "people", args.backend, args.cache)
            tr, te = split(labels, None, 0.3)
            run_train(x, labels, tr, te, params, layout, mp)


if __name__ == "__main__":
    main()
