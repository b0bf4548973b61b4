"""Client-side fixed-point encoding and additive secret sharing mod 2^64.

A real value ``v`` is encoded as the ring element ``round(v * 2**FRAC_BITS) mod 2**64``
(two's complement for negatives), which is exactly how MP-SPDZ's ``sfix`` stores it.
It is then split into two shares ``s0 = r`` and ``s1 = x - r mod 2**64`` with ``r``
drawn uniformly from the ring by the operating system's CSPRNG (``secrets``/``os.urandom``).
Each share alone is uniform and independent of ``x``; only their sum reveals it.

Why 16 fractional bits: embeddings are L2-normalised, so every component lies in
[-1, 1] and typically has magnitude ~1/sqrt(128) = 0.09; 2^-16 = 1.5e-5 keeps the
relative encoding error below 0.02 %. MP-SPDZ's default ``sfix`` (f=16, k=31) keeps every
intermediate value below 2^15 in magnitude, and in the 64-bit ring probabilistic
truncation of such values fails with probability about 2^(k+1-64) = 2^-32 per operation.

Share files are written in MP-SPDZ's binary input format (``Input-Binary-P<i>-0``):
little-endian int64, in exactly the order the program reads them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .fileio import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

RING_BITS = 64
FRAC_BITS = 16
#: largest magnitude accepted for encoding: MP-SPDZ sfix with k=31, f=16 holds |v| < 2^15
MAX_ABS = float(2 ** (31 - FRAC_BITS - 1))
_MASK = (1 << RING_BITS) - 1


class SharingError(ValueError):
    """Bad input to encoding or sharing, or an inconsistent share bundle."""


def encode_fixed(values: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Fixed-point encode real values into ring elements (uint64, two's complement)."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise SharingError("cannot encode NaN or infinite values")
    limit = MAX_ABS * (1 << (FRAC_BITS - frac_bits))
    if arr.size and np.max(np.abs(arr)) >= limit:
        raise SharingError(f"value {np.max(np.abs(arr))!r} out of fixed-point range: |v| must be < {limit}")
    return np.round(arr * (1 << frac_bits)).astype(np.int64).view(np.uint64)


def decode_fixed(ring: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Inverse of :func:`encode_fixed` (interprets ring elements as signed)."""
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / (1 << frac_bits)


def random_ring(shape: tuple[int, ...] | int) -> np.ndarray:
    """Uniform ring elements from the OS CSPRNG (never numpy's PRNG)."""
    n = int(np.prod(shape))
    return np.frombuffer(secrets.token_bytes(8 * n), dtype=np.uint64).reshape(shape).copy()


def share(ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ring elements into two additive shares mod 2^64."""
    x = np.asarray(ring, dtype=np.uint64)
    r = random_ring(x.shape)
    with np.errstate(over="ignore"):
        return r, x - r  # uint64 arithmetic wraps mod 2^64


def reconstruct(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """Add two share arrays mod 2^64."""
    a = np.asarray(s0, dtype=np.uint64)
    b = np.asarray(s1, dtype=np.uint64)
    if a.shape != b.shape:
        raise SharingError(f"share shapes differ: {a.shape} vs {b.shape}")
    with np.errstate(over="ignore"):
        return a + b


def one_hot(indices: Iterable[int], n_classes: int) -> np.ndarray:
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_classes):
        raise SharingError(f"label index out of range 0..{n_classes - 1}")
    out = np.zeros((idx.size, n_classes), dtype=np.float64)
    out[np.arange(idx.size), idx] = 1.0
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShareManifest:
    """What travels with one server's share file; holds sizes, never data or names."""

    program: str
    program_version: str
    kind: str  # "train" | "predict"
    n: int
    d: int
    n_classes: int
    frac_bits: int
    ring_bits: int
    run_id: str
    party: int
    file: str
    sha256: str
    n_values: int
    extra: dict[str, Any] = field(default_factory=dict)
    job: str = ""  # the client's job id; names the server's output folder
    program_args: list[str] = field(default_factory=list)  # compile-time arguments the servers must use
    model_gen: str = ""  # predict/refresh: the generation of model shares the client expects
    protocol: str = "semi2k"  # "dealer": the client deals preprocessing as a third party; "semi2k": OT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: Path) -> "ShareManifest":
        try:
            raw = json.loads(Path(path).read_text())
            return cls(**raw)
        except FileNotFoundError:
            raise SharingError(f"{path}: share manifest missing") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise SharingError(f"{path}: not a valid share manifest ({exc})") from None


def share_arrays(arrays: list[tuple[np.ndarray, int]]) -> tuple[bytes, bytes]:
    """Encode, share and serialise ``(array, frac_bits)`` pairs (row-major, in order) for party 0 and 1.

    ``frac_bits=0`` encodes integers (labels, one-hot entries); ``FRAC_BITS`` encodes sfix values.
    """
    if not arrays:
        return b"", b""  # a job without client data (share refresh)
    flat = np.concatenate([encode_fixed(a, f).ravel() for a, f in arrays])
    s0, s1 = share(flat)
    return s0.astype("<u8").tobytes(), s1.astype("<u8").tobytes()


def write_share_bundle(
    arrays: list[tuple[np.ndarray, int]],
    dest_dirs: tuple[Path, Path],
    *,
    program: str,
    program_version: str,
    kind: str,
    n: int,
    d: int,
    n_classes: int,
    run_id: str,
    extra: dict[str, Any] | None = None,
    job: str = "",
    program_args: list[str] | None = None,
    model_gen: str = "",
    protocol: str = "semi2k",
) -> list[ShareManifest]:
    """Share ``arrays`` and write ``Input-Binary-P<i>-0`` plus ``manifest.json`` into each dest dir.

    ``arrays`` are ``(array, frac_bits)`` pairs in the order the program reads them.
    ``dest_dirs[i]`` is server i's input folder. Nothing but shares and sizes is written there.
    """
    blobs = share_arrays(arrays)
    n_values = len(blobs[0]) // 8
    manifests = []
    for party, (blob, dest) in enumerate(zip(blobs, dest_dirs)):
        fname = f"Input-Binary-P{party}-0"
        atomic_write_bytes(Path(dest) / fname, blob)
        m = ShareManifest(
            program=program, program_version=program_version, kind=kind, n=n, d=d,
            n_classes=n_classes, frac_bits=FRAC_BITS, ring_bits=RING_BITS, run_id=run_id,
            party=party, file=fname, sha256=sha256_bytes(blob), n_values=n_values, extra=dict(extra or {}),
            job=job, program_args=list(program_args or []), model_gen=model_gen, protocol=protocol,
        )
        atomic_write_json(Path(dest) / "manifest.json", m.to_json())
        manifests.append(m)
    logger.info("wrote %d shared values per server (%s, run %s)", n_values, kind, run_id)
    return manifests


def new_run_id() -> str:
    return secrets.token_hex(8)
