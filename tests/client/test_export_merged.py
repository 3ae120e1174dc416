"""``export --merged``: a plain Hugging Face folder that loads with the Auto classes where fedlora cannot
be imported, and whose logits are the adapter-on-base model's to 1e-5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedlora.client import cli
from fedlora.client.export_merged import export_merged
from fedlora.client.predict import load_trained
from fedlora.common.adapter import adapter_state
from helpers.trained import train_and_export

# Runs in a fresh interpreter: fedlora is made unimportable before anything else is imported.
LOAD_WITHOUT_FEDLORA = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoFedlora(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fedlora" or name.startswith("fedlora."):
                raise ImportError("fedlora must not be needed to load a merged export")

    sys.meta_path.insert(0, NoFedlora())
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    classifier_dir, lm_dir, texts, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    tok = AutoTokenizer.from_pretrained(classifier_dir, trust_remote_code=True)
    clf = AutoModelForSequenceClassification.from_pretrained(classifier_dir, trust_remote_code=True).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    lm_tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    lm_batch = lm_tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        result = {
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "logits": clf(**batch).logits.tolist(),
            "id2label": {str(k): v for k, v in clf.config.id2label.items()},
            "lm_input_ids": lm_batch["input_ids"].tolist(),
            "lm_attention_mask": lm_batch["attention_mask"].tolist(),
            "lm_logits": lm(**lm_batch).logits.tolist(),
            "lm_class": type(lm).__name__,
            "fedlora_loaded": [m for m in sys.modules if m.split(".")[0] == "fedlora"],
        }
    json.dump(result, open(out, "w"))
    """
)
TEXTS = ["fever and cough since monday", "itchy red rash", "knee pain"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    classifier = train_and_export(root / "cls", "classification")
    lm = train_and_export(root / "lm", "causal-lm")
    merged_cls = export_merged(classifier[3], root / "merged-cls")
    merged_lm = cli.main(["export", str(lm[3]), "--merged", str(root / "merged-lm")])
    assert merged_lm == 0
    script = root / "load.py"
    script.write_text(LOAD_WITHOUT_FEDLORA)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(root / "hf-home")}
    result = root / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(merged_cls),
            str(root / "merged-lm"),
            json.dumps(TEXTS),
            str(result),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return classifier, lm, root, json.loads(result.read_text())


def test_the_adapter_is_trained_so_merging_changes_weights(exported):
    classifier, lm, _, _ = exported
    for _, _, model, _, _ in (classifier, lm):
        b = [v for k, v in adapter_state(model).items() if "lora_B" in k]
        assert b and all(v.abs().max() > 0 for v in b)


def test_merged_classifier_loads_without_fedlora_and_its_logits_match(exported):
    classifier, _, _, got = exported
    assert got["fedlora_loaded"] == []
    trained = load_trained(classifier[3])
    assert got["id2label"] == {str(i): label for i, label in enumerate(trained.labels)}
    ids, mask = torch.tensor(got["input_ids"]), torch.tensor(got["attention_mask"])
    with torch.no_grad():
        expected = trained.model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=1e-5, rtol=0)


def test_merged_causal_lm_is_a_plain_llama_folder_whose_logits_match(exported):
    _, lm, root, got = exported
    assert got["fedlora_loaded"] == [] and got["lm_class"] == "LlamaForCausalLM"
    config = json.loads((root / "merged-lm" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not list((root / "merged-lm").glob("*.py"))
    trained = load_trained(lm[3])
    ids, mask = torch.tensor(got["lm_input_ids"]), torch.tensor(got["lm_attention_mask"])
    with torch.no_grad():
        expected = trained.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.tensor(got["lm_logits"]), expected, atol=1e-5, rtol=0)
    # Generation stops at the end token responses were trained with.
    assert config["eos_token_id"] == trained.tokenizer.sep_token_id


def test_export_refuses_a_folder_that_is_not_empty(exported, capsys):
    classifier, _, root, _ = exported
    assert cli.main(["export", str(classifier[3]), "--merged", str(root / "merged-lm")]) == 2
    err = capsys.readouterr().err.strip()
    assert "merged-lm" in err and "not an empty folder" in err and "\n" not in err
