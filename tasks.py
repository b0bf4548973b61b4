"""Invoke tasks: private face recognition on two-party MPC (MP-SPDZ semi2k).

Defaults live in invoke.yaml; a command-line flag always wins. Every task ends in
``Exit(message, code=1)`` on failure, with the file or value at fault named.
"""
from __future__ import annotations

from invoke import Collection

from orchestration.cli import machine, owner, sources, twohosts

#: every task at the top level, named as the function with dashes (build_mpc: build-mpc); the tasks live in
#: orchestration/cli, one module per who runs them
ns = Collection(
    machine.fetch_models, machine.setup, machine.build_mpc, machine.test,
    owner.train, owner.predict, owner.enroll, owner.demo, owner.evaluate, owner.recognize, owner.refresh_shares,
    twohosts.certs, twohosts.party, twohosts.deal, twohosts.serve, twohosts.share_train, twohosts.share_predict,
    twohosts.share_refresh, twohosts.collect, twohosts.share_confirm, twohosts.confirm,
    sources.contribute, sources.gallery, sources.withdraw,
)
