"""Local mode of the service: both servers' gateways (and the client's dealer) on this machine.

``invoke serve`` without ``--id`` runs this; tests and benchmarks use it too. Each server is its own
process (``python -m orchestration.server.gateway``), as on two hosts, with its own folder, key and
log; the dealer (dealer mode) runs in the calling process, as the client's part.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from preprocessing.fileio import open_private, private_dir

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.hosts import Hosts, write_hosts
from orchestration.mpspdz.toolchain import MPSPDZ, Protocol
from orchestration.client.local_sources import dealer_dir, ensure_local_sources
from orchestration.client.private import Layout, ensure_local_certs
from orchestration.client.service import ServiceClient, run_service_dealer
from orchestration.dealer.daemon import run_dealer
from orchestration.shared.wire import ServiceError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def local_hosts(layout: Layout, host: str, port: int, n_parties: int) -> Hosts:
    """The local service's hosts file: server 0 at ``port``, server 1 at ``port + 1``, the dealer at ``port + 2``."""
    private_dir(layout.root)
    return write_hosts(layout.root / "service-hosts", [(host, port + k) for k in range(max(3, n_parties))])


def ensure_local_client(layout: Layout) -> None:
    """Local mode: the client's service certificate, pinned on both local servers."""
    key, pem = certs_mod.client_files(layout.client)
    if not pem.is_file():
        certs_mod.make_client_cert(layout.client, "owner")
    fp = certs_mod.fingerprint(pem)
    for i in range(2):
        if fp not in certs_mod.allowed_clients(layout.server(i)):  # local mode: this client's key is the one
            certs_mod.allow_client(layout.server(i), pem, replace=True)


class LocalService:
    """Start with :meth:`start`, stop with :meth:`stop` (SIGTERM to both servers), or use as a context manager."""

    def __init__(self, mp: MPSPDZ, layout: Layout, proto: Protocol, *, host: str = "127.0.0.1", port: int = 7300,
                 batch: int = 16, log_dir: Path | None = None, follower_wait: float = 10.0,
                 max_queued: int | None = None, extra_args: list[str] | None = None,
                 sources: dict[str, Any] | None = None):
        """``sources``: a gallery of many sources with these settings (``layout`` is then the sources layout of
        :mod:`orchestration.client.local_sources`); its dealer runs from its own folder with its own key."""
        self.mp, self.layout, self.proto = mp, layout, proto
        self.host, self.port, self.batch = host, int(port), int(batch)
        self.log_dir = log_dir
        self.follower_wait = follower_wait
        self.max_queued = max_queued
        self.extra_args = list(extra_args or [])  # more flags of orchestration.server.gateway (limits)
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None]
        self.stop_dealer = threading.Event()
        self.dealer: threading.Thread | None = None
        self.hosts: Hosts | None = None
        self.sources = sources

    def start(self) -> "LocalService":
        if self.sources is not None:
            ensure_local_sources(self.layout, self.proto.dealer is not None)
        else:
            ensure_local_certs(self.layout, 3)  # the client's certificate serves the dealer mode; harmless otherwise
            ensure_local_client(self.layout)
        self.hosts = local_hosts(self.layout, self.host, self.port, self.proto.n_parties)
        for i in range(2):
            self.start_server(i)
        if self.proto.dealer is not None:
            self.dealer = threading.Thread(target=self._deal, daemon=True, name="service-dealer")
            self.dealer.start()
        return self

    def _deal(self) -> None:
        if self.sources is not None:
            try:
                run_dealer(self.mp, dealer_dir(self.layout), self.layout.build, self.hosts, self.proto, self.stop_dealer)
            except Exception:  # noqa: BLE001 - reported, the servers then say they wait for the dealer
                logger.exception("the dealer failed")
            return
        try:
            run_service_dealer(self.mp, self.layout.client, self.layout.build, self.hosts, self.proto,
                               self.stop_dealer)
        except Exception:  # noqa: BLE001 - reported, the servers then say they wait for the dealer
            logger.exception("the service's dealer failed")

    def server_command(self, i: int) -> list[str]:
        assert self.hosts is not None
        return [sys.executable, "-m", "orchestration.server.gateway", "--server-dir", str(self.layout.server(i)),
                "--id", str(i), "--hosts", str(self.hosts.path), "--protocol", self.proto.name,
                "--batch", str(self.batch), "--mpspdz-home", str(self.mp.home),
                "--follower-wait", str(self.follower_wait)] + (
                    ["--sources", json.dumps(self.sources)] if self.sources is not None else []) + (
                    ["--max-queued", str(self.max_queued)] if self.max_queued is not None else []) + self.extra_args

    def start_server(self, i: int) -> subprocess.Popen[bytes]:
        out = None
        if self.log_dir is not None:
            private_dir(self.log_dir)
            out = open_private(Path(self.log_dir) / f"server{i}.log", "a")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        p = subprocess.Popen(self.server_command(i), cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None,
                             env=env)
        if out is not None:
            out.close()
        self.procs[i] = p
        return p

    def stop_server(self, i: int, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        p = self.procs[i]
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs[i] = None
        return p.returncode

    def wait_ready(self, timeout: float = 120.0, serving: bool = True) -> list[dict]:
        """Until both servers serve (``serving`` False: answer at all); their status."""
        assert self.hosts is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with ServiceClient(self.layout.client, self.hosts, timeout=5.0) as cl:
            while time.monotonic() < deadline:
                for i, p in enumerate(self.procs):
                    if p is not None and p.poll() is not None:
                        raise ServiceError(f"server {i} exited with code {p.returncode} while starting", "unavailable")
                try:
                    st = cl.status()
                    if all(s.get("state") == "serving" or not serving for s in st):
                        return st
                except ServiceError as exc:
                    last = exc
                time.sleep(0.2)
        raise ServiceError(f"the local service did not come up within {timeout:.0f} s ({last})", "unavailable")

    def watch(self, done: threading.Event, every: float = 0.5) -> tuple[int, int] | None:
        """Until ``done`` is set (None), or a server stops by itself: (which server, its exit code)."""
        while not done.wait(every):
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    return i, p.returncode
        return None

    def stop(self) -> list[int | None]:
        codes = [self.stop_server(i) for i in range(2)]
        self.stop_dealer.set()
        if self.dealer is not None:
            self.dealer.join(timeout=10)
        return codes

    def __enter__(self) -> "LocalService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LocalService", "ensure_local_client", "local_hosts"]
