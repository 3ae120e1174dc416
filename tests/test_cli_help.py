"""What a person reads from the commands: plain --help ending with an example and where every key is
listed, the recipe each simulated institution would run, a summary line that is never empty, and no
progress bar text off a terminal."""

from __future__ import annotations

import argparse
import io

from rich.console import Console

from fedlora.client import cli as client_cli
from fedlora.common import cli_support
from fedlora.server import cli as server_cli
from fedlora.simulations import cli as sim_cli

PERSONAS = {
    "fedlora-simulate": "simulation",
    "fedlora-client": "institution",
    "fedlora-server": "coordinator",
}


def every_command() -> dict[str, argparse.ArgumentParser]:
    found = {"fedlora-simulate": sim_cli.parser(), "fedlora-simulate check": sim_cli.check_parser()}
    for name, parser in (("fedlora-client", client_cli.parser()), ("fedlora-server", server_cli.parser())):
        found[name] = parser
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found.update({f"{name} {command}": p for command, p in sub.choices.items()})
    return found


def test_every_help_is_plain_and_ends_with_an_example_and_the_key_list() -> None:
    commands = every_command()
    assert len(commands) == 16
    for name, parser in commands.items():
        text = parser.format_help()
        persona = PERSONAS[" ".join(name.split()[:1])]
        assert "``" not in text, name
        last = f"every config key, with its help and range: python -m fedlora.common.config {persona}"
        assert text.rstrip().endswith(last), name
        example = text[text.index("example:\n") :].splitlines()[1].strip()
        assert example.startswith(name.split()[0]), (name, example)


def test_track_is_offered_where_a_run_trains() -> None:
    commands = every_command()
    offered = {name for name, p in commands.items() if "--track" in p.format_help()}
    assert {"fedlora-simulate", "fedlora-server start", "fedlora-client train-local"} <= offered
    track = next(a for a in commands["fedlora-simulate"]._actions if a.dest == "track")
    assert track.default is None and track.const == "" and track.nargs == "?"


def test_simulate_check_prints_the_planned_recipe_across_institutions(capsys) -> None:
    sets = ["model.source=tiny-bert", "training.batch_size=null", "training.local_steps=null"]
    assert sim_cli.main(["check", *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    for value in ("batch size", "local steps", "noise multiplier", "max grad norm", "learning rate"):
        shown = lines[f"planned {value}"]
        if shown.startswith("none ("):  # e.g. no noise where every institution releases statistics only
            assert "5 of 5 without: " in shown, shown
            continue
        low, median, high = (float(x.split()[-1]) for x in shown.split(" (")[0].split(" / "))
        assert low <= median <= high, value
    assert " of 5 institutions fine-tune (LoRA) after the round-0 statistics, " in lines["planner"]
    assert "smallest (" in lines["planner"] and "largest (" in lines["planner"]
    # The planner sizes each batch by the institution's rows: unequal partitions plan unequal batches.
    smallest, _, largest = (float(x.split()[-1]) for x in lines["planned batch size"].split(" / "))
    assert smallest < largest


def test_a_run_without_evaluation_does_not_end_with_an_empty_summary() -> None:
    history = [{"round": 0, "clients": []}, {"round": 1, "clients": [{"node": 1, "epsilon": 1.0}]}]
    said = sim_cli.outcome(history)
    assert said == "exported round 1 (the last round (no validation scores)), no held-out evaluation"
    scored = [{"round": 1, "central": {"accuracy": 0.75, "loss": 0.5, "examples": 10.0}}]
    assert sim_cli.outcome(scored).endswith("test accuracy 0.7500, loss 0.5000")


def test_off_a_terminal_a_progress_bar_writes_nothing(monkeypatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(cli_support, "console", Console(file=log, stderr=True))
    with cli_support.progress_bar("audit", 3) as advance:
        for _ in range(3):
            advance(0.5)
    assert log.getvalue() == ""
    terminal = io.StringIO()
    monkeypatch.setattr(cli_support, "console", Console(file=terminal, force_terminal=True))
    with cli_support.progress_bar("audit", 3) as advance:
        advance(0.5)
    assert "audit" in terminal.getvalue()
