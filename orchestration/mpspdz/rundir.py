"""A long-lived MP-SPDZ party's working folder (the service's servers and its dealer)."""
from __future__ import annotations

from pathlib import Path

from preprocessing.fileio import destroy_tree, owner_only, private_dir

from orchestration.mpspdz import certs as certs_mod
from orchestration.mpspdz.hosts import Hosts, write_hosts
from orchestration.mpspdz.toolchain import Protocol, programs_dir


def prepare_run(run: Path, party_certs: certs_mod.PartyCerts, build: Path, proto: Protocol, program: str,
                hosts: Hosts, listen_base: int | None = None) -> Path:
    """A service party's working folder, made afresh and owner-only throughout: its key and the pinned
    certificates in Player-Data/, an empty Persistence/, the compiled bytecode (linked) and, for a
    server, its own public input (the port base it listens on for its gateway). Returns the folder's
    hosts file."""
    destroy_tree(run)
    private_dir(run)
    private_dir(run / "Persistence")
    certs_mod.install_for_run(party_certs, run / "Player-Data")
    d = private_dir(run / "Programs")
    for sub in ("Bytecode", "Schedules"):
        (d / sub).symlink_to(programs_dir(Path(build).resolve(), proto) / sub)
    private_dir(d / "Public-Input")
    if listen_base is not None:
        with owner_only():
            (d / "Public-Input" / program).write_text(f"{listen_base}\n")
    return write_hosts(run / "hosts", [(e.address, e.port) for e in hosts.parties[:proto.n_parties]]).path


__all__ = ["prepare_run"]
