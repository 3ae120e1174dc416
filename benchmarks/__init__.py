"""Benchmarks, each run from a checkout of the repository as ``python -m benchmarks NAME`` (see
``__main__``). Not part of the installed package: ``pip install .`` and ``pip install -e .`` both leave
them out, and a user without the repository does not get them. Run from the repository's root (Ray's
actors and spawned processes then find them as the driver does)."""

PROG = "python -m benchmarks"
