"""Run one MPC program on local parties with given inputs: the tests' way to look at a program alone.

The same pieces as local mode (orchestration/client/private.py run_local): compile_program, per-party
folders with the pinned certificates installed, a hosts file on free ports, the bind shim and
run_parties. Without the job machinery around them (bundles, manifests, model generations), so a
test can hand each party any ring values, including ones no honest client would send.

The dealer protocol runs three parties (the dealer is party 2 and gets no input file), semi2k two.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from preprocessing.fileio import owner_only, private_dir

from orchestration.mpspdz import certs
from orchestration.mpspdz.hosts import write_hosts
from orchestration.mpspdz.launcher import PartySpec, RunResult, bind_shim, free_ports, run_parties
from orchestration.mpspdz.toolchain import MPSPDZ, compile_program, programs_dir, protocol as get_protocol

#: MP-SPDZ's persistence file signature for shares mod 2^64 (both protocols): an 8-byte length, then the
#: domain ("Z2^" + the bit count as text, then as a 4-byte integer); the shares follow it
PERSISTENCE_HEADER = (9).to_bytes(8, "little") + b"Z2^64" + (64).to_bytes(4, "little")


@dataclass
class PartyOutput:
    persistence: np.ndarray  # the shares in the party's Persistence/Transactions-P<i>.data, uint64 (empty if none)
    stdout: str  # everything the party printed (its log)


@dataclass
class ProgramRun:
    run: RunResult
    parties: list[PartyOutput]  # servers 0 and 1, then the dealer if any

    def reconstruct(self, start: int, count: int) -> np.ndarray:
        """The servers' shares of persistence values [start, start+count) added mod 2^64."""
        a, b = (p.persistence[start:start + count] for p in self.parties[:2])
        assert len(a) == len(b) == count, f"persistence holds {len(a)}/{len(b)} values, wanted {start}+{count}"
        with np.errstate(over="ignore"):
            return a + b


def _certs(root: Path, n_parties: int) -> list[Path]:
    """Keys for all three parties, made once per root (a semi2k run uses the first two)."""
    dirs = [root / "certs" / f"party{i}" for i in range(3)]
    if not all(certs.cert_dir(d).is_dir() for d in dirs):
        certs.make_local_pair(dirs)
    return dirs[:n_parties]


def share_ring(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two additive shares mod 2^64 of ring elements (a test's seeded randomness, not the client's CSPRNG)."""
    v = np.asarray(values, dtype=np.uint64).ravel()
    r = rng.integers(0, 2 ** 64, size=v.shape, dtype=np.uint64, endpoint=False)
    with np.errstate(over="ignore"):
        return r, v - r


@owner_only()
def run_program(mp: MPSPDZ, root: Path, program: str, args: Sequence[str], inputs: Sequence[np.ndarray], *,
                persistence: Sequence[np.ndarray] | None = None, protocol: str = "dealer",
                timeout: float = 120.0) -> ProgramRun:
    """Compile ``program args`` and run it; ``inputs[i]`` (uint64) is server i's Input-Binary-P<i>-0 and
    ``persistence[i]`` its Persistence/Transactions-P<i>.data before the run (none: no file).

    ``root`` keeps the build and the keys between calls (use one per test session)."""
    proto = get_protocol(protocol)
    root = Path(root)
    build = root / "build"
    full = compile_program(mp, program, [str(a) for a in args], build, proto=proto)
    cert_dirs = _certs(root, proto.n_parties)
    run_root = Path(tempfile.mkdtemp(prefix="run-", dir=private_dir(root)))  # 0700, fresh for every run
    dirs = []
    for i in range(proto.n_parties):
        d = run_root / f"p{i}"
        (d / "Persistence").mkdir(parents=True)
        (d / "Programs").symlink_to(programs_dir(build.resolve(), proto))
        certs.install_for_run(certs.check_party_certs(cert_dirs[i], i, proto.n_parties), d / "Player-Data")
        if i < 2:
            (d / "Player-Data" / f"Input-Binary-P{i}-0").write_bytes(np.asarray(inputs[i], "<u8").tobytes())
            if persistence is not None:
                (d / "Persistence" / f"Transactions-P{i}.data").write_bytes(
                    PERSISTENCE_HEADER + np.asarray(persistence[i], "<u8").tobytes())
        dirs.append(d)
    host = "127.0.0.1"
    base = free_ports(host, proto.n_parties)
    hosts = write_hosts(run_root / "hosts", [(host, base + i) for i in range(proto.n_parties)])
    specs = [PartySpec(i, d, run_root / f"p{i}.log", host, base + i) for i, d in enumerate(dirs)]
    result = run_parties(mp, full, specs, hosts.path, encrypted=True, shim=bind_shim(build), timeout=timeout,
                         proto=proto)
    outs = []
    for i, d in enumerate(dirs):
        f = d / "Persistence" / f"Transactions-P{i}.data"
        raw = f.read_bytes() if f.exists() else PERSISTENCE_HEADER
        assert raw.startswith(PERSISTENCE_HEADER), f"{f}: unexpected header {raw[:17]!r}"
        data = np.frombuffer(raw[len(PERSISTENCE_HEADER):], "<u8").copy()
        outs.append(PartyOutput(data, specs[i].log.read_text(errors="replace")))
    return ProgramRun(result, outs)


__all__ = ["PERSISTENCE_HEADER", "PartyOutput", "ProgramRun", "run_program", "share_ring"]
