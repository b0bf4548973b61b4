"""Two servers in two network namespaces, at 0 ms and 20 ms round trip: time and data of training
and recognition, each server run by `invoke party` over TLS, as on two real hosts.

    python benchmarks/two_hosts.py [--rtt 0 --rtt 20] [--people 10 --per 8] [--queries 1 --queries 64]

Needs root (network namespaces). Latency comes from tc netem where the kernel has it, else from
tests/delay_relay.py, a TCP relay in server 1's namespace that holds every byte for half the
round trip each way (all of MP-SPDZ's connections go from server 1 to server 0). The measured
round trip of the path the servers use is printed beside the figures.
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

from orchestration import client, reference  # noqa: E402

PORTS = (7300, 7301)


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


def run_job(net: netlab.TwoHosts, root: Path, hosts: list[Path], job_dir: Path) -> tuple[float, list[dict]]:
    t0 = time.monotonic()
    procs = []
    for i in range(2):
        argv = [sys.executable, "-m", "invoke", "party", "--id", str(i), "--hosts", str(hosts[i]), "--job",
                str(job_dir / f"server{i}"), "--server-dir", str(root / f"server{i}"), "--timeout", "3000"]
        procs.append(net.popen(i, argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    wall = time.monotonic() - t0
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a server failed:\n{out}")
    job = json.loads((job_dir / "server0" / "manifest.json").read_text())["job"]
    receipts = [json.loads((root / f"server{i}" / "outputs" / job / "receipt.json").read_text()) for i in range(2)]
    return wall, receipts


def compile_all(root: Path, hosts: list[Path], job_dir: Path) -> None:
    """Compile outside the timed runs (each server compiles for itself on first use)."""
    from orchestration.mpspdz import compile_program, find_mpspdz

    m = json.loads((job_dir / "server0" / "manifest.json").read_text())
    for i in range(2):
        compile_program(find_mpspdz(), m["program"], m["program_args"], root / f"server{i}" / "build")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", type=float, action="append", help="round trip(s) in ms (default 0 and 20)")
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
    print("rtt_target_ms,rtt_measured_ms,delay,job,queries,wall_s,protocol_s,data_total_mb")
    for rtt in rtts:
        with tempfile.TemporaryDirectory(prefix="two-hosts-") as tmp, netlab.TwoHosts(rtt_ms=rtt) as net:
            root = Path(tmp)
            for i in range(2):
                subprocess.run([sys.executable, "-m", "invoke", "certs", "--id", str(i), "--server-dir",
                                str(root / f"server{i}")], cwd=REPO, check=True, capture_output=True)
            for i in range(2):
                subprocess.run([sys.executable, "-m", "invoke", "certs", "--id", str(i), "--server-dir",
                                str(root / f"server{i}"), "--peer-cert",
                                str(root / f"server{1 - i}" / "certs" / f"P{1 - i}.pem")],
                               cwd=REPO, check=True, capture_output=True)
            hosts = [root / "hosts0", root / "hosts1"]
            for i in range(2):
                hosts[i].write_text(net.hosts_text(i, PORTS))
            measured = path_rtt_ms(net, hosts[1].read_text())
            sent = client.share_train(root / "client", x, labels, params, root / "train")
            compile_all(root, hosts, root / "train")
            wall, rc = run_job(net, root, hosts, root / "train")
            client.collect(root / "client", sent.job, [root / f"server{i}" / "outputs" / sent.job for i in range(2)])
            print(f"{rtt:g},{measured:.2f},{net.delay},train,,{wall:.2f},{rc[0]['seconds']:.2f},"
                  f"{rc[0]['global_data_mb']:.1f}", flush=True)
            for q in batches:
                sent = client.share_predict(root / "client", x[:q] if q <= len(x) else
                                            x[[k % len(x) for k in range(q)]], 0.0, root / f"predict{q}")
                compile_all(root, hosts, root / f"predict{q}")
                wall, rc = run_job(net, root, hosts, root / f"predict{q}")
                done = client.collect(root / "client", sent.job,
                                      [root / f"server{i}" / "outputs" / sent.job for i in range(2)])
                assert done.predictions is not None and len(done.predictions) == q
                print(f"{rtt:g},{measured:.2f},{net.delay},predict,{q},{wall:.2f},{rc[0]['seconds']:.2f},"
                      f"{rc[0]['global_data_mb']:.1f}", flush=True)


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
