"""The dealer: a host of its own (a third operator) that deals the servers' correlated randomness.

It holds no data: no embedding, no name, no share. It joins every MPC run of the servers as MP-SPDZ's
party 2 (``dealer-ring-party.x``), sees no opened value, and learns only which program runs with which
sizes. It imports neither client nor server code.
"""
