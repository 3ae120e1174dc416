"""Issue 27, items 3 and 4: the exported adapter is the round best on validation (round 0 included),
validation and final test are disjoint, and every evaluation shows macro-F1, per-class recall and a
collapse onto one class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from safetensors.torch import load_file

from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state, peft_module
from fedlora.common.codec import EvaluateMetrics, evaluate_reply, parse_evaluate_reply
from fedlora.common.data import ChoiceSet, TokenizedDataset
from fedlora.common.errors import AdapterError, CheckpointError, ConfigError
from fedlora.common.held_out import VALIDATION, best_round, exported_round, split_held_out
from fedlora.common.model_card import write_model_card
from fedlora.common.scoring import class_scores, evaluate
from fedlora.common.workbench import prepare
from fedlora.server.app import AfterRound, export, restore
from fedlora.server.checkpoint import load_checkpoint
from fedlora.server.history import summarise_round
from fedlora.server.strategy import build_strategy
from fedlora.simulations.report import write_metrics, write_report


def test_class_scores_match_a_hand_computation() -> None:
    truth = torch.tensor([0, 0, 0, 1, 1, 2])
    picks = torch.tensor([0, 0, 1, 1, 2, 2])
    # class 0: 2 hits of 3 rows, 2 picks -> F1 4/5; class 1: 1 of 2, 2 picks -> 1/2; class 2: 1 of 1,
    # 2 picks -> 2/3 (scikit-learn's f1_score(average="macro") gives the same mean).
    got = class_scores(picks, truth)
    assert got["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert (got["recall_0"], got["recall_1"], got["recall_2"]) == pytest.approx((2 / 3, 1 / 2, 1.0))
    assert got["top_class"] == 0 and got["top_share"] == pytest.approx(1 / 3)


def test_a_predicted_class_absent_from_the_truth_counts_in_macro_f1_but_has_no_recall() -> None:
    got = class_scores(torch.tensor([1, 1, 1, 0]), torch.tensor([0, 0, 0, 0]))
    # class 0: 1 hit, 4 rows, 1 pick -> F1 2/5; class 1: never right -> 0
    assert got["macro_f1"] == pytest.approx((2 / 5 + 0) / 2)
    assert "recall_1" not in got and got["recall_0"] == pytest.approx(1 / 4)
    assert got["top_class"] == 1 and got["top_share"] == pytest.approx(3 / 4)


def test_evaluate_reports_them_beside_accuracy(make_config, toy_classification) -> None:
    bench = prepare(make_config({"data": {"labels": ["a", "b", "c"]}}), with_data=False)
    model, data = bench.built.model, toy_classification(24, 3)
    scores = evaluate(model, "classification", data, torch.device("cpu"))
    module = peft_module(model).eval()
    with torch.no_grad():
        picks = module(input_ids=data.input_ids, attention_mask=data.attention_mask).argmax(-1)
    assert scores["accuracy"] == pytest.approx(float((picks == data.labels).double().mean()))
    assert {k: scores[k] for k in class_scores(picks, data.labels)} == pytest.approx(
        class_scores(picks, data.labels)
    )


def test_federated_evaluation_carries_them_only_as_the_codec_allows() -> None:
    sent = EvaluateMetrics(40, loss=0.5, accuracy=0.8, macro_f1=0.7, recall={0: 0.9, 2: 0.5})
    content = evaluate_reply(sent)
    assert set(content[P.METRICS]) == {P.NUM_EXAMPLES, P.LOSS, P.ACCURACY, P.MACRO_F1, "recall_0", "recall_2"}
    assert parse_evaluate_reply(content) == sent
    for bad in ({"recall_x": 0.5}, {"recall_01": 0.5}, {"recall_1": 1.5}, {P.MACRO_F1: -0.1}):
        with pytest.raises(AdapterError):
            parse_evaluate_reply(type(content)({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 4.0, **bad})}))


def _rows(n: int, seed: int = 0) -> TokenizedDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 900, (n, 6), generator=g)
    ids[1] = ids[0]  # a duplicated row must not land on both sides
    labels = torch.arange(n) % 3
    labels[1] = labels[0]
    return TokenizedDataset(ids, torch.ones_like(ids), labels)


def _row_set(data: TokenizedDataset) -> set[tuple[int, ...]]:
    return {tuple(r.tolist()) for r in data.input_ids}


def test_validation_and_test_are_disjoint_deterministic_and_per_class() -> None:
    data = _rows(90)
    validation, test = split_held_out(data, 0.5)
    again, _ = split_held_out(
        TokenizedDataset(data.input_ids.flip(0), data.attention_mask, data.labels.flip(0)), 0.5
    )
    assert not _row_set(validation) & _row_set(test)
    assert len(validation) + len(test) == len(data) and _row_set(validation) == _row_set(again)
    per_class = np.bincount(validation.labels.numpy()) - 0.5 * np.bincount(data.labels.numpy())
    assert np.abs(per_class).max() <= 1  # a duplicate may pull one row over the share
    duplicate = tuple(data.input_ids[0].tolist())
    assert (duplicate in _row_set(validation)) != (duplicate in _row_set(test))
    assert split_held_out(data, 0.0) == (None, data)
    with pytest.raises(ConfigError, match=r"federation\.validation_share"):
        split_held_out(_rows(2), 0.9)


def test_multiple_choice_questions_follow_their_rows() -> None:
    rows = TokenizedDataset(
        torch.arange(36).view(6, 6) + 5, torch.ones(6, 6, dtype=torch.int64), torch.zeros(6)
    )
    question = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    options = TokenizedDataset(
        torch.arange(13)[:, None], torch.ones(13, 1, dtype=torch.int64), torch.zeros(13, 1)
    )
    choices = ChoiceSet(options, question, torch.tensor([1, 2, 0, 1, 0, 1]), torch.arange(13.0))
    data = TokenizedDataset(rows.input_ids, rows.attention_mask, torch.zeros(6, 6), None, choices)
    validation, test = split_held_out(data, 0.5)
    for part in (validation, test):
        kept = [next(i for i in range(6) if torch.equal(rows.input_ids[i], r)) for r in part.input_ids]
        assert part.choices.answers.tolist() == [choices.answers[i].item() for i in kept]
        expected = [o for i in kept for o in (question == i).nonzero().flatten().tolist()]
        assert part.choices.rows.input_ids.flatten().tolist() == expected
        assert part.choices.question.tolist() == sorted(part.choices.question.tolist())


def _entry(round_: int, validation: float, test: float, share: float = 0.5) -> dict:
    return {
        "round": round_,
        "central": {"accuracy": test, "macro_f1": test, "loss": 1.0, "top_class": 1.0, "top_share": share},
        VALIDATION: {"accuracy": 0.5, "macro_f1": validation},
    }


def test_the_choice_reads_validation_only_and_counts_round_zero() -> None:
    history = [_entry(0, 0.40, 0.40), _entry(1, 0.60, 0.50), _entry(2, 0.55, 0.90), _entry(3, 0.60, 0.99)]
    assert best_round(history) is history[1]  # the test set's best (round 3) never chooses; ties: earliest
    assert best_round([_entry(0, 0.5, 0.5), _entry(1, 0.2, 0.9)])["round"] == 0
    assert exported_round([{"round": 0, "central": {}}, {"round": 1, "central": {}}]) == {
        "round": 1,
        "chosen_by": "the last round (no validation scores)",
    }
    assert "validation macro_f1 0.6" in summarise_round(history[1]).line(3)


def test_a_run_that_gets_worse_exports_its_best_round_and_resumes_to_it(make_config, tmp_path) -> None:
    """A fake evaluator whose validation peaks at round 1 and then falls (the test set keeps rising):
    the checkpoint keeps round 1's adapter, a resumed server restores it, and the export, the
    adapter's record, the model card, metrics.json and report.md name round 1."""
    cfg = make_config({"data": {"labels": ["neg", "pos"]}, "federation": {"rounds": 3}})
    bench = prepare(cfg, with_data=False)
    fresh = adapter_state(bench.built.model)
    adapters = [{k: v + 0.01 * r for k, v in fresh.items()} for r in range(4)]
    records = [ArrayRecord({k: Array(v.numpy()) for k, v in a.items()}) for a in adapters]
    validation = {0: 0.3, 1: 0.7, 2: 0.5, 3: 0.4}

    def score(arrays: ArrayRecord) -> dict:
        r = next(i for i, rec in enumerate(records) if rec is arrays)
        return {
            "central": {"accuracy": 0.5 + 0.1 * r, "macro_f1": 0.5},
            VALIDATION: {"macro_f1": validation[r]},
        }

    after = AfterRound(
        tmp_path / "checkpoint",
        bench.built.fingerprint,
        3,
        build_strategy(cfg, bench.built.fingerprint, 2),
        score,
        [],
    )
    after.before_first(records[0])
    for r in (1, 2, 3):
        after(r, records[r], MetricRecord({P.NUM_EXAMPLES: 10.0, P.MACRO_F1: 0.6, "recall_0": 0.8}))
    assert after.best is records[1]
    assert after.history[2]["federated"] == {P.NUM_EXAMPLES: 10.0, P.MACRO_F1: 0.6, "recall_0": 0.8}
    best = load_checkpoint(tmp_path / "checkpoint").best
    assert all(torch.equal(best[k], adapters[1][k]) for k in fresh)

    start = restore(tmp_path / "checkpoint", bench.built, build_strategy(cfg, bench.built.fingerprint, 2))
    assert start.done == 3 and all(
        torch.equal(start.best.to_torch_state_dict()[k], adapters[1][k]) for k in fresh
    )
    export(tmp_path, cfg, bench, start.best, start.history)
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(exported[k], adapters[1][k]) for k in exported)
    record = json.loads((tmp_path / "adapter" / "fedlora.json").read_text())["exported_round"]
    assert record == {"round": 1, "chosen_by": "the best validation macro_f1 (0.7000)"}
    assert "the global adapter of round 1 of 3" in write_model_card(tmp_path).read_text()
    write_metrics(tmp_path, start.history)
    assert json.loads((tmp_path / "metrics.json").read_text())["exported_round"]["round"] == 1
    report = write_report(tmp_path, start.history, "run").read_text()
    assert "exported adapter: round 1" in report
    assert "test accuracy: 0.5000 before, 0.6000 after (round 1)" in report


def test_a_checkpoint_that_lost_its_best_adapter_is_refused(make_config, tmp_path) -> None:
    cfg = make_config({"data": {"labels": ["neg", "pos"]}})
    bench = prepare(cfg, with_data=False)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in adapter_state(bench.built.model).items()})
    after = AfterRound(
        tmp_path,
        bench.built.fingerprint,
        2,
        build_strategy(cfg, bench.built.fingerprint, 2),
        lambda _a: {"central": {}, VALIDATION: {"macro_f1": 0.5}},
        [],
    )
    after.before_first(arrays)
    after(1, arrays)
    (tmp_path / "round-00001" / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match="best round's adapter is missing"):
        restore(tmp_path, bench.built, build_strategy(cfg, bench.built.fingerprint, 2))


def test_the_report_flags_a_collapse_and_only_a_collapse(tmp_path) -> None:
    labels = {"labels": ["negative", "neutral", "positive"]}
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "fedlora.json").write_text(json.dumps(labels))
    collapsed = [
        _entry(0, 0.4, 0.4, share=0.5),
        _entry(1, 0.3, 0.3, share=0.97),
        _entry(2, 0.3, 0.3, share=0.9),
    ]
    report = write_report(tmp_path, collapsed, "run").read_text()
    assert "- round 1: collapse: predicts neutral for 97% of rows" in report
    assert report.count("collapse:") == 1  # 90% exactly is not over 90%
    healthy = [_entry(0, 0.4, 0.4, share=0.5), _entry(1, 0.5, 0.5, share=0.6)]
    assert "collapse" not in write_report(tmp_path, healthy, "run").read_text().lower()


DESTRUCTIVE = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "data.train_rows=32",
    "data.eval_rows=60",
    "training.local_steps=2",
    "training.batch_size=8",
    "training.learning_rate=5.0",  # destructive: the rounds jump between classes
    "training.head_learning_rate=5.0",
    "privacy.enabled=false",
    "federation.rounds=3",
    "federation.min_clients=2",
    "federation.fraction_evaluate=0",
    "simulation.num_clients=2",
    "simulation.partition=iid",
]


@pytest.mark.slow
@pytest.mark.integration
def test_a_real_run_exports_the_round_validation_chose(tmp_path) -> None:
    """Real Flower simulation, real PEFT: the held-out rows are split once into validation and test,
    the export is the adapter of the round best on validation (the last one only if it is the best),
    and report.md names that round and flags exactly the rounds whose predictions collapse."""
    from fedlora.common.config import load_config
    from fedlora.simulations.report import write_all
    from fedlora.simulations.run import simulate

    simulate(load_config(overrides=DESTRUCTIVE), tmp_path)
    history = write_all(tmp_path, "destructive")
    assert [e["round"] for e in history] == [0, 1, 2, 3]
    for entry in history:
        assert entry["central"]["examples"] + entry[VALIDATION]["examples"] == 60
    chosen = max(history, key=lambda e: (e[VALIDATION]["macro_f1"], -e["round"]))["round"]
    assert exported_round(history)["round"] == chosen
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    assert all(torch.equal(exported[k], ckpt.best[k]) for k in exported)
    last_differs = any(not torch.equal(exported[k], ckpt.adapter[k]) for k in exported)
    assert last_differs == (chosen != 3), chosen
    report = (tmp_path / "report.md").read_text()
    assert f"exported adapter: round {chosen}," in report
    collapsed = [e["round"] for e in history if e["central"]["top_share"] > 0.9]
    assert [int(line.split()[2][:-1]) for line in report.splitlines() if "collapse:" in line] == collapsed
