"""A model trained for real on a few rows and exported as the production code exports it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import export_adapter
from fedlora.common.config import config_from_dict, to_dict
from fedlora.common.workbench import prepare

WORDS = ["fever and cough", "itchy red rash", "knee pain when walking", "tired all day, poor sleep"]
LABELS = ["flu", "skin", "joint", "sleep"]


def table(root: Path) -> Path:
    rows = [
        {
            "text": f"{WORDS[i % 4]} since day {i}",
            "label": LABELS[i % 4],
            "prompt": f"Which department? {WORDS[i % 4]}",
            "response": f" {LABELS[i % 4]}",
        }
        for i in range(24)
    ]
    path = root / "rows.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def train_and_export(root: Path, task: str):
    """(config, workbench, the trained model in memory, the folder holding adapter/, the rows' CSV);
    tiny-bert classifies, tiny-llama generates, 4 steps at a high learning rate move the adapter."""
    root.mkdir(parents=True, exist_ok=True)
    data = table(root)
    cfg = config_from_dict(
        {
            "model": {"source": "tiny-bert" if task == "classification" else "tiny-llama", "task": task},
            "data": {"path": str(data), "max_length": 24},
            "training": {"device": "cpu", "local_steps": 4, "batch_size": 8, "learning_rate": 0.05},
            "privacy": {"enabled": False},
        },
        source="<test>",
    )
    bench = prepare(cfg)
    trainer = LocalTrainer(cfg, bench.built.model, bench.data.train, torch.device("cpu"), None)
    trainer.train_round(1)
    model = trainer.model
    model.eval()
    metadata = {"fingerprint": bench.built.fingerprint, "labels": list(bench.labels), "config": to_dict(cfg)}
    export_adapter(model, root / "out" / "adapter", metadata)
    return cfg, bench, model, root / "out", data
