"""``fedlora-simulate``: many virtual institutions fine-tune one shared adapter on this machine.

``fedlora-simulate check [CONFIG]`` validates the config without starting anything."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.client.app import shared_data
from fedlora.client.canaries import BLACK_BOX_CANARIES, WHITE_BOX_CANARIES
from fedlora.client.privacy_audit import require_no_leak
from fedlora.client.recipe import facts, plan
from fedlora.client.statistics import head_values
from fedlora.common.cli_support import (
    add_config_arguments,
    add_out_argument,
    console,
    finish_help,
    read_config,
    report,
    run_cli,
    run_folder,
)
from fedlora.common.config import FedloraConfig, to_dict
from fedlora.common.held_out import exported_round
from fedlora.common.model import build_model, model_dir
from fedlora.common.model_card import ended_after
from fedlora.common.scoring import headline
from fedlora.common.tracking import add_track_argument, tracked
from fedlora.server.history import summarise_round, track_history
from fedlora.simulations.compare import compare, markdown
from fedlora.simulations.federated_audit import RESULT_FILE, audit_federation
from fedlora.simulations.head_round_audit import RESULT_FILE as HEAD_RESULT_FILE
from fedlora.simulations.head_round_audit import (
    audit_head_rounds,
    audit_secure_head_rounds,
    require_head_noise,
)
from fedlora.simulations.report import (
    SEEDED,
    audit_metrics,
    audit_section,
    exported_entry,
    federated_result,
    tracked_files,
    write_all,
    write_report,
)
from fedlora.simulations.run import backend_config, simulate
from fedlora.simulations.secure_sum_audit import RESULT_FILE as SUM_RESULT_FILE
from fedlora.simulations.secure_sum_audit import audit_secure_sum, require_enough_noise
from fedlora.simulations.virtual_client import partition_sizes, with_peers

DEFAULT_CONFIG = "hospitals.yaml"


def default_config() -> str:
    return str(files("fedlora.configs.simulation") / DEFAULT_CONFIG)


def _progress_fields(entry: dict) -> dict[str, str]:
    """Loss and accuracy of the central evaluation: clients send no loss unless they opt in."""
    summary = summarise_round(entry)
    loss, acc = summary.central.get("loss"), summary.central.get("accuracy")
    return {
        "clients": f"{summary.replies} ok, {summary.dropped} dropped",
        "loss": f"{loss:.4f}" if loss is not None else "-",
        "acc": f"{acc:.4f}" if acc is not None else "-",
        "eps": f"{summary.epsilon:.2f}",
    }


def describe(cfg: FedloraConfig) -> str:
    dp = f"epsilon {cfg.privacy.epsilon:g}" if cfg.privacy.enabled else "off"
    return (
        f"{cfg.simulation.num_clients} clients, {cfg.federation.rounds} rounds, {cfg.model.source} "
        f"({cfg.model.task}), aggregator {cfg.federation.aggregator}, DP {dp}"
    )


@contextmanager
def round_progress(rounds: int) -> Iterator[Callable[[dict], None]]:
    """A live bar on a terminal; elsewhere (a log file, a batch job) one plain line per round."""
    if not console.is_terminal:
        start = time.perf_counter()

        def line(entry: dict) -> None:
            console.print(
                f"{summarise_round(entry).line(rounds)}, {time.perf_counter() - start:.0f} s",
                highlight=False,
                soft_wrap=True,
            )

        yield line
        return
    columns = (
        TextColumn("round"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[clients]}"),
        TextColumn("held-out loss {task.fields[loss]}"),
        TextColumn("acc {task.fields[acc]}"),
        TextColumn("eps {task.fields[eps]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("rounds", total=rounds, clients="-", loss="-", acc="-", eps="-")
        # a federation that ended early by design (its entry says why) fills the bar at its last round
        yield lambda e: bar.update(
            task,
            completed=e["round"],
            total=e["round"] if e.get("ended_early") else rounds,
            **_progress_fields(e),
        )


PLANNED = ("batch_size", "local_steps", "noise_multiplier", "max_grad_norm", "learning_rate")
"""The recipe values ``check`` shows across the virtual institutions (client.recipe.Recipe)."""


def min_median_max(values: list[float]) -> str:
    ordered = sorted(values)
    shown = [f"{v:.4g}" for v in (ordered[0], ordered[len(ordered) // 2], ordered[-1])]
    return "min {} / median {} / max {}".format(*shown)


def spread(sizes: list[int]) -> str:
    """Training rows per virtual institution, as a researcher sizes the privacy budget by them."""
    return f"{len(sizes)} institutions, training rows {min_median_max(sizes)}"


def planner_decisions(cfg: FedloraConfig) -> dict[str, str]:
    """What the recipe planner (client.recipe) plans for the virtual institutions: min / median / max
    of each planned value, how many fine-tune after the round-0 statistics and how many release the
    statistics only, and why for the smallest and the largest."""
    if cfg.data.privacy_unit is not None and cfg.privacy.enabled:
        return {"planner": "per person: each institution plans from its persons at its first message"}
    cfg = with_peers(cfg)
    tokenizer, bundle = shared_data(cfg)
    model = build_model(cfg.model, bundle.labels, len(tokenizer)).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = partition_sizes(cfg)
    labels = len(bundle.labels)
    recipes = {
        rows: plan(facts(cfg, rows, labels, trainable=trainable, head_values=head_values(model)), cfg)
        for rows in set(sizes)
    }
    planned = [recipes[rows] for rows in sizes]
    found = {}
    for name in PLANNED:
        choices = [getattr(r, name) for r in planned]
        known = [float(c.value) for c in choices if c.value is not None]
        unset = [c.reason for c in choices if c.value is None]
        text = min_median_max(known) if known else "none"
        if unset:
            text += f" ({len(unset)} of {len(choices)} without: {unset[0]})"
        found[f"planned {name.replace('_', ' ')}"] = text
    tuning = sum(1 for r in planned if r.fine_tune.value)
    heads = sum(1 for r in planned if r.head_rounds.value)
    shown = []
    for name, rows in (("smallest", min(sizes)), ("largest", max(sizes))):
        recipe = recipes[rows]
        if recipe.head_rounds.value:
            what, why = "head rounds", f"{recipe.fine_tune.reason}; {recipe.head_rounds.reason}"
        else:
            what = "fine-tunes" if recipe.fine_tune.value else "statistics only"
            why = recipe.fine_tune.reason
        shown.append(f"{name} ({rows} rows) {what}: {why}")
    summary = (
        f"{tuning} of {len(sizes)} institutions fine-tune (LoRA) after the round-0 statistics, "
        f"{heads} run head rounds, {len(sizes) - tuning - heads} release the statistics only"
    )
    return {**found, "planner": "; ".join([summary, *shown])}


def check(args: argparse.Namespace) -> int:
    """What a run would refuse in its config, its resources and its base model, without starting one."""
    cfg = read_config(args.config or default_config(), args.set, "simulation")
    backend = backend_config(cfg)
    folder = model_dir(cfg.model.source)
    found = {
        "config": args.config or default_config(),
        "federation": describe(cfg),
        "model": cfg.model.source + (f" ({folder})" if folder else " (built from a config)"),
        "data": cfg.data.path or f"the packaged drug reviews ({cfg.data.demo_task})",
        "partition": f"{cfg.simulation.partition}, {spread(partition_sizes(cfg))}",
        "per client": f"{backend['client_resources']['num_cpus']:g} CPU",
        **planner_decisions(cfg),
    }
    for key, value in found.items():
        report.print(f"{key}: {value}", highlight=False, soft_wrap=True)
    return 0


def run(args: argparse.Namespace) -> int:
    sets = [*args.set, f"simulation.ray_address={args.ray_address}"] if args.ray_address else args.set
    cfg = read_config(args.config or default_config(), sets, "simulation")
    out = run_folder(args.out, cfg.name)
    seeded = f" [bold red]({SEEDED})[/]" if cfg.simulation.reproducible else ""
    with tracked(args.track, out, cfg.name) as tracker:
        tracker.params(to_dict(cfg, "simulation"))
        console.print(f"[bold]{cfg.name}[/]: {describe(cfg)} -> {out}{seeded}", soft_wrap=True)
        start = time.perf_counter()
        with round_progress(cfg.federation.rounds) as on_round:
            canaries = (args.white_box_canaries, args.black_box_canaries) if args.audit else None
            simulate(cfg, out, on_round=on_round, canaries=canaries)
        audits = audit_federation(cfg, out) if args.audit else []
        summed = audit_secure_sum(cfg, out) if args.audit else None
        heads = audit_head_rounds(cfg, out) if args.audit else []
        secure_heads = audit_secure_head_rounds(cfg, out) if args.audit else None
        seconds = time.perf_counter() - start
        title = f"{cfg.name}: federated simulation"
        audited = "\n" + audit_section(audits, summed, heads, secure_heads) if args.audit else ""
        history = write_all(out, title, extra=f"Wall time: {seconds:.1f} s.\n{audited}")
        if args.compare:
            summary = compare(cfg, out, federated_result(history))
            write_report(out, history, title, f"Wall time: {seconds:.1f} s.\n{audited}\n" + markdown(summary))
        track_history(tracker, history)
        tracker.metrics(audit_metrics(audits))
        tracker.artifacts(tracked_files(out))
    done = f"done in {seconds:.0f} s: {outcome(history)}; report at {out / 'report.md'}"
    report.print(done, soft_wrap=True)
    for audit in audits:
        require_no_leak(audit.result, out / RESULT_FILE)
    require_enough_noise(summed, out / SUM_RESULT_FILE)
    require_head_noise(heads, out / HEAD_RESULT_FILE, secure_heads)
    return 0


def outcome(history: list[dict]) -> str:
    """The run's result in a few words: the exported round and its test scores, or that nothing was
    scored (no held-out data)."""
    chosen = exported_round(history)
    exported = f"exported round {chosen['round']} ({chosen['chosen_by']})"
    final = exported_entry(history).get("central", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in headline(final).items() if k != "examples")
    ended = ended_after(history)
    why = f"; ended after round {ended['round']}: {ended['ended_early']}" if ended else ""
    return (f"{exported}, test {shown}" if shown else f"{exported}, no held-out evaluation") + why


def check_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora-simulate check", description=check.__doc__)
    add_config_arguments(ap, "simulation", f"the packaged {DEFAULT_CONFIG}")
    finish_help(ap, "simulation", "fedlora-simulate check --set simulation.num_clients=20")
    return ap


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedlora-simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(ap, "simulation", f"the packaged {DEFAULT_CONFIG}")
    add_out_argument(ap, "config, checkpoints, metrics, report; an existing one is resumed")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="also score a linear probe on the frozen base (the floor), and train each institution alone "
        "(DP) and centrally (DP and not) on the same data",
    )
    ap.add_argument(
        "--audit",
        action="store_true",
        help="every institution inserts canaries in its own trainer; the report gets measured epsilon "
        "lower bounds beside the claimed epsilon (exit non-zero if a white-box bound exceeds a claim)",
    )
    ap.add_argument(
        "--white-box-canaries", type=int, default=WHITE_BOX_CANARIES, help="--audit: gradient canaries"
    )
    ap.add_argument(
        "--black-box-canaries",
        type=int,
        default=BLACK_BOX_CANARIES,
        help="--audit: input canaries (they join each institution's training rows); 0 for none",
    )
    ap.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join this running Ray cluster (host:port, or auto: the one RAY_ADDRESS names) instead of "
        "starting Ray here (simulation.ray_address)",
    )
    add_track_argument(ap)
    finish_help(ap, "simulation", "fedlora-simulate --set federation.rounds=3 --out runs/first --track")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        args = check_parser().parse_args(argv[1:])
        return run_cli(lambda: check(args))
    args = parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
