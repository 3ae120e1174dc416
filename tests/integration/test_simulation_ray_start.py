"""Ray not starting in time on a loaded machine (issue 26): the simulation says so in one line, with
what to do, and stops, instead of pages of tracebacks and a ServerApp left waiting for replies. Ray
itself is not started: ``ray.init`` raises what Ray 2.55 raises when its raylet has not registered
within 30 s (ray/_private/node.py)."""

from __future__ import annotations

import threading

import ray

from fedlora.simulations import cli as sim_cli

RAY_MESSAGE = (
    "The current node timed out during startup. This could happen because some of the raylet failed "
    "to startup or the GCS has become overloaded."
)


def timed_out(*_args, **_kwargs) -> None:
    raise Exception(RAY_MESSAGE)  # a bare Exception, as Ray raises it


def test_ray_not_starting_in_time_is_one_line_with_what_to_do(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ray, "init", timed_out)
    sets = [
        "model.source=tiny-bert",
        "federation.rounds=1",
        "simulation.num_clients=2",
        "federation.min_clients=2",
        "federation.central_eval=false",
    ]
    threads = set(threading.enumerate())
    code = sim_cli.main(["--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]])
    out, err = capsys.readouterr()
    said = [line for line in (out + err).splitlines() if line.strip()]
    assert code == 2, out + err
    assert said[-1].startswith("error: Ray did not start within its fixed 30 s"), said
    assert "retry" in said[-1] and len(said) == 2  # the run's one-line summary, then the error
    assert "Traceback" not in out + err and "timed out during startup" not in out + err
    # Nothing is left running: no ServerApp thread waiting federation.round_timeout for replies.
    assert [t.name for t in set(threading.enumerate()) - threads if t.is_alive()] == []
