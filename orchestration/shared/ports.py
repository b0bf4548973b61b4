"""The service's ports and program sizes, which the client, both servers and the dealer must agree on.

From the hosts file's line ``address:p`` of server i: ``p`` MPC, ``p + 100`` clients, ``p + 200`` the
gateways' link (server 1 listens), ``p + 300`` MP-SPDZ's client listener (for the gateway only, on its
own host). Each server takes its own ports from its own line and the other's from the other's line,
so two hosts files may differ (NAT, relays).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestration.mpspdz.hosts import Hosts

CLIENT_OFFSET, LINK_OFFSET, SPDZ_OFFSET = 100, 200, 300


@dataclass(frozen=True)
class ServicePorts:
    """Every port of the service, from the hosts file (2 lines; a 3rd for the dealer)."""

    hosts: Hosts

    def mpc(self, i: int) -> tuple[str, int]:
        return self.hosts[i].address, self.hosts[i].port

    def client(self, i: int) -> tuple[str, int]:
        return self.hosts[i].address, self.hosts[i].port + CLIENT_OFFSET

    def link(self) -> tuple[str, int]:
        return self.hosts[1].address, self.hosts[1].port + LINK_OFFSET

    def spdz(self, i: int) -> tuple[str, int]:
        """Where server i's party listens for its gateway (a run-time input of the party, not of the program)."""
        return self.hosts[i].address, self.hosts[i].port + SPDZ_OFFSET


def service_program_args(batch: int, d1: int, c: int, exp_bits: int,
                         names: tuple[int, float] | list[Any] | None = None, lanes: int = 1,
                         quick: bool = False) -> list[str]:
    """The serve program's compile-time arguments, the same for both servers and the dealer: sizes only, the
    number of lanes of ``batch`` queries (batches in flight at once, each in an MP-SPDZ thread of its own) and
    whether a quick lane of one query comes first, and for a gallery of many sources (``names``: name width in
    words, the public threshold on the top logit z_max) the names mode."""
    args = [str(batch), str(d1), str(c), str(exp_bits), "serve"]
    if int(lanes) != 1:
        args += ["lanes", str(int(lanes))]
    if quick:
        args += ["quick"]
    if names is not None:
        args += ["names", str(int(names[0])), logit_arg(float(names[1]))]
    return args


MAX_LANES = 8  # the serve program's limit


def status_lanes(status: dict[str, Any]) -> dict[str, Any]:
    """``lanes`` and ``quick`` for :func:`service_program_args` as a server's status announces them (1 and no
    quick lane when a server of before lanes says nothing); a value out of range is refused with ValueError (a
    dealer must run exactly the servers' program)."""
    lanes, quick = status.get("lanes", 1), status.get("quick", False)
    if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= MAX_LANES:
        raise ValueError(f"the server's status announces {lanes!r} lanes: expected 1..{MAX_LANES}")
    if not isinstance(quick, bool):
        raise ValueError(f"the server's status announces quick={quick!r}: expected true or false")
    return {"lanes": lanes, "quick": quick}


def logit_arg(t: float) -> str:
    """face_predict's names-mode threshold T as a program argument: a decimal, a negative one with ``m`` for the
    minus sign (``m1.5`` = -1.5; MP-SPDZ's compiler would take ``-1.5`` for an option)."""
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"names-mode threshold {t!r}: expected a finite logit")
    return f"m{-t!r}" if t < 0 else repr(t + 0.0)  # + 0.0: -0.0 is 0.0


__all__ = ["CLIENT_OFFSET", "LINK_OFFSET", "MAX_LANES", "SPDZ_OFFSET", "ServicePorts", "logit_arg",
           "service_program_args", "status_lanes"]
