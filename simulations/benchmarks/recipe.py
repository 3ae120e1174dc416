"""Held-out accuracy of local LoRA training on the drug-review triage task, private and not,
against the linear-probe floor.

Run: ``python -m fedlora.simulations.benchmarks recipe [CONFIG] [--set K=V] [--recipe SPEC ...]
[--modes nondp dp]``

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
``--epsilon`` (delta from the config), on the 266 training rows, then scored on the 169 held-out
rows. The floor is a linear probe computed here: frozen MiniLM, mean-pooled token states, multinomial
logistic regression trained with L-BFGS in torch (scikit-learn's default objective: summed
cross-entropy + 0.5 * C^-1 * ||W||^2, C = 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.cli_support import add_config_arguments, console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.data import TokenizedDataset
from fedlora.common.errors import ConfigError
from fedlora.common.model import PooledClassifier, build_base_model, build_model, device_for
from fedlora.common.scoring import evaluate, trim
from fedlora.common.workbench import Workbench, prepare
from fedlora.simulations.benchmarks import PROG

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


@torch.no_grad()
def embed(model: PooledClassifier, data: TokenizedDataset, batch_size: int = 64) -> torch.Tensor:
    """The pooled vectors the model's head would see, for every row."""
    model.eval()
    return torch.cat([model.embed(*trim(batch)[:2]) for batch in DataLoader(data, batch_size=batch_size)])


def logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, c: float = 1.0) -> nn.Linear:
    """Multinomial LR, scikit-learn's objective: sum of cross-entropies + ||W||^2 / (2C), L-BFGS."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    xd = x.double()
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=1000, tolerance_grad=1e-8, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(xd), y, reduction="sum") + head.weight.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return head


def linear_probe(cfg: FedloraConfig, bench: Workbench) -> dict[str, float]:
    # The probe of FACTS.md: frozen, mean-pooled, not normalised; no head needed.
    frozen = dataclasses.replace(cfg.model, pooling="mean", normalize=False, head_init="zero")
    base = build_base_model(frozen, bench.labels, len(bench.tokenizer))
    train, test = bench.data.train, bench.data.eval
    x_train, x_test = embed(base, train), embed(base, test)
    y_train, y_test = train.labels, test.labels
    result = {
        "majority": float((y_test == torch.bincount(y_train).argmax()).float().mean()),
        "norm": float(x_train.norm(dim=1).mean()),
    }
    for c in (0.1, 1.0, 10.0):
        head = logistic_regression(x_train, y_train, len(bench.labels), c)
        with torch.no_grad():
            result[f"C={c:g}"] = float((head(x_test.double()).argmax(1) == y_test).float().mean())
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


def table(outcomes: list[Outcome], probe: dict[int, dict[str, float]], epsilon: float) -> Table:
    t = Table(title=f"Triage (266 train / 169 held-out, 8 labels): LoRA recipes, DP at epsilon {epsilon:g}")
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
            f"{any_run.examples_seen / 266:.1f}",
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
    report.print(table(outcomes, probe, args.epsilon), width=160)
    console.print(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: measure(args))
