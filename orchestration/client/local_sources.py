"""Local mode of the many-source service: both servers, the dealer and every named client on this machine.

Everything lives under ``<var>/sources/`` (its own folder: a gallery of many sources never mixes with a
single owner's model)::

    sources/server0, sources/server1     the servers (gallery shares, model generations, pins)
    sources/dealer                       the dealer: its MPC key (P2) and a client key of role dealer
    sources/client                       the operator's client (role owner: status, train --on-servers)
    sources/clients/<name>               each source's or query client's key (role in its certificate)

Each is a folder of its own with its own key, as on separate hosts; local mode only makes and pins the
keys for them. The data owner's single-owner client (``<var>/client``) is not the dealer here.
"""
from __future__ import annotations

import logging
from pathlib import Path

from orchestration.client.private import Layout
from orchestration.mpspdz import certs as certs_mod

logger = logging.getLogger(__name__)


def sources_layout(layout: Layout) -> Layout:
    return Layout(layout.root / "sources", layout.protocol)


def dealer_dir(layout: Layout) -> Path:
    return layout.root / "dealer"


def client_dir(layout: Layout, name: str) -> Path:
    return layout.root / "clients" / certs_mod.check_client_name(name)


def _server_pems(layout: Layout) -> list[Path]:
    return [certs_mod.cert_dir(layout.server(i)) / f"P{i}.pem" for i in range(2)]


def _pin_everywhere(layout: Layout, folder: Path) -> None:
    """Pin ``folder``'s client certificate on both local servers and give it both servers' certificates."""
    _, pem = certs_mod.client_files(folder)
    fp = certs_mod.fingerprint(pem)
    for i in range(2):
        if fp not in certs_mod.allowed_clients(layout.server(i)):
            certs_mod.allow_client(layout.server(i), pem, replace=True)
    certs_mod.install_server_certs(folder, _server_pems(layout), replace=True)


def ensure_local_sources(layout: Layout, dealer: bool) -> None:
    """The servers' pair, the dealer's keys (dealer mode) and the operator's client, made and pinned once."""
    if not any(certs_mod.cert_dir(layout.server(i)).exists() for i in range(2)):
        certs_mod.make_local_pair([layout.server(0), layout.server(1)])
    if dealer:
        d = dealer_dir(layout)
        if not (certs_mod.cert_dir(d) / "P2.key").exists():
            mine = certs_mod.make_party_cert(d, 2)
            for i in range(2):
                certs_mod.import_peer_cert(d, 2, _server_pems(layout)[i], replace=True)
                certs_mod.import_peer_cert(layout.server(i), i, mine.path, replace=True)
        if not certs_mod.client_files(d)[1].exists():
            certs_mod.make_client_cert(d, "dealer", role=certs_mod.DEALER_ROLE)
        _pin_everywhere(layout, d)
    if not certs_mod.client_files(layout.client)[1].exists():
        certs_mod.make_client_cert(layout.client, "operator")
    _pin_everywhere(layout, layout.client)


def ensure_local_client(layout: Layout, name: str, role: str) -> Path:
    """A named client's folder with a certificate of ``role``, pinned on both local servers."""
    folder = client_dir(layout, name)
    _, pem = certs_mod.client_files(folder)
    if pem.exists():
        held = certs_mod.client_role(pem.read_text())
        if held != role:
            raise certs_mod.CertError(f"client {name} ({pem}) has role {held}, not {role}: one name, one role; "
                                      f"use another name for a {role} client")
    else:
        certs_mod.make_client_cert(folder, name, role=role)
        logger.info("local mode: made %s client %s (%s) and pinned it on both servers", role, name, pem)
    _pin_everywhere(layout, folder)
    return folder


__all__ = ["client_dir", "dealer_dir", "ensure_local_client", "ensure_local_sources", "sources_layout"]
