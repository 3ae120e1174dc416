"""Benchmarks, each run as ``python -m fedlora.simulations.benchmarks NAME`` (see ``__main__``)."""

PROG = "python -m fedlora.simulations.benchmarks"
