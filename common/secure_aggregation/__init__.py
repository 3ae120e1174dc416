"""Secure aggregation (Bonawitz et al. 2017; Bell et al. 2020, SecAgg+), the coordinator learns only
the sum: plain state machines (``client.ClientRound``, ``server.ServerRound``) over small parts, each
built on ``cryptography``'s primitives, with no Flower in them. See ARCHITECTURE.md."""
