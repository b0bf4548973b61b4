"""The invoke tasks, grouped by who runs them; tasks.py at the project root gathers them into one namespace.

- ``common``: what they share (invoke.yaml lookups where a flag wins, the run layout, MP-SPDZ, the service),
- ``machine``: making a machine ready, on every host (fetch-models, setup, build-mpc, test),
- ``owner``: the data owner on one machine, local mode (train, predict, enroll, demo, evaluate, recognize,
  refresh-shares),
- ``twohosts``: servers on two hosts and the client that sends them bundles (certs, party, deal, serve,
  share-train, share-predict, share-refresh, collect, share-confirm, confirm).

They parse flags, print and map errors to exit codes; the work is in orchestration.client, .server and .mpspdz.
"""
