"""The service under attack by its own clients: honest clients' answers and latency while authorised but
hostile clients run every attack of the security review in a loop (issue 15), against a run without them.

    python benchmarks/abuse_bench.py [--seconds 300] [--baseline 60] [--honest 4] [--hostile 4] [--classes 10]

Local mode (both gateways, their parties and the dealer on this machine, as `invoke serve`). The model
is trained on synthetic face-like embeddings. Honest clients (the data owner's certificate) send
requests of 1..4 faces back to back and check every answer against the expected classes. Each hostile
client has a certificate of its own, pinned on both servers, and loops over: halves of one request
with other sizes, a stalled half (4,096 at server 1, 1 at server 0), half requests then a hang-up,
frames announcing 64 MiB, headers that break JSON parsers (deep nesting, 5,000-digit numbers), queries
of the wrong size, its whole allowance of connections left idle, TLS handshakes never finished,
garbage bytes, frames trickled byte by byte, CBC-only handshakes, and its own revocation and re-pinning
on both servers. Prints one JSON line per run and a summary: honest requests answered, lost and wrong;
their p50/p95 against the run without attackers; each gateway's peak RSS; attacks run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from synthetic import clusters  # noqa: E402

from orchestration.client.jobs import load_model_record, model_generation  # noqa: E402
from orchestration.client.local_service import LocalService  # noqa: E402
from orchestration.client.private import Layout, train_private  # noqa: E402
from orchestration.client.service import ServiceClient  # noqa: E402
from orchestration.mpspdz import certs  # noqa: E402
from orchestration.mpspdz.toolchain import find_mpspdz, protocol  # noqa: E402
from orchestration.shared import reference  # noqa: E402
from orchestration.shared.wire import ServiceError, WireError, encode, receive, send  # noqa: E402

PARAMS = reference.TrainParams(epochs=1, batch=32, lr=1.0, alpha=16.0, exp_bits=8, seed=1)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Honest:
    """``n`` clients sending requests of 1..4 faces until ``stop``; every answer checked."""

    def __init__(self, make: Callable[[], ServiceClient], x: np.ndarray, expect: list[int], n: int):
        self.make, self.x, self.expect, self.n = make, x, expect, n
        self.lat: list[float] = []
        self.lost: list[str] = []
        self.wrong = 0
        self.lock = threading.Lock()

    def worker(self, k: int, stop: threading.Event) -> None:
        rng = np.random.default_rng(k)
        cl = self.make()
        try:
            while not stop.is_set():
                idx = rng.choice(len(self.x), size=int(rng.integers(1, 5)), replace=False)
                t0 = time.perf_counter()
                try:
                    got = [p.best for p in cl.recognise(self.x[idx], 0.0).predictions]
                except ServiceError as exc:
                    with self.lock:
                        self.lost.append(f"{exc.code}: {exc}")
                    continue
                dt = time.perf_counter() - t0
                with self.lock:
                    self.lat.append(dt)
                    self.wrong += got != [self.expect[j] for j in idx]
        finally:
            cl.close()


class Hostile:
    """One authorised client that misbehaves in every way the security review found, in a loop."""

    def __init__(self, folder: Path, name: str, svc: LocalService, layout: Layout, d1: int):
        self.folder, self.name, self.svc, self.layout, self.d1 = folder, name, svc, layout, d1
        self.count: dict[str, int] = {}
        self.gen = model_generation(load_model_record(layout.client))

    def client(self) -> ServiceClient:
        return ServiceClient(self.folder, self.svc.hosts, timeout=10)

    def _frames(self, n: int, rid: str, d1: int | None = None) -> list[tuple[dict, bytes]]:
        return ServiceClient.request_frames(np.ones((n, d1 or self.d1)), self.gen, rid)

    def _drain(self, cl: ServiceClient, servers=(0, 1), timeout: float = 30.0) -> None:
        for i in servers:
            try:
                s = cl._sock(i)
                s.settimeout(timeout)
                receive(s)
            except (OSError, WireError, ServiceError):
                pass

    # -- the attacks ---------------------------------------------------------------------------------------

    def mismatched_halves(self) -> None:
        cl = self.client()
        try:
            rid = os.urandom(8).hex()
            send(cl._sock(1), *self._frames(2, rid)[1])
            send(cl._sock(0), *self._frames(16, rid)[0])
            self._drain(cl)
        finally:
            cl.close()

    def stalled_half(self) -> None:
        cl = self.client()
        try:
            rid = os.urandom(8).hex()
            send(cl._sock(1), *self._frames(4096, rid)[1])
            send(cl._sock(0), *self._frames(1, rid)[0])
            self._drain(cl)
        finally:
            cl.close()

    def half_then_hang_up(self) -> None:
        cl = self.client()
        try:
            send(cl._sock(int.from_bytes(os.urandom(1), "big") % 2), *self._frames(4096, os.urandom(8).hex())[0])
        finally:
            cl.close()

    def huge_frame(self) -> None:
        cl = self.client()
        try:
            head = json.dumps({"type": "recognize", "id": "x", "gen": self.gen, "n": 4096, "d1": 2048}).encode()
            s = cl._sock(0)
            s.sendall(struct.pack("<II", 64 << 20, len(head)) + head)
            try:
                s.sendall(b"\0" * (4 << 20))
            except OSError:
                pass
            self._drain(cl, (0,), 5)
        finally:
            cl.close()

    def parser_bombs(self) -> None:
        for head in (b'{"type":"status","x":' + b"[" * 20000 + b"]" * 20000 + b"}",
                     b'{"type":"recognize","id":"b","gen":"g","n":' + b"9" * 5000 + b',"d1":1}'):
            cl = self.client()
            try:
                cl._sock(1).sendall(struct.pack("<II", 4 + len(head), len(head)) + head)
                self._drain(cl, (1,), 5)
            finally:
                cl.close()

    def wrong_size(self) -> None:
        cl = self.client()
        try:
            rid = os.urandom(8).hex()
            for i, frame in enumerate(self._frames(8, rid, d1=self.d1 + 7)):
                send(cl._sock(i), *frame)
            self._drain(cl, timeout=5)
        finally:
            cl.close()

    def connection_hog(self) -> None:
        socks = []
        for _ in range(10):  # more than the allowance: the extra ones are answered busy and closed
            cl = self.client()
            try:
                socks.append(cl._sock(0))
            except ServiceError:
                break
        time.sleep(2.0)
        for s in socks:
            s.close()

    def raw_abuse(self) -> None:
        addr = self.client().ports.client(0)
        silent = [socket.create_connection(addr, timeout=5) for _ in range(4)]  # TCP only, no handshake
        g = socket.create_connection(addr, timeout=5)
        g.sendall(b"GET / HTTP/1.0\r\n\r\n" * 20)
        time.sleep(1.0)
        for s in silent + [g]:
            s.close()

    def trickle(self) -> None:
        cl = self.client()
        try:
            s = cl._sock(1)
            for b in b"\x40\x00\x00":
                s.sendall(bytes([b]))
                time.sleep(0.3)
        except OSError:
            pass
        finally:
            cl.close()

    def cbc_only(self) -> None:
        cl = self.client()
        ctx = cl._context(0)
        ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA")
        try:
            with ctx.wrap_socket(socket.create_connection(cl.ports.client(0), timeout=5)) as t:
                send(t, {"type": "status"})
                receive(t)
        except (OSError, ssl.SSLError, WireError):
            pass

    def revoke_and_repin(self) -> None:
        pins = [certs.client_dir_of(self.layout.server(i)) / f"{self.name}.pem" for i in (0, 1)]
        saved = [p.read_bytes() for p in pins]
        cl = self.client()
        try:
            cl.status()
            for p in pins:
                p.unlink()
            time.sleep(1.5)
            try:
                cl.status()
            except ServiceError:
                pass
        finally:
            cl.close()
            for p, b in zip(pins, saved):
                tmp = p.with_name(f".{p.name}.tmp")
                tmp.write_bytes(b)
                os.chmod(tmp, 0o600)
                os.replace(tmp, p)

    ATTACKS = ("mismatched_halves", "stalled_half", "half_then_hang_up", "huge_frame", "parser_bombs", "wrong_size",
               "connection_hog", "raw_abuse", "trickle", "cbc_only", "revoke_and_repin")

    def loop(self, stop: threading.Event, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            name = self.ATTACKS[int(rng.integers(len(self.ATTACKS)))]
            try:
                getattr(self, name)()
            except (OSError, ssl.SSLError, ServiceError, WireError):
                pass  # what the service does to an attacker is its business; only the honest clients count
            self.count[name] = self.count.get(name, 0) + 1


def make_hostile(layout: Layout, root: Path, k: int) -> tuple[Path, str]:
    name = f"mallory{k}"
    folder = root / name
    certs.make_client_cert(folder, name)
    for i in (0, 1):
        certs.allow_client(layout.server(i), folder / "certs" / "client.pem")
        (folder / "certs" / f"P{i}.pem").write_bytes((certs.cert_dir(layout.client) / f"P{i}.pem").read_bytes())
    (folder / "model.json").write_bytes((layout.client / "model.json").read_bytes())
    return folder, name


def run(svc: LocalService, honest: Honest, hostile: list[Hostile], seconds: float) -> dict[str, Any]:
    stop = threading.Event()
    threads = [threading.Thread(target=honest.worker, args=(k, stop)) for k in range(honest.n)]
    threads += [threading.Thread(target=h.loop, args=(stop, 100 + k)) for k, h in enumerate(hostile)]
    peak = [0, 0]
    for t in threads:
        t.start()
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        for i in (0, 1):
            p = svc.procs[i]
            if p is None or p.poll() is not None:
                raise RuntimeError(f"server {i} stopped during the run")
            peak[i] = max(peak[i], rss_kib(p.pid))
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    lat = honest.lat
    attacks: dict[str, int] = {}
    for h in hostile:
        for k, v in h.count.items():
            attacks[k] = attacks.get(k, 0) + v
    return {"hostile_clients": len(hostile), "seconds": seconds, "answered": len(lat), "lost": len(honest.lost),
            "wrong": honest.wrong, "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p95_ms": 1000 * float(np.percentile(lat, 95)) if lat else None,
            "peak_rss_mib": [round(p / 1024, 1) for p in peak], "attacks": attacks,
            "first_losses": honest.lost[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="length of the run under attack")
    ap.add_argument("--baseline", type=float, default=60.0, help="length of the run without attackers")
    ap.add_argument("--honest", type=int, default=4, help="honest clients")
    ap.add_argument("--hostile", type=int, default=4, help="hostile clients")
    ap.add_argument("--classes", type=int, default=10, help="people in the model")
    ap.add_argument("--protocol", default="dealer", choices=("dealer", "semi2k"))
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    mp = find_mpspdz(None)
    proto = protocol(args.protocol)
    with tempfile.TemporaryDirectory(prefix="abuse-bench-") as t:
        tmp = Path(t)
        x, labels = clusters(people=args.classes, per=4, seed=args.classes)
        layout = Layout(tmp / "var", proto.name)
        train_private(mp, layout, x, labels, PARAMS)
        with LocalService(mp, layout, proto, batch=args.batch, port=7650, log_dir=layout.root / "logs") as svc:
            svc.wait_ready()
            make = lambda: ServiceClient(layout.client, svc.hosts, timeout=60)  # noqa: E731
            probe = make()
            try:
                expect = [p.best for p in probe.recognise(x[:64], 0.0).predictions]
            finally:
                probe.close()
            d1 = x.shape[1] + 1
            rows = []
            base = run(svc, Honest(make, x[:64], expect, args.honest), [], args.baseline)
            print(json.dumps(dict(base, what="without attackers")), flush=True)
            rows.append(base)
            hostile = [Hostile(*make_hostile(layout, tmp, k), svc, layout, d1) for k in range(args.hostile)]
            attacked = run(svc, Honest(make, x[:64], expect, args.honest), hostile, args.seconds)
            print(json.dumps(dict(attacked, what="under attack")), flush=True)
            rows.append(attacked)
    print()
    print(f"{'run':18} {'s':>5} {'answered':>9} {'lost':>5} {'wrong':>6} {'p50 ms':>8} {'p95 ms':>8}  peak RSS MiB")
    for name, r in zip(("without attackers", "under attack"), rows):
        print(f"{name:18} {r['seconds']:>5.0f} {r['answered']:>9} {r['lost']:>5} {r['wrong']:>6} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f}  {r['peak_rss_mib'][0]} / {r['peak_rss_mib'][1]}")
    print(f"p95 under attack / without: {rows[1]['p95_ms'] / rows[0]['p95_ms']:.2f} (target <= 2)")
    print("attacks run:", ", ".join(f"{k} {v}" for k, v in sorted(rows[1]["attacks"].items())))
    return 0 if rows[1]["lost"] == 0 and rows[1]["wrong"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
