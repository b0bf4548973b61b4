"""Two servers in two network namespaces, at 0 ms and 20 ms round trip: time, data and rounds of
training and recognition, each server run by `invoke party` over TLS, as on two real hosts; in the
dealer mode the client's `invoke deal` runs beside them (in server 1's namespace, reaching server 0
over the same delayed path as server 1).

    python benchmarks/two_hosts.py [--rtt 0 --rtt 20] [--protocol dealer --protocol semi2k]
                                   [--people 10 --per 8] [--queries 1 --queries 64]

Needs root (network namespaces). Latency comes from tc netem where the kernel has it, else from
tests/delay_relay.py, a TCP relay in server 1's namespace that holds every byte for half the
round trip each way (all of MP-SPDZ's connections go from higher to lower party numbers). The
measured round trip of the path is printed beside the figures, and `round_trips` is the protocol
time divided by it. `mpspdz_rounds` is what MP-SPDZ prints for server 0 (it counts every send and
every receive, the dealer's deliveries included, so it is about twice the round trips).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import netlab  # noqa: E402
from synthetic import clusters  # noqa: E402
from test_two_hosts import PORTS, Deployment  # noqa: E402

from orchestration.client import jobs as client
from orchestration.shared import reference  # noqa: E402
from orchestration.mpspdz.toolchain import compile_program, find_mpspdz, protocol  # noqa: E402


def path_rtt_ms(net: netlab.TwoHosts, hosts1: str) -> float:
    """Round trip from server 1 to where its hosts file says server 0 is (through the relay if any)."""
    code = (
        "import socket,threading\n"
        f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{net.addr[0]}',{PORTS[0]}))\n"
        "s.listen();print('ready',flush=True);c,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
        "while (b:=c.recv(1)): c.sendall(b)\n")
    echo = net.popen(0, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    host, port = hosts1.splitlines()[0].rsplit(":", 1)
    probe = (
        "import socket,time,statistics\n"
        f"c=socket.create_connection(('{host}',{port}));c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
        "ts=[]\nfor _ in range(20):\n t=time.perf_counter();c.sendall(b'x');c.recv(1);ts.append(time.perf_counter()-t)\n"
        "print(statistics.median(ts)*1000)\n")
    try:
        return float(net.run(1, [sys.executable, "-c", probe]).stdout)
    finally:
        echo.kill()
        echo.wait()


def run_job(dep: Deployment, job_dir: Path) -> tuple[float, list[dict]]:
    """Both servers (and the dealer) on the job; wall time and both receipts."""
    m = json.loads((job_dir / "server0" / "manifest.json").read_text())
    proto = protocol(m["protocol"])
    for d in (dep.servers + [dep.root]):  # compile outside the timing (each server compiles for itself)
        compile_program(find_mpspdz(), m["program"], m["program_args"], d / "build", proto=proto)
    t0 = time.monotonic()
    res = dep.run(job_dir, timeout=3000)
    wall = time.monotonic() - t0
    for rc, out in res:
        if rc != 0:
            raise SystemExit(f"a server failed:\n{out}")
    receipts = [json.loads((dep.servers[i] / "outputs" / m["job"] / "receipt.json").read_text()) for i in range(2)]
    return wall, receipts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", type=float, action="append", help="round trip(s) in ms (default 0 and 20)")
    ap.add_argument("--protocol", action="append", choices=["dealer", "semi2k"], help="default: both")
    ap.add_argument("--people", type=int, default=10)
    ap.add_argument("--per", type=int, default=8, help="training faces per person")
    ap.add_argument("--queries", type=int, action="append", help="query batch sizes (default 1 and 64)")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    reason = netlab.unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    rtts = args.rtt or [0.0, 20.0]
    batches = args.queries or [1, 64]
    x, labels = clusters(people=args.people, per=args.per, seed=0)
    params = reference.TrainParams(epochs=args.epochs, batch=32, lr=1.0, alpha=16.0, exp_bits=8, seed=0)
    print(f"two namespaces, one `invoke party` each, TLS on; N={len(x)} faces, C={args.people} people, d=128, "
          f"{args.epochs} SGD epoch(s)")
    print("protocol,rtt_target_ms,rtt_measured_ms,delay,job,queries,wall_s,protocol_s,round_trips,mpspdz_rounds,"
          "data_total_mb")
    for proto in args.protocol or ["dealer", "semi2k"]:
        for rtt in rtts:
            with tempfile.TemporaryDirectory(prefix="two-hosts-") as tmp, netlab.TwoHosts(rtt_ms=rtt) as net:
                dep = Deployment(Path(tmp), net, protocol=proto)
                measured = path_rtt_ms(net, dep.hosts_files[1].read_text())

                def row(job: str, q, wall: float, rc: list[dict]) -> None:
                    secs = rc[0]["seconds"]
                    trips = f"{secs * 1000 / measured:.0f}" if rtt else ""
                    print(f"{proto},{rtt:g},{measured:.2f},{net.delay},{job},{q},{wall:.2f},{secs:.3f},{trips},"
                          f"{rc[0].get('rounds')},{rc[0]['global_data_mb']:.1f}", flush=True)

                sent = client.share_train(dep.client, x, labels, params, dep.root / "train", protocol=proto)
                wall, rc = run_job(dep, dep.root / "train")
                client.collect(dep.client, sent.job, dep.outputs(sent.job))
                row("train", "", wall, rc)
                for q in batches:
                    sent = client.share_predict(dep.client, x[[k % len(x) for k in range(q)]], 0.0,
                                                dep.root / f"predict{q}", protocol=proto)
                    wall, rc = run_job(dep, dep.root / f"predict{q}")
                    done = client.collect(dep.client, sent.job, dep.outputs(sent.job))
                    assert done.predictions is not None and len(done.predictions) == q
                    row("predict", q, wall, rc)


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
