"""Roles of service client certificates (issue 17, many data owners): owner, source, query, dealer.

The role is written into the certificate (OU=role-ROLE) by `invoke certs --client NAME --role ROLE`, read back
when a server pins it and on every connection; a certificate without one is the single data owner's. A source
(or query) client never deals, and on a server the dealer's key is no such client's key. No MPC here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.mpspdz import certs
from orchestration.shared import roles

REPO = Path(__file__).resolve().parents[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _self_signed(folder: Path, subj: str, key: Path | None = None) -> tuple[Path, Path]:
    """A certificate with subject ``subj``, of ``key`` (a new one without): (key, certificate)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = subj.strip("/").replace("/", "_").replace("=", "-")
    pem = folder / f"{stem}.pem"
    if key is None:
        key = folder / f"{stem}.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                 "-subj", subj, "-keyout", str(key), "-out", str(pem))
    else:
        _openssl("req", "-x509", "-new", "-key", str(key), "-days", "2", "-subj", subj, "-out", str(pem))
    return key, pem


# ---- the role in the certificate ----------------------------------------------------------------------

@pytest.mark.parametrize("role", certs.ROLES)
def test_each_role_goes_through_make_pin_and_allowed_clients(tmp_path, role):
    info = certs.make_client_cert(tmp_path / "c", f"c-{role}", role=role)
    assert certs.client_role(info.path.read_text()) == role
    pinned = certs.allow_client(tmp_path / "s0", info.path)
    assert certs.client_role(pinned.path.read_text()) == role
    (got,) = certs.allowed_clients(tmp_path / "s0").values()
    assert (got.name, got.role) == (f"c-{role}", role)


def test_the_default_role_is_owner_and_the_subject_says_so(tmp_path):
    info = certs.make_client_cert(tmp_path / "c", "me")
    assert certs.client_role(info.path.read_text()) == "owner" == certs.DEFAULT_ROLE
    subject = subprocess.run(["openssl", "x509", "-in", str(info.path), "-noout", "-subject", "-nameopt", "RFC2253"],
                             capture_output=True, text=True, check=True).stdout
    assert "OU=role-owner" in subject and "CN=client-me" in subject, subject
    assert info.common_name == "client-me"  # the OU does not change the name the gateways go by


def test_a_certificate_without_an_organizational_unit_is_an_owner(tmp_path):
    """Certificates made before roles existed (CN only) keep working: they are the single data owner's."""
    _, pem = _self_signed(tmp_path / "old", "/CN=client-legacy")
    assert certs.client_role(pem.read_text()) == "owner"
    certs.allow_client(tmp_path / "s0", pem)
    (got,) = certs.allowed_clients(tmp_path / "s0").values()
    assert (got.name, got.role) == ("legacy", "owner")


@pytest.mark.parametrize("subj, words", [
    ("/CN=client-x/OU=role-admin", ["'role-admin'", "owner, source, query, dealer"]),
    ("/CN=client-x/OU=Engineering", ["'Engineering'", "owner, source, query, dealer"]),
    ("/CN=client-x/OU=role-query/OU=role-source", ["2 organizational units", "one role"]),
])
def test_an_unknown_role_is_refused_at_pinning_and_ignored_if_copied_by_hand(tmp_path, subj, words):
    _, pem = _self_signed(tmp_path / "bad", subj)
    with pytest.raises(certs.CertError) as err:
        certs.allow_client(tmp_path / "s0", pem)
    msg = str(err.value)
    assert str(pem) in msg and "client 'x'" in msg and all(w in msg for w in words), msg
    assert not list(certs.client_dir_of(tmp_path / "s0").glob("*.pem"))  # nothing pinned
    folder = certs.client_dir_of(tmp_path / "s1")
    folder.mkdir(parents=True)
    shutil.copy(pem, folder / "x.pem")  # pinned by hand: the gateway serves no client whose role it cannot tell
    assert certs.allowed_clients(tmp_path / "s1") == {}


def test_an_unknown_role_is_refused_when_the_certificate_is_made(tmp_path):
    with pytest.raises(certs.CertError, match="owner, source, query, dealer"):
        certs.make_client_cert(tmp_path / "c", "x", role="admin")
    assert not (tmp_path / "c" / "certs" / "client.pem").exists()


def test_client_role_refuses_what_is_no_certificate():
    with pytest.raises(certs.CertError, match="not a PEM certificate"):
        certs.client_role("hello")
    body = "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n"  # DER 30 03 02 01 00: no X.509
    with pytest.raises(certs.CertError):
        certs.client_role(body)


# ---- what each role may ask ---------------------------------------------------------------------------

def test_require_role_says_who_may_not_do_what_and_who_may():
    with pytest.raises(roles.RoleError) as err:
        roles.require_role("query", roles.ACTIONS["contribute"], "contribute", "door")
    assert str(err.value) == "client door (role query) may not contribute: only source clients contribute"
    with pytest.raises(roles.RoleError) as err:
        roles.require_role("source", roles.ACTIONS["recognize"], "recognize", "clinic-a")
    assert str(err.value) == "client clinic-a (role source) may not recognize: only query or owner clients recognize"
    with pytest.raises(roles.RoleError) as err:
        roles.require_role("dealer", roles.ACTIONS["gallery"], "gallery", "third")
    assert str(err.value) == "client third (role dealer) may not list the gallery: only source clients list the gallery"
    with pytest.raises(roles.RoleError, match="unknown role 'admin'"):
        roles.require_role("admin", roles.ROLES, "status", "x")


def test_the_table_of_actions():
    may = {a: set(r) for a, r in roles.ACTIONS.items()}
    assert may == {"contribute": {"source"}, "gallery": {"source"}, "withdraw": {"source"},
                   "recognize": {"query", "owner"}, "train-on-servers": {"owner"}, "status": set(certs.ROLES)}
    for action, allowed in roles.ACTIONS.items():
        for role in certs.ROLES:
            if role in allowed:
                roles.require_role(role, roles.allowed_roles(action), action, "c")
            else:
                with pytest.raises(roles.RoleError, match=f"role {role}"):
                    roles.require_role(role, roles.allowed_roles(action), action, "c")


# ---- a source never deals -----------------------------------------------------------------------------

def _dealer_and_client_of_one_key(tmp_path: Path, role: str) -> tuple[Path, Path]:
    key, p2 = _self_signed(tmp_path / "station", "/CN=P2")
    _, client = _self_signed(tmp_path / "station", f"/CN=client-station/OU=role-{role}", key=key)
    return p2, client


@pytest.mark.parametrize("role", ["source", "owner", "query"])
def test_a_server_refuses_the_dealers_key_as_a_data_clients_key_whichever_is_pinned_first(tmp_path, role):
    p2, client = _dealer_and_client_of_one_key(tmp_path, role)
    a, b = tmp_path / "s0", tmp_path / "s1"
    certs.allow_client(a, client)  # the client first: then the dealer is refused
    with pytest.raises(certs.CertError) as err:
        certs.import_peer_cert(a, 0, p2)
    msg = str(err.value)
    assert str(p2) in msg and str(certs.client_dir_of(a) / "station.pem") in msg and f"role {role}" in msg, msg
    assert "never deals" in msg and not (certs.cert_dir(a) / "P2.pem").exists()
    certs.import_peer_cert(b, 1, p2)  # the dealer first: then the client is refused
    with pytest.raises(certs.CertError) as err:
        certs.allow_client(b, client)
    msg = str(err.value)
    assert str(client) in msg and str(certs.cert_dir(b) / "P2.pem") in msg and f"role {role}" in msg, msg
    assert not (certs.client_dir_of(b) / "station.pem").exists()


def test_a_dealer_certificate_may_share_the_dealers_key(tmp_path):
    p2, client = _dealer_and_client_of_one_key(tmp_path, "dealer")
    certs.import_peer_cert(tmp_path / "s0", 0, p2)
    certs.allow_client(tmp_path / "s0", client)
    certs.check_dealer_is_no_source(tmp_path / "s0")


def test_pins_copied_by_hand_are_checked_too_and_before_every_run(tmp_path):
    p2, client = _dealer_and_client_of_one_key(tmp_path, "source")
    s0 = tmp_path / "s0"
    certs.make_party_cert(s0, 0)
    certs.make_party_cert(tmp_path / "s1", 1)
    certs.import_peer_cert(s0, 0, certs.cert_dir(tmp_path / "s1") / "P1.pem")
    certs.import_peer_cert(s0, 0, p2)
    certs.check_party_certs(s0, 0, 3)
    certs.client_dir_of(s0).mkdir()
    shutil.copy(client, certs.client_dir_of(s0) / "station.pem")
    with pytest.raises(certs.CertError, match="role source"):
        certs.check_dealer_is_no_source(s0)
    with pytest.raises(certs.CertError, match="never deals"):
        certs.check_party_certs(s0, 0, 3)
    certs.check_party_certs(s0, 0, 2)  # no dealer in this run


def test_the_single_owner_keeps_dealing_with_a_key_of_its_own(tmp_path):
    """Today's dealer mode: the data owner's client is party 2 (P2.key) and has its service key (client.key)
    beside it; the two are different keys, so pinning both on both servers passes."""
    dirs = [tmp_path / "s0", tmp_path / "s1", tmp_path / "client"]
    certs.make_local_pair(dirs)
    info = certs.make_client_cert(dirs[2], "owner")
    assert certs.public_key(info.path) != certs.public_key(certs.cert_dir(dirs[2]) / "P2.pem")
    for i in (0, 1):
        certs.allow_client(dirs[i], info.path)
        certs.check_dealer_is_no_source(dirs[i])
        certs.check_party_certs(dirs[i], i, 3)
    certs.refuse_to_deal_as_source(dirs[2])  # an owner deals


@pytest.mark.parametrize("role", ["source", "query"])
def test_a_source_or_query_client_refuses_to_deal(tmp_path, role):
    certs.make_client_cert(tmp_path / "c", "clinic", role=role)
    with pytest.raises(certs.CertError) as err:
        certs.refuse_to_deal_as_source(tmp_path / "c")
    msg = str(err.value)
    assert f"role {role}" in msg and "run the dealer on a host of its own with a dealer certificate" in msg, msg
    if role == "source":
        assert "a source never deals: run the dealer on a host of its own with a dealer certificate" in msg


@pytest.mark.parametrize("role", ["owner", "dealer", None])
def test_an_owner_a_dealer_or_a_host_without_a_client_certificate_may_deal(tmp_path, role):
    if role:
        certs.make_client_cert(tmp_path / "c", "x", role=role)
    certs.refuse_to_deal_as_source(tmp_path / "c")


# ---- the role on a gateway connection -----------------------------------------------------------------

def test_a_connection_carries_its_pinned_certificates_role(tmp_path):
    from test_gateway_connections import Gateway, _connect, _status

    from orchestration.client.service import ServiceClient
    from orchestration.mpspdz.hosts import write_hosts
    from orchestration.server.connections import Limits

    seen: list[tuple[str, str]] = []

    def handle(conn, header, body):
        seen.append((conn.name, conn.role))
        conn.reply({"type": "status"})

    g = Gateway(tmp_path, Limits(), handle=handle)
    try:
        for name, role in (("clinic", "source"), ("door", "query"), ("third", "dealer")):
            folder = tmp_path / f"client-{name}"
            certs.make_client_cert(folder, name, role=role)
            certs.allow_client(g.server, folder / "certs" / "client.pem")
            for i in (0, 1):
                shutil.copy(certs.cert_dir(g.server) / "P0.pem", folder / "certs" / f"P{i}.pem")
            hosts = write_hosts(tmp_path / f"hosts-{name}", [("127.0.0.1", g.port - 100), ("127.0.0.1", g.port - 99)])
            assert _status(_connect(ServiceClient(folder, hosts, timeout=5)))["type"] == "status"
        assert seen == [("clinic", "source"), ("door", "query"), ("third", "dealer")]
    finally:
        g.close()


# ---- `invoke certs --client NAME --role ROLE` ---------------------------------------------------------

def _invoke(var: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INVOKE_PATHS_VAR=str(var))
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_invoke_certs_makes_a_query_client_and_prints_its_path_last(tmp_path):
    var = tmp_path / "var"
    r = _invoke(var, "certs", "--client", "x", "--role", "query")
    assert r.returncode == 0, r.stderr
    pem = Path(r.stdout.strip().splitlines()[-1])
    assert pem == var / "client" / "certs" / "client.pem" and pem.is_file(), r.stdout
    assert "role query" in r.stdout
    assert certs.client_role(pem.read_text()) == "query"
    r = _invoke(var, "certs", "--id", "0", "--allow-client", str(pem))
    assert r.returncode == 0 and "service client x (role query" in r.stdout, r.stdout + r.stderr


def test_invoke_certs_refuses_an_unknown_role_and_a_role_without_a_client(tmp_path):
    var = tmp_path / "var"
    r = _invoke(var, "certs", "--client", "x", "--role", "admin")
    assert r.returncode == 1 and "owner, source, query, dealer" in r.stderr, r.stderr
    assert not (var / "client" / "certs" / "client.pem").exists()
    r = _invoke(var, "certs", "--id", "0", "--role", "query")
    assert r.returncode == 1 and "--role only applies with --client" in r.stderr, r.stderr
    assert "--role" in _invoke(var, "--help", "certs").stdout
