"""What each service client's role may ask the gateways: one table and the check the gateways make.

The role is in the client's pinned certificate (``OU=role-<role>``, read by
:func:`orchestration.mpspdz.certs.client_role`) and on every connection as ``ClientConn.role``.
A gateway handler checks it before acting::

    require_role(conn.role, ACTIONS["contribute"], "contribute", conn.name)

The operator of a server acts on that server itself (its own invoke tasks), never through a gateway,
so no role stands for it here.
"""
from __future__ import annotations

from typing import Sequence

from orchestration.mpspdz.certs import DEALER_ROLE, DEFAULT_ROLE, OWNER, QUERY, ROLES, SOURCE

__all__ = ["ACTIONS", "DEFAULT_ROLE", "ROLES", "RoleError", "VERBS", "allowed_roles", "require_role"]

#: action -> the roles that may ask it
ACTIONS: dict[str, tuple[str, ...]] = {
    "contribute": (SOURCE,),  # add own persons' embeddings
    "gallery": (SOURCE,),  # list own persons
    "withdraw": (SOURCE,),  # remove own persons
    "recognize": (QUERY, OWNER),  # who is this face: a name, nothing else
    "train-on-servers": (OWNER,),  # (and the servers' operators, on the servers themselves)
    "status": ROLES,  # the dealer only polls this
}

#: how messages say an action (the key itself where it reads as a verb)
VERBS: dict[str, str] = {
    "gallery": "list the gallery",
    "train-on-servers": "train on the servers",
    "status": "ask the status",
}

assert all(set(roles) <= set(ROLES) for roles in ACTIONS.values())
assert DEALER_ROLE in ACTIONS["status"]


class RoleError(PermissionError):
    """A client asked for something its role may not do (the gateway answers with an error, the connection stays)."""


def allowed_roles(action: str) -> tuple[str, ...]:
    """The roles that may ``action`` (a key of :data:`ACTIONS`); KeyError for an action not in the table."""
    return ACTIONS[action]


def require_role(role: str, allowed: Sequence[str], action: str, name: str) -> None:
    """RoleError unless ``role`` is in ``allowed``; the message names the client, its role, the action
    and the roles that may do it, e.g. ``client door (role query) may not contribute: only source
    clients contribute``."""
    if role in allowed:
        return
    verb = VERBS.get(action, action)
    if role not in ROLES:
        raise RoleError(f"client {name} has the unknown role {role!r} (roles: {', '.join(ROLES)}): it may not {verb}")
    who = " or ".join(allowed) if allowed else ""
    only = f"only {who} clients {verb}" if allowed else "no client does"
    raise RoleError(f"client {name} (role {role}) may not {verb}: {only}")
