"""The recognition service across two network namespaces (used by tests/test_service.py and
benchmarks/service_bench.py).

Server i runs ``invoke serve --id i`` in namespace i with its own folder and key; in the dealer mode
the client's ``invoke deal --serve`` runs in server 1's namespace, as the one-job two-host tests do.
Client calls run in threads that joined a namespace (Linux ``setns`` is per thread), so a test can
hold several concurrent clients without leaving its own namespace.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import netlab

from orchestration.mpspdz.hosts import load_hosts
from orchestration.client.service import ServiceClient
from orchestration.shared.wire import ServiceError

REPO = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000


def enter_namespace(ns: str) -> None:
    """Move the calling thread into network namespace ``ns`` (made by ``ip netns add``)."""
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


class NsClients:
    """``n`` worker threads inside namespace ``ns``; :meth:`call` runs a function in one of them."""

    def __init__(self, ns: str, n: int = 1):
        self.pool = ThreadPoolExecutor(max_workers=n, initializer=enter_namespace, initargs=(ns,))

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = 600, **kw: Any) -> Any:
        return self.pool.submit(fn, *args, **kw).result(timeout=timeout)

    def submit(self, fn: Callable[..., Any], *args: Any, **kw: Any):
        return self.pool.submit(fn, *args, **kw)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class ServiceLab:
    """The service of a two-namespace deployment (``Deployment`` of tests/test_two_hosts.py)."""

    def __init__(self, dep: Any, ports: tuple[int, int, int] = (7200, 7201, 7202), batch: int = 16,
                 max_queued: int = 100_000, lanes: int | None = None):
        self.dep, self.net = dep, dep.net
        self.root = Path(dep.root)
        self.batch, self.lanes = batch, lanes
        self.max_queued = max_queued
        n = 3 if dep.protocol == "dealer" else 2
        self.hosts_files = [self.root / f"service-hosts{i}" for i in range(n)]
        texts = [self.net.hosts_text(i, ports[:n] if n == 3 else ports[:2]) for i in range(n)]
        if self.net.delay == "relay":
            # hosts_text delays the MPC links (server 1 and the dealer reach server 0 through a relay);
            # the service adds two more cross-namespace links: server 0's gateway to server 1's link
            # port, and the client (in namespace 1) to server 0's gateway
            from orchestration.shared.ports import CLIENT_OFFSET, LINK_OFFSET

            relay0 = int(texts[1].splitlines()[0].rsplit(":", 1)[1])  # server 0 as namespace 1 sees it
            self.net.add_relay(1, relay0 + CLIENT_OFFSET, (self.net.addr[0], ports[0] + CLIENT_OFFSET))
            seen1 = ports[1] + 2000  # server 1 as server 0 sees it: only its link port is used
            self.net.add_relay(0, seen1 + LINK_OFFSET, (self.net.addr[1], ports[1] + LINK_OFFSET))
            lines = texts[0].splitlines()
            texts[0] = f"{lines[0]}\n127.0.0.1:{seen1}\n" + "".join(f"{ln}\n" for ln in lines[2:])
        for i in range(n):
            self.hosts_files[i].write_text(texts[i])
        self.logs = [self.root / f"serve{i}.log" for i in range(2)] + [self.root / "serve-dealer.log"]
        self.procs: list[subprocess.Popen | None] = [None, None, None]
        self.client_ns = 1  # the client sits beside server 1 (and its dealer)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, INVOKE_PATHS_VAR=str(self.root), INVOKE_MPSPDZ_PROTOCOL=self.dep.protocol,
                   INVOKE_SERVICE_BATCH=str(self.batch), INVOKE_SERVICE_MAX_QUEUED=str(self.max_queued),
                   INVOKE_SERVICE_MAX_PER_CLIENT=str(self.max_queued), INVOKE_SERVICE_MAX_CLIENT_CONNECTIONS="32")
        if self.lanes is not None:
            env["INVOKE_SERVICE_LANES"] = str(self.lanes)
        return env

    def start_server(self, i: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "invoke", "serve", "--id", str(i), "--hosts", str(self.hosts_files[i]),
                "--server-dir", str(self.dep.servers[i])]
        log = open(self.logs[i], "a")
        p = self.net.popen(i, argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                           start_new_session=True)
        log.close()
        self.procs[i] = p
        return p

    def start_dealer(self) -> subprocess.Popen | None:
        if self.dep.protocol != "dealer":
            return None
        argv = [sys.executable, "-m", "invoke", "deal", "--serve", "--hosts", str(self.hosts_files[2])]
        log = open(self.logs[2], "a")
        p = self.net.popen(1, argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                           start_new_session=True)
        log.close()
        self.procs[2] = p
        return p

    def start(self) -> "ServiceLab":
        for i in range(2):
            self.start_server(i)
        self.start_dealer()
        return self

    def client_hosts(self):
        """The client's view of the service: it runs in server 1's namespace (as the dealer does)."""
        return load_hosts(self.hosts_files[2] if len(self.hosts_files) == 3 else self.hosts_files[1])

    def new_client(self, timeout: float = 30.0, client_dir: Path | None = None, **kw: Any) -> ServiceClient:
        return ServiceClient(client_dir or self.dep.client, self.client_hosts(), timeout=timeout, **kw)

    def wait_ready(self, clients: NsClients, timeout: float = 180.0) -> list[dict]:
        cl = self.new_client(timeout=5.0)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                for i, p in enumerate(self.procs):
                    if p is not None and p.poll() is not None:
                        raise RuntimeError(f"service process {i} exited with {p.returncode}:\n{self.log_tail(i)}")
                try:
                    st = clients.call(cl.status)
                    if all(s.get("state") == "serving" for s in st):
                        return st
                except ServiceError as exc:
                    last = exc
                time.sleep(0.3)
        finally:
            clients.call(cl.close)
        raise RuntimeError(f"service not up within {timeout:.0f} s ({last}):\n" +
                           "\n".join(self.log_tail(i) for i in range(3)))

    def log_tail(self, i: int, n: int = 15) -> str:
        try:
            return "\n".join(self.logs[i].read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop_process(self, i: int, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        p = self.procs[i]
        if p is None:
            return None
        if p.poll() is None:
            os.killpg(p.pid, sig) if sig == signal.SIGKILL else p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs[i] = None
        return p.returncode

    def stop(self) -> list[int | None]:
        return [self.stop_process(i) for i in (0, 1, 2)]


@contextlib.contextmanager
def trained_service(root: Path, x: Any, labels: list[str], prepare: Callable[[Any], Any] | None = None):
    """Two namespaces, a model trained across them (one-job mode), then the service started on it, the
    client beside server 1: yields (lab, clients, what ``prepare(deployment)`` returned)."""
    from test_two_hosts import Deployment

    with netlab.TwoHosts(rtt_ms=0) as net:
        dep = Deployment(root, net)
        dep.pin_client()
        dep.train(x, labels)
        extra = prepare(dep) if prepare is not None else None
        lab = ServiceLab(dep).start()
        clients = NsClients(net.ns[1], n=4)
        try:
            lab.wait_ready(clients)
            yield lab, clients, extra
        finally:
            lab.stop()
            clients.close()


__all__ = ["NsClients", "ServiceLab", "enter_namespace", "netlab", "trained_service"]
