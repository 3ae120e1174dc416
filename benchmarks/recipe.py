"""Held-out accuracy of local LoRA training on a packaged task (the drug-review triage by default),
private and not, against the linear-probe floor.

Run: ``python -m benchmarks recipe [CONFIG] [--set K=V] [--recipe SPEC ...]
[--modes nondp dp]`` (MedMCQA subjects: ``--set data.dataset=medmcqa-subjects``)

A recipe is a comma-separated list of ``key=value`` pairs (any key left out keeps the config
default):

    lr      training.learning_rate          hlr    training.head_learning_rate
    bs      training.batch_size             steps  training.local_steps
    rounds  local rounds (privacy.planned_rounds, so DP noise covers exactly steps x rounds)
    clip    privacy.max_grad_norm           r      model.lora_r
    alpha   model.lora_alpha                len    data.max_length
    wd      training.weight_decay           seed   training.seed
    init    model.head_init (label-names | zero)

Each recipe is trained from the same initial adapter once without DP and once with DP-SGD at
``--epsilon`` (delta from the config), on the training rows (266 for the triage), then scored on the
held-out rows (169). The floor is the linear probe of ``fedlora.simulations.probe`` (frozen MiniLM,
mean-pooled token states, logistic regression), here at C = 0.1, 1 and 10.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from benchmarks import PROG
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.cli_support import add_config_arguments, console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError
from fedlora.common.model import build_model, device_for
from fedlora.common.scoring import evaluate
from fedlora.common.workbench import Workbench, prepare
from fedlora.simulations.probe import frozen_features, logistic_regression, score

KEYS = {
    "lr": "training.learning_rate",
    "hlr": "training.head_learning_rate",
    "bs": "training.batch_size",
    "steps": "training.local_steps",
    "rounds": "privacy.planned_rounds",
    "clip": "privacy.max_grad_norm",
    "r": "model.lora_r",
    "alpha": "model.lora_alpha",
    "len": "data.max_length",
    "wd": "training.weight_decay",
    "seed": "training.seed",
    "init": "model.head_init",
}

# The settled recipes (README, "Measured"): a non-private one and a private one.
DEFAULT_RECIPES = (
    "lr=5e-3,hlr=2e-2,bs=32,steps=9,rounds=8,clip=1.0,len=128",
    "lr=1e-3,hlr=5e-2,bs=128,steps=10,rounds=2,clip=1.0,len=128",
)


@dataclass
class Outcome:
    recipe: str
    mode: str
    accuracy: float
    loss: float
    epsilon: float | None
    noise_multiplier: float | None
    examples_seen: int
    seconds: float
    curve: list[float]


def parse_recipe(spec: str) -> dict[str, str]:
    values = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(f"--recipe {spec!r}: {item!r} is not key=value with key in {', '.join(KEYS)}")
        values[key] = value
    return values


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def recipe_config(
    spec: str, private: bool, epsilon: float, config: str | None = None, sets: Sequence[str] = ()
) -> tuple[FedloraConfig, int]:
    """The recipe over ``config`` and its ``--set`` overrides (the built-in defaults if none)."""
    values = parse_recipe(spec)
    # Numbers go through Python: YAML 1.1 reads '5e-3' as a string.
    overrides = [f"{KEYS[k]}={_number(v)}" for k, v in values.items()]
    overrides += [f"privacy.enabled={'true' if private else 'false'}", f"privacy.epsilon={epsilon}"]
    cfg = read_config(config, [*sets, *overrides], "institution")
    return cfg, cfg.planned_rounds


# ---------------------------------------------------------------- linear probe


def linear_probe(cfg: FedloraConfig, bench: Workbench) -> dict[str, float]:
    """The probe of simulations.probe at three regularisation strengths, and the majority class."""
    train, test = bench.data.train, bench.data.eval
    x_train, x_test = frozen_features(cfg.model, bench.labels, len(bench.tokenizer), train, test)
    y_train, y_test = train.labels, test.labels
    result = {
        "majority": float((y_test == torch.bincount(y_train).argmax()).float().mean()),
        "norm": float(x_train.norm(dim=1).mean()),
    }
    for c in (0.1, 1.0, 10.0):
        head = logistic_regression(x_train, y_train, len(bench.labels), c)
        result[f"C={c:g}"] = score(head, x_test, y_test)["accuracy"]
    return result


# ---------------------------------------------------------------- fine-tuning


def train_once(
    spec: str,
    private: bool,
    epsilon: float,
    benches: dict[int, Workbench],
    folder: Path,
    curve: bool,
    config: str | None = None,
    sets: Sequence[str] = (),
) -> Outcome:
    cfg, rounds = recipe_config(spec, private, epsilon, config, sets)
    if cfg.data.max_length not in benches:
        benches[cfg.data.max_length] = prepare(cfg)
    bench = benches[cfg.data.max_length]
    device = device_for(cfg.training.device)
    built = build_model(cfg.model, bench.labels, len(bench.tokenizer))
    ledger = None
    if private:
        path = folder / f"ledger-{abs(hash((spec, time.time())))}.json"
        ledger = PrivacyLedger.from_config(cfg.privacy, path)
    start = time.perf_counter()
    trainer = LocalTrainer(cfg, built.model, bench.data.train, device, ledger)
    seen, accuracies, loss = 0, [], math.nan
    mode = "dp" if private else "nondp"
    for r in range(1, rounds + 1):
        result = trainer.train_round(r)
        seen += result.examples_seen
        if curve or r == rounds:
            metrics = evaluate(trainer.model, cfg.model.task, bench.data.eval, device, 64)
            accuracies.append(metrics["accuracy"])
            loss = metrics["loss"]
            console.print(
                f"  {mode:5s} round {r}/{rounds}: train loss {result.loss:.3f}, "
                f"held-out acc {metrics['accuracy']:.3f}, loss {metrics['loss']:.3f}"
                + (f", epsilon {result.epsilon:.2f}" if result.epsilon is not None else "")
            )
    return Outcome(
        recipe=spec,
        mode=mode,
        accuracy=accuracies[-1],
        loss=loss,
        epsilon=ledger.spent if ledger is not None else None,
        noise_multiplier=trainer.noise_multiplier,
        examples_seen=seen,
        seconds=time.perf_counter() - start,
        curve=accuracies,
    )


def table(
    outcomes: list[Outcome], probe: dict[int, dict[str, float]], epsilon: float, bench: Workbench
) -> Table:
    rows = len(bench.data.train)
    t = Table(
        title=f"{rows} train / {len(bench.data.eval)} held-out, {len(bench.labels)} labels: LoRA recipes, "
        f"DP at epsilon {epsilon:g}"
    )
    for name in ("recipe", "epochs", "non-DP acc", "DP acc", "epsilon spent", "noise", "wall s"):
        t.add_column(name, justify="left" if name == "recipe" else "right")
    by_recipe: dict[str, dict[str, Outcome]] = {}
    for o in outcomes:
        by_recipe.setdefault(o.recipe, {})[o.mode] = o
    for spec, runs in by_recipe.items():
        nondp, dp = runs.get("nondp"), runs.get("dp")
        any_run = nondp or dp
        t.add_row(
            spec,
            f"{any_run.examples_seen / rows:.1f}",
            f"{nondp.accuracy:.1%}" if nondp else "-",
            f"{dp.accuracy:.1%}" if dp else "-",
            f"{dp.epsilon:.2f}" if dp else "-",
            f"{dp.noise_multiplier:.3f}" if dp else "-",
            " + ".join(f"{o.seconds:.0f}" for o in (nondp, dp) if o),
        )
    for length, p in sorted(probe.items()):
        t.add_row(
            f"linear probe, frozen mean-pooled MiniLM, len={length}",
            "-",
            f"{p['C=1']:.1%} (C=0.1 {p['C=0.1']:.1%}, C=10 {p['C=10']:.1%})",
            "-",
            "-",
            "-",
            "-",
        )
        t.add_row(f"majority class (len={length})", "-", f"{p['majority']:.1%}", "-", "-", "-", "-")
    return t


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} recipe", description=__doc__)
    add_config_arguments(ap, "institution")
    ap.add_argument(
        "--recipe",
        action="append",
        help="a recipe, e.g. 'lr=5e-3,hlr=2e-2,bs=32,steps=9,rounds=8' (repeatable; default: two settled)",
    )
    ap.add_argument(
        "--modes", nargs="*", default=["nondp", "dp"], choices=["nondp", "dp"], help="none: probe only"
    )
    ap.add_argument("--epsilon", type=float, default=8.0, help="DP budget (delta from the config: 1e-5)")
    ap.add_argument(
        "--probe-lengths",
        type=int,
        nargs="*",
        default=[128],
        help="max_length values at which to compute the linear probe (none: skip it)",
    )
    ap.add_argument("--curve", action="store_true", help="evaluate after every round, not only the last")
    ap.add_argument("--json", type=Path, help="append the outcomes to this JSON-lines file")
    return ap


def measure(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    recipes = args.recipe or list(DEFAULT_RECIPES)
    for spec in recipes:
        parse_recipe(spec)
    start = time.perf_counter()
    benches: dict[int, Workbench] = {}
    probe = {}
    for length in args.probe_lengths:
        cfg = read_config(
            args.config, [*args.set, f"data.max_length={length}", "privacy.enabled=false"], "institution"
        )
        benches.setdefault(length, prepare(cfg))
        t0 = time.perf_counter()
        probe[length] = linear_probe(cfg, benches[length])
        console.print(f"linear probe len={length}: {probe[length]} ({time.perf_counter() - t0:.0f}s)")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
        for spec in recipes:
            for mode in args.modes:
                console.print(f"[bold]{spec}[/] {mode}")
                o = train_once(
                    spec, mode == "dp", args.epsilon, benches, Path(tmp), args.curve, args.config, args.set
                )
                console.print(f"  -> acc {o.accuracy:.3f} in {o.seconds:.0f}s")
                outcomes.append(o)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(asdict(o)) + "\n")
    if benches:
        report.print(table(outcomes, probe, args.epsilon, next(iter(benches.values()))), width=160)
    console.print(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: measure(args))
