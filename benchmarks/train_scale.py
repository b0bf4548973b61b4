"""Private training at gallery scale (issue 19): 10,000 people x 10 photos, synthetic d=128, local mode.

    python benchmarks/train_scale.py                          # 10,000 people, warm start from class means
    python benchmarks/train_scale.py --people 1000 --sgd      # also what one SGD epoch adds (float64 and MPC)

With ``--epochs 0`` (the default here) the client averages each person's photos in the clear and shares
c x d means; the servers compute the nearest-class-mean model on shares (face_train.mpc, no one-hot
product), so the cost grows with the number of people, not faces x people. Prints `key: value` lines:
the wall time of each step, the peak memory of this process (the client: sharing and the threshold
choice) and of its largest child (the MP-SPDZ compiler or a party), and the accuracy on held-out photos
of the model the servers hold (its shares reconstructed here, as only a benchmark may) beside the float64
reference of the same algorithm, plus one batch of queries through the real protocol.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from orchestration.client.private import Layout, _read_shares, predict_private, train_private  # noqa: E402
from orchestration.mpspdz.toolchain import find_mpspdz  # noqa: E402
from orchestration.shared import reference  # noqa: E402
from preprocessing import sharing  # noqa: E402


def peak_mb(who: int) -> float:
    """Peak resident memory in MB: RUSAGE_SELF, or RUSAGE_CHILDREN (the largest child that has ended)."""
    return resource.getrusage(who).ru_maxrss / 1024


def data(people: int, per: int, test_per: int, spread: float, seed: int):
    from synthetic import clusters

    x, labels = clusters(people=people, per=per + test_per, d=128, spread=spread, seed=seed)
    labels = np.array(labels)
    k = np.arange(len(x)) % (per + test_per)
    return x[k < per], labels[k < per], x[k >= per], labels[k >= per]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=10_000)
    ap.add_argument("--per", type=int, default=10, help="training photos per person")
    ap.add_argument("--test-per", type=int, default=2, help="held-out photos per person")
    ap.add_argument("--spread", type=float, default=1.8, help="noise around each person's centre (norm); 1.8 makes the 10,000-person task hard enough to show disagreements (float64 accuracy about 0.9)")
    ap.add_argument("--epochs", type=int, default=0, help="0: the warm start from class means alone")
    ap.add_argument("--sgd", action="store_true", help="also train with 1 SGD epoch (float64 reference, and MPC "
                    "when the one-hot fits) and print what it adds")
    ap.add_argument("--protocol", default="dealer", choices=["dealer", "semi2k"])
    ap.add_argument("--queries", type=int, default=64, help="held-out photos sent through the protocol (one batch)")
    ap.add_argument("--alpha", type=float, default=16.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mp = find_mpspdz()
    xtr, ltr, xte, lte = data(args.people, args.per, args.test_per, args.spread, seed=19)
    classes = sorted(set(ltr))
    index = {n: k for k, n in enumerate(classes)}
    ytr, yte = np.array([index[n] for n in ltr]), np.array([index[n] for n in lte])
    print(f"people: {len(classes)}\ntrain_faces: {len(xtr)}\ntest_faces: {len(xte)}\nprotocol: {args.protocol}")
    for epochs in [args.epochs] + ([1] if args.sgd and args.epochs != 1 else []):
        p = f"epochs{epochs}."
        params = reference.TrainParams(epochs=epochs, batch=32, lr=1.0, alpha=args.alpha, exp_bits=8)
        t0 = time.monotonic()
        w_ref = reference.train(xtr, ytr, len(classes), params)
        ref_best = reference.predict_scores(w_ref, xte, params.exp_bits)[0]
        print(f"{p}float64_train_seconds: {time.monotonic() - t0:.1f}")
        print(f"{p}float64_accuracy: {np.mean(ref_best == yte):.4f}", flush=True)
        if epochs and len(xtr) * len(classes) > 200_000_000:
            print(f"{p}mpc: not run (SGD shares an n x c one-hot of {len(xtr) * len(classes):,} values)")
            continue
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            layout = Layout(Path(tmp), args.protocol)
            t0 = time.monotonic()
            report = train_private(mp, layout, xtr, list(ltr), params, timeout=7200)
            wall = time.monotonic() - t0
            print(f"{p}share_seconds: {report.share_seconds:.1f} (incl. the threshold choice on the client)")
            print(f"{p}compile_seconds: {report.compile_seconds:.1f}")
            print(f"{p}protocol_seconds: {report.run.wall_seconds:.1f}")
            print(f"{p}train_wall_seconds: {wall:.1f}")
            print(f"{p}data_mb_between_all_parties: {report.run.data_sent_mb:.1f}")
            print(f"{p}mpspdz_rounds: {report.run.parties[0].rounds}")
            print(f"{p}peak_mb_client_process: {peak_mb(resource.RUSAGE_SELF):.0f}")
            print(f"{p}peak_mb_largest_child: {peak_mb(resource.RUSAGE_CHILDREN):.0f}", flush=True)
            d1, c = xtr.shape[1] + 1, len(classes)
            held = sharing.decode_fixed(sharing.reconstruct(*[
                _read_shares(layout.model_dir(i) / f"Transactions-P{i}.data", 0, d1 * c)
                for i in range(2)])).reshape(d1, c)
            best = reference.predict_scores(held, xte, params.exp_bits)[0]
            print(f"{p}servers_model_accuracy: {np.mean(best == yte):.4f} (the shares' model on all held-out photos)")
            print(f"{p}servers_model_agreement_with_float64: {np.mean(best == ref_best):.4f}")
            print(f"{p}max_weight_difference_to_float64: {np.max(np.abs(held - w_ref)):.2e}", flush=True)
            q = min(args.queries, len(xte))
            t0 = time.monotonic()
            rep = predict_private(mp, layout, xte[:q], threshold=-1e9, timeout=3600)
            got = np.array([pr.best for pr in rep.predictions])
            print(f"{p}mpc_queries: {q} in {time.monotonic() - t0:.1f} s (protocol {rep.run.wall_seconds:.2f} s, "
                  f"compile {rep.compile_seconds:.1f} s)")
            print(f"{p}mpc_query_agreement_with_float64: {np.mean(got == ref_best[:q]):.4f}", flush=True)


if __name__ == "__main__":
    main()
