"""The statistics head on frozen features: summed DP class statistics against the floor and the old way.

Run: ``python -m benchmarks stats_head [--sets triage rating medmcqa] [--seeds 3]``

Per set (drug-review triage of the hospitals preset, drug-review 3-class rating, MedMCQA subjects),
the frozen MiniLM's mean-pooled features at 64 tokens are computed once and cached. Per seed, the
training rows are split into ``--institutions`` by Dirichlet(``--alpha``) label skew; every institution
releases its per-class sums of L2-normalised features and its counts with Gaussian noise (std sigma x
sqrt 2, sigma calibrated by PRV so that the one release spends epsilon at delta 1e-5; LDA also
releases the second moment, sqrt 3). Compared on the held-out rows, accuracy and macro-F1 with 95%
intervals over seeds (simulations.stats):

- probe: the non-private logistic probe on every training row (simulations.probe), the floor;
- label names: the public start (model.head_init), no data, no privacy cost;
- summed NCM + start: the server's head (server.statistics_head): the summed release, each class
  direction the posterior mean of the released one and the label names'; without the start, the
  ablation; "fixed prior" is the former rule (the label names worth FIXED_PRIOR_WEIGHT x the summed
  noise's norm in rows, a weight chosen on triage's test rows), kept here to compare;
- summed LDA: a ridge LDA from the summed release with the second moment, at each epsilon;
- averaged heads: the old way, each institution's own cosine head and log-share bias from its own
  release (client-side head start at epsilon 2, a quarter of 8), averaged as adapter tensors.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor, nn

from benchmarks import PROG
from fedlora.common.accounting import calibrate_noise
from fedlora.common.cli_support import console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.data import build_data
from fedlora.common.model import HEAD, build_model, load_tokenizer
from fedlora.configs import simulation as presets
from fedlora.server.statistics_head import class_mean_head, summed, summed_variance
from fedlora.simulations.partitions import dirichlet_partition
from fedlora.simulations.probe import frozen_features, logistic_regression
from fedlora.simulations.stats import mean_interval

DELTA = 1e-5
HEAD_SCALE = 20.0
OLD_EPSILON = 2.0
FIXED_PRIOR_WEIGHT = 2.0
SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "triage": ("hospitals.yaml", ()),
    "rating": ("hospitals.yaml", ("data.demo_task=rating",)),
    "medmcqa": ("medmcqa.yaml", ()),
}
Head = tuple[Tensor, Tensor]


def set_config(name: str, *extra: str) -> FedloraConfig:
    """The set's simulation preset at 64 tokens, with ``extra`` overrides."""
    preset, overrides = SETS[name]
    path = Path(presets.__file__).parent / preset
    return read_config(str(path), (*overrides, "data.max_length=64", *extra), "simulation")


def features(name: str, cache: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Normalised frozen features and labels of train and test rows, and the class count (cached)."""
    file = cache / f"{name}.pt"
    if not file.exists():
        cfg = set_config(name)
        tokenizer = load_tokenizer(cfg.model)
        bundle = build_data(cfg, tokenizer)
        console.print(f"{name}: embedding {len(bundle.train)} + {len(bundle.eval)} rows (cached after)")
        x_train, x_test = frozen_features(cfg.model, bundle.labels, len(tokenizer), bundle.train, bundle.eval)
        cache.mkdir(parents=True, exist_ok=True)
        saved = (x_train, bundle.train.labels, x_test, bundle.eval.labels, len(bundle.labels))
        torch.save(saved, file)
    x_train, y_train, x_test, y_test, classes = torch.load(file)
    return x_train, y_train, x_test, y_test, classes


def public_start(name: str, cache: Path) -> Tensor:
    """The head's public start rows (the label names' embeddings x head_scale), cached."""
    file = cache / f"{name}-start.pt"
    if not file.exists():
        cfg = set_config(name)
        tokenizer = load_tokenizer(cfg.model)
        labels = build_data(cfg, tokenizer).labels
        model = build_model(cfg.model, labels, len(tokenizer)).model
        start = next(v for k, v in model.state_dict().items() if f".{HEAD}." in k and k.endswith(".weight"))
        torch.save(start.detach().clone(), file)
    return torch.load(file)


def exact_statistics(x: Tensor, y: Tensor, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Class sums of unit rows, counts, and the second moment sum of x x^T."""
    unit = nn.functional.normalize(x.double(), dim=-1)
    sums = torch.zeros(classes, unit.shape[1], dtype=torch.float64).index_add_(0, y, unit)
    counts = torch.bincount(y, minlength=classes).double()
    return sums, counts, unit.T @ unit


def gaussian(shape: torch.Size, std: float, gen: torch.Generator) -> Tensor:
    return std * torch.randn(shape, dtype=torch.float64, generator=gen)


def release(stats: tuple[Tensor, Tensor, Tensor], std: float, gen: torch.Generator) -> tuple[Tensor, ...]:
    """One institution's Gaussian mechanism on its statistics (symmetric noise on the moment)."""
    sums, counts, moment = stats
    upper = torch.triu(gaussian(moment.shape, std, gen))
    sym = upper + torch.triu(upper, 1).T
    return sums + gaussian(sums.shape, std, gen), counts + gaussian(counts.shape, std, gen), moment + sym


def lda_head(sums: Tensor, counts: Tensor, moment: Tensor, noise_std: float, institutions: int) -> Head:
    """Ridge LDA from summed statistics: the shared covariance from the second moment less the class
    means' part, plus a ridge of the noise's expected spectral norm (2 sqrt(K D) x std) per row."""
    n = counts.clamp(min=1.0)
    total = float(n.sum())
    means = sums / n[:, None]
    within = (moment - (sums.T @ means)) / total
    width = sums.shape[1]
    ridge = 2 * math.sqrt(institutions * width) * noise_std / total + 1e-3
    precision = torch.linalg.inv(within + ridge * torch.eye(width, dtype=within.dtype))
    weight = means @ precision
    bias = -0.5 * (weight * means).sum(1) + torch.log(n / total)
    return weight, bias


def fixed_prior_head(sums: Tensor, counts: Tensor, start: Tensor, noise_var: float) -> Head:
    """The former server head: the label names' unit rows added to the sums, worth
    FIXED_PRIOR_WEIGHT x the summed noise's expected norm in rows."""
    rows = FIXED_PRIOR_WEIGHT * math.sqrt(noise_var * sums.shape[1])
    direction = sums + rows * nn.functional.normalize(start.double(), dim=-1)
    return class_mean_head(direction, counts, HEAD_SCALE)


def averaged_heads(releases: Sequence[tuple[Tensor, Tensor]], head_scale: float) -> Head:
    """The old way: each institution's own head (cosine rows, log of its own noisy class shares),
    then the heads averaged as adapter tensors are."""
    heads = [class_mean_head(sums, counts, head_scale) for sums, counts in releases]
    return torch.stack([w for w, _ in heads]).mean(0), torch.stack([b for _, b in heads]).mean(0)


def macro_f1(predicted: Tensor, truth: Tensor, classes: int) -> float:
    """The mean over classes present in the truth or the predictions of their F1."""
    scores = []
    for c in range(classes):
        tp = float(((predicted == c) & (truth == c)).sum())
        fp = float(((predicted == c) & (truth != c)).sum())
        fn = float(((predicted != c) & (truth == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def scored(head: Head, x: Tensor, y: Tensor, classes: int) -> tuple[float, float]:
    weight, bias = head
    predicted = (nn.functional.normalize(x.double(), dim=-1) @ weight.double().T + bias.double()).argmax(1)
    return float((predicted == y).double().mean()), macro_f1(predicted, y, classes)


def run_set(name: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    x_train, y_train, x_test, y_test, classes = features(name, Path(args.cache))
    start = public_start(name, Path(args.cache))
    probe = logistic_regression(x_train, y_train, classes)
    with torch.no_grad():
        guess = probe(x_test.double()).argmax(1)
    probe_score = (float((guess == y_test).double().mean()), macro_f1(guess, y_test, classes))
    names = scored((start, torch.zeros(classes)), x_test, y_test, classes)
    results: dict[str, list[tuple[float, float]]] = {"probe (non-private)": [], "label names (public)": []}
    for seed in range(args.seeds):
        results["probe (non-private)"].append(probe_score)
        results["label names (public)"].append(names)
        parts = dirichlet_partition(y_train.numpy(), args.institutions, args.alpha, seed)
        stats = [exact_statistics(x_train[p], y_train[p], classes) for p in parts]
        exact = summed([(s, c) for s, c, _ in stats])
        results.setdefault("summed NCM, no noise", []).append(
            scored(class_mean_head(*exact, HEAD_SCALE), x_test, y_test, classes)
        )
        moment = torch.stack([m for _, _, m in stats]).sum(0)
        results.setdefault("summed LDA, no noise", []).append(
            scored(lda_head(*exact, moment, 0.0, len(parts)), x_test, y_test, classes)
        )
        gen = torch.Generator().manual_seed(1000 + seed)
        for epsilon in args.epsilons:
            sigma = calibrate_noise(epsilon, DELTA, "prv", 1.0, 1)
            noisy = [release(s, sigma * math.sqrt(2), gen) for s in stats]
            released = summed([(s, c) for s, c, _ in noisy])
            noise_var = summed_variance([sigma * math.sqrt(2)] * len(parts))
            head = class_mean_head(*released, HEAD_SCALE, start, noise_var)
            results.setdefault(f"summed NCM + start, eps {epsilon:g}", []).append(
                scored(head, x_test, y_test, classes)
            )
            results.setdefault(f"fixed prior (former), eps {epsilon:g}", []).append(
                scored(fixed_prior_head(*released, start, noise_var), x_test, y_test, classes)
            )
            results.setdefault(f"summed NCM no start, eps {epsilon:g}", []).append(
                scored(class_mean_head(*released, HEAD_SCALE), x_test, y_test, classes)
            )
            with_moment = [release(s, sigma * math.sqrt(3), gen) for s in stats]
            sums, counts = summed([(s, c) for s, c, _ in with_moment])
            moment = torch.stack([m for _, _, m in with_moment]).sum(0)
            lda = lda_head(sums, counts, moment, sigma * math.sqrt(3), len(parts))
            results.setdefault(f"summed LDA, eps {epsilon:g}", []).append(
                scored(lda, x_test, y_test, classes)
            )
        sigma_old = calibrate_noise(OLD_EPSILON, DELTA, "prv", 1.0, 1)
        old = averaged_heads([release(s, sigma_old * math.sqrt(2), gen)[:2] for s in stats], HEAD_SCALE)
        results.setdefault(f"averaged heads, eps {OLD_EPSILON:g}", []).append(
            scored(old, x_test, y_test, classes)
        )
    return results


def table(name: str, results: dict[str, list[tuple[float, float]]], rows: str) -> Table:
    out = Table(title=f"{name}: {rows}")
    for column in ("head", "accuracy (95% CI)", "macro-F1 (95% CI)"):
        out.add_column(column)

    def shown(values: list[float]) -> str:
        est = mean_interval(values)
        return f"{est.mean:.3f} [{est.low:.3f}, {est.high:.3f}]"

    for head, values in results.items():
        out.add_row(head, shown([a for a, _ in values]), shown([f for _, f in values]))
    return out


def feature_arguments(
    name: str, doc: str | None, seeds: int, epsilons: Sequence[float]
) -> argparse.ArgumentParser:
    """The options every benchmark on these cached features takes: sets, paired seeds, the
    federation's split (institutions, Dirichlet alpha), epsilons and the features' cache."""
    ap = argparse.ArgumentParser(prog=f"{PROG} {name}", description=(doc or name).split("\n")[0])
    ap.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--institutions", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--epsilons", type=float, nargs="+", default=list(epsilons))
    cache = Path(tempfile.gettempdir()) / "fedlora-stats-head"
    ap.add_argument("--cache", default=str(cache), help="where features are kept (outside the repository)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = feature_arguments("stats_head", __doc__, seeds=3, epsilons=(2.0, 4.0, 8.0))
    args = ap.parse_args(argv)

    def body() -> None:
        for name in args.sets:
            results = run_set(name, args)
            rows = f"{args.institutions} institutions, Dirichlet {args.alpha:g}, {args.seeds} seeds"
            report.print(table(name, results, rows))

    return run_cli(body)

