"""Several virtual institutions on one GPU (`simulation.client_gpus` below 1), refused where one
institution's memory need does not fit its share.

Ray shares a GPU by bookkeeping only: a 0.25 share lets four actors onto a GPU whatever they use. The
need is measured once per model and training shape (one DP round of one institution on a GPU held
whole, the process's CUDA use at its end: context, weights, activations, Opacus' per-example
gradients) and cached in the user's cache folder, so later runs check without measuring.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError

GIB = 2**30
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedlora" / "gpu-need.json"


def check_share(fraction: float, gpu_bytes: int, need_bytes: int, where: str) -> None:
    """Refuse a share of ``gpu_bytes`` below ``need_bytes``, with the largest share that fits."""
    if fraction * gpu_bytes >= need_bytes:
        return
    fits = need_bytes / gpu_bytes
    most = f"at least {fits:.2f}" if fits <= 1 else "more than one GPU's memory: a smaller model or batch"
    raise ConfigError(
        f"simulation.client_gpus: {fraction:g} of {where} ({gpu_bytes / GIB:.1f} GiB) is "
        f"{fraction * gpu_bytes / GIB:.2f} GiB, but one institution of this model needs "
        f"{need_bytes / GIB:.2f} GiB (measured); use {most}"
    )


def need_key(cfg: FedloraConfig, gpu_name: str) -> str:
    """What the measured need depends on: the model, its training shape and the GPU."""
    m, t = cfg.model, cfg.training
    return json.dumps(
        [gpu_name, m.source, m.task, m.dtype, m.quantization, m.lora_r, m.target_modules,
         cfg.data.max_length,
         t.batch_size, t.physical_batch_size, t.gradient_checkpointing, cfg.privacy.enabled]
    )


def measure_need(cfg: FedloraConfig) -> tuple[str, int, int]:
    """Run on a GPU held whole: the GPU's name, its memory and one institution's need in bytes."""
    import torch

    from fedlora.client.ledger import PrivacyLedger
    from fedlora.client.trainer import LocalTrainer
    from fedlora.common.model import device_for
    from fedlora.common.workbench import prepare

    device = device_for(cfg.training.device)
    bench = prepare(cfg)
    with tempfile.TemporaryDirectory(prefix="fedlora-gpu-need-") as folder:
        path = Path(folder) / "ledger.json"
        ledger = PrivacyLedger.from_config(cfg.privacy, path) if cfg.privacy.enabled else None
        trainer = LocalTrainer(cfg, bench.built.model.to(device), bench.data.train, device, ledger)
        trainer.train_round(1, steps=1)
        trainer.close()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return torch.cuda.get_device_name(device), total, total - free


def check_gpu_share(cfg: FedloraConfig) -> None:
    """With a GPU share below 1: the need from the cache, or measured on a GPU node of the running Ray
    and cached; then `check_share`."""
    fraction = cfg.simulation.client_gpus
    if not 0 < fraction < 1:
        return
    import ray

    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    name, total = ray.get(ray.remote(num_gpus=1)(gpu_memory).remote())
    key = need_key(cfg, name)
    if key not in cache:
        _, total, cache[key] = ray.get(ray.remote(num_gpus=1)(measure_need).remote(cfg))
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(cache, indent=1))
    check_share(fraction, total, cache[key], name)


def gpu_memory() -> tuple[str, int]:
    """Run on a GPU node: the GPU's name and memory in bytes."""
    import torch

    return torch.cuda.get_device_name(), torch.cuda.mem_get_info()[1]
