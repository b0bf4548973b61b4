"""Recognition cost against gallery size, round trip and batch (issue 19): one table and one plot.

    python benchmarks/gallery_scale.py                       # C = 10 291 1000 10000, RTT 0 and 20 ms, batch 1 16 64
    python benchmarks/gallery_scale.py --classes 1000 --rtt 20 --batch 1 --batch 16

Each server is run by `invoke party` over TLS in its own network namespace, as on two hosts, and the client's
`invoke deal` beside them (dealer mode, the default protocol); the latency is tc netem's or tests/delay_relay.py's
(see benchmarks/two_hosts.py). The models are synthetic (2 photos per person, the warm start from class means:
the size is what matters here). Per (C, RTT, batch) it prints one row: protocol seconds per face, faces per
second, MB sent between all parties per face, MP-SPDZ's round count for server 0 (`mpspdz_rounds`: every send and
every receive), the part of it MP-SPDZ counts in its online phase (`online`: the openings between the servers; the
rest is preprocessing, in the dealer mode the dealer's deliveries, which it pushes ahead of the servers) and the
round trips (protocol time / measured RTT). Compiling is
outside the timing (once per size). Writes the table as Markdown and a PNG of seconds per face against C, one
line per round trip and batch, to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import csv
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import netlab  # noqa: E402
from synthetic import clusters  # noqa: E402
from test_two_hosts import Deployment  # noqa: E402
from two_hosts import path_rtt_ms, run_job  # noqa: E402

from orchestration.client import jobs as client  # noqa: E402
from orchestration.shared import reference  # noqa: E402

COLUMNS = ["classes", "rtt_ms", "batch", "seconds_per_face", "faces_per_s", "mb_per_face", "mpspdz_rounds",
           "online_rounds", "round_trips", "protocol_s"]


def measure(c: int, rtt: float, batches: list[int], proto: str) -> list[dict]:
    x, labels = clusters(people=c, per=2, seed=c)
    params = reference.TrainParams(epochs=0, alpha=16.0, exp_bits=8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gallery-scale-") as tmp, netlab.TwoHosts(rtt_ms=rtt) as net:
        dep = Deployment(Path(tmp), net, protocol=proto)
        measured = path_rtt_ms(net, dep.hosts_files[1].read_text())
        sent = client.share_train(dep.client, x, labels, params, dep.root / "train", protocol=proto)
        run_job(dep, dep.root / "train")
        client.collect(dep.client, sent.job, dep.outputs(sent.job))
        for q in batches:
            sent = client.share_predict(dep.client, x[[k % len(x) for k in range(q)]], 0.0, dep.root / f"predict{q}",
                                        protocol=proto)
            _, rc = run_job(dep, dep.root / f"predict{q}")
            done = client.collect(dep.client, sent.job, dep.outputs(sent.job))
            assert done.predictions is not None and len(done.predictions) == q
            secs = float(rc[0]["seconds"])
            row = {"classes": c, "rtt_ms": rtt, "batch": q, "seconds_per_face": secs / q, "faces_per_s": q / secs,
                   "mb_per_face": float(rc[0]["global_data_mb"]) / q, "mpspdz_rounds": rc[0].get("rounds"),
                   "online_rounds": rc[0].get("online_rounds") or "",
                   "round_trips": round(secs * 1000 / measured) if rtt else "", "protocol_s": secs,
                   "rtt_measured_ms": measured}
            print(",".join(_fmt(row[k]) for k in COLUMNS), flush=True)
            rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["rtt_measured_ms"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of an earlier run (``path``) that this run did not measure, then this run's, sorted by C, RTT, batch."""
    key = lambda r: (int(r["classes"]), float(r["rtt_ms"]), int(r["batch"]))  # noqa: E731
    new = {key(r) for r in rows}
    old = []
    if path.is_file():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                if key(r) not in new:
                    old.append({k: (v if k == "round_trips" or not v else float(v) if "." in v or "e" in v else int(v))
                                for k, v in r.items()})
    return sorted(old + rows, key=key)


def markdown(rows: list[dict]) -> str:
    head = "| C | RTT (ms) | batch | s per face | faces/s | MB per face | mpspdz_rounds | online | round trips |\n" \
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    return head + "".join(
        f"| {r['classes']:,} | {r['rtt_ms']:g} | {r['batch']} | {r['seconds_per_face']:.3f} | {r['faces_per_s']:.1f} | "
        f"{r['mb_per_face']:.2f} | {r['mpspdz_rounds']} | {r.get('online_rounds', '')} | {r['round_trips']} |\n"
        for r in rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rtt in sorted({r["rtt_ms"] for r in rows}):
        for q in sorted({r["batch"] for r in rows}):
            pts = sorted((r["classes"], r["seconds_per_face"]) for r in rows if r["rtt_ms"] == rtt and r["batch"] == q)
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if rtt else "--", label=f"RTT {rtt:g} ms, batch {q}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("people in the gallery (C)")
    ax.set_ylabel("protocol seconds per face")
    ax.set_title("Private recognition, two servers over TLS, dealer mode")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, action="append", help="gallery sizes (default 10 291 1000 10000)")
    ap.add_argument("--rtt", type=float, action="append", help="round trips in ms (default 0 and 20)")
    ap.add_argument("--batch", type=int, action="append", help="query batch sizes (default 1 16 64)")
    ap.add_argument("--protocol", default="dealer", choices=["dealer", "semi2k"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out's gallery_scale.csv that this run "
                    "did not measure (table and plot then show both)")
    args = ap.parse_args()
    reason = netlab.unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    print(",".join(COLUMNS), flush=True)
    rows = []
    for c in args.classes or [10, 291, 1000, 10000]:
        for rtt in args.rtt or [0.0, 20.0]:
            rows += measure(c, rtt, args.batch or [1, 16, 64], args.protocol)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = merged(args.out / "gallery_scale.csv", rows) if args.merge else rows
    write_csv(args.out / "gallery_scale.csv", rows)
    table = args.out / "gallery_scale.md"
    tmp = table.with_suffix(".tmp")
    tmp.write_text(markdown(rows))
    tmp.replace(table)
    plot(rows, args.out / "gallery_scale.png")
    print(f"\n{markdown(rows)}\nwrote {table} and {args.out / 'gallery_scale.png'}")


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
