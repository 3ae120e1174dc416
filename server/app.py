"""The Flower ServerApp: restore, run the rounds, evaluate centrally, checkpoint, export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state, export_adapter, from_record, load_adapter_state
from fedlora.common.config import FedloraConfig, load_config, to_dict
from fedlora.common.data import TokenizedDataset
from fedlora.common.errors import CheckpointError, ConfigError
from fedlora.common.model import device_for
from fedlora.common.model_card import write_model_card
from fedlora.common.scoring import evaluate
from fedlora.common.workbench import Workbench, prepare
from fedlora.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlora.server.strategy import build_strategy

log = logging.getLogger("fedlora.server")
RoundCallback = Callable[[dict], None]


@dataclass(frozen=True)
class ServerSettings:
    cfg: FedloraConfig
    run_dir: Path
    num_clients: int


def server_workbench(cfg: FedloraConfig) -> tuple[Workbench, TokenizedDataset | None]:
    """The model, and a central evaluation set when the coordinator has data (or uses the demo)."""
    coordinator_without_data = cfg.data.path is None and cfg.data.labels is not None
    bench = prepare(cfg, with_data=not coordinator_without_data)
    data = bench.data
    return bench, (data.eval if data is not None and data.eval is not None else None)


def run_server(grid: Grid, settings: ServerSettings, on_round: RoundCallback | None = None) -> list[dict]:
    """Run (or resume) the federation; returns the per-round history."""
    cfg, run_dir = settings.cfg, settings.run_dir
    bench, eval_set = server_workbench(cfg)
    eval_set = eval_set if cfg.federation.central_eval else None
    model, fingerprint = bench.built.model, bench.built.fingerprint
    device = device_for(cfg.training.device)
    ckpt_dir = run_dir / "checkpoint"
    ckpt = load_checkpoint(ckpt_dir)
    if ckpt is not None and ckpt.fingerprint != fingerprint:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint is for fingerprint {ckpt.fingerprint}, this config gives "
            f"{fingerprint}: another base model or layout"
        )
    done = ckpt.round if ckpt is not None else 0
    history = ckpt.history if ckpt is not None else []
    initial = adapter_state(model)
    if ckpt is not None:
        if ckpt.adapter.keys() != initial.keys():
            raise CheckpointError(f"{ckpt_dir}: the checkpoint's adapter tensors are not this model's")
        initial = {k: ckpt.adapter[k] for k in initial}  # the model's order: FedAvgM pairs by position
    if done:
        log.info("resuming after round %d from %s", done, ckpt_dir)
    strategy = build_strategy(cfg, fingerprint, settings.num_clients, round_offset=done)
    if ckpt is not None:
        strategy.load_state_tensors(ckpt.strategy)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower after every round: evaluate, then checkpoint the complete round."""
        absolute = server_round + done
        load_adapter_state(model, from_record(arrays))
        scores = {}
        if eval_set is not None:
            scores = evaluate(
                model.to(device), cfg.model.task, eval_set, device, cfg.training.eval_batch_size
            )
        if server_round == 0:
            if not history:
                history.append({"round": 0, "central": scores, "time": time.time()})
            return MetricRecord(scores) if scores else None
        entry = asdict(strategy.rounds[-1]) if strategy.rounds else {"round": absolute}
        entry.update({"central": scores, "time": time.time()})
        history.append(entry)
        save_checkpoint(
            ckpt_dir,
            Checkpoint(
                round=absolute,
                fingerprint=fingerprint,
                adapter=arrays.to_torch_state_dict(),  # as Flower goes on with it (FedAdam: float64)
                strategy=strategy.state_tensors(),
                history=history,
            ),
        )
        if on_round is not None:
            on_round(entry)
        return MetricRecord(scores) if scores else None

    remaining = cfg.federation.rounds - done
    final = ArrayRecord({k: v.contiguous() for k, v in initial.items()})
    if remaining > 0:
        result = strategy.start(
            grid=grid,
            initial_arrays=final,
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=central,
        )
        final = result.arrays if result.arrays is not None else final
    load_adapter_state(model, from_record(final))
    export_adapter(
        model,
        run_dir / "adapter",
        {
            "fingerprint": fingerprint,
            "labels": list(bench.labels),
            "rounds": cfg.federation.rounds,
            "config": to_dict(cfg),
        },
    )
    (run_dir / "history.json").write_text(json.dumps(history, indent=1, default=float))
    write_model_card(run_dir)
    return history


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
