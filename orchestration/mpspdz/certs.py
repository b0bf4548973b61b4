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
from typing import Callable, Sequence

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


def _make_self_signed(key: Path, pem: Path, common_name: str, days: int, unit: str | None = None) -> None:
    """A new EC key and its self-signed certificate; ``unit``: the subject's organizationalUnit (a client's role)."""
    private_dir(key.parent)
    subject = f"/CN={common_name}" + (f"/OU={unit}" if unit else "")
    with tempfile.TemporaryDirectory(dir=key.parent, prefix=".new-") as tmp:  # 0700; openssl runs under umask 077
        tkey, tpem = Path(tmp) / "key", Path(tmp) / "pem"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-days", str(days), "-subj", subject, "-keyout", str(tkey), "-out", str(tpem))
        os.chmod(tkey, 0o600)
        os.replace(tkey, key)
        os.replace(tpem, pem)


@owner_only()
def make_party_cert(server_dir: Path, party: int, *, days: int = DEFAULT_DAYS, force: bool = False) -> CertInfo:
    """Create server ``party``'s key and self-signed certificate in ``<server_dir>/certs``."""
    d = cert_dir(server_dir)
    key, pem = d / f"P{party}.key", d / f"P{party}.pem"
    if (key.exists() or pem.exists()) and not force:
        others = "both servers" if party == DEALER else "the other server (and, in the dealer mode, the client)"
        raise CertError(f"{key if key.exists() else pem} exists; use --force to replace {party_label(party)}'s key "
                        f"({others} must then receive the new certificate)")
    _make_self_signed(key, pem, f"P{party}", days)
    logger.info("%s: new key %s and certificate %s", party_label(party), key, pem)
    return inspect(pem)


MAX_PARTIES = 3  # two servers and, in the dealer mode, the client
DEALER = 2  # party 2: the data owner's client, dealing in the dealer mode (never a server)


def party_label(party: int) -> str:
    """How messages name party ``party``: ``server 0``, ``server 1``, or for party 2 the dealer it is."""
    return "the dealer (the data owner's client)" if party == DEALER else f"server {party}"


def _pin(src: Path, dest: Path, what: str, *, replace: bool) -> bool:
    """Copy certificate ``src`` to ``dest`` atomically (0600); False if ``dest`` already holds it.

    A pin that holds a different certificate is replaced only with ``replace`` (``--replace-pin``):
    a pin swapped silently would let whoever holds the new key in. Fingerprints in messages are
    SHA-256 as ``invoke certs`` prints them (openssl's colon form)."""
    new = inspect(Path(src))
    if dest.is_file() or dest.is_symlink():
        try:
            old: CertInfo | None = inspect(dest)
        except CertError:
            old = None
        if old is not None and old.fingerprint == new.fingerprint:
            logger.info("%s already holds %s (sha256 %s): nothing to do", dest, src, new.fingerprint)
            return False
        if not replace:
            pinned = f"{old.common_name!r} sha256 {old.fingerprint}" if old else "an unreadable file"
            raise CertError(f"{dest} already pins {what} with another certificate: pinned {pinned}; new {src} "
                            f"{new.common_name!r} sha256 {new.fingerprint}. If the new one is right (that party "
                            "was re-keyed), add --replace-pin")
        logger.warning("%s: replacing pinned certificate (sha256 %s) by %s (sha256 %s)", dest,
                       old.fingerprint if old else "unreadable", src, new.fingerprint)
    private_dir(dest.parent)
    tmp = dest.with_name(f".{dest.name}.tmp")
    copy_private(src, tmp)
    os.replace(tmp, dest)
    return True


@owner_only()
def import_peer_cert(server_dir: Path, party: int, pem: Path, *, replace: bool = False) -> CertInfo:
    """Install another party's certificate (the other server's, or the client's: P2) into ``party``'s folder.

    The same certificate again changes nothing; a different one where a pin exists needs ``replace``."""
    info = inspect(Path(pem))
    others = [j for j in range(MAX_PARTIES) if j != party]
    names = {f"P{j}": j for j in others}
    if info.common_name not in names:
        wanted = " or ".join(f"{party_label(j)} (common name P{j})" for j in others)
        raise CertError(f"{pem}: certificate is for {info.common_name or 'no name'!r}, {party_label(party)} needs the "
                        f"one of {wanted}")
    peer = names[info.common_name]
    if peer == DEALER:  # a server pins the dealer: never the key of a client that holds data or asks
        _refuse_the_dealers_key(server_dir, dealer=Path(pem))
    dest = cert_dir(server_dir) / f"P{peer}.pem"
    _pin(Path(pem), dest, f"{party_label(peer)} (P{peer})", replace=replace)
    return inspect(dest)


@owner_only()
def make_local_pair(party_dirs: Sequence[Path], *, days: int = DEFAULT_DAYS, force: bool = False
                    ) -> list[CertInfo]:
    """All parties on one machine (both servers, and the client for the dealer mode): a key and
    certificate each, and each holds every other party's certificate."""
    made = [make_party_cert(party_dirs[i], i, days=days, force=force) for i in range(len(party_dirs))]
    for i in range(len(party_dirs)):
        for j in range(len(party_dirs)):
            if j != i:  # every key was just made here: the old pins are replaced by design
                import_peer_cert(party_dirs[i], i, made[j].path, replace=True)
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
    if party != DEALER and DEALER in others:  # a pin copied by hand is checked too, before every run
        check_dealer_is_no_source(server_dir)
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
CLIENT_NAME_MAX = 48
CLIENT_NAME_RULE = f"1..{CLIENT_NAME_MAX} letters, digits, '-', '_' or '.', not starting with '.'"


def check_client_name(name: str) -> str:
    """A service client's name as it may appear in ``client-<name>`` and in ``clients/<name>.pem``, or CertError.

    The one rule for both: the name becomes a file name on every server that pins the client, so no
    path separator, no leading dot (no hidden file, no ``..``), ASCII only."""
    ok = (0 < len(name) <= CLIENT_NAME_MAX and name.isascii() and not name.startswith(".")
          and all(ch.isalnum() or ch in "-_." for ch in name))
    if not ok:
        raise CertError(f"client name {name!r}: use {CLIENT_NAME_RULE}")
    return name


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


# ---- a service client's role: the organizationalUnit of its certificate's subject -------------
#
# ``invoke certs --client NAME --role R`` writes ``OU=role-R`` into the subject; a certificate without
# an OU (made before roles existed) is ``owner``, so the single data owner's certificate keeps working.
# The role is part of the pinned certificate: changing it means a new certificate and a new pin. What
# each role may ask the gateways is orchestration.shared.roles.

OWNER, SOURCE, QUERY, DEALER_ROLE = "owner", "source", "query", "dealer"
#: owner: the single data owner (trains, recognises); source: one data owner among several (contributes,
#: lists and withdraws its own persons); query: asks who a face is, learns a name; dealer: the third host
#: that deals correlated randomness (only polls the servers' status)
ROLES: tuple[str, ...] = (OWNER, SOURCE, QUERY, DEALER_ROLE)
DEFAULT_ROLE = OWNER
ROLE_UNIT_PREFIX = "role-"
#: roles whose client certificate may never share its key with the dealer's (party 2's) certificate: a
#: station that deals, together with one server, unmasks every opened value (only a dealer-role key may)
NEVER_THE_DEALERS_KEY: tuple[str, ...] = (OWNER, SOURCE, QUERY)
#: roles of a client that must not run ``invoke deal`` (the single data owner deals in the dealer mode)
NEVER_DEALS: tuple[str, ...] = (SOURCE, QUERY)


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`ROLES`, else CertError listing them."""
    if role not in ROLES:
        raise CertError(f"unknown client role {role!r}: use one of {', '.join(ROLES)}")
    return role


_OID_OU = b"\x55\x04\x0b"  # 2.5.4.11 organizationalUnitName
_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x14: "latin-1", 0x16: "ascii", 0x1E: "utf-16-be"}


def _der(buf: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at ``at``: (tag, start of its content, end of its content); CertError if truncated."""
    if at + 2 > len(buf):
        raise CertError("truncated DER")
    tag, n = buf[at], buf[at + 1]
    at += 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k <= 4 or at + k > len(buf):
            raise CertError("bad DER length")
        n, at = int.from_bytes(buf[at:at + k], "big"), at + k
    if at + n > len(buf):
        raise CertError("truncated DER")
    return tag, at, at + n


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The elements inside ``buf[start:end]``: (tag, element start, content start, content end)."""
    out, at = [], start
    while at < end:
        tag, c0, c1 = _der(buf, at)
        if c1 > end:
            raise CertError("bad DER nesting")
        out.append((tag, at, c0, c1))
        at = c1
    return out


def _subject_and_key(text: str) -> tuple[list[tuple[bytes, int, bytes]], bytes]:
    """A PEM certificate's subject as [(attribute OID, string tag, value bytes)] and its SubjectPublicKeyInfo (DER)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(text)
    except ValueError as exc:
        raise CertError(f"not a PEM certificate ({exc})") from None
    tag, c0, c1 = _der(der, 0)
    tbs = _children(der, c0, c1)[0] if tag == 0x30 else None
    if tbs is None or tbs[0] != 0x30:
        raise CertError("not an X.509 certificate")
    fields = _children(der, tbs[2], tbs[3])
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    if len(fields) < 6 or fields[4][0] != 0x30 or fields[5][0] != 0x30:  # serial, sigalg, issuer, validity, subject, key
        raise CertError("not an X.509 certificate")
    subject = []
    for rdn in _children(der, fields[4][2], fields[4][3]):
        for atv in _children(der, rdn[2], rdn[3]) if rdn[0] == 0x31 else ():
            parts = _children(der, atv[2], atv[3]) if atv[0] == 0x30 else []
            if len(parts) == 2 and parts[0][0] == 0x06:
                subject.append((der[parts[0][2]:parts[0][3]], parts[1][0], der[parts[1][2]:parts[1][3]]))
    return subject, der[fields[5][1]:fields[5][3]]


def client_role(pem_text: str) -> str:
    """The role of a service client's certificate (PEM text): its subject's ``OU=role-<role>``, or ``owner``
    without any OU. CertError for any other OU, several, or a role not in :data:`ROLES`."""
    units = []
    for oid, tag, value in _subject_and_key(pem_text)[0]:
        if oid == _OID_OU:
            try:
                units.append(value.decode(_STRINGS[tag]))
            except (KeyError, UnicodeDecodeError):
                units.append(repr(value))
    allowed = ", ".join(ROLE_UNIT_PREFIX + r for r in ROLES)
    if not units:
        return DEFAULT_ROLE
    if len(units) > 1:
        raise CertError(f"the certificate names {len(units)} organizational units ({', '.join(map(repr, units))}): "
                        f"a client has one role, OU={' or OU='.join(ROLE_UNIT_PREFIX + r for r in ROLES)}")
    role = units[0][len(ROLE_UNIT_PREFIX):] if units[0].startswith(ROLE_UNIT_PREFIX) else None
    if role not in ROLES:
        raise CertError(f"the certificate's organizational unit {units[0]!r} is no client role: allowed roles are "
                        f"{', '.join(ROLES)} (OU {allowed}; no OU means {DEFAULT_ROLE}); make the certificate "
                        "with `invoke certs --client NAME --role ROLE`")
    return role


def public_key(pem: Path | str) -> bytes:
    """A certificate's SubjectPublicKeyInfo (DER): equal for two certificates of one key."""
    text = Path(pem).read_text() if isinstance(pem, Path) else pem
    try:
        return _subject_and_key(text)[1]
    except CertError as exc:
        raise CertError(f"{pem if isinstance(pem, Path) else 'certificate'}: {exc}") from None


@owner_only()
def make_client_cert(client_dir: Path, name: str = "owner", *, days: int = DEFAULT_DAYS,
                     force: bool = False, role: str = DEFAULT_ROLE) -> CertInfo:
    """The service client's key and certificate (common name ``client-<name>``, ``OU=role-<role>``)."""
    check_client_name(name)
    check_role(role)
    key, pem = client_files(client_dir)
    if (key.exists() or pem.exists()) and not force:
        raise CertError(f"{key if key.exists() else pem} exists; use --force to replace this client's key "
                        "(both servers must then be given the new certificate)")
    _make_self_signed(key, pem, CLIENT_PREFIX + name, days, ROLE_UNIT_PREFIX + role)
    logger.info("service client %s (role %s): new key %s and certificate %s", name, role, key, pem)
    return inspect(pem)


def client_dir_of(server_dir: Path) -> Path:
    return Path(server_dir) / "clients"


@owner_only()
def allow_client(server_dir: Path, pem: Path, *, replace: bool = False) -> CertInfo:
    """Pin a service client's certificate on this server (``clients/<name>.pem``).

    The name comes from the certificate (common name ``client-<name>``) and must pass
    :func:`check_client_name`, the rule ``invoke certs --client`` makes names with. Pinning the same
    certificate again changes nothing; a different certificate under a pinned name needs ``replace``.
    A certificate already pinned under another name is refused (one key, one name: the gateway names
    the client by its certificate, and two names for it would make that name a matter of chance)."""
    pem = Path(pem)
    info = inspect(pem)
    cn = info.common_name
    if not cn.startswith(CLIENT_PREFIX):
        raise CertError(f"{pem}: certificate is for {cn or 'no name'!r}, expected a service client's "
                        f"(common name {CLIENT_PREFIX}<name>, made by `invoke certs --client NAME`)")
    name = cn[len(CLIENT_PREFIX):]
    try:
        check_client_name(name)
    except CertError:
        raise CertError(f"{pem}: common name {cn!r} is no client name this server can pin: after "
                        f"{CLIENT_PREFIX!r} use {CLIENT_NAME_RULE}") from None
    if info.not_after < time.time():
        raise CertError(f"{pem}: expired on {time.strftime('%Y-%m-%d', time.gmtime(info.not_after))}")
    text = pem.read_text()
    try:
        role = client_role(text)
    except CertError as exc:
        raise CertError(f"{pem} (client {name!r}): {exc}") from None
    _refuse_the_dealers_key(server_dir, clients=[(pem, name, role, public_key(text))])
    d = private_dir(client_dir_of(server_dir))
    dest = d / f"{name}.pem"
    if dest.resolve().parent != d.resolve():  # the rule above already keeps it there; never write elsewhere
        raise CertError(f"{pem}: common name {cn!r} would be pinned at {dest}, outside {d}")
    try:
        held = inspect(dest).fingerprint if dest.is_file() else None
    except CertError:
        held = None
    for other in sorted(d.glob("*.pem")) if held != info.fingerprint else ():
        if other.name != dest.name:
            try:
                same = inspect(other).fingerprint == info.fingerprint
            except CertError:
                continue
            if same:
                raise CertError(f"{pem} (sha256 {info.fingerprint}) is already pinned as client {other.stem!r} ({other}); "
                                f"one certificate has one name: delete {other} first to pin it as {name!r}")
    _pin(pem, dest, f"client {name!r}", replace=replace)
    return inspect(dest)


@owner_only()
def install_server_certs(client_dir: Path, pems: Sequence[Path], *, replace: bool = False
                         ) -> list[tuple[CertInfo, bool]]:
    """A service client pins the servers' certificates (``P0.pem``, ``P1.pem``) in ``<client>/certs``.

    Only the servers' certificates: no key is made here, neither a dealer's (P2) nor a server's. Every file
    is checked before any is installed (common name P0 or P1, each server once, not expired), so a bad
    second file leaves the first one's pin as it was. Returns (pinned certificate, whether it changed)."""
    infos = [inspect(Path(pem)) for pem in pems]
    seen: dict[str, Path] = {}
    for pem, info in zip(pems, infos):
        if info.common_name not in ("P0", "P1"):
            raise CertError(f"{pem}: certificate is for {info.common_name or 'no name'!r}, expected a server's "
                            "(common name P0 or P1: the file P0.pem or P1.pem that `invoke certs --id I` printed "
                            "on server I)")
        if info.common_name in seen:
            raise CertError(f"{pem} and {seen[info.common_name]} are both {info.common_name}'s certificate: give "
                            "server 0's P0.pem and server 1's P1.pem once each")
        if info.not_after < time.time():
            raise CertError(f"{pem}: expired on {time.strftime('%Y-%m-%d', time.gmtime(info.not_after))}; server "
                            f"{info.common_name[1:]} makes a new one with `invoke certs --id {info.common_name[1:]} "
                            "--force`")
        seen[info.common_name] = Path(pem)
    d = cert_dir(client_dir)
    for pem, info in zip(pems, infos):  # all refusals of a pin before any pin changes
        dest = d / f"{info.common_name}.pem"
        if not replace and (dest.is_file() or dest.is_symlink()):
            try:
                same = inspect(dest).fingerprint == info.fingerprint
            except CertError:
                same = False
            if not same:
                _pin(Path(pem), dest, f"server {info.common_name[1:]} ({info.common_name})", replace=False)
    out = []
    for pem, info in zip(pems, infos):
        dest = d / f"{info.common_name}.pem"
        changed = _pin(Path(pem), dest, f"server {info.common_name[1:]} ({info.common_name})", replace=replace)
        out.append((inspect(dest), changed))
    return out


@dataclass(frozen=True)
class PinnedClient:
    name: str
    pem: str  # the certificate, PEM text
    role: str = DEFAULT_ROLE  # from the certificate's OU (client_role)


def allowed_clients(server_dir: Path) -> dict[str, PinnedClient]:
    """{fingerprint: client} of every client this server accepts now (each file read once).

    A pin whose certificate names an unknown role is ignored (logged), as an unreadable one is: the
    gateway serves no client whose role it cannot tell."""
    out: dict[str, PinnedClient] = {}
    d = client_dir_of(server_dir)
    if d.is_dir():
        for path in sorted(d.glob("*.pem")):
            try:
                text = path.read_text()
                out[fingerprint(text)] = PinnedClient(path.stem, text, client_role(text))
            except (OSError, CertError) as exc:
                logger.warning("%s: ignored (%s)", path, exc)
    return out


# ---- a client that holds data or asks never deals ---------------------------------------------
#
# The dealer (party 2) hands both servers correlated randomness: whoever deals and also holds one
# server's view unmasks every value the servers open. So on a server the dealer's certificate
# (certs/P2.pem) may share its key with no pinned client but a dealer-role one; and a data source or
# query client does not run `invoke deal`. (The single data owner deals with P2.key, a key of its own
# beside its client.key: the two never were one key.)

def _pinned_roles(server_dir: Path) -> list[tuple[Path, str, str, bytes]]:
    """(file, name, role, public key) of every readable client pin (others are ignored, as the gateway does)."""
    out = []
    d = client_dir_of(server_dir)
    for path in sorted(d.glob("*.pem")) if d.is_dir() else ():
        try:
            text = path.read_text()
            out.append((path, path.stem, client_role(text), public_key(text)))
        except (OSError, CertError):
            continue
    return out


def _refuse_the_dealers_key(server_dir: Path, *, dealer: Path | None = None,
                            clients: Sequence[tuple[Path, str, str, bytes]] | None = None) -> None:
    """CertError if the dealer's certificate (``dealer``, default the pinned certs/P2.pem) has the key of a
    client of a role in :data:`NEVER_THE_DEALERS_KEY` (``clients``: (file, name, role, public key),
    default every pinned client)."""
    dealer = dealer if dealer is not None else cert_dir(server_dir) / "P2.pem"
    if not dealer.is_file():
        return
    try:
        dealer_key = public_key(dealer)
    except (OSError, CertError):
        return  # an unreadable dealer pin: check_party_certs says so before any run
    for path, name, role, key in _pinned_roles(server_dir) if clients is None else clients:
        if role in NEVER_THE_DEALERS_KEY and key == dealer_key:
            raise CertError(f"{path} (client {name!r}, role {role}) and {dealer} (the dealer, P2) are one key: a "
                            f"{role} client never deals (whoever deals and sees one server's share unmasks every "
                            "opened value); the dealer runs on a host of its own with its own key (`invoke certs "
                            "--id 2` there) and, for the service, a client certificate of role dealer")


def check_dealer_is_no_source(server_dir: Path) -> None:
    """On a server: CertError if the pinned dealer's certificate (certs/P2.pem) has the public key of a
    pinned client of role owner, source or query (only a dealer-role client may share its key)."""
    _refuse_the_dealers_key(Path(server_dir))


def refuse_to_deal_as_source(client_dir: Path) -> None:
    """For `invoke deal`: CertError if this client's own certificate (certs/client.pem) has role source or
    query. No client certificate (a host that only deals) or role owner or dealer: nothing to refuse."""
    pem = client_files(Path(client_dir))[1]
    if not pem.is_file():
        return
    try:
        role = client_role(pem.read_text())
    except CertError as exc:
        raise CertError(f"{pem}: {exc}") from None
    if role in NEVER_DEALS:
        who = "a source" if role == SOURCE else f"a {role} client"
        raise CertError(f"this client's certificate {pem} has role {role}: {who} never deals: run the dealer on a "
                        "host of its own with a dealer certificate (`invoke certs --client NAME --role dealer` and "
                        "`invoke certs --id 2` there); whoever deals and sees one server's share unmasks every "
                        "opened value")


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


# ---- TLS settings of the Python side ---------------------------------------------------------

#: forward secrecy and authenticated encryption only: ECDHE with AES-GCM or ChaCha20-Poly1305
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def harden_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Exactly TLS 1.2 (what MP-SPDZ speaks too) and only ECDHE with AES-GCM or ChaCha20-Poly1305.

    No CBC suite (no MAC-then-encrypt), no static RSA key exchange. Returns ``ctx`` for chaining."""
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    suites = [c for c in ctx.get_ciphers() if c.get("protocol") != "TLSv1.3"]  # 1.3's are off (maximum_version)
    bad = [c["name"] for c in suites if not c.get("aead") or c.get("kea") != "kx-ecdhe"]
    if not suites or bad:
        raise CertError(f"this OpenSSL ({ssl.OPENSSL_VERSION}) offers {', '.join(bad) or 'no suite'} for "
                        f"{AEAD_CIPHERS!r}: expected only ECDHE with AES-GCM or ChaCha20-Poly1305")
    return ctx


# ---- `invoke certs`: what each combination of its flags does ---------------------------------

def certs_command(party_dir: Callable[[int], Path], *, party: int | None = None, peer_cert: Path | None = None,
                  folder: Path | None = None, days: int = DEFAULT_DAYS, force: bool = False,
                  replace_pin: bool = False, client: str | None = None, role: str | None = None,
                  allow: Path | None = None, server_certs: Sequence[Path] = ()) -> list[str]:
    """The work of ``invoke certs``; returns the lines to print, raises CertError (the task exits 1).

    ``party_dir(i)`` is party i's default folder (2: the client's), ``folder`` the --server-dir flag.
    ``force`` replaces this party's own key and certificate; ``replace_pin`` replaces a pinned
    certificate (--peer-cert, --allow-client) that differs from the one given. Neither implies the other.
    ``role`` (--role, only with --client; default owner) goes into a new client certificate. With --client the
    last line is the client certificate's path."""
    out: list[str] = []
    if role is not None and not client:
        raise CertError("--role only applies with --client NAME (it goes into the new client certificate; a pinned "
                        "certificate's role is the one it was made with)")
    if client:
        check_role(role or DEFAULT_ROLE)
    if replace_pin and not (peer_cert or allow or server_certs):
        raise CertError("--replace-pin only applies with --peer-cert, --server-cert or --allow-client (it replaces "
                        "a pinned certificate); --force replaces this party's own key")
    if server_certs:
        if party is not None or peer_cert or allow:
            raise CertError("--server-cert is for a service client (with or without --client NAME): it installs the "
                            "servers' P0.pem and P1.pem and makes no party key; leave out --id, --peer-cert and "
                            "--allow-client (the dealer installs them with --id 2 --peer-cert)")
        cdir = folder or party_dir(DEALER)
        key, pem = client_files(cdir)
        if client and (force or not (key.exists() and pem.exists())):
            info = make_client_cert(cdir, str(client), days=days, force=force, role=role or DEFAULT_ROLE)
            out.append(f"service client {client} (role {role or DEFAULT_ROLE}): key stays here; give {info.path} "
                       f"(sha256 {info.fingerprint}) to both servers: invoke certs --id I --allow-client client.pem")
        elif client:
            have = inspect(pem)
            try:
                held = client_role(pem.read_text())
            except CertError as exc:
                held = f"unreadable: {exc}"
            out.append(f"service client: {pem} exists ({have.common_name}, role {held}, sha256 {have.fingerprint}); "
                       "kept (--force replaces it)")
            if role is not None and role != held:
                out.append(f"service client: --role {role} not applied: the kept certificate's role is {held}; "
                           "--force makes a new one with --role")
        for info, changed in install_server_certs(cdir, server_certs, replace=replace_pin):
            server = info.common_name[1:]
            out.append(f"service client: {'pinned' if changed else 'already pins'} server {server}'s certificate "
                       f"{info.path} (sha256 {info.fingerprint}){'' if changed else '; nothing changed'}")
        missing = [f"P{i}.pem" for i in range(2) if not (cert_dir(cdir) / f"P{i}.pem").is_file()]
        if missing:
            out.append(f"still missing: {', '.join(missing)}; install it with invoke certs --server-cert FILE")
        if not pem.exists():
            out.append("this client has no key yet: invoke certs --client NAME [--role ROLE]")
        elif client:
            out.append(str(pem))  # last: the certificate to give both servers
        return out
    if client:
        r = role or DEFAULT_ROLE
        info = make_client_cert(folder or party_dir(DEALER), str(client), days=days, force=force, role=r)
        return [f"service client {client} (role {r}): key stays here; give {info.path} (sha256 {info.fingerprint}) "
                "to both servers: invoke certs --id I --allow-client client.pem",
                "then install both servers' certificates here (no other key is made): invoke certs --server-cert "
                "P0.pem --server-cert P1.pem",
                str(info.path)]  # last: the certificate to give both servers
    if allow:
        if party is None:
            raise CertError("--allow-client needs --id (which server pins the client)")
        sdir = folder or party_dir(party)
        before = {c.name: f for f, c in allowed_clients(sdir).items()}
        info = allow_client(sdir, Path(allow), replace=replace_pin)
        who = f"service client {info.path.stem} (role {client_role(info.path.read_text())}, {info.common_name})"
        if before.get(info.path.stem) == fingerprint(info.path):
            return [f"server {party}: already accepts {who} with this certificate ({info.path}, sha256 "
                    f"{info.fingerprint}); nothing changed"]
        return [f"server {party}: accepts {who} from now on ({info.path}, sha256 {info.fingerprint})"]
    if party is None:
        if peer_cert:
            raise CertError("--peer-cert needs --id (which server receives it)")
        dirs = (party_dir(0), party_dir(1), party_dir(2))
        made = make_local_pair(dirs, days=days, force=force)
        out += [f"{party_label(i)}: {info.path} (sha256 {info.fingerprint})" for i, info in enumerate(made)]
        out.append("both local servers and the client hold their own key and every other party's certificate")
        return out
    me = party_label(party)
    sdir = folder or party_dir(party)
    own = cert_dir(sdir) / f"P{party}.pem"
    if peer_cert:
        peer_pem = Path(peer_cert)
        name = inspect(peer_pem).common_name
        dest = cert_dir(sdir) / f"{name}.pem"  # only read if the name is a party's: import_peer_cert checks it
        try:
            had = fingerprint(dest) if name in {f"P{j}" for j in range(MAX_PARTIES)} and dest.is_file() else None
        except (OSError, CertError):
            had = None  # a damaged pin: import_peer_cert says so
        info = import_peer_cert(sdir, party, peer_pem, replace=replace_pin)
        if had == fingerprint(info.path):
            out.append(f"{me}: already holds {info.common_name}'s certificate {info.path} (sha256 "
                       f"{info.fingerprint}); nothing changed")
        else:
            out.append(f"{me}: installed {info.common_name}'s certificate {info.path} (sha256 {info.fingerprint})")
    if not peer_cert or force or not own.exists():
        if own.exists() and not force:
            out.append(f"{me}: {own} exists (sha256 {inspect(own).fingerprint}); --force replaces it")
            for j in range(MAX_PARTIES):  # the pins, to compare with the fingerprints the other parties print
                pin = cert_dir(sdir) / f"P{j}.pem"
                if j != party and pin.is_file():
                    try:
                        held = inspect(pin).fingerprint
                    except CertError as exc:
                        held = f"unreadable ({exc})"
                    out.append(f"{me}: pins {party_label(j)}'s certificate {pin} (sha256 {held})")
        else:
            info = make_party_cert(sdir, party, days=days, force=force)
            to = "both servers" if party == 2 else f"server {1 - party} (and, in the dealer mode, the client)"
            out.append(f"{me}: key {cert_dir(sdir) / f'P{party}.key'} stays here; send {info.path} "
                       f"(sha256 {info.fingerprint}) to {to}")
    return out
