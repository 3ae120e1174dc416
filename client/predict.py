"""Use what a run trained: load an exported adapter onto its base, classify texts or answer prompts.

The adapter folder records the config and fingerprint it was trained with (common.adapter), so the
base is rebuilt exactly as training built it and refused if it is not the same model. Inputs are
tokenized as training tokenized them (common.data): the same columns, truncation and special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.common.adapter import METADATA_FILE, PEFT_CONFIG_FILE, load_adapter_folder
from fedlora.common.config import FedloraConfig, config_from_dict
from fedlora.common.data import FORMATS, eos_id, pad_id, text_column_values, token_limit
from fedlora.common.errors import AdapterError, ConfigError, DataError
from fedlora.common.model import build_base_model, device_for, fingerprint, load_tokenizer, target_modules

ADAPTER_DIR = "adapter"
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Trained:
    """A ready model: the base with the adapter loaded, in eval mode on ``device``."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]
    cfg: FedloraConfig
    adapter_dir: Path
    device: torch.device

    @property
    def task(self) -> str:
        return self.cfg.model.task


@dataclass(frozen=True)
class Decoding:
    """How responses are generated; temperature 0 is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: {self.max_new_tokens}; expected at least 1")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature: {self.temperature}; expected 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: {self.top_p}; expected above 0 and at most 1")


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder of a run folder, a train-local output folder, or the adapter folder itself."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: not a folder (expected a fedlora run folder or adapter folder)")
    for candidate in (root, root / ADAPTER_DIR):
        if (candidate / PEFT_CONFIG_FILE).is_file() and (candidate / METADATA_FILE).is_file():
            return candidate
    raise AdapterError(
        f"{root}: not a fedlora run or adapter folder (expected {PEFT_CONFIG_FILE} and {METADATA_FILE} "
        f"in it or in its {ADAPTER_DIR}/ folder)"
    )


def read_metadata(adapter_dir: Path) -> dict:
    path = adapter_dir / METADATA_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{path}: unreadable fedlora metadata ({type(err).__name__}: {err})") from None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise AdapterError(f"{path}: no 'config' with a 'model' section (not written by fedlora?)")
    if "fingerprint" not in data:
        raise AdapterError(f"{path}: no 'fingerprint' (not written by fedlora?)")
    return data


def recorded(path: str | Path) -> tuple[Path, dict, FedloraConfig]:
    """The adapter folder, its metadata and the model and data settings it was trained with."""
    adapter_dir = adapter_folder(path)
    meta = read_metadata(adapter_dir)
    config = meta["config"]
    sections = {"model": config["model"], "data": config.get("data", {})}
    return adapter_dir, meta, config_from_dict(sections, source=str(adapter_dir / METADATA_FILE))


def load_trained(path: str | Path, device: str = "auto") -> Trained:
    """The base rebuilt from the adapter's own record, the adapter on it, its tokenizer and labels."""
    adapter_dir, meta, cfg = recorded(path)
    labels = tuple(meta.get("labels") or ())
    tokenizer = load_tokenizer(cfg.model)
    base = build_base_model(cfg.model, labels, len(tokenizer))
    found = fingerprint(cfg.model, base, labels, target_modules(cfg.model, base))
    if found != meta["fingerprint"]:
        raise AdapterError(
            f"{adapter_dir}: trained on a base with fingerprint {meta['fingerprint']}, but "
            f"model.source {cfg.model.source!r} now gives {found} (another model, labels or layout)"
        )
    target = device_for(device)
    model = load_adapter_folder(base, adapter_dir).to(target)
    return Trained(model, tokenizer, labels, cfg, adapter_dir, target)


def classify(
    trained: Trained, texts: Sequence[str], batch_size: int = 32, on_batch: Progress | None = None
) -> torch.Tensor:
    """Each text's label probabilities, ``[len(texts), len(labels)]``."""
    tok = trained.tokenizer
    limit = token_limit(trained.cfg.data, tok)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        ids = tok(chunk, truncation=True, max_length=limit)["input_ids"]
        batch = _right_padded(ids, pad_id(tok))
        with torch.no_grad():
            logits = trained.model(**{k: v.to(trained.device) for k, v in batch.items()})
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(out)


def _right_padded(rows: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def prompt_ids(trained: Trained, prompts: Sequence[str]) -> list[list[int]]:
    """[bos] prompt, as training saw it before the response; a long prompt loses its start."""
    tok = trained.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    head = [int(start)] if start is not None else []
    room = max(1, token_limit(trained.cfg.data, tok) - len(head))
    return [head + ids[-room:] for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]


def generate(
    trained: Trained,
    prompts: Sequence[str],
    decoding: Decoding = Decoding(),
    batch_size: int = 8,
    on_batch: Progress | None = None,
) -> list[str]:
    """The model's response to each prompt (left-padded batches, stopping at the end token)."""
    tok = trained.tokenizer
    pad, eos = pad_id(tok), eos_id(tok)
    rows = prompt_ids(trained, prompts)
    torch.manual_seed(decoding.seed)
    sampling = {"do_sample": False}
    if decoding.temperature > 0:
        sampling = {"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p}
    responses: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], dtype=torch.int64)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], dtype=torch.int64)
        with torch.no_grad():
            out = trained.model.generate(
                input_ids=ids.to(trained.device),
                attention_mask=mask.to(trained.device),
                max_new_tokens=decoding.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                **sampling,
            )
        responses += tok.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
        if on_batch is not None:
            on_batch(len(chunk))
    return responses


def inputs(frame: pd.DataFrame, cfg: FedloraConfig, source: str, column: str | None = None) -> list[str]:
    """The texts (or prompts) of the rows: ``column``, else the column training read them from."""
    if column is None:
        column = cfg.data.text_column if cfg.model.task == "classification" else cfg.data.prompt_column
    return text_column_values(frame, column, source)


def predict_frame(
    trained: Trained,
    frame: pd.DataFrame,
    source: str,
    column: str | None = None,
    batch_size: int = 32,
    decoding: Decoding = Decoding(),
    on_batch: Progress | None = None,
) -> pd.DataFrame:
    """The input rows with their predictions: label, its probability and every label's; or the
    generated response."""
    texts = inputs(frame, trained.cfg, source, column)
    out = frame.copy()
    if trained.task == "classification":
        probs = classify(trained, texts, batch_size, on_batch)
        best = probs.argmax(dim=-1)
        out["prediction"] = [trained.labels[int(i)] for i in best]
        out["probability"] = probs.gather(1, best[:, None])[:, 0].numpy()
        for i, label in enumerate(trained.labels):
            out[f"probability_{label}"] = probs[:, i].numpy()
    else:
        out["generated"] = generate(trained, texts, decoding, batch_size, on_batch)
    return out


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"--out: {path}: unknown format '{path.suffix}' (expected .csv, .jsonl or .parquet)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)


def prediction_lines(trained: Trained, frame: pd.DataFrame) -> list[str]:
    """One JSON object per row: what ``predict`` prints when no --out is given."""
    lines = []
    for _, row in frame.iterrows():
        if trained.task == "classification":
            record = {
                "prediction": row["prediction"],
                "probability": float(row["probability"]),
                "probabilities": {label: float(row[f"probability_{label}"]) for label in trained.labels},
            }
        else:
            record = {"generated": row["generated"]}
        lines.append(json.dumps(record, ensure_ascii=False))
    return lines
