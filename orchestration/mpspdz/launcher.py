"""Launching the two MP-SPDZ parties: processes, ports, timeouts, exit codes.

This module knows nothing about faces or models; it runs a compiled program with one
working directory per party and reports what happened (time, data sent, which party failed).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from preprocessing.fileio import PRIVATE_UMASK, open_private, owner_only, private_dir

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.toolchain import MPSPDZ, MPSPDZError, Protocol, protocol

logger = logging.getLogger(__name__)

#: ``-d`` (MP-SPDZ's --direct): every opening is one simultaneous exchange between the two servers, a one-way
#: trip. Without it MP-SPDZ opens through a king (server 1 sends its share to server 0, which sends the sum
#: back): a full round trip per round. At 20 ms between the servers, one query at C=1,000 (dealer) took 1.195 s
#: and 116 mpspdz_rounds without it, 0.659 s and 65 with it (same program; benchmarks/gallery_scale.py), and
#: semi2k at C=10 0.870 s against 0.726 s.
#: SoftSpoken OT with k=4 instead of MP-SPDZ's default 2: measured here on private training
#: (N=80, C=10, one epoch) it sends 25 % less data and runs faster; k=8 saves more data but is CPU-bound.
DEFAULT_PARTY_ARGS: tuple[str, ...] = ("-o", "softspoken=4", "-d")
#: the dealer mode's preprocessing batches (MP-SPDZ's default 10,000): the dealer delivers each kind of correlated
#: randomness in batches, and a batch of queries needs more of it, so with 10,000 a batch of 64 paid extra rounds
#: for the deliveries (C=1,000: 258 mpspdz_rounds against 116 for one query; with 100,000: 126 against 116, at
#: 0.4 MB more for one query; benchmarks/mpc_bench.py queries). Every party of a run must pass the same value.
DEALER_PARTY_ARGS: tuple[str, ...] = ("-b", "100000", "-d")


#: a long-lived party (start_party: the service's request loop, a gallery job) runs a program whose count of
#: matrix products MP-SPDZ cannot know (a loop without end). It then multiplies secret matrices with one Beaver
#: triple per scalar product (Hemi::use_plain_matmul: the requirement is unknown) instead of one matrix triple:
#: the logits of a batch of 16 queries at C=10,000 took 20.6 million triples, half of each server's CPU time.
#: All parties of a run must agree (the dealer deals what the servers ask for); one-job runs know their counts.
LONG_LIVED_DEALER_ARGS: tuple[str, ...] = ("-o", "force_matrix_triples")


def party_args(proto: Protocol, long_lived: bool = False) -> tuple[str, ...]:
    """Run-time options per protocol: the dealer mode has no OT to tune."""
    if proto.name == "semi2k":
        return DEFAULT_PARTY_ARGS
    return DEALER_PARTY_ARGS + (LONG_LIVED_DEALER_ARGS if long_lived else ())


def party_name(party: int, proto: Protocol | None = None) -> str:
    """How errors name a party: the servers by number, the dealer as what it is, the client."""
    if proto is not None and party == proto.dealer:
        return certs_mod.party_label(party)
    return f"server {party}"

_DATA_SENT = re.compile(r"^Data sent = ([0-9.e+]+) MB in ~(\d+) rounds")
_GLOBAL_DATA = re.compile(r"^Global data sent = ([0-9.e+]+) MB")
_TIME = re.compile(r"^Time = ([0-9.e+-]+) seconds")
#: MP-SPDZ's own split of the rounds (-v): the online phase's (openings between the servers) and the preprocessing's
#: (in the dealer mode the dealer's deliveries, which it pushes ahead of the servers)
#: (with threads: "3 threads spent a total of ... on the online phase, ... on the preprocessing/offline phase, and")
_PHASES = re.compile(r"^(?:Spent|\d+ threads spent a total of) [0-9.e+-]+ seconds \([0-9.e+-]+ MB, (\d+) rounds\) "
                     r"on the online phase(?: and|,) [0-9.e+-]+ seconds \([0-9.e+-]+ MB, (\d+) rounds\) on the preprocessing")


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
    online_rounds: int | None = None
    offline_rounds: int | None = None


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


def free_ports(host: str, count: int) -> int:
    """A base port such that base .. base+count-1 are free on ``host`` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + count - 1 > 65535:
            continue
        try:
            for k in range(count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
                    sk.bind((host, base + k))
            return base
        except OSError:
            continue
    raise MPSPDZError(f"could not find {count} consecutive free ports on {host}")



@owner_only()
def bind_shim(build_dir: Path) -> Path:
    """The compiled LD_PRELOAD shim that keeps MP-SPDZ's listener on the hosts-file address.

    MP-SPDZ binds its listening socket to every interface; see bindshim.c.
    Built once per source version into ``build_dir`` with the system C compiler.
    """
    src = Path(__file__).with_name("bindshim.c")
    code = src.read_bytes()
    out = Path(build_dir) / f"bindshim-{hashlib.sha256(code).hexdigest()[:12]}.so"
    if out.exists():
        return out
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise MPSPDZError("a C compiler (cc or gcc) is needed once to build orchestration/mpspdz/bindshim.c, which keeps "
                          "MP-SPDZ from listening on every interface (Debian: apt install gcc libc6-dev)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise MPSPDZError(f"compiling {src} failed: {proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class PartySpec:
    """One party to run on this machine."""

    party: int
    workdir: Path  # holds Programs/, Player-Data/, Persistence/ for this run
    log: Path
    bind_address: str  # the address the hosts file gives this party; its listener goes there
    port: int  # the port the hosts file gives this party


def party_command(mp: MPSPDZ, party: int, program: str, hosts_file: Path, *, encrypted: bool,
                  extra_args: Sequence[str] | None = None, proto: Protocol | None = None) -> list[str]:
    proto = proto or protocol("semi2k")
    cmd = [str(mp.binary(proto)), "-p", str(party), "-N", str(proto.n_parties), "-ip",
           str(Path(hosts_file).resolve()), "-v"]
    if encrypted and not proto.always_tls:
        cmd.append("-e")  # semi2k-party.x: TLS with the per-party certificates in Player-Data/ only with -e
    return [*cmd, *(party_args(proto) if extra_args is None else extra_args), program]


def party_env(shim: Path | None, spec: PartySpec) -> dict[str, str]:
    """A party's environment: the bind shim keeps its listeners on its hosts-file address."""
    env = dict(os.environ)
    if shim is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD", "")]))
        env["FACEREC_BIND_ADDR"] = spec.bind_address
        env["FACEREC_SELF_PORT"] = str(spec.port)
    return env


def start_party(mp: MPSPDZ, spec: PartySpec, program: str, hosts_file: Path, *, shim: Path,
                proto: Protocol, every_party_prints: bool = False) -> tuple[subprocess.Popen[bytes], Any]:
    """A long-lived party (the service's): TLS always, its output into ``spec.log``; stop it with :func:`_kill`.

    ``every_party_prints``: MP-SPDZ's ``-OF .``, so that a public line the program prints (a gallery job's
    revealed range check) reaches every party's log, not only party 0's.
    Returns the process and its open log file (close it after the process ended)."""
    extra = [*party_args(proto, long_lived=True), *(("-OF", ".") if every_party_prints else ())]
    cmd = party_command(mp, spec.party, program, hosts_file, encrypted=True, proto=proto, extra_args=extra)
    private_dir(Path(spec.log).parent)
    log = open_private(spec.log, "w")
    proc = subprocess.Popen(cmd, cwd=spec.workdir, stdout=log, stderr=subprocess.STDOUT, env=party_env(shim, spec),
                            start_new_session=True, preexec_fn=_child_setup)
    return proc, log


def _parse(line: str, res: PartyResult) -> None:
    if m := _DATA_SENT.match(line):
        res.data_sent_mb, res.rounds = float(m.group(1)), int(m.group(2))
    elif m := _GLOBAL_DATA.match(line):
        res.global_data_mb = float(m.group(1))
    elif m := _TIME.match(line):
        res.seconds = float(m.group(1))
    elif m := _PHASES.match(line):
        res.online_rounds, res.offline_rounds = int(m.group(1)), int(m.group(2))


_HANDSHAKE = re.compile(r"(Client|Server)-side handshake with (P\d+) failed")
#: OpenSSL's words for a peer whose certificate was checked and refused (by us, or by the peer: its alert)
_CERT_REFUSED = re.compile(r"(certificate verify failed|unknown ca|bad certificate|certificate unknown|"
                           r"certificate expired|certificate revoked|unsupported certificate|certificate required|"
                           r"no certificate|self[- ]signed certificate|unable to get local issuer|"
                           r"wrong signature type|decrypt error|handshake failure)", re.I)
#: this party checked the peer's certificate against its own pin of the peer, and refused it
_WE_REFUSED = re.compile(r"(certificate verify failed|self[- ]signed certificate|unable to get local issuer)", re.I)
#: the peer's alert: the peer checked this party's certificate against its pin of this party, and refused it
_PEER_REFUSED = re.compile(r"alert (unknown ca|bad certificate|certificate unknown|certificate expired|"
                           r"certificate revoked|unsupported certificate|certificate required)", re.I)
_PEER_LOST = re.compile(r"(Connection reset|Broken pipe|End of file|connection closed|Received 0 bytes|"
                        r"receiving error|sending error|stream truncated|Connection refused)", re.I)
_BIND_FAILED = re.compile(r"^Binding to socket on .*:(\d+) failed \((.*)\)")
#: MP-SPDZ gives up on a peer after 60 s (a constant of its networking code): the lowest party waits for the
#: others to connect ("Timed out waiting for peer"), the others try to connect ("cannot connect from ...")
_NO_PEER_WAITING = re.compile(r"Timed out waiting for peer")
_NO_PEER_CONNECT = re.compile(r"cannot connect from \S+ to (\S+):(\d+) after")
#: printed once a party met all its peers (connections and TLS handshakes done)
_MET_PEERS = re.compile(r"^Setup took ", re.M)
#: MP-SPDZ's own advice, written for its default setup (Player-Data/, c_rehash, Scripts/setup-ssl.sh): wrong here,
#: where each party's certificates are installed for every run from its certs/ folder
_ADVICE = re.compile(r"(c_rehash|setup-ssl\.sh|Player-Data/P\d|troubleshooting\.html#handshake-failures|"
                     r"^The certificates should be the same|^Signature \(should match)")
_RESTART_MARGIN = 5.0  # seconds: a party is not restarted for a late peer when less than this is left of the run
_SURVIVOR_WAIT = 0.5  # seconds to let the other party end after one failed, to see who went first
_LOG_DRAIN_WAIT = 2.0  # seconds to let an ended party's last output reach its log


LOST = "lost the connection"


def _others(party: int, n_parties: int, proto: Protocol | None) -> str:
    names = [party_name(j, proto) for j in range(n_parties) if j != party]
    return " or ".join(names)


def handshake_cause(text: str) -> str:
    """Why MP-SPDZ's TLS handshake failed, from what it printed after "...-side handshake with P<j> failed":
    "certificate" only if OpenSSL refused a certificate (ours or theirs: "certificate verify failed",
    "tlsv1 alert unknown ca", "bad certificate", ...), else "cut" ("stream truncated", "End of file",
    "Connection reset by peer", or no reason at all, as when the peer was killed)."""
    return "certificate" if any(_CERT_REFUSED.search(ln) for ln in _reasons(text)) else "cut"


def _reasons(text: str) -> list[str]:
    # not MP-SPDZ's advice around them, which speaks of certificates anyway
    return [ln for ln in text.splitlines() if "handshake:" in ln or "SSL error" in ln or "what()" in ln
            or "Fatal error" in ln]


@dataclass(frozen=True)
class Refusal:
    """One refused certificate: ``holder``'s pin of ``subject`` (its certs/P<subject>.pem) is not the certificate
    ``subject`` uses. ``seen_by`` is the party whose log shows it (the holder: "certificate verify failed";
    the subject: the holder's alert, "unknown ca")."""

    holder: int
    subject: int
    seen_by: int


def handshake_refusals(text: str, party: int) -> list[Refusal]:
    """Every certificate refusal party ``party``'s log shows, with who refused whom."""
    out: list[Refusal] = []
    for m in _HANDSHAKE.finditer(text):
        peer = int(m.group(2)[1:])
        later = _HANDSHAKE.search(text, m.end())
        reasons = _reasons(text[m.start():later.start() if later else None])
        if any(_PEER_REFUSED.search(ln) for ln in reasons):
            out.append(Refusal(peer, party, party))
        elif any(_WE_REFUSED.search(ln) for ln in reasons):
            out.append(Refusal(party, peer, party))
    return list(dict.fromkeys(out))


def _colon(hex_fp: str) -> str:
    """A fingerprint as `invoke certs` prints it (openssl's form: upper-case hex in colon-separated pairs)."""
    return ":".join(hex_fp[k:k + 2] for k in range(0, len(hex_fp), 2)).upper()


def _cert_fp(pem: Path) -> str | None:
    try:
        return _colon(certs_mod.fingerprint(Path(pem)))
    except (OSError, certs_mod.CertError):
        return None


def refusal_text(r: Refusal, proto: Protocol | None, player_data: dict[int, Path] | None = None) -> str:
    """What a refusal means and what to do, with the fingerprints this process can see.

    ``player_data`` maps the parties run by this process to their run's Player-Data folder (their own
    certificate P<i>.pem and their pins P<j>.pem): with both sides there, both fingerprints are shown; with one,
    what this host holds, to compare with the other host's ``invoke certs --id J``."""
    h, s = party_name(r.holder, proto), party_name(r.subject, proto)
    hs, ss = f"{certs_mod.party_label(r.holder)}'s", f"{certs_mod.party_label(r.subject)}'s"
    pd = player_data or {}
    text = (f"{h} refused {ss} certificate: {hs} pin of {s} (certs/P{r.subject}.pem in {hs} folder) is not the "
            f"certificate {s} uses (its own certs/P{r.subject}.pem)")
    facts = []
    if r.holder in pd and (fp := _cert_fp(pd[r.holder] / f"P{r.subject}.pem")):
        facts.append(f"{h} pins sha256 {fp}")
    if r.subject in pd and (fp := _cert_fp(pd[r.subject] / f"P{r.subject}.pem")):
        facts.append(f"{ss} certificate is sha256 {fp}")
    if facts:
        text += "; " + ", ".join(facts)
    if r.holder not in pd or r.subject not in pd:
        far = r.subject if r.holder in pd else r.holder
        text += (f"; compare with what `invoke certs --id {far}` prints on {certs_mod.party_label(far)}'s host "
                 f"({'its own certificate' if far == r.subject else f'its pin of {s}'})")
    text += (f". Next: copy {ss} certs/P{r.subject}.pem to {hs} host and run `invoke certs --id {r.holder} "
             f"--peer-cert P{r.subject}.pem --replace-pin` there (if {s} was re-keyed by mistake, restore its old "
             "key instead)")
    return text


def _peer_address(hosts_file: Path | None, peer: int) -> str:
    if hosts_file is None:
        return ""
    try:
        lines = Path(hosts_file).read_text().splitlines()
    except OSError:
        return ""
    return f" at {lines[peer].strip()}" if peer < len(lines) and lines[peer].strip() else ""


def _peer_at(hosts_file: Path | None, address: str, port: int) -> int | None:
    """Which party the hosts file puts at ``address:port``."""
    if hosts_file is None:
        return None
    try:
        lines = Path(hosts_file).read_text().splitlines()
    except OSError:
        return None
    for j, line in enumerate(lines):
        host, _, p = line.strip().rpartition(":")
        if p == str(port) and (host == address or len([ln for ln in lines if ln.strip().endswith(f":{port}")]) == 1):
            return j
    return None


def missing_peers(text: str, party: int, n_parties: int, hosts_file: Path | None = None) -> list[int] | None:
    """The peers party ``party`` did not meet, from its log (None: it met them all, or failed otherwise).

    MP-SPDZ's lowest party waits for the others to connect; every other one connects to the lower ones and
    waits for the higher ones. Its messages name an address ("cannot connect ... to A:P") or no one."""
    if _MET_PEERS.search(text) or _HANDSHAKE.search(text):
        return None
    if m := _NO_PEER_CONNECT.search(text):
        j = _peer_at(hosts_file, m.group(1), int(m.group(2)))
        return [j] if j is not None and j != party else [k for k in range(party)]
    if _NO_PEER_WAITING.search(text):
        return [k for k in range(party + 1, n_parties)] or [k for k in range(n_parties) if k != party]
    return None


def missing_text(party: int, peers: Sequence[int], proto: Protocol | None, hosts_file: Path | None,
                 waited: float) -> str:
    names = " or ".join(f"{party_name(j, proto)}{_peer_address(hosts_file, j)}" for j in peers)
    return (f"{party_name(party, proto)} waited {waited:.0f} s for {names}, which never came"
            f"{'' if len(peers) == 1 else ' (one of them at least)'}: start its `invoke "
            f"{'deal' if proto is not None and peers == [proto.dealer] else 'party'}` (or check that the hosts "
            "file's address is right and reachable), then run this again")


def diagnose(log_text: str, party: int, proto: Protocol | None = None,
             player_data: dict[int, Path] | None = None) -> tuple[str, int | None]:
    """Why a party stopped, from its own output: (reason, party to blame or None).

    With two parties a lost connection blames the other one; with three (the dealer mode) MP-SPDZ's
    message does not say which peer went away, so the reason names both candidates and blames none.
    A failed TLS handshake is blamed on the certificates only if OpenSSL refused one
    (:func:`handshake_cause`), and then on the party whose pin is not the other's certificate
    (:func:`handshake_refusals`); a handshake cut short is a lost connection to the peer it names."""
    n = proto.n_parties if proto else 2
    me = party_name(party, proto)
    if m := _HANDSHAKE.search(log_text):
        peer = int(m.group(2)[1:])
        them = party_name(peer, proto)
        later = _HANDSHAKE.search(log_text, m.end())
        if handshake_cause(log_text[m.start():later.start() if later else None]) == "certificate":
            refused = handshake_refusals(log_text, party)
            if refused:
                return (f"TLS handshake between {me} and {them} failed: "
                        + "; ".join(refusal_text(r, proto, player_data) for r in refused), refused[0].holder)
            return (f"TLS handshake between {me} and {them} failed: one side does not hold the other's certificate "
                    f"(certs/P{peer}.pem of {me} must be the certificate {them} uses, and the other way round)", None)
        return (f"{LOST} to {them} during the TLS handshake: the connection was cut ({them} stopped, was killed "
                "or its host went away); no certificate was refused", peer)
    for line in log_text.splitlines():
        if m := _BIND_FAILED.match(line.strip()):
            return f"{me} cannot listen on port {m.group(1)}: {m.group(2)}", party
    if _PEER_LOST.search(log_text):
        if n == 2:
            return f"{LOST} to server {1 - party} (it stopped or its host went away)", 1 - party
        return f"{LOST} to {_others(party, n, proto)} (one of them stopped or its host went away)", None
    return "", None


def player_data_of(specs: Sequence[PartySpec]) -> dict[int, Path]:
    return {s.party: Path(s.workdir) / "Player-Data" for s in specs}


def exit_reason(log: Path, party: int, proto: Protocol | None, player_data: dict[int, Path] | None = None,
                hosts_file: Path | None = None, waited: float | None = None) -> str:
    """One party's failure from its log, as :func:`diagnose` gives it, else the peers it never met, else ""."""
    text = _read(log)
    why, _ = diagnose(text, party, proto, player_data)
    if why:
        return why
    n = proto.n_parties if proto else 2
    peers = missing_peers(text, party, n, hosts_file)
    if peers:
        return missing_text(party, peers, proto, hosts_file, 60.0 if waited is None else waited)
    return ""


@owner_only()
def run_parties(
    mp: MPSPDZ,
    program: str,
    specs: Sequence[PartySpec],
    hosts_file: Path,
    *,
    encrypted: bool = True,
    shim: Path | None = None,
    timeout: float = 1800.0,
    extra_args: Sequence[str] | None = None,
    on_line: Callable[[int, str], None] | None = None,
    on_spawn: Callable[[list[subprocess.Popen[str]]], None] | None = None,
    proto: Protocol | None = None,
) -> RunResult:
    """Run ``program`` for the parties in ``specs`` (one or both); raise :class:`PartyFailed` on any failure.

    With both parties here, both are stopped as soon as one fails. With one, a peer that goes
    away shows in its output and is named in the error. The timeout bounds the whole run.
    """
    procs: list[subprocess.Popen[str]] = []
    results = [PartyResult(s.party, -1, Path(s.log)) for s in specs]
    readers: list[threading.Thread] = []
    bind_errors: list[str] = []
    restarts = [0] * len(specs)
    start = time.monotonic()
    cmds = [party_command(mp, s.party, program, hosts_file, encrypted=encrypted, extra_args=extra_args, proto=proto)
            for s in specs]

    def spawn(k: int) -> subprocess.Popen[str]:
        s = specs[k]
        private_dir(Path(s.log).parent)
        logger.debug("party %d: %s (cwd %s)", s.party, " ".join(cmds[k]), s.workdir)
        return subprocess.Popen(cmds[k], cwd=s.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True, env=party_env(shim, s),
                                preexec_fn=_child_setup)

    for k in range(len(specs)):
        procs.append(spawn(k))

    if on_spawn:  # fault-injection hook for tests
        on_spawn(procs)

    def reader(k: int, proc: subprocess.Popen[str]) -> None:
        with open_private(specs[k].log, "w") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                _parse(line.strip(), results[k])
                if _BIND_FAILED.match(line.strip()):
                    bind_errors.append(f"{party_name(specs[k].party, proto)}: {line.strip()}")
                if on_line:
                    on_line(specs[k].party, line.rstrip("\n"))

    def start_reader(k: int) -> threading.Thread:
        t = threading.Thread(target=reader, args=(k, procs[k]), daemon=True)
        t.start()
        return t

    for k in range(len(specs)):
        readers.append(start_reader(k))

    failed: int | None = None
    reason = ""
    exited: list[int] = []  # indices into specs, in the order the loop saw the processes end

    def poll_all() -> list[int | None]:
        codes = [p.poll() for p in procs]
        exited.extend(k for k, c in enumerate(codes) if c is not None and k not in exited)
        return codes

    def restart_late(bad: list[int]) -> bool:
        """MP-SPDZ gives up on a late peer after 60 s; the run's timeout is what bounds that wait here:
        a party that stopped only because a peer had not come yet is started again while time is left."""
        if time.monotonic() - start > timeout - _RESTART_MARGIN:
            return False
        late = []
        for k in bad:
            readers[k].join(timeout=_LOG_DRAIN_WAIT)
            n = proto.n_parties if proto else 2
            if procs[k].returncode != 1 or not missing_peers(_read(specs[k].log), specs[k].party, n, hosts_file):
                return False
            late.append(k)
        for k in late:
            restarts[k] += 1
            peers = missing_peers(_read(specs[k].log), specs[k].party, proto.n_parties if proto else 2, hosts_file)
            logger.info("%s: %s not there yet after %.0f s; starting the party again (the run may wait %.0f s)",
                        party_name(specs[k].party, proto),
                        " or ".join(party_name(j, proto) for j in peers or ()), time.monotonic() - start, timeout)
            procs[k] = spawn(k)
            results[k] = PartyResult(specs[k].party, -1, Path(specs[k].log))
            readers[k] = start_reader(k)
            if k in exited:
                exited.remove(k)
        return True

    try:
        while True:
            codes = poll_all()
            if bind_errors:  # MP-SPDZ would retry for ten minutes
                party_s, _, line = bind_errors[0].partition(": ")
                failed = int(party_s.split()[1])
                reason = f"{party_name(failed, proto)} cannot listen ({line}); is another program using that port?"
                break
            bad = [k for k, c in enumerate(codes) if c not in (None, 0)]
            if bad and restart_late(bad):
                continue
            if bad:
                # the survivor usually follows within moments: see in which order they end
                until = time.monotonic() + _SURVIVOR_WAIT
                while any(c is None for c in codes) and time.monotonic() < until:
                    time.sleep(0.02)
                    codes = poll_all()
                # what an ended party printed last must be in its log before anyone reads it
                until = time.monotonic() + _LOG_DRAIN_WAIT
                for k in exited:
                    readers[k].join(timeout=max(0.0, until - time.monotonic()))
                failed, reason = _blame(specs, codes, order=exited, proto=proto, hosts_file=hosts_file,
                                        waited=time.monotonic() - start)
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() - start > timeout:
                hung = [specs[k].party for k, c in enumerate(codes) if c is None]
                failed = hung[0] if len(hung) == 1 and len(specs) > 1 else None
                reason = (f"timed out after {timeout:.0f} s (still running: "
                          f"{', '.join(party_name(h, proto) for h in hung)})")
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        for t in readers:
            t.join(timeout=5)
    for k, p in enumerate(procs):
        results[k].returncode = p.returncode
    wall = time.monotonic() - start
    if failed is not None or reason:
        n = proto.n_parties if proto else 2
        if len(specs) == 1 and reason.startswith("timed out"):
            text = _read(specs[0].log)
            why, blame = diagnose(text, specs[0].party, proto, player_data_of(specs))
            peers = None
            if not why:  # killed by the timeout while it waited (MP-SPDZ says nothing then) or after it gave up
                peers = missing_peers(text, specs[0].party, n, hosts_file)
                if peers is None and not _MET_PEERS.search(text):
                    peers = [j for j in range(n) if j != specs[0].party]
            if peers:
                why, blame = missing_text(specs[0].party, peers, proto, hosts_file, wall), (
                    peers[0] if len(peers) == 1 else None)
            reason += f"; {why}" if why else f"; {_others(specs[0].party, n, proto)} never finished its part"
            failed = blame if blame is not None else (1 - specs[0].party if n == 2 else None)
        logs = "; ".join(f"{party_name(s.party, proto)} log: {s.log}" for s in specs)
        shown = next((s for s in specs if s.party == failed), specs[0])
        log_tail = _tail(Path(shown.log))
        msg = (f"{program}: {reason}. {logs}"
               + (f"\nlast lines of {party_name(shown.party, proto)}:\n{log_tail}" if log_tail else ""))
        raise PartyFailed(msg, failed, Path(shown.log))
    return RunResult(program, wall, results)


#: signals sent from outside the party (an operator, a service manager, the OOM killer, a test): a party
#: that died of one of these is where the failure started, whatever its peer printed afterwards
_OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})


#: why a party dies of SIGILL: MP-SPDZ's default build is ``-march=native``, so binaries made on a newer CPU
#: (the offline archive was built with AVX-512) stop at their first such instruction on an older one
ILLEGAL_INSTRUCTION = ("illegal instruction: these MP-SPDZ binaries were built for a CPU with instructions this "
                       "one lacks (an -march=native build from a machine with AVX-512, say); build MP-SPDZ on this "
                       "machine instead: `invoke setup --from-source DIR --force` with an MP-SPDZ source tree")


def _blame(specs: Sequence[PartySpec], codes: list[int | None], order: Sequence[int] | None = None,
           proto: Protocol | None = None, hosts_file: Path | None = None,
           waited: float | None = None) -> tuple[int | None, str]:
    """Which party caused the failure, and why, from the evidence: signals, messages, and exit order.

    ``order`` lists indices into ``specs`` in the order their processes were seen to end. Among the
    parties that failed, the first of these explains the failure:

    1. a party stopped by a signal from outside (SIGKILL, SIGTERM, ...);
    2. a party that failed by itself (an exit code, or a signal such as SIGSEGV) without saying it
       lost its peer;
    3. only if every failed party says it lost its peer (or died of SIGPIPE), the peer is at fault:
       the peer of the one that ended first.

    Within a rank the one that ended first wins. A survivor often aborts (SIGABRT, an uncaught
    boost::system::system_error) right after its peer dies, and its last line may not be in its log
    yet, so rank 1 never beats rank 0 and exit order breaks ties, whichever party index is lower.
    A refused certificate explains the failure unless a party was stopped from outside (a party
    killed while the others connect makes their handshakes fail too: those read as a lost connection).
    """
    texts = [_read(s.log) for s in specs]
    pdata = player_data_of(specs)
    diag = [diagnose(t, s.party, proto, pdata) for t, s in zip(texts, specs)]
    bad = [k for k, c in enumerate(codes) if c not in (None, 0)]
    killed = any(c is not None and c < 0 and -c in _OUTSIDE_SIGNALS for c in codes)
    if not killed:
        # both sides' evidence: who refused whose certificate, each refusal once (the holder's log and the
        # subject's both show it)
        refused = list(dict.fromkeys((r.holder, r.subject) for t, s in zip(texts, specs)
                                     for r in handshake_refusals(t, s.party)))
        if refused:
            h0, s0 = (party_name(j, proto) for j in refused[0])
            return refused[0][0], f"TLS handshake between {h0} and {s0} failed: " + "; ".join(
                refusal_text(Refusal(h, sub, h), proto, pdata) for h, sub in refused)
        for (why, _), s in zip(diag, specs):
            if why.startswith("TLS"):
                return None, why
    n_all = proto.n_parties if proto else 2
    for k, (t, s) in enumerate(zip(texts, specs)):
        if k in bad and not diag[k][0] and (peers := missing_peers(t, s.party, n_all, hosts_file)):
            diag[k] = (missing_text(s.party, peers, proto, hosts_file, 60.0 if waited is None else waited),
                       peers[0] if len(peers) == 1 else None)
    seen = list(dict.fromkeys([k for k in (order or ()) if k in bad] + bad))  # exit order, then the rest

    def rank(k: int) -> int:
        c = codes[k]
        assert c is not None
        if c < 0 and -c in _OUTSIDE_SIGNALS:
            return 0
        if diag[k][0].startswith(LOST) or c == -signal.SIGPIPE:
            return 2
        return 1

    k = min(seen, key=lambda j: (rank(j), seen.index(j)))
    party, c = specs[k].party, codes[k]
    assert c is not None
    n = proto.n_parties if proto else 2
    if rank(k) == 2:
        why = diag[k][0] or f"{LOST} to {_others(party, n, proto)} (it stopped or its host went away)"
        return diag[k][1] if diag[k][0] else (1 - party if n == 2 else None), f"{party_name(party, proto)} stopped: {why}"
    what = f"was killed (signal {-c})" if c < 0 else f"exited with code {c}"
    extra = f": {diag[k][0]}" if diag[k][0] else (f": {ILLEGAL_INSTRUCTION}" if c == -signal.SIGILL else "")
    msg = f"{party_name(party, proto)} {what}{extra}"
    for j in seen:
        if j != k:
            cj = codes[j]
            assert cj is not None
            then = diag[j][0] or (f"killed (signal {-cj})" if cj < 0 else f"exit code {cj}")
            msg += f"; {party_name(specs[j].party, proto)} then stopped too ({then})"
    return party, msg


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _child_setup() -> None:
    """In the child, before MP-SPDZ starts: owner-only files (umask 077), and die with the launcher."""
    os.umask(PRIVATE_UMASK)
    _die_with_parent()


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the launching process dies, even by SIGKILL (Linux prctl).

    The party runs in its own session, so without this a killed launcher would leave it running."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _kill(p: subprocess.Popen[str]) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=3)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def quiet(text: str) -> list[str]:
    """A party's output without MP-SPDZ's advice for its own default setup (Player-Data/P0.pem, c_rehash,
    Scripts/setup-ssl.sh), which does not apply to the certificates installed here; what failed stays."""
    out = []
    for line in text.splitlines():
        if _HANDSHAKE.search(line):
            line = line[:line.index(" failed") + len(" failed")] + "."
        elif _ADVICE.search(line):
            continue
        out.append(line)
    return out


def _tail(path: Path, n: int = 8) -> str:
    try:
        lines = quiet(Path(path).read_text(errors="replace").strip())
    except OSError:
        return ""
    return "\n".join(lines[-n:])
