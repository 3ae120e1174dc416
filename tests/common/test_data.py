"""Reading, checking and tokenizing an institution's table; demo data; partitioners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.common.config import DataConfig, FedloraConfig, ModelConfig, SimulationConfig
from fedlora.common.data import (
    IGNORE_INDEX,
    DataBundle,
    TokenizedDataset,
    build_data,
    demo_tables,
    read_table,
    resolve_labels,
    tokenize_causal_lm,
    tokenize_classification,
)
from fedlora.common.errors import DataError
from fedlora.simulations.partitions import column_partition, dirichlet_partition, iid_partition, partition

FRAME = pd.DataFrame(
    {
        "text": [
            "Chest pain after climbing stairs",
            "Persistent dry cough for two weeks",
            "Rash on both arms",
            "Shortness of breath at night, worse when lying down",
            "Itchy red patches",
            "Coughing up phlegm",
        ],
        "label": ["cardio", "resp", "derm", "cardio", "derm", "resp"],
        "hospital": ["b", "a", "a", "c", "b", "a"],
    }
)


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def config(task: str = "classification", **data: object) -> FedloraConfig:
    return FedloraConfig(model=ModelConfig(task=task), data=DataConfig(**data))


def assert_equal(a: TokenizedDataset, b: TokenizedDataset) -> None:
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_csv_jsonl_parquet_give_the_same_dataset(tmp_path, tokenizer, task):
    frame = FRAME.assign(prompt=FRAME["text"], response=FRAME["label"])
    bundles = [
        build_data(config(task, path=str(write(frame, tmp_path / f"t.{ext}"))), tokenizer)
        for ext in ("csv", "jsonl", "parquet")
    ]
    first = bundles[0]
    assert len(first.train) == len(FRAME)
    for other in bundles[1:]:
        assert_equal(first.train, other.train)
        assert other.labels == first.labels
    if task == "classification":
        assert first.labels == ("cardio", "derm", "resp")
        assert first.train_label_ids.tolist() == [0, 2, 1, 0, 1, 2]
    else:
        assert first.labels == () and first.train_label_ids is None


def test_format_setting_overrides_the_suffix(tmp_path, tokenizer):
    path = tmp_path / "export.dat"
    FRAME.to_json(path, orient="records", lines=True)
    assert read_table(path, "jsonl")["label"].tolist() == FRAME["label"].tolist()


def test_eval_file_is_tokenized_with_the_train_label_set(tmp_path, tokenizer):
    train = write(FRAME, tmp_path / "train.csv")
    held_out = write(FRAME.iloc[[2, 4]], tmp_path / "eval.csv")
    bundle = build_data(config(path=str(train), eval_path=str(held_out)), tokenizer)
    assert bundle.eval.labels.tolist() == [1, 1]  # derm in (cardio, derm, resp)


def test_integer_labels_are_strings_in_numeric_order(tmp_path, tokenizer):
    frame = pd.DataFrame({"text": list("abcde"), "label": [10, 2, 0, 2, 1]})
    cfg = config(path=str(write(frame, tmp_path / "ints.csv")))
    bundle = build_data(cfg, tokenizer)
    assert bundle.labels == ("0", "1", "2", "10")
    assert bundle.train.labels.tolist() == [3, 2, 0, 2, 1]
    given = config(path=cfg.data.path, labels=("10", "2", "1", "0"))
    assert build_data(given, tokenizer).train.labels.tolist() == [0, 1, 3, 1, 2]


def test_a_single_inferred_label_asks_for_the_label_set():
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["flu", "flu"]})
    with pytest.raises(DataError, match=r"^site\.csv: .*only the label 'flu'.*data\.labels"):
        resolve_labels(DataConfig(), frame, "site.csv")


def test_demo_triage_keeps_the_eight_most_frequent_train_conditions(tokenizer):
    train, test = demo_tables(DataConfig())
    assert (len(train), len(test)) == (266, 169)
    assert set(train["label"]) == set(test["label"])
    assert set(train["label"]) == {
        "Birth Control", "Depression", "Pain", "Acne",
        "Bipolar Disorde", "Insomnia", "Anxiety", "Obesity",
    }  # fmt: skip
    assert {"text", "label", "condition", "rating", "drug"} <= set(train.columns)
    text = " ".join(train["text"])
    assert "&#039;" not in text and "&quot;" not in text and "&amp;" not in text
    assert "didn't" in text
    assert not train["text"].str.startswith('"').any()
    assert not train["text"].str.endswith(('"', " ")).any()
    bundle = build_data(config(), tokenizer)
    assert (len(bundle.train), len(bundle.eval), len(bundle.labels)) == (266, 169, 8)
    assert bundle.train.input_ids.shape[1] == 128


def test_demo_top_conditions_ranks_by_train_frequency():
    train, test = demo_tables(DataConfig(demo_top_conditions=3))
    assert sorted(train["label"].unique()) == ["Birth Control", "Depression", "Pain"]
    assert set(test["label"]) <= set(train["label"])
    train, _ = demo_tables(DataConfig(demo_top_conditions=7))
    labels = set(train["label"])
    assert "Anxiety" in labels and "Obesity" not in labels  # both 17 train rows: ties go by name


def test_demo_rating_keeps_every_review(tokenizer):
    train, test = demo_tables(DataConfig(demo_task="rating"))
    assert (len(train), len(test)) == (600, 379)
    bundle = build_data(config(demo_task="rating"), tokenizer)
    assert bundle.labels == ("negative", "neutral", "positive")
    assert (len(bundle.train), len(bundle.eval)) == (600, 379)


def test_demo_serves_causal_lm_with_loss_on_the_answer(tokenizer):
    bundle = build_data(config("causal-lm", demo_task="rating"), tokenizer)
    row = bundle.train.labels[0]
    answer = tokenizer.decode(row[row != IGNORE_INDEX])
    assert answer.split()[0] in {"positive", "neutral", "negative"}


def bad_label(tmp_path: Path) -> FedloraConfig:
    frame = FRAME.copy()
    frame.loc[4, "label"] = "flu"
    path = write(frame, tmp_path / "notes.jsonl")
    return config(path=str(path), labels=("cardio", "derm", "resp"))


def nan_text(tmp_path: Path) -> FedloraConfig:
    frame = FRAME.copy()
    frame.loc[2, "text"] = None
    return config(path=str(write(frame, tmp_path / "holes.parquet")))


def missing_column(tmp_path: Path) -> FedloraConfig:
    path = write(FRAME.rename(columns={"text": "note"}), tmp_path / "hospital.csv")
    return config(path=str(path))


def malformed_jsonl(tmp_path: Path) -> FedloraConfig:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    return config(path=str(path))


def header_only(tmp_path: Path) -> FedloraConfig:
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    return config(path=str(path))


def zero_bytes(tmp_path: Path) -> FedloraConfig:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n")
    return config(path=str(path))


def unknown_suffix(tmp_path: Path) -> FedloraConfig:
    path = tmp_path / "x.txt"
    path.write_text("text,label\na,b\n")
    return config(path=str(path))


def not_parquet(tmp_path: Path) -> FedloraConfig:
    path = tmp_path / "x.parquet"
    path.write_text("text,label\na,b\n")
    return config(path=str(path))


def missing_file(tmp_path: Path) -> FedloraConfig:
    return config(path=str(tmp_path / "absent.csv"))


def bad_eval_label(tmp_path: Path) -> FedloraConfig:
    held_out = FRAME.assign(label=["cardio", "resp", "derm", "cardio", "derm", "neuro"])
    return config(
        path=str(write(FRAME, tmp_path / "train.csv")),
        eval_path=str(write(held_out, tmp_path / "test.csv")),
    )


@pytest.mark.parametrize(
    ("make", "file", "culprits"),
    [
        (bad_label, "notes.jsonl", ["label 'flu' at row 5", "expected one of: cardio, derm, resp"]),
        (nan_text, "holes.parquet", ["column 'text'", "row 3"]),
        (missing_column, "hospital.csv", ["missing column 'text'", "columns: note, label"]),
        (malformed_jsonl, "broken.jsonl", ["malformed JSON at line 2"]),
        (header_only, "empty.csv", ["no rows"]),
        (zero_bytes, "blank.jsonl", ["no rows"]),
        (unknown_suffix, "x.txt", ["unknown format '.txt'", "data.format"]),
        (not_parquet, "x.parquet", ["cannot read ("]),
        (missing_file, "absent.csv", ["not found"]),
        (bad_eval_label, "test.csv", ["label 'neuro' at row 6"]),
    ],
)
def test_bad_input_is_one_line_naming_file_and_culprit(tmp_path, tokenizer, make, file, culprits):
    with pytest.raises(DataError) as caught:
        build_data(make(tmp_path), tokenizer)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / file) + ": ")
    for culprit in culprits:
        assert culprit in message


def test_causal_lm_labels_cover_exactly_the_response(tokenizer):
    frame = pd.DataFrame(
        {
            "prompt": ["Summarise: the patient reports a mild headache.", "Translate: hello"],
            "response": ["mild headache", "bonjour, comment allez vous aujourd'hui"],
        }
    )
    data = DataConfig(max_length=64)
    ds = tokenize_causal_lm(frame, data, tokenizer, "qa.csv")
    eos = tokenizer.sep_token_id  # BERT has no eos: the sep token ends the response
    for i, (prompt, response) in enumerate(zip(frame["prompt"], frame["response"], strict=True)):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = [*tokenizer(response, add_special_tokens=False)["input_ids"], eos]
        n = 1 + len(p) + len(r)
        ids, mask, labels = ds[i]
        assert ids[:n].tolist() == [tokenizer.cls_token_id, *p, *r]
        assert mask.tolist() == [1] * n + [0] * (ds.input_ids.shape[1] - n)
        assert (ids[n:] == tokenizer.pad_token_id).all()
        assert labels[n - len(r) : n].tolist() == r
        is_prompt_or_pad = torch.ones_like(labels, dtype=torch.bool)
        is_prompt_or_pad[n - len(r) : n] = False
        assert (labels[is_prompt_or_pad] == IGNORE_INDEX).all()
        assert (labels[~is_prompt_or_pad] == ids[~is_prompt_or_pad]).all()
    assert ds.input_ids.shape[1] == max(ds.attention_mask.sum(dim=1))
    assert ds.input_ids.dtype == ds.attention_mask.dtype == ds.labels.dtype == torch.int64


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(40)) + " final"
    frame = pd.DataFrame({"prompt": [prompt, "short"], "response": ["yes it is", "x " * 60]})
    ds = tokenize_causal_lm(frame, DataConfig(max_length=12), tokenizer, "long.csv")
    assert ds.input_ids.shape == (2, 12)
    response = [*tokenizer("yes it is", add_special_tokens=False)["input_ids"], 102]
    final = tokenizer("final", add_special_tokens=False)["input_ids"]
    ids, _, labels = ds[0]
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-len(response) :].tolist() == response
    assert ids[-len(response) - len(final) : -len(response)].tolist() == final
    assert (labels[-len(response) :] == ids[-len(response) :]).all()
    assert (labels[: -len(response)] == IGNORE_INDEX).all()
    ids, _, labels = ds[1]  # the response alone overflows: the prompt goes, the response is cut
    assert ids[0] == tokenizer.cls_token_id
    assert (labels[1:] == ids[1:]).all() and labels[0] == IGNORE_INDEX


def test_classification_truncates_and_right_pads_to_the_longest(tokenizer):
    frame = pd.DataFrame({"text": ["a b c d e f g h i j k l", "a"], "label": ["x", "y"]})
    ds = tokenize_classification(frame, DataConfig(max_length=8), tokenizer, ("x", "y"), "t.csv")
    assert ds.input_ids.shape == (2, 8)
    assert ds.input_ids[0, -1] == tokenizer.sep_token_id
    assert ds.input_ids[1].tolist() == [101, 1037, 102] + [tokenizer.pad_token_id] * 5
    assert ds.attention_mask.tolist() == [[1] * 8, [1] * 3 + [0] * 5]
    assert ds.labels.tolist() == [0, 1]
    wide = tokenize_classification(frame, DataConfig(max_length=64), tokenizer, ("x", "y"), "t")
    assert wide.input_ids.shape == (2, 14)  # [CLS] + 12 words + [SEP], not 64


def test_subset_keeps_rows_and_trims_padding(tokenizer):
    frame = pd.DataFrame({"prompt": ["a b c d e f g", "a", "b"], "response": ["x", "y", "z"]})
    ds = tokenize_causal_lm(frame, DataConfig(), tokenizer, "t.csv")
    part = ds.subset(np.array([2, 1]))
    assert len(part) == 2 and part.input_ids.shape[1] == 4  # [CLS] b z [SEP]
    assert part.input_ids.tolist() == ds.input_ids[[2, 1], :4].tolist()
    assert part.labels.tolist() == ds.labels[[2, 1], :4].tolist()
    assert len(ds.subset([])) == 0


def test_iid_partition_covers_every_row_once_in_near_equal_parts():
    parts = iid_partition(103, 5, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} == {20, 21}
    assert [p.tolist() for p in parts] == [p.tolist() for p in iid_partition(103, 5, seed=1)]
    assert [p.tolist() for p in parts] != [p.tolist() for p in iid_partition(103, 5, seed=2)]
    with pytest.raises(DataError, match="3 rows cannot fill 5 parts"):
        iid_partition(3, 5, seed=0)


def mean_label_skew(label_ids: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label distribution and the global one."""
    k = int(label_ids.max()) + 1
    overall = np.bincount(label_ids, minlength=k) / len(label_ids)
    return float(
        np.mean(
            [0.5 * np.abs(np.bincount(label_ids[p], minlength=k) / len(p) - overall).sum() for p in parts]
        )
    )


LABEL_IDS = np.random.default_rng(0).integers(0, 6, size=600)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_partition_covers_every_row_once_with_min_size(alpha):
    parts = dirichlet_partition(LABEL_IDS, 8, alpha, seed=3, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_partition(LABEL_IDS, 8, alpha, seed=3, min_size=5)
    assert [p.tolist() for p in parts] == [p.tolist() for p in again]


def test_smaller_dirichlet_alpha_gives_more_label_skew():
    skew = {
        alpha: np.mean(
            [mean_label_skew(LABEL_IDS, dirichlet_partition(LABEL_IDS, 5, alpha, s)) for s in range(5)]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5 and skew[100.0] < 0.1


def test_dirichlet_partition_gives_up_with_a_data_error():
    with pytest.raises(DataError, match="dirichlet_alpha"):
        dirichlet_partition(np.zeros(30, dtype=int), 10, 0.01, seed=0, min_size=3)
    with pytest.raises(DataError, match="10 rows cannot give 6 parts 2 rows each"):
        dirichlet_partition(np.zeros(10, dtype=int), 6, 1.0, seed=0)


def test_column_partition_gives_one_part_per_value_in_sorted_order():
    parts = column_partition(np.array(["b", "a", "a", "c", "b", "a"], dtype=object))
    assert [p.tolist() for p in parts] == [[1, 2, 5], [0, 4], [3]]
    assert [p.tolist() for p in column_partition(np.array([10, 2, 10]))] == [[1], [0, 2]]


def test_partition_dispatches_on_the_simulation_config(tmp_path, tokenizer):
    path = str(write(FRAME, tmp_path / "sites.csv"))
    cfg = FedloraConfig(data=DataConfig(path=path), simulation=SimulationConfig(partition_column="hospital"))
    bundle = build_data(cfg, tokenizer)
    assert bundle.train_groups.tolist() == FRAME["hospital"].tolist()
    column = SimulationConfig(partition="column", partition_column="hospital", num_clients=3)
    assert [p.tolist() for p in partition(bundle, column)] == [[1, 2, 5], [0, 4], [3]]
    with pytest.raises(DataError, match=r"has 3 distinct values but simulation\.num_clients is 2"):
        partition(bundle, SimulationConfig(partition="column", num_clients=2))
    assert len(partition(bundle, SimulationConfig(partition="iid", num_clients=3))) == 3
    parts = partition(bundle, SimulationConfig(partition="dirichlet", num_clients=2))
    assert sorted(np.concatenate(parts).tolist()) == list(range(6))


def test_column_partition_without_the_column_names_the_setting():
    ds = TokenizedDataset(torch.zeros(4, 3, dtype=torch.int64), torch.ones(4, 3), torch.zeros(4))
    bundle = DataBundle(ds, None, (), None, None)
    sim = SimulationConfig(partition="column", partition_column="site")
    with pytest.raises(DataError, match=r"^simulation\.partition_column: 'site'"):
        partition(bundle, sim)
    with pytest.raises(DataError, match=r"^simulation\.partition_column: is not set"):
        partition(bundle, SimulationConfig(partition="column"))
    with pytest.raises(DataError, match="'dirichlet' needs class labels"):
        partition(bundle, SimulationConfig(partition="dirichlet"))


def test_eval_path_without_path_is_refused():
    with pytest.raises(DataError, match=r"data\.eval_path"):
        build_data(config(eval_path="test.csv"), tokenizer=None)


def test_dataset_works_with_a_data_loader(tokenizer):
    ds = tokenize_classification(FRAME, DataConfig(), tokenizer, ("cardio", "derm", "resp"), "t")
    ids, mask, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert ids.shape == mask.shape == (4, ds.input_ids.shape[1])
    assert labels.tolist() == [0, 2, 1, 0]


def test_a_csv_with_an_unquoted_comma_in_every_row_is_refused_not_shifted(tmp_path):
    """pandas would take the first field as the index: the text would become ' severe'."""
    path = tmp_path / "notes.csv"
    path.write_text("text,label\nmild pain, not severe,low\nchest pain, severe,high\n")
    with pytest.raises(DataError) as info:
        read_table(path)
    message = str(info.value)
    assert message == (
        f"{path}: line 2 has 3 fields, the header 2 (an unquoted comma in a text? quote that field)"
    )
    assert "severe" not in message  # the line is named, its private text is not repeated


def test_a_csv_row_wider_than_the_header_further_down_is_named_by_its_line(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text('text,label\n"a, quoted comma",low\n"two\nlines",high\nx, y,low\n')
    with pytest.raises(DataError, match=r"notes\.csv: line 5 has 3 fields, the header 2"):
        read_table(path)


def test_a_csv_with_quoted_commas_is_read_as_written(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text('text,label\n"mild pain, not severe",low\n"chest pain, severe",high\nshort,\n')
    frame = read_table(path)
    assert frame["text"].tolist() == ["mild pain, not severe", "chest pain, severe", "short"]
    assert frame["label"].tolist()[:2] == ["low", "high"]
    assert list(frame.columns) == ["text", "label"] and frame.index.tolist() == [0, 1, 2]
