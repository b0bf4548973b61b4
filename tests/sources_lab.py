"""A many-source service on this machine for the tests (tests/test_sources.py) and benchmarks.

Both servers' gateways are processes of their own, the dealer a third party with its own key (its own
folder), every source and query client a folder of its own with its role's certificate: what local mode
of `invoke serve --sources` runs. Synthetic persons are unit vectors around random centres, so that a
person's photos are near each other and far from everyone else's.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.client.local_service import LocalService
from orchestration.client.local_sources import ensure_local_client
from orchestration.client.private import Layout
from orchestration.mpspdz.toolchain import MPSPDZ, protocol

# a logit threshold on z_max: alpha 16, so z_max = 8 (1 - d^2): enrolled photos near 8, strangers near -8
SETTINGS = {"d": 128, "name_words": 8, "alpha": 16.0, "thresholds": [[1, 4.0]], "exp_bits": 8, "embedder": "facenet",
            "score": "zmax"}


class People:
    """Synthetic persons: ``photos(j, k)`` are k unit embeddings of person j; a stranger is any j never enrolled."""

    def __init__(self, n: int, seed: int = 7, spread: float = 0.15):
        self.rng = np.random.default_rng(seed)
        c = self.rng.normal(size=(n, 128))
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.spread = spread

    def photos(self, j: int, k: int) -> np.ndarray:
        x = self.centres[j] + self.spread * self.rng.normal(size=(k, 128)) / np.sqrt(128)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


class SourcesLab:
    """Start with :meth:`start`; ``client(name, role)`` gives a named client's folder (made and pinned)."""

    def __init__(self, mp: MPSPDZ, root: Path, proto: str = "dealer", settings: dict[str, Any] | None = None,
                 batch: int = 4):
        self.layout = Layout(Path(root) / "sources", proto)
        self.settings = dict(settings or SETTINGS)
        port = random.randrange(20000, 32000, 10)  # below the ephemeral range (32768-): no outgoing connection takes it
        self.svc = LocalService(mp, self.layout, protocol(proto), port=port, batch=batch,
                                log_dir=Path(root) / "logs", sources=self.settings, follower_wait=5.0)

    def start(self) -> "SourcesLab":
        self.svc.start()
        self.svc.wait_ready(120, serving=False)
        return self

    @property
    def hosts(self):
        return self.svc.hosts

    def client(self, name: str, role: str) -> Path:
        return ensure_local_client(self.layout, name, role)

    def stop(self) -> None:
        self.svc.stop()

    def server_files(self) -> list[list[Path]]:
        """Every file of each server's folder (and the dealer's, as a third list)."""
        out = [[p for p in self.layout.server(i).rglob("*") if p.is_file() and not p.is_symlink()] for i in range(2)]
        out.append([p for p in (self.layout.root / "dealer").rglob("*") if p.is_file()])
        return out


__all__ = ["People", "SETTINGS", "SourcesLab"]
