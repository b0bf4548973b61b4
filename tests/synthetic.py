"""Synthetic face embeddings: unit vectors in clusters, one per person (no images, no models needed)."""
from __future__ import annotations

import numpy as np


def clusters(people: int = 5, per: int = 8, d: int = 128, spread: float = 0.3, seed: int = 0
             ) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(people, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers.repeat(per, 0) + spread * rng.normal(size=(people * per, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [f"person_{k:02d}" for k in range(people) for _ in range(per)]
    return x, labels


def split(people: int, per: int, seed: int, every: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Clusters with every ``every``-th face held out: (x, labels, train indices, test indices)."""
    x, labels = clusters(people=people, per=per, seed=seed)
    te = np.arange(0, len(x), every)
    return x, labels, np.setdiff1d(np.arange(len(x)), te), te
