"""Launching the two MP-SPDZ parties: processes, ports, timeouts, exit codes.

This module knows nothing about faces or models; it runs a compiled program with one
working directory per party and reports what happened (time, data sent, which party failed).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .mpspdz import MPSPDZ, MPSPDZError

logger = logging.getLogger(__name__)

#: SoftSpoken OT with k=4 instead of MP-SPDZ's default 2: measured here on private training
#: (N=80, C=10, one epoch) it sends 25 % less data and runs faster; k=8 saves more data but is CPU-bound.
DEFAULT_PARTY_ARGS: tuple[str, ...] = ("-o", "softspoken=4")

_DATA_SENT = re.compile(r"^Data sent = ([0-9.e+]+) MB in ~(\d+) rounds")
_GLOBAL_DATA = re.compile(r"^Global data sent = ([0-9.e+]+) MB")
_TIME = re.compile(r"^Time = ([0-9.e+-]+) seconds")


class PartyFailed(MPSPDZError):
    """One party exited non-zero, crashed, or the run timed out."""

    def __init__(self, message: str, party: int | None, log: Path | None):
        super().__init__(message)
        self.party = party
        self.log = log


@dataclass
class PartyResult:
    party: int
    returncode: int
    log: Path
    data_sent_mb: float | None = None
    rounds: int | None = None
    global_data_mb: float | None = None
    seconds: float | None = None


@dataclass
class RunResult:
    program: str
    wall_seconds: float
    parties: list[PartyResult] = field(default_factory=list)

    @property
    def data_sent_mb(self) -> float:
        """Total data sent by both parties (MB), as MP-SPDZ reports it."""
        g = self.parties[0].global_data_mb if self.parties else None
        if g is not None:
            return g
        return sum(p.data_sent_mb or 0.0 for p in self.parties)


def free_port_pair(host: str) -> int:
    """A base port such that base and base+1 are free on ``host`` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base >= 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s2:
                s2.bind((host, base + 1))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s1:
                s1.bind((host, base))
            return base
        except OSError:
            continue
    raise MPSPDZError(f"could not find two consecutive free ports on {host}")


def _parse(line: str, res: PartyResult) -> None:
    if m := _DATA_SENT.match(line):
        res.data_sent_mb, res.rounds = float(m.group(1)), int(m.group(2))
    elif m := _GLOBAL_DATA.match(line):
        res.global_data_mb = float(m.group(1))
    elif m := _TIME.match(line):
        res.seconds = float(m.group(1))


def run_parties(
    mp: MPSPDZ,
    program: str,
    workdirs: Sequence[Path],
    logs: Sequence[Path],
    *,
    host: str = "127.0.0.1",
    timeout: float = 1800.0,
    extra_args: Sequence[str] = DEFAULT_PARTY_ARGS,
    on_line: Callable[[int, str], None] | None = None,
    on_spawn: Callable[[list[subprocess.Popen[str]]], None] | None = None,
) -> RunResult:
    """Run ``program`` with party i in ``workdirs[i]``; raise :class:`PartyFailed` on any failure.

    Both parties are stopped as soon as one fails or the timeout passes.
    """
    base = free_port_pair(host)
    procs: list[subprocess.Popen[str]] = []
    results = [PartyResult(i, -1, Path(logs[i])) for i in range(2)]
    readers: list[threading.Thread] = []
    start = time.monotonic()
    for i in range(2):
        Path(logs[i]).parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(mp.party_binary), "-p", str(i), "-N", "2", "-h", host, "-pn", str(base), "-v",
               *extra_args, program]
        logger.debug("party %d: %s (cwd %s)", i, " ".join(cmd), workdirs[i])
        procs.append(subprocess.Popen(cmd, cwd=workdirs[i], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1, start_new_session=True))

    if on_spawn:  # fault-injection hook for tests
        on_spawn(procs)

    def reader(i: int) -> None:
        with open(logs[i], "w") as log:
            assert procs[i].stdout is not None
            for line in procs[i].stdout:
                log.write(line)
                log.flush()
                _parse(line.strip(), results[i])
                if on_line:
                    on_line(i, line.rstrip("\n"))

    for i in range(2):
        t = threading.Thread(target=reader, args=(i,), daemon=True)
        t.start()
        readers.append(t)

    failed: int | None = None
    reason = ""
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                reason = f"party {failed} exited with code {codes[failed]}"
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() - start > timeout:
                hung = [i for i, c in enumerate(codes) if c is None]
                failed = hung[0] if len(hung) == 1 else None
                reason = f"timed out after {timeout:.0f} s (still running: party {', party '.join(map(str, hung))})"
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        for t in readers:
            t.join(timeout=5)
    for i, p in enumerate(procs):
        results[i].returncode = p.returncode
    wall = time.monotonic() - start
    if failed is not None or reason:
        which = failed if failed is not None else 0
        other = 1 - which
        log_tail = _tail(Path(logs[which]))
        msg = (f"{program}: {reason}. Party {which} log: {logs[which]} ; party {other} log: {logs[other]}"
               + (f"\nlast lines of party {which}:\n{log_tail}" if log_tail else ""))
        raise PartyFailed(msg, failed, Path(logs[which]))
    return RunResult(program, wall, results)


def _kill(p: subprocess.Popen[str]) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=3)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])
