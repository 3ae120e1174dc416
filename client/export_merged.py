"""A merged export for serving: the base with the adapter added into its weights, as a plain Hugging
Face folder that loads with the Auto classes where fedlora is not installed.

Causal LM: the merged model is the base architecture itself (a Llama-style folder for SmolLM2 and
tiny-llama), so any stack that serves the base serves it. Classification: no stock class pools,
normalises and scores as fedlora's PooledClassifier does, so the folder carries a standalone modeling
file (client/modeling_fedlora_pooled.py) named in ``auto_map``; it loads with
``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from fedlora.client import modeling_fedlora_pooled as pooled
from fedlora.client.predict import Trained, load_trained
from fedlora.common.cli_support import create_folder
from fedlora.common.data import eos_id, pad_id
from fedlora.common.errors import ConfigError
from fedlora.common.model import HEAD, PooledClassifier


def usable_target(out: Path) -> Path:
    """An absent or empty folder: an export never mixes its files with another model's."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--merged: {out} exists and is not an empty folder; choose a new folder")
    return create_folder(out, "--merged")


def export_merged(path: str | Path, out_dir: str | Path) -> Path:
    """Merge the run's (or adapter folder's) adapter into its base and save the result to ``out_dir``."""
    out = usable_target(Path(out_dir))
    trained = load_trained(path, device="cpu")
    with warnings.catch_warnings():  # a deprecation inside PEFT's merge, not the user's to act on
        warnings.simplefilter("ignore", FutureWarning)
        merged = trained.model.merge_and_unload()
    if isinstance(merged, PooledClassifier):
        _save_classifier(merged, trained, out)
    else:
        _save_causal_lm(merged, trained, out)
    trained.tokenizer.save_pretrained(out)
    return out


def _save_classifier(merged: PooledClassifier, trained: Trained, out: Path) -> None:
    cfg = trained.cfg.model
    config = pooled.FedloraPooledConfig(
        encoder_config=merged.encoder.config.to_dict(),
        pooling=cfg.pooling,
        normalize=cfg.normalize,
        id2label=dict(enumerate(trained.labels)),
        label2id={label: i for i, label in enumerate(trained.labels)},
        architectures=[pooled.FedloraPooledClassifier.__name__],
    )
    module = Path(pooled.__file__).stem
    config.auto_map = {
        "AutoConfig": f"{module}.{pooled.FedloraPooledConfig.__name__}",
        "AutoModelForSequenceClassification": f"{module}.{pooled.FedloraPooledClassifier.__name__}",
    }
    model = pooled.FedloraPooledClassifier(config)
    state = {
        k: v
        for k, v in merged.state_dict().items()
        if k.startswith(f"{HEAD}.") or (k.startswith("encoder.") and not k.startswith("encoder.pooler."))
    }
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    shutil.copyfile(pooled.__file__, out / Path(pooled.__file__).name)


def _save_causal_lm(merged, trained: Trained, out: Path) -> None:
    """The end, start and pad tokens training used, so generation stops where the responses did."""
    tok = trained.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    for config in (merged.config, merged.generation_config):
        config.eos_token_id = eos_id(tok)
        config.pad_token_id = pad_id(tok)
        config.bos_token_id = start
    merged.save_pretrained(out)
