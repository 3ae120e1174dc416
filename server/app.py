"""The Flower ServerApp: restore, run the rounds (each followed by central evaluation and a
checkpoint), export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlora.common import protocol as P
from fedlora.common.adapter import State, adapter_state, export_adapter, from_record, load_adapter_state
from fedlora.common.config import FederationConfig, FedloraConfig, load_config, to_dict
from fedlora.common.data import TokenizedDataset
from fedlora.common.errors import CheckpointError, ConfigError, FedloraError
from fedlora.common.held_out import VALIDATION, best_round, exported_round, split_held_out
from fedlora.common.model import BuiltModel, device_for
from fedlora.common.model_card import ended_after, write_model_card
from fedlora.common.scoring import evaluate
from fedlora.common.secure_aggregation.identity import Roster, load_roster
from fedlora.common.workbench import Workbench, prepare
from fedlora.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlora.server.head_step import SecureHead
from fedlora.server.history import summarise_round
from fedlora.server.secure_head import HeadSumCallback, secure_head_sum
from fedlora.server.secure_statistics import secure_statistics
from fedlora.server.strategy import LoraStrategy, build_strategy

log = logging.getLogger("fedlora.server")
RoundCallback = Callable[[dict], None]
SumCallback = Callable[[np.ndarray], None]


@dataclass(frozen=True)
class ServerSettings:
    cfg: FedloraConfig
    run_dir: Path
    num_clients: int
    on_secure_sum: SumCallback | None = None
    """Under secure aggregation, handed round 0's unmasked sum (what the coordinator learns anyway):
    the simulation's audit checks its noise against the claimed sigma C (simulations.secure_sum_audit)."""
    on_secure_head: HeadSumCallback | None = None
    """Under secure aggregation, handed each secure head round's number and unmasked sum (the same audit)."""


def server_workbench(cfg: FedloraConfig) -> tuple[Workbench, TokenizedDataset | None]:
    """The model, and a central evaluation set when the coordinator has data (or uses the demo)."""
    coordinator_without_data = cfg.data.path is None and cfg.data.labels is not None
    bench = prepare(cfg, with_data=not coordinator_without_data)
    data = bench.data
    return bench, (data.eval if data is not None and data.eval is not None else None)


def run_server(grid: Grid, settings: ServerSettings, on_round: RoundCallback | None = None) -> list[dict]:
    """Run (or resume) the federation: restore, run the remaining rounds, export; returns the
    per-round history."""
    cfg, run_dir = settings.cfg, settings.run_dir
    bench, eval_set = server_workbench(cfg)
    strategy = build_strategy(cfg, bench.built.fingerprint, settings.num_clients)
    start = restore(run_dir / "checkpoint", bench.built, strategy)
    after_round = AfterRound(
        checkpoint=run_dir / "checkpoint",
        fingerprint=bench.built.fingerprint,
        rounds=cfg.federation.rounds,
        strategy=strategy,
        score=central_evaluation(cfg, bench.built.model, eval_set),
        history=start.history,
        best=start.best,
        on_round=on_round,
    )
    if not start.history and cfg.federation.statistics_first and cfg.model.task == "classification":
        start = statistics_first(grid, strategy, start, after_round, cfg, settings.on_secure_sum)
    fed = cfg.federation
    roster = load_roster(cfg.security.identity_roster) if cfg.security.identity_roster else None
    secure = SecureHeads(fed, roster, settings.on_secure_head) if fed.secure_aggregation else None
    final = run_rounds(grid, strategy, start, after_round, cfg.federation.round_timeout, secure)
    export(run_dir, cfg, bench, final if after_round.best is None else after_round.best, after_round.history)
    require_budget_for_every_round(after_round.history, cfg.federation.rounds)
    return after_round.history


def require_budget_for_every_round(history: list[dict], rounds: int) -> None:
    """A round every node refused because its privacy budget was spent trained nothing: the
    federation ran fewer rounds than planned, an error (after the export, so what was trained is
    kept) rather than a completed run."""
    refused = [
        entry["round"]
        for entry in history
        if entry.get("round")
        and not entry.get("clients")
        and entry.get("dropped")
        and all(d.get("reason") == P.FAILURES[P.BUDGET_EXHAUSTED] for d in entry["dropped"])
    ]
    if refused:
        raise FedloraError(
            f"round{'s' if len(refused) > 1 else ''} {', '.join(map(str, refused))} of {rounds} trained "
            "nothing: every node answered "
            "'budget exhausted' (its privacy budget is spent); the exported adapter is that of the "
            "rounds before, fewer than planned"
        )


@dataclass(frozen=True)
class Start:
    """Where the federation stands: rounds done, the global adapter, the history so far, and the
    adapter of the round best on validation (None without validation scores)."""

    done: int
    arrays: ArrayRecord
    history: list[dict]
    best: ArrayRecord | None = None


def restore(ckpt_dir: Path, built: BuiltModel, strategy: LoraStrategy) -> Start:
    """The last checkpointed round, its adapter and the strategy's state loaded, or round 0 with
    the model's fresh adapter; CheckpointError for a checkpoint of another model or strategy."""
    initial = adapter_state(built.model)
    ckpt = load_checkpoint(ckpt_dir)
    if ckpt is None:
        return Start(done=0, arrays=as_record(initial), history=[])
    if ckpt.fingerprint != built.fingerprint:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint is for fingerprint {ckpt.fingerprint}, this config gives "
            f"{built.fingerprint}: another base model or layout"
        )
    if ckpt.adapter.keys() != initial.keys():
        raise CheckpointError(f"{ckpt_dir}: the checkpoint's adapter tensors are not this model's")
    try:
        strategy.load_state_tensors(ckpt.strategy)
    except CheckpointError as err:
        raise CheckpointError(f"{ckpt_dir}: {err}") from None
    log.info("resuming after round %d from %s", ckpt.round, ckpt_dir)
    if best_round(ckpt.history) is not None and (ckpt.best is None or ckpt.best.keys() != initial.keys()):
        raise CheckpointError(f"{ckpt_dir}: the best round's adapter is missing or not this model's")
    return Start(
        done=ckpt.round,
        arrays=as_record({k: ckpt.adapter[k] for k in initial}),
        history=ckpt.history,
        best=as_record({k: ckpt.best[k] for k in initial}) if ckpt.best is not None else None,
    )


def as_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in state.items()})


Scorer = Callable[[ArrayRecord], dict[str, dict[str, float]]]
"""A global adapter's scores by history key: ``central`` (the final test) and ``validation``."""


def central_evaluation(
    cfg: FedloraConfig, model: torch.nn.Module, eval_set: TokenizedDataset | None
) -> Scorer:
    """The coordinator's held-out scores of a global adapter, on the final test and on the validation
    part (federation.validation_share) that chooses the exported round; none without central data."""
    if eval_set is None or not cfg.federation.central_eval:
        return lambda _arrays: {"central": {}}
    validation, test = split_held_out(eval_set, cfg.federation.validation_share)
    parts = {"central": test, VALIDATION: validation}
    device = device_for(cfg.training.device)

    def score(arrays: ArrayRecord) -> dict[str, dict[str, float]]:
        load_adapter_state(model, from_record(arrays))
        return {
            key: evaluate(model.to(device), cfg.model.task, part, device, cfg.training.eval_batch_size)
            for key, part in parts.items()
            if part is not None
        }

    return score


@dataclass
class AfterRound:
    """What follows every round, in order: central scores, the history entry, the best round so far
    on validation, the checkpoint (the complete round, atomically), then the caller's callback."""

    checkpoint: Path
    fingerprint: str
    rounds: int
    strategy: LoraStrategy
    score: Scorer
    history: list[dict]
    best: ArrayRecord | None = None
    """The adapter of the round best on validation (``held_out.best_round``), round 0 included."""
    on_round: RoundCallback | None = None

    def before_first(self, arrays: ArrayRecord) -> None:
        """Round 0 of a new federation: the scores of the adapter nobody has trained yet."""
        if not self.history:
            self.history.append({"round": 0, **self.score(arrays), "time": time.time()})
            self._keep_if_best(arrays)

    def _keep_if_best(self, arrays: ArrayRecord) -> None:
        if best_round(self.history) is self.history[-1]:
            self.best = arrays

    def __call__(self, server_round: int, arrays: ArrayRecord, federated: MetricRecord | None = None) -> None:
        logged = self.strategy.rounds[-1] if self.strategy.rounds else None
        entry = (
            asdict(logged) if logged is not None and logged.round == server_round else {"round": server_round}
        )
        entry.update({**self.score(arrays), "time": time.time()})
        if federated is not None:
            entry["federated"] = dict(federated)
        self.history.append(entry)
        self._keep_if_best(arrays)
        save_checkpoint(
            self.checkpoint,
            Checkpoint(
                round=server_round,
                fingerprint=self.fingerprint,
                adapter=arrays.to_torch_state_dict(),  # as the next round starts from it (FedAdam: float64)
                strategy=self.strategy.state_tensors(),
                history=self.history,
                best=self.best.to_torch_state_dict() if self.best is not None else None,
            ),
        )
        log.info("%s", summarise_round(entry).line(self.rounds))
        if self.on_round is not None:
            self.on_round(entry)


def statistics_first(
    grid: Grid,
    strategy: LoraStrategy,
    start: Start,
    after_round: AfterRound,
    cfg: FedloraConfig,
    on_secure_sum: SumCallback | None = None,
) -> Start:
    """Round 0 of a new federation: the shared head from the institutions' summed class statistics
    (server.statistics_head), then the after-round step, so that round 0 is scored and checkpointed and
    a resumed federation never asks (and charges) the institutions again. Under secure aggregation the
    coordinator sees only the sum (server.secure_statistics)."""
    if cfg.federation.secure_aggregation:
        built = secure_statistics(grid, strategy, start.arrays, cfg, on_secure_sum)
    else:
        messages = strategy.configure_statistics(start.arrays, grid)
        replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
        built = strategy.aggregate_statistics(replies, cfg.model.head_scale)
    arrays = built if built is not None else start.arrays
    after_round(0, arrays)
    return Start(done=0, arrays=arrays, history=after_round.history)


@dataclass(frozen=True)
class SecureHeads:
    """Under secure aggregation, a round's head gradients go through a secure sum (server.secure_head)."""

    fed: FederationConfig
    roster: Roster | None = None
    """The federation's identities where the coordinator holds them (security.identity_roster)."""
    on_sum: HeadSumCallback | None = None

    def __call__(
        self,
        grid: Grid,
        strategy: LoraStrategy,
        arrays: ArrayRecord,
        replies: list[Message],
        server_round: int,
    ) -> SecureHead | None:
        """The secure sum among the nodes whose reply joined it; None where none did."""
        joined = strategy.joined(replies, server_round)
        if not joined:
            return None
        return secure_head_sum(
            grid, strategy, arrays, self.fed, self.roster, joined, server_round, self.on_sum
        )


def run_rounds(
    grid: Grid,
    strategy: LoraStrategy,
    start: Start,
    after_round: AfterRound,
    timeout: float,
    secure: SecureHeads | None = None,
) -> ArrayRecord:
    """The remaining rounds, numbered as the federation counts them: train on the nodes (under secure
    aggregation, then the secure head sum of those that joined it) and aggregate, evaluate on the
    nodes, then the after-round step. Returns the last global adapter."""
    arrays = start.arrays
    if start.done < after_round.rounds:
        strategy.summary()
        after_round.before_first(arrays)
    for server_round in range(start.done + 1, after_round.rounds + 1):
        if ended_early(after_round.history, after_round.rounds):
            break
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        secured = secure(grid, strategy, arrays, replies, server_round) if secure is not None else None
        aggregated, _ = strategy.aggregate_train(server_round, replies, secured)
        arrays = aggregated if aggregated is not None else arrays
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        federated = (
            strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
            if messages
            else None
        )
        end_if_nothing_trains(strategy, grid, server_round, after_round.rounds)
        after_round(server_round, arrays, federated)
    return arrays


NOTHING_TRAINS = "every institution planned no training after round 0 (statistics only)"


def end_if_nothing_trains(strategy: LoraStrategy, grid: Grid, server_round: int, rounds: int) -> None:
    """Mark the round's log as the federation's last (before the after-round step checkpoints it)
    when every connected node answered it with an empty update whose plan trains in no later round
    (P.STATISTICS_ONLY: the whole budget went to round 0's statistics): the rounds left could not
    change the model. Not when any node trained, sent a head gradient, failed or was refused (a budget
    refusal among them), gave no reason, or was not asked or did not answer: it may still train."""
    record = strategy.rounds[-1] if strategy.rounds else None
    if record is None or record.round != server_round or server_round >= rounds:
        return
    said = set(record.no_training)
    if record.clients or record.dropped or record.head_gradients or record.statistics_only != len(said):
        return
    if said and set(grid.get_node_ids()) <= said:
        record.ended_early = NOTHING_TRAINS


def ended_early(history: list[dict], rounds: int) -> bool:
    """Whether the history records that the federation ended early by design (end_if_nothing_trains),
    said in one log line. A resumed run then runs nothing more, whatever federation.rounds says now:
    every institution's whole budget went to round 0, so no later round could train."""
    last = ended_after(history)
    if last is None:
        return False
    done = int(last["round"])
    log.info("round %d: %s; stopping after round %d of %d", done, last["ended_early"], done, rounds)
    return True


def export(
    run_dir: Path, cfg: FedloraConfig, bench: Workbench, final: ArrayRecord, history: list[dict]
) -> None:
    """The exported adapter (``final``: the round best on validation, else the last) as a standard
    PEFT folder, its round named in the adapter's record, and the history beside it."""
    model = bench.built.model
    load_adapter_state(model, from_record(final))
    chosen = exported_round(history)
    log.info("exporting the global adapter of round %d (%s)", chosen["round"], chosen["chosen_by"])
    export_adapter(
        model,
        run_dir / "adapter",
        {
            "fingerprint": bench.built.fingerprint,
            "labels": list(bench.labels),
            "rounds": cfg.federation.rounds,
            "exported_round": chosen,
            "config": to_dict(cfg),
        },
    )
    (run_dir / "history.json").write_text(json.dumps(history, indent=1, default=float))
    write_model_card(run_dir)


def settings_from_run_config(context: Context) -> ServerSettings:
    """`flwr run` and deployment: the coordinator's YAML and run folder come in the run config."""
    path = context.run_config.get(P.NODE_CONFIG)
    if not path:
        raise ConfigError("run config: missing 'config' (the coordinator's YAML path)")
    cfg = load_config(str(path), persona="coordinator")
    run_dir = Path(str(context.run_config.get(P.RUN_DIR) or Path(str(path)).parent / "run"))
    return ServerSettings(cfg=cfg, run_dir=run_dir, num_clients=cfg.federation.min_clients)


def build_server_app(
    settings: Callable[[Context], ServerSettings], on_round: RoundCallback | None = None
) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, settings(context), on_round)

    return server


app = build_server_app(settings_from_run_config)
