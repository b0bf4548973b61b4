"""Per-server TLS certificates for MP-SPDZ's encrypted channels (``-e``).

Each server makes its own key and self-signed certificate (common name ``P<i>``, as MP-SPDZ
expects) and keeps the key. Certificates, never keys, are exchanged: server i's folder holds::

    certs/P<i>.key   its private key (mode 0600, never leaves the server)
    certs/P<i>.pem   its certificate (send this to the other server)
    certs/P<j>.pem   the other server's certificate (received from it)
    certs/P2.pem     dealer mode: the client's certificate (the client deals as party 2)

In the dealer mode the client is party 2 with ``certs/P2.key`` and ``P2.pem`` in its own folder
and both servers' certificates beside them: every party pins the certificates of all the others.

Before a run the three files are put into the run's ``Player-Data/`` with the hash links
``c_rehash`` would make, which is where MP-SPDZ looks. MP-SPDZ verifies the peer against
exactly that certificate and its name, so a server with another key cannot join.
"""
from __future__ import annotations

import calendar
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from preprocessing.fileio import copy_private, owner_only, private_dir

logger = logging.getLogger(__name__)

DEFAULT_DAYS = 365


class CertError(RuntimeError):
    """A certificate or key is missing, malformed, expired, or does not belong where it is."""


def _openssl(*args: str, input: bytes | None = None) -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise CertError("the openssl command is needed to make and check certificates (Debian: apt install openssl)")
    proc = subprocess.run([exe, *args], input=input, capture_output=True)
    if proc.returncode != 0:
        raise CertError(f"openssl {' '.join(args)} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


def cert_dir(server_dir: Path) -> Path:
    return Path(server_dir) / "certs"


@dataclass(frozen=True)
class CertInfo:
    path: Path
    common_name: str
    not_after: float  # epoch seconds
    subject_hash: str
    fingerprint: str


def inspect(pem: Path) -> CertInfo:
    """Read a certificate; raise CertError naming the file if it is not one."""
    pem = Path(pem)
    if not pem.is_file():
        raise CertError(f"certificate {pem} missing")
    out = _openssl("x509", "-in", str(pem), "-noout", "-subject", "-enddate", "-hash", "-fingerprint", "-sha256",
                   "-nameopt", "RFC2253")
    fields = {}
    lines = out.strip().splitlines()
    for line in lines:
        if "=" in line and not line.startswith(("subject", "notAfter", "sha256", "SHA256")):
            continue
        key, _, value = line.partition("=")
        fields[key.strip().lower()] = value.strip()
    hash_line = next((ln for ln in lines if "=" not in ln), "")
    cn = ""
    for part in fields.get("subject", "").split(","):
        k, _, v = part.partition("=")
        if k.strip() == "CN":
            cn = v.strip()
    not_after = float(calendar.timegm(time.strptime(fields["notafter"], "%b %d %H:%M:%S %Y %Z")))
    fp = fields.get("sha256 fingerprint", "")
    return CertInfo(pem, cn, not_after, hash_line.strip(), fp)


def _make_self_signed(key: Path, pem: Path, common_name: str, days: int) -> None:
    private_dir(key.parent)
    with tempfile.TemporaryDirectory(dir=key.parent, prefix=".new-") as tmp:  # 0700; openssl runs under umask 077
        tkey, tpem = Path(tmp) / "key", Path(tmp) / "pem"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-days", str(days), "-subj", f"/CN={common_name}", "-keyout", str(tkey), "-out", str(tpem))
        os.chmod(tkey, 0o600)
        os.replace(tkey, key)
        os.replace(tpem, pem)


@owner_only()
def make_party_cert(server_dir: Path, party: int, *, days: int = DEFAULT_DAYS, force: bool = False) -> CertInfo:
    """Create server ``party``'s key and self-signed certificate in ``<server_dir>/certs``."""
    d = cert_dir(server_dir)
    key, pem = d / f"P{party}.key", d / f"P{party}.pem"
    if (key.exists() or pem.exists()) and not force:
        raise CertError(f"{key if key.exists() else pem} exists; use --force to replace server {party}'s key "
                        "(the other server must then receive the new certificate)")
    _make_self_signed(key, pem, f"P{party}", days)
    logger.info("server %d: new key %s and certificate %s", party, key, pem)
    return inspect(pem)


MAX_PARTIES = 3  # two servers and, in the dealer mode, the client


def party_label(party: int) -> str:
    return "the client" if party == 2 else f"server {party}"


@owner_only()
def import_peer_cert(server_dir: Path, party: int, pem: Path) -> CertInfo:
    """Install another party's certificate (the other server's, or the client's: P2) into ``party``'s folder."""
    info = inspect(Path(pem))
    others = [j for j in range(MAX_PARTIES) if j != party]
    names = {f"P{j}": j for j in others}
    if info.common_name not in names:
        wanted = " or ".join(f"{party_label(j)} (common name P{j})" for j in others)
        raise CertError(f"{pem}: certificate is for {info.common_name or 'no name'!r}, {party_label(party)} needs the "
                        f"one of {wanted}")
    peer = names[info.common_name]
    dest = cert_dir(server_dir) / f"P{peer}.pem"
    private_dir(dest.parent)
    tmp = dest.with_name(f".{dest.name}.tmp")
    copy_private(pem, tmp)
    os.replace(tmp, dest)
    return inspect(dest)


@owner_only()
def make_local_pair(party_dirs: Sequence[Path], *, days: int = DEFAULT_DAYS, force: bool = False
                    ) -> list[CertInfo]:
    """All parties on one machine (both servers, and the client for the dealer mode): a key and
    certificate each, and each holds every other party's certificate."""
    made = [make_party_cert(party_dirs[i], i, days=days, force=force) for i in range(len(party_dirs))]
    for i in range(len(party_dirs)):
        for j in range(len(party_dirs)):
            if j != i:
                import_peer_cert(party_dirs[i], i, made[j].path)
    return made


@dataclass(frozen=True)
class PartyCerts:
    party: int
    own: CertInfo
    key: Path
    peers: dict[int, CertInfo]  # every other party's pinned certificate

    @property
    def peer(self) -> CertInfo:
        """The other server's certificate."""
        return self.peers[1 - self.party] if self.party < 2 else self.peers[0]


def check_party_certs(server_dir: Path, party: int, n_parties: int = 2) -> PartyCerts:
    """Everything party ``party`` needs for an encrypted run of ``n_parties``, checked; errors say what to do."""
    d = cert_dir(server_dir)
    me = party_label(party)
    key, own_pem = d / f"P{party}.key", d / f"P{party}.pem"
    for path, what in ((own_pem, f"{me}'s certificate"), (key, f"{me}'s private key")):
        if not path.is_file():
            raise CertError(f"{what} {path} missing: run `invoke certs --id {party}` on {me}")
    peer_pems = {j: d / f"P{j}.pem" for j in range(n_parties) if j != party}
    for j, pem in peer_pems.items():
        if not pem.is_file():
            raise CertError(f"{party_label(j)}'s certificate {pem} missing: copy P{j}.pem from {party_label(j)} and "
                            f"run `invoke certs --id {party} --peer-cert P{j}.pem`")
    own = inspect(own_pem)
    others = {j: inspect(pem) for j, pem in peer_pems.items()}
    for info, name in ((own, f"P{party}"), *((o, f"P{j}") for j, o in others.items())):
        if info.common_name != name:
            raise CertError(f"{info.path}: common name {info.common_name!r}, expected {name!r}")
        if info.not_after < time.time():
            raise CertError(f"{info.path}: expired on {time.strftime('%Y-%m-%d', time.gmtime(info.not_after))}; "
                            f"make a new one with `invoke certs --id {name[1:]} --force` and exchange it")
    if _openssl("x509", "-in", str(own_pem), "-noout", "-pubkey") != _openssl("pkey", "-in", str(key), "-pubout"):
        raise CertError(f"{key} does not belong to {own_pem}")
    for j, other in others.items():
        if own.fingerprint == other.fingerprint:
            raise CertError(f"{other.path} is {me}'s own certificate, not {party_label(j)}'s")
    return PartyCerts(party, own, key, others)


@owner_only()
def install_for_run(certs: PartyCerts, player_data: Path) -> None:
    """Put the key, every certificate and their hash links where MP-SPDZ reads them."""
    private_dir(player_data)
    me = certs.party
    copy_private(certs.key, player_data / f"P{me}.key")  # 0600 from its first byte
    copy_private(certs.own.path, player_data / f"P{me}.pem")
    for j, info in certs.peers.items():
        copy_private(info.path, player_data / f"P{j}.pem")
    used: set[str] = set()
    for info, name in ((certs.own, f"P{me}.pem"), *((o, f"P{j}.pem") for j, o in certs.peers.items())):
        k = 0
        while f"{info.subject_hash}.{k}" in used:
            k += 1
        used.add(f"{info.subject_hash}.{k}")
        os.symlink(name, player_data / f"{info.subject_hash}.{k}")


# ---- the recognition service: client certificates and the gateway's own ------------------------
#
# A service client (the owner's laptop, a door camera...) has its own key and self-signed
# certificate, common name ``client-<name>``, in ``<client>/certs/client.key|pem``. Each server
# pins the clients it accepts: ``<server>/clients/<name>.pem``, one file per allowed client,
# added with ``invoke certs --id I --allow-client FILE`` and removed by deleting the file (read
# anew for every connection, so neither takes a restart).

CLIENT_PREFIX = "client-"


def fingerprint(pem: Path | str) -> str:
    """SHA-256 of the certificate's DER form, hex (what the gateways pin)."""
    import hashlib
    import ssl

    text = Path(pem).read_text() if isinstance(pem, Path) else pem
    try:
        der = ssl.PEM_cert_to_DER_cert(text)
    except ValueError as exc:
        raise CertError(f"{pem}: not a PEM certificate ({exc})") from None
    return hashlib.sha256(der).hexdigest()


def client_files(client_dir: Path) -> tuple[Path, Path]:
    d = cert_dir(client_dir)
    return d / "client.key", d / "client.pem"


@owner_only()
def make_client_cert(client_dir: Path, name: str = "owner", *, days: int = DEFAULT_DAYS,
                     force: bool = False) -> CertInfo:
    """The service client's key and certificate (common name ``client-<name>``)."""
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or len(name) > 48:
        raise CertError(f"client name {name!r}: use 1..48 letters, digits, '-', '_' or '.'")
    key, pem = client_files(client_dir)
    if (key.exists() or pem.exists()) and not force:
        raise CertError(f"{key if key.exists() else pem} exists; use --force to replace this client's key "
                        "(both servers must then be given the new certificate)")
    _make_self_signed(key, pem, CLIENT_PREFIX + name, days)
    logger.info("service client %s: new key %s and certificate %s", name, key, pem)
    return inspect(pem)


def client_dir_of(server_dir: Path) -> Path:
    return Path(server_dir) / "clients"


@owner_only()
def allow_client(server_dir: Path, pem: Path) -> CertInfo:
    """Pin a service client's certificate on this server (``clients/<name>.pem``)."""
    info = inspect(Path(pem))
    if not info.common_name.startswith(CLIENT_PREFIX):
        raise CertError(f"{pem}: certificate is for {info.common_name or 'no name'!r}, expected a service client's "
                        f"(common name {CLIENT_PREFIX}<name>, made by `invoke certs --client NAME`)")
    if info.not_after < time.time():
        raise CertError(f"{pem}: expired on {time.strftime('%Y-%m-%d', time.gmtime(info.not_after))}")
    d = client_dir_of(server_dir)
    private_dir(d)
    dest = d / f"{info.common_name[len(CLIENT_PREFIX):]}.pem"
    tmp = dest.with_name(f".{dest.name}.tmp")
    copy_private(pem, tmp)
    os.replace(tmp, dest)
    return inspect(dest)


@dataclass(frozen=True)
class PinnedClient:
    name: str
    pem: str  # the certificate, PEM text


def allowed_clients(server_dir: Path) -> dict[str, PinnedClient]:
    """{fingerprint: client} of every client this server accepts now (each file read once)."""
    out: dict[str, PinnedClient] = {}
    d = client_dir_of(server_dir)
    if d.is_dir():
        for path in sorted(d.glob("*.pem")):
            try:
                text = path.read_text()
                out[fingerprint(text)] = PinnedClient(path.stem, text)
            except (OSError, CertError) as exc:
                logger.warning("%s: ignored (%s)", path, exc)
    return out


@owner_only()
def make_gateway_cert(player_data: Path, client_id: int) -> tuple[Path, Path]:
    """A throw-away key for the gateway, MP-SPDZ's only client on this host (``C<id>``, hash-linked).

    Made afresh for every start of the service's MP-SPDZ party and destroyed with its folder."""
    key, pem = player_data / f"C{client_id}.key", player_data / f"C{client_id}.pem"
    _make_self_signed(key, pem, f"C{client_id}", 2)
    info = inspect(pem)
    k = 0
    while (player_data / f"{info.subject_hash}.{k}").exists():
        k += 1
    os.symlink(pem.name, player_data / f"{info.subject_hash}.{k}")
    return key, pem


def harden_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 exactly, ECDHE with AES-GCM or ChaCha20-Poly1305 only (no CBC)."""
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    return ctx
