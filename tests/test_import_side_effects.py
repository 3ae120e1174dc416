"""Importing fedlora changes nothing about the process: the environment, warning filters and library
logging are set where a command starts, for that command only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "simulations", "configs")

PROBE = """
import importlib, json, logging, os, warnings
# Third-party libraries first: what they do on import is theirs, not fedlora's.
import flwr.simulation, flwr.supercore.cli.flower_superexec, opacus, peft, ray, torch, transformers
from transformers.utils import logging as hf_logging

def state():
    return {
        "environ": dict(os.environ),
        "filters": [repr(f) for f in warnings.filters],
        "transformers": [hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()],
        "flwr": [logging.getLogger("flwr").level, logging.getLogger("flwr").propagate],
    }

before = state()
names = json.loads(os.environ.pop("FEDLORA_MODULES"))
before["environ"].pop("FEDLORA_MODULES")
for name in names:
    importlib.import_module(name)
after = state()
changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
print(json.dumps({"modules": names, "changed": changed}))
"""


def test_importing_every_fedlora_module_leaves_the_process_as_it_was() -> None:
    modules = sorted(
        ".".join(("fedlora", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    )
    # Unset what fedlora once set on import, so that setting it again would show.
    unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"FEDLORA_MODULES": json.dumps(modules)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"fedlora.common.model", "fedlora.client.trainer", "fedlora.simulations.run"} <= set(
        result["modules"]
    )
    assert result["changed"] == {}
