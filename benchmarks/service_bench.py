"""The recognition service (`invoke serve`): latency of one face, throughput of batched requests, and
a load test of concurrent clients; on loopback (local mode) and across two network namespaces.

    python benchmarks/service_bench.py [--setup local --setup netns] [--rtt 0 --rtt 20]
                                       [--classes 10 --classes 291] [--protocol dealer] [--batch 16] [--lanes 2]
                                       [--epochs 0]
                                       [--singles 100] [--sizes 16,256,1024] [--clients 4 --requests 1000]

Each case trains a model on synthetic face-like embeddings (unit vectors in C clusters; the MPC's
cost depends on sizes only) in the one-job mode, starts the service on it and measures from the
client's side: "one face" is embedding -> name (sharing, both requests, reconstruction and the
threshold) for one query at a time; "throughput" one request of N faces; "load" K clients in
threads sending R requests in all (1..4 faces each), every answer checked against the expected
classes: none lost, none answered twice or with another request's result.

`--setup netns` needs root: two namespaces, the client and the dealer in server 1's. At `--rtt`
above 0 every cross-namespace link (MPC, the gateways' link, the client to server 0) goes through
tests/delay_relay.py (this kernel has no netem), which holds each byte half the round trip each way.
Prints one JSON line per measurement, then a summary table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from synthetic import clusters  # noqa: E402

from orchestration.shared import reference  # noqa: E402
from orchestration.mpspdz.toolchain import find_mpspdz, protocol  # noqa: E402
from orchestration.shared.wire import ServiceError  # noqa: E402

PARAMS = reference.TrainParams(epochs=1, batch=32, lr=1.0, alpha=16.0, exp_bits=8, seed=1)


def params(args: argparse.Namespace) -> reference.TrainParams:
    return reference.TrainParams(**{**PARAMS.__dict__, "epochs": args.epochs})


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def measure(call, make_client, x: np.ndarray, args: argparse.Namespace, label: dict) -> list[dict]:
    """All measurements of one running service; ``call(fn, *a)`` runs fn where the client lives."""
    out = []
    x = x[:64]  # the faces the measurements draw from (their expected classes come from one request)
    cl = make_client()
    try:
        expect = [p.best for p in call(cl.recognise, x, 0.0).predictions]
        lat = []
        for k in range(args.singles):
            t0 = time.perf_counter()
            call(cl.recognise, x[k % len(x):k % len(x) + 1], 0.0)
            lat.append(time.perf_counter() - t0)
        out.append(dict(label, what="one face", n=len(lat), p50_ms=1000 * statistics.median(lat),
                        p95_ms=1000 * percentile(lat, 95), mean_ms=1000 * statistics.mean(lat)))
        for n in args.sizes:
            y = np.concatenate([x] * (n // len(x) + 1))[:n]
            t0 = time.perf_counter()
            ans = call(cl.recognise, y, 0.0)
            dt = time.perf_counter() - t0
            ok = [p.best for p in ans.predictions] == (expect * (n // len(x) + 1))[:n]
            out.append(dict(label, what="throughput", faces=n, seconds=dt, faces_per_s=n / dt, correct=ok))
    finally:
        call(cl.close)
    if args.requests:
        out.append(load_test(call, make_client, x, expect, args, label))
    return out


def load_test(call, make_client, x: np.ndarray, expect: list[int], args: argparse.Namespace, label: dict) -> dict:
    per = [args.requests // args.clients + (1 if k < args.requests % args.clients else 0) for k in range(args.clients)]
    lat: list[float] = []
    lost: list[str] = []
    wrong = 0
    lock = threading.Lock()

    def worker(k: int) -> None:
        nonlocal wrong
        rng = np.random.default_rng(k)
        cl = make_client()
        try:
            for _ in range(per[k]):
                idx = rng.choice(len(x), size=int(rng.integers(1, 5)), replace=False)
                t0 = time.perf_counter()
                try:
                    got = [p.best for p in cl.recognise(x[idx], 0.0).predictions]
                except ServiceError as exc:
                    with lock:
                        lost.append(str(exc))
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    wrong += got != [expect[j] for j in idx]
        finally:
            cl.close()

    t0 = time.perf_counter()
    futures = [call.submit(worker, k) for k in range(args.clients)]
    for f in futures:
        f.result()
    wall = time.perf_counter() - t0
    return dict(label, what="load", clients=args.clients, requests=args.requests, answered=len(lat), lost=len(lost),
                wrong=wrong, seconds=wall, requests_per_s=len(lat) / wall, p50_ms=1000 * statistics.median(lat),
                p95_ms=1000 * percentile(lat, 95), first_loss=lost[0] if lost else None)


class LocalCall:
    """Client calls in this process (local mode); ``submit`` runs in a thread."""

    def __call__(self, fn, *a, **kw):
        return fn(*a, **kw)

    def submit(self, fn, *a):
        from concurrent.futures import ThreadPoolExecutor

        ex = ThreadPoolExecutor(max_workers=1)
        f = ex.submit(fn, *a)
        ex.shutdown(wait=False)
        return f


class NsCall:
    def __init__(self, ns: str, n: int):
        from service_lab import NsClients

        self.clients = NsClients(ns, n)

    def __call__(self, fn, *a, **kw):
        return self.clients.call(fn, *a, **kw)

    def submit(self, fn, *a):
        return self.clients.submit(fn, *a)


def run_local(mp, proto, c: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    from orchestration.client.private import Layout, train_private
    from orchestration.client.service import ServiceClient
    from orchestration.client.local_service import LocalService

    x, labels = clusters(people=c, per=args.per, seed=c)
    layout = Layout(tmp / f"local-{proto.name}-{c}", proto.name)
    train_private(mp, layout, x, labels, params(args))
    with LocalService(mp, layout, proto, batch=args.batch, port=7600, log_dir=layout.root / "logs",
                      extra_args=["--lanes", str(args.lanes)]) as svc:
        svc.wait_ready(timeout=args.ready_timeout)
        label = dict(setup="local", rtt_ms=0.0, protocol=proto.name, classes=c, batch=args.batch, lanes=args.lanes)
        return measure(LocalCall(), lambda: ServiceClient(layout.client, svc.hosts), x, args, label)


def run_netns(mp, proto, c: int, rtt: float, args: argparse.Namespace, tmp: Path) -> list[dict]:
    import netlab
    from service_lab import ServiceLab
    from test_two_hosts import Deployment, invoke

    x, labels = clusters(people=c, per=args.per, seed=c)
    with netlab.TwoHosts(rtt_ms=rtt) as net:
        root = tmp / f"netns-{proto.name}-{c}-{rtt:g}"
        root.mkdir()
        dep = Deployment(root, net, protocol=proto.name)
        dep.pin_client()
        # training is set-up here, not what is measured: it goes over the direct link, not the delay relay
        delayed = [f.read_text() for f in dep.hosts_files]
        direct = [f"{net.addr[0]}:{p0}\n{net.addr[1]}:{p1}\n" for p0, p1 in [(7100, 7101)]][0]
        for f in dep.hosts_files:
            f.write_text(direct + (f"{net.addr[1]}:7102\n" if len(dep.hosts_files) == 3 else ""))
        dep.train(x, labels, params(args))
        for f, text in zip(dep.hosts_files, delayed):
            f.write_text(text)
        lab = ServiceLab(dep, batch=args.batch, lanes=args.lanes).start()
        call = NsCall(net.ns[1], max(args.clients, 1))
        try:
            lab.wait_ready(call.clients, timeout=args.ready_timeout)
            label = dict(setup="netns", rtt_ms=rtt, delay=net.delay, protocol=proto.name, classes=c,
                         batch=args.batch, lanes=args.lanes)
            return measure(call, lambda: lab.new_client(timeout=900), x, args, label)
        finally:
            lab.stop()
            call.clients.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="append", choices=("local", "netns"))
    ap.add_argument("--rtt", action="append", type=float, help="netns: round trip in ms (default 0 and 20)")
    ap.add_argument("--classes", action="append", type=int, help="people in the model (default 10 and 291)")
    ap.add_argument("--protocol", action="append", choices=("dealer", "semi2k"))
    ap.add_argument("--batch", type=int, default=16, help="queries per MPC batch of the service")
    ap.add_argument("--lanes", type=int, default=2, help="batches in flight at once (service.lanes)")
    ap.add_argument("--ready-timeout", type=float, default=1800.0,
                    help="seconds to wait for the service (both servers and the dealer compile the serve program "
                         "first: minutes at C=10,000)")
    ap.add_argument("--epochs", type=int, default=PARAMS.epochs,
                    help="SGD epochs of the model served (0: the warm start from class means, for large C)")
    ap.add_argument("--per", type=int, default=4, help="training faces per person")
    ap.add_argument("--singles", type=int, default=100, help="one-face requests for the latency")
    ap.add_argument("--sizes", default="16,256,1024", help="request sizes for the throughput")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=1000, help="load test: requests in all (0: no load test)")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    setups = args.setup or ["local", "netns"]
    rtts = args.rtt or [0.0, 20.0]
    mp = find_mpspdz(None)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="service-bench-") as t:
        tmp = Path(t)
        for name in args.protocol or ["dealer"]:
            proto = protocol(name)
            for c in args.classes or [10, 291]:
                for setup in setups:
                    cases = [0.0] if setup == "local" else rtts
                    for rtt in cases:
                        res = run_local(mp, proto, c, args, tmp) if setup == "local" else \
                            run_netns(mp, proto, c, rtt, args, tmp)
                        for r in res:
                            print(json.dumps(r), flush=True)
                        rows += res
    print()
    print(f"{'setup':6} {'rtt':>4} {'proto':7} {'C':>4}  {'one face p50/p95 ms':>20}  {'faces/s (N)':>22}  load")
    keys = sorted({(r["setup"], r["rtt_ms"], r["protocol"], r["classes"]) for r in rows})
    for k in keys:
        rs = [r for r in rows if (r["setup"], r["rtt_ms"], r["protocol"], r["classes"]) == k]
        one = next((r for r in rs if r["what"] == "one face"), None)
        thr = [r for r in rs if r["what"] == "throughput"]
        load = next((r for r in rs if r["what"] == "load"), None)
        one_s = f"{one['p50_ms']:.1f} / {one['p95_ms']:.1f}" if one else "-"
        thr_s = ", ".join(f"{r['faces_per_s']:.0f} ({r['faces']})" for r in thr)
        load_s = (f"{load['answered']}/{load['requests']} answered, {load['lost']} lost, {load['wrong']} wrong, "
                  f"p50 {load['p50_ms']:.1f} ms, p95 {load['p95_ms']:.1f} ms" if load else "-")
        print(f"{k[0]:6} {k[1]:>4g} {k[2]:7} {k[3]:>4}  {one_s:>20}  {thr_s:>22}  {load_s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
