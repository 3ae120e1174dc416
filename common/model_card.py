"""The adapter's README.md: what the model is and what its privacy guarantee covers, written from the
run's own records (the adapter's fedlora.json and adapter_config.json, the round history or
train-local's metrics, the institutions' privacy ledgers), never from hand-written text.

The server writes it at export for a federation or a simulation (``<run>/history.json``, the ledgers in
``<run>/ledgers/`` when the institutions are virtual), train-local for its own output folder
(``metrics.json`` and the institution's ledger). Without ledgers (a deployment: the coordinator never
sees them) each institution's epsilon is the one it reported from its ledger in its last reply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.common import protocol as P
from fedlora.common.adapter import CARD_FILE, METADATA_FILE, PEFT_CONFIG_FILE
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.errors import CheckpointError
from fedlora.common.head_gradient import CLIP as HEAD_CLIP
from fedlora.common.held_out import exported_round
from fedlora.common.model import HUB_IDS
from fedlora.common.scoring import RECALL, TOP_CLASS, TOP_SHARE

ADAPTER_DIR = "adapter"
HISTORY_FILE = "history.json"
LOCAL_METRICS_FILE = "metrics.json"
LEDGERS_DIR = "ledgers"


@dataclass(frozen=True)
class Spend:
    """One institution's privacy spend, as its ledger (or its last reply) states it."""

    name: str
    epsilon: float
    source: str
    delta: float | None = None
    accountant: str | None = None
    noise_multipliers: tuple[float, ...] = ()
    sample_rates: tuple[float, ...] = ()
    steps: int | None = None
    round_noise: tuple[tuple[int, float], ...] = ()
    """Each ledger entry's round and noise multiplier."""


@dataclass(frozen=True)
class Records:
    """What a card is written from."""

    meta: dict[str, Any]
    peft: dict[str, Any]
    rounds: str
    """The rounds run, and where the federation ended early by design, of how many and why."""
    institutions: int
    aggregation: str
    evaluation: list[tuple[str, str, str]]  # metric, before, after
    evaluated_on: str  # a sentence: where the figures come from, or why there are none
    spends: list[Spend]
    released: list[str]  # statistics that left an institution in the clear
    local: bool
    statistics: str = ""
    """Round 0 (statistics first): what each institution released and at what epsilon; "" if none."""
    head_rounds: str = ""
    """The head rounds (client.head_rounds): what left each institution, at what noise; "" if none."""
    lora_trained: bool = True
    """Whether any reply of a round after round 0 trained LoRA (else only the head was trained)."""
    no_training: bool = False
    """Whether an institution answered a round saying its plan trains nothing after round 0."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable for the model card ({err})") from None


def ledger_spend(path: Path, name: str) -> Spend:
    """Epsilon after the last recorded round, and the mechanism of every round, from a ledger file
    (client.ledger writes it; each entry's epsilon composes every step before it)."""
    data = _json(path)
    try:
        entries = list(data["entries"])
        return Spend(
            name=name,
            epsilon=float(entries[-1]["epsilon"]) if entries else 0.0,
            source=f"ledger {path.name}",
            delta=float(data["delta"]),
            accountant=str(data["accountant"]),
            noise_multipliers=tuple(sorted({float(e["noise_multiplier"]) for e in entries})),
            sample_rates=tuple(sorted({float(e["sample_rate"]) for e in entries})),
            steps=sum(int(e["steps"]) for e in entries),
            round_noise=tuple((int(e["round"]), float(e["noise_multiplier"])) for e in entries),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a privacy ledger ({type(err).__name__}: {err})") from None


def reported_spends(history: Sequence[Mapping[str, Any]]) -> list[Spend]:
    """Each node's epsilon from its last accepted reply (computed by its ledger before it replied)."""
    last: dict[int, float] = {}
    for entry in history:
        for client in entry.get("clients", []):
            last[int(client["node"])] = float(client[P.EPSILON])
    return [Spend(f"node {node}", eps, "its last reply") for node, eps in sorted(last.items())]


def _metric_name(key: str, labels: Sequence[str]) -> str:
    """A score's name for people: per-class recall by the label's name."""
    if key == TOP_SHARE:
        return "share of rows in the most predicted class"
    if key.startswith(RECALL):
        index = int(key.removeprefix(RECALL))
        return f"recall of {labels[index] if index < len(labels) else f'class {index}'}"
    return key


def _figure(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a count, such as the examples evaluated
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _run_records(run_dir: Path, adapter_dir: Path) -> Records:
    meta = _json(adapter_dir / METADATA_FILE)
    history = _json(run_dir / HISTORY_FILE)
    rounds = max((int(e.get("round", 0)) for e in history), default=0)
    ran = rounds_statement(history, int(meta.get("rounds", rounds)))
    nodes = {int(c["node"]) for e in history for c in [*e.get("clients", []), *e.get("dropped", [])]}
    ledgers = sorted((run_dir / LEDGERS_DIR).glob("*.json"))
    spends = [ledger_spend(p, p.stem) for p in ledgers] or reported_spends(history)
    scored = [e for e in history if e.get("central")]
    chosen = exported_round(history)
    evaluation = []
    if scored:
        first = scored[0]
        final = next((e for e in scored if e["round"] == chosen["round"]), scored[-1])
        labels = list(meta.get("labels") or [])
        for key in final["central"]:
            if key == TOP_CLASS:
                continue
            before = first["central"].get(key, "-") if first is not final else "-"
            evaluation.append((_metric_name(key, labels), _figure(before), _figure(final["central"][key])))
    fed = meta["config"]["federation"]
    released = sorted({k for e in history for c in e.get("clients", []) for k in c if k == P.LOSS})
    return Records(
        meta=meta,
        peft=_json(adapter_dir / PEFT_CONFIG_FILE),
        rounds=ran,
        institutions=max(len(nodes), len(ledgers)),
        aggregation=f"{fed['aggregator']} (LoRA aggregator) under the {fed['strategy']} strategy",
        evaluation=evaluation,
        evaluated_on=(
            f"Measured on the coordinator's held-out final test set, before round 1 (round "
            f"{scored[0]['round']}) and for this adapter, the global adapter of round {chosen['round']} of "
            f"{rounds}, exported as {chosen['chosen_by']}; the final test set never chose it."
            if scored
            else "Not evaluated: no central evaluation ran (federation.central_eval off, or no held-out set)."
        ),
        spends=spends,
        released=[f"training {k} (privacy.release_metrics)" for k in released],
        local=False,
        statistics=statistics_statement(history, meta["config"].get("data", {}).get("privacy_unit")),
        head_rounds=head_rounds_statement(history, spends, meta["config"]["privacy"]["max_grad_norm"]),
        lora_trained=lora_trained(history),
        no_training=any(e.get("no_training") for e in history),
    )


def ended_after(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The history entry of the round after which the federation ended early by design (its
    ``ended_early`` says why: server.app.end_if_nothing_trains), None where it ran every round."""
    return next((e for e in history if e.get("ended_early")), None)


def rounds_statement(history: Sequence[Mapping[str, Any]], planned: int) -> str:
    """The rounds a federation ran (the last in its history); where it ended early by design, of the
    ``planned`` and why, so a reader does not take the missing rounds for a failure."""
    ran = max((int(e.get("round", 0)) for e in history), default=0)
    ended = ended_after(history)
    if ended is None:
        return str(ran)
    return (
        f"{ran} of {planned} planned: the federation ended after round {ended['round']} by design, as "
        f"{ended['ended_early']}; no later round could change the model"
    )


def _head_replies(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A round's head-round replies in its history entry: a head reply carries no row count."""
    return [c for c in entry.get("clients", []) if P.NUM_EXAMPLES not in c]


def lora_trained(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any reply after round 0 took a LoRA step (not a head round, not statistics only)."""
    return any(
        P.NUM_EXAMPLES in c and float(c.get(P.STEPS, 0)) > 0
        for e in history
        if int(e.get("round", 0)) > 0
        for c in e.get("clients", [])
    )


def head_rounds_statement(
    history: Sequence[Mapping[str, Any]], spends: Sequence[Spend], clip: float | None
) -> str:
    """The head rounds in one paragraph, from what the coordinator received (each head reply's
    epsilon and noise std, in the history) and, where it holds them (a simulation), the ledgers'
    noise multipliers for those rounds; ``clip``: the run's privacy.max_grad_norm (None: the
    planner's head clip, common.head_gradient.CLIP)."""
    rounds = sorted(int(e["round"]) for e in history if int(e.get("head_gradients", 0)) > 0)
    replies = [c for e in history if int(e["round"]) in rounds for c in _head_replies(e)]
    if not replies:
        return ""
    noise = sorted(float(c[P.NOISE_STD]) for c in replies)
    shown = ", ".join(str(r) for r in rounds)
    line = (
        f"- head rounds: in {len(rounds)} round{'s' if len(rounds) > 1 else ''} ({shown}) the recipe planner "
        f"chose head rounds ({len(replies)} replies in all): DP-SGD of LoRA would add nothing measurable, so "
        "LoRA was not trained in them. Each round, each institution sent one vector: the sum over all its "
        "rows (sample rate 1) of each row's gradient of the cross-entropy with respect to the "
        "classification head, clipped to L2 norm C, plus Gaussian noise of std sigma x C "
        f"(noise std {noise[0]:.3g} to {noise[-1]:.3g}), with its epsilon and no row count; the server "
        "divided the sum by round 0's released counts and took one SGD step of the head."
    )
    if noise[-1] == 0:
        return f"{line} No noise: privacy was off, the exact clipped sums left."
    clipped = clip if clip is not None else HEAD_CLIP
    secure, assumption = _secure_head_rounds(history, rounds, noise[0], clipped)
    line += secure
    planned = f"{clip:g}" if clip is not None else f"{HEAD_CLIP:g} (the planner's head clip)"
    sigmas = sorted({m for s in spends if s.round_noise for r, m in s.round_noise if r in rounds})
    if sigmas:
        mechanism = (
            f"At noise multiplier sigma {_rates(sigmas)} (the ledgers' entries for these rounds), "
            f"clip C {planned}"
        )
    else:
        mechanism = (
            "The noise multiplier sigma and clip C are each institution's own (its ledger; the planner's "
            f"head clip is {HEAD_CLIP:g}): the coordinator receives only their product, the noise std above"
        )
    statement = (
        f"{line} {mechanism}. Each head round is charged in the institution's ledger before a row is "
        "read, as one DP-SGD step at sample rate 1 at the noise of round 0's release, and composed with "
        "round 0 by its accountant: the epsilons below cover them."
    )
    return f"{statement}\n{assumption}" if assumption else statement


def _secure_head_rounds(
    history: Sequence[Mapping[str, Any]], rounds: Sequence[int], share: float, clip: float
) -> tuple[str, str]:
    """The head rounds that ran under secure aggregation (their history's ``secagg_*`` figures): a
    sentence and the aggregation assumption's line; empty where none did. ``share``: the smallest noise
    std a reply carried (the weakest statement covers every other one)."""
    secure = [
        e for e in history if int(e["round"]) in rounds and "secagg_institutions" in e.get("aggregation", {})
    ]
    if not secure:
        return "", ""
    figures = secure[0]["aggregation"]
    sampled, dropouts, colluders = (
        int(figures[k]) for k in ("secagg_institutions", "secagg_dropouts", "secagg_colluders")
    )
    honest = max(1, sampled - dropouts - colluders)
    sharing = NoiseSharing(share * math.sqrt(honest) / clip, clip, sampled, dropouts, colluders)
    shown = ", ".join(str(int(e["round"])) for e in secure)
    return (
        f" Under secure aggregation in rounds {shown}: each vector left masked with only its institution's "
        "share of the noise (the noise std above: sigma x C / sqrt(m)), and the server unmasked only the "
        "sum, which carried sigma x C once.",
        aggregation_assumption(sharing),
    )


def statistics_statement(history: Sequence[Mapping[str, Any]], unit: str | None = None) -> str:
    """Round 0's release in one line, from its history entry (server.app.statistics_first); ``unit``:
    the run's data.privacy_unit, whose institutions released per person (client.statistics)."""
    round0 = next((e for e in history if e.get("round") == 0 and e.get("clients")), None)
    if round0 is None:
        return ""
    clients = round0["clients"]
    eps = sorted(float(c[P.EPSILON]) for c in clients)
    noise = sorted(float(c.get(P.NOISE_STD, 0.0)) for c in clients)
    spent = f"epsilon {eps[0]:.3g} to {eps[-1]:.3g}" if eps[-1] > 0 else "no DP (exact statistics)"
    per_person = unit is not None and eps[-1] > 0  # without DP the exact per-row statistics left
    what = "person" if per_person else "row"
    line = (
        f"- round 0, statistics first: {len(clients)} institutions each released once its per-class sums "
        f"of L2-normalised pooled embeddings and its {what} counts (one Gaussian mechanism, L2 sensitivity "
        f"sqrt(2) per {what}, noise std "
        f"{noise[0]:.3g} to {noise[-1]:.3g}) at {spent} of its budget, charged in its ledger as round 0 and "
        "composed with the rounds; the server summed them into the shared head."
    )
    if per_person:
        line += (
            f" Each person's rows (column `{unit}`) were averaged first: a person counts once, fractionally "
            "in each class they have rows in."
        )
    secagg = round0.get("aggregation", {})
    if "secagg_institutions" not in secagg or eps[-1] == 0:
        return line
    sampled, dropouts, colluders = (
        int(secagg[k]) for k in ("secagg_institutions", "secagg_dropouts", "secagg_colluders")
    )
    honest = sampled - dropouts - colluders
    # the smallest share's sigma: the weakest institution's statement covers every other one
    sigma = noise[0] * math.sqrt(honest) / P.STATISTICS_SENSITIVITY
    sharing = NoiseSharing(sigma, P.STATISTICS_SENSITIVITY, sampled, dropouts, colluders)
    return (
        f"{line} Under secure aggregation: the server unmasked only the sum of "
        f"{int(secagg['secagg_survivors'])} institutions' masked releases (noise std above: each one's "
        f"share).\n{aggregation_assumption(sharing)}"
    )


def _local_records(out_dir: Path, adapter_dir: Path) -> Records:
    meta = _json(adapter_dir / METADATA_FILE)
    metrics = _json(out_dir / LOCAL_METRICS_FILE)
    rows = metrics.get("rounds", [])
    privacy = meta["config"]["privacy"]
    ledger = Path(privacy["ledger_path"])
    name = meta["config"].get("name", "this institution")
    spends = [ledger_spend(ledger, name)] if privacy["enabled"] else []
    final = rows[-1] if rows else {}
    evaluation = [(k.removeprefix("eval_"), "-", _figure(v)) for k, v in final.items() if k[:5] == "eval_"]
    return Records(
        meta=meta,
        peft=_json(adapter_dir / PEFT_CONFIG_FILE),
        rounds=str(len(rows)),
        institutions=1,
        aggregation="none: trained by one institution alone (fedlora-client train-local)",
        evaluation=evaluation,
        evaluated_on=(
            f"Measured on the institution's held-out set (data.eval_path) after round {final.get('round')}."
            if evaluation
            else "Not evaluated: no held-out set was given (data.eval_path)."
        ),
        spends=spends,
        released=[],
        local=True,
    )


def _task_lines(meta: Mapping[str, Any]) -> list[str]:
    model, data = meta["config"]["model"], meta["config"]["data"]
    if model["task"] == "classification":
        labels = meta.get("labels") or []
        return [
            f"- task: text classification into {len(labels)} labels: {', '.join(labels)}",
            f"- input: the text column `{data['text_column']}`, truncated to {data['max_length']} tokens",
            f"- head: {model['pooling']} pooling{', L2-normalised' if model['normalize'] else ''}, "
            f"a linear layer trained with the adapter (started from {model['head_init']})",
        ]
    return [
        "- task: causal language modelling (instruction -> response)",
        f"- input: `[bos] <{data['prompt_column']}>`; the model continues with the response "
        f"(`{data['response_column']}` in training, loss on the response only), up to {data['max_length']} "
        "tokens in all",
    ]


def _lora_lines(peft: Mapping[str, Any]) -> list[str]:
    scale = peft["lora_alpha"] / (math.sqrt(peft["r"]) if peft.get("use_rslora") else peft["r"])
    targets = peft.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, list) else [str(targets)]
    lines = [
        f"- LoRA rank {peft['r']}, alpha {peft['lora_alpha']:g} (scale {scale:g}"
        f"{', rank-stabilised' if peft.get('use_rslora') else ''}) on {', '.join(targets)}",
    ]
    if peft.get("modules_to_save"):
        lines.append(f"- trained in full and saved with the adapter: {', '.join(peft['modules_to_save'])}")
    return lines


def _rates(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values) or "none (no step ran)"


def _privacy_lines(rec: Records) -> list[str]:
    privacy = rec.meta["config"]["privacy"]
    from_ledgers = any(s.delta is not None for s in rec.spends)
    spent = any(s.epsilon > 0 for s in rec.spends)
    if not from_ledgers and not spent:
        return [
            "**No differential privacy.** No privacy spend is recorded (epsilon 0): the adapter was trained "
            "without DP-SGD and carries no formal guarantee about the rows it was trained on.",
        ]
    unit = rec.meta["config"].get("data", {}).get("privacy_unit")
    if unit is None:
        lines = [
            "- privacy unit: one row (example) of an institution's data. A person with k rows in one "
            "institution's data is protected at about k times that institution's epsilon (group privacy).",
            "- mechanism: DP-SGD with Opacus (Poisson sampling, per-example gradient clipping, Gaussian "
            "noise on the sum), run by each institution on its own data before its update leaves."
            if rec.lora_trained or not rec.head_rounds
            else "- mechanism: no DP-SGD step of LoRA ran; the Gaussian mechanism on round 0's statistics "
            "and on the head rounds' clipped gradient sums (below), run by each institution before its "
            "release left.",
        ]
    else:
        cap = rec.meta["config"]["data"].get("max_rows_per_unit")
        lines = [
            f"- privacy unit: one person (data.privacy_unit, column `{unit}`), however many rows they have "
            "in an institution's data: each epsilon below is per person.",
            "- mechanism: person-level DP-SGD with Opacus (Poisson sampling of persons; each sampled "
            f"person's gradient is the mean over up to {cap} of their rows, clipped as one; Gaussian noise "
            "on the sum), run by each institution on its own data before its update leaves.",
        ]
    if rec.statistics:
        lines.append(rec.statistics)
    if rec.head_rounds:
        lines.append(rec.head_rounds)
    if from_ledgers:
        clip = privacy["max_grad_norm"]
        each = "per-example" if unit is None else "per-person"
        lines.append(
            f"- {each} gradient clipping norm: {clip:g}"
            if clip is not None
            else f"- {each} gradient clipping norm: planned by each institution (training.recipe: auto)"
        )
        accountants = sorted({s.accountant for s in rec.spends if s.accountant})
        lines.append(
            f"- accountant: Opacus {', '.join(accountants).upper()}, composing every step recorded in the "
            "institution's ledger (rounds of earlier runs on the same ledger included)"
        )
    else:
        lines.append(
            "- delta, accountant, clipping norm, noise and sample rate are each institution's own settings "
            "(its privacy section and ledger); the coordinator receives only the epsilon below."
        )
    lines += [
        "",
        "| institution | epsilon | delta | noise multipliers | sample rates | steps | from |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rec.spends:
        delta = f"{s.delta:g}" if s.delta is not None else "its own"
        noise = _rates(s.noise_multipliers) if s.delta is not None else "its own"
        rates = _rates(s.sample_rates) if s.delta is not None else "its own"
        steps = str(s.steps) if s.steps is not None else "its own"
        lines.append(f"| {s.name} | {s.epsilon:.4f} | {delta} | {noise} | {rates} | {steps} | {s.source} |")
    return lines


def aggregation_assumption(sharing: NoiseSharing) -> str:
    """The card's statement of what a distributed-noise epsilon assumes (common.distributed_noise):
    without secure aggregation and honest peers, each institution's share alone is far less noise."""
    m = sharing.honest
    return (
        f"- distributed noise: each institution added Gaussian noise of std sigma x C / sqrt({m}) "
        f"(sigma {sharing.sigma:g}, C {sharing.clipping:g}), so that every aggregated sum, of at least "
        f"{sharing.sampled} sampled - {sharing.dropouts} tolerated dropouts - {sharing.colluders} tolerated "
        f"colluders = {m} institutions, carries the central noise sigma x C. Each epsilon assumes that the "
        "coordinator learns only that sum (secure aggregation, against a malicious coordinator: every "
        "advert signed by an identity of the federation's roster, which the institutions hold out of band, "
        "and the survivor list checked by the survivors' signatures before anything is unmasked), that "
        f"the roster lists only real institutions and that at most {sharing.colluders} "
        "of the institutions collude with it; without that assumption an institution's epsilon is the one "
        f"its ledger records without aggregation (its share alone: noise multiplier sigma / sqrt({m}))."
    )


def _not_covered(rec: Records) -> list[str]:
    if rec.local:
        lines = ["- nothing left the institution during training: train-local sends nothing."]
        if rec.evaluation:
            lines.append("- this card's evaluation figures: computed on the institution's held-out rows.")
    else:
        lines = [
            f"- what every reply carries in the clear: {', '.join(P.TRAIN_REQUIRED)} (counts and settings, "
            "not computed from the rows' content beyond their number).",
        ]
        if rec.no_training:
            lines.append(
                f"- what an institution that planned statistics only answered the rounds after round 0: "
                f"an empty update, steps 0 and {P.PLAN} {P.STATISTICS_ONLY} (its planner's decision, from "
                "counts and the budget)."
            )
        if rec.head_rounds:
            lines.append(
                f"- what a head round's reply carries in the clear: {', '.join(P.HEAD_REQUIRED)} "
                "(no row count)."
            )
        if rec.released:
            lines.append(f"- statistics sent in the clear, outside the guarantee: {', '.join(rec.released)}.")
        else:
            lines.append("- training statistics in the clear: none (privacy.release_metrics off).")
        lines.append(
            "- evaluation metrics sent by institutions that set privacy.release_metrics (local loss and "
            "accuracy, without noise)."
        )
    lines += [
        "- the base model and its pretraining data, the label names and the initial head (public).",
        "- a person with rows at several institutions: each institution's epsilon covers its own rows "
        "of them (their epsilons add up).",
    ]
    return lines


def render(rec: Records) -> str:
    meta = rec.meta
    cfg = meta["config"]
    source = cfg["model"]["source"]
    base = meta.get("base_model", {}).get("name_or_path", source)
    front = ["---", "library_name: peft"]
    if source in HUB_IDS:
        front.append(f"base_model: {HUB_IDS[source]}")
    front += ["tags:", "- fedlora", "- lora", "- differential-privacy", "- federated-learning", "---", ""]
    lines = [
        *front,
        f"# {cfg['name']}: a LoRA adapter trained with fedlora",
        "",
        "## Model",
        f"- base model: {base} (model.source `{source}`); fingerprint `{meta['fingerprint']}`",
        *_task_lines(meta),
        *_lora_lines(rec.peft),
        "",
        "## Training",
        f"- rounds: {rec.rounds}",
        f"- institutions: {rec.institutions}",
        f"- aggregation: {rec.aggregation}",
        "",
        "## Evaluation",
        rec.evaluated_on,
        "",
    ]
    if rec.evaluation:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {name} | {before} | {after} |" for name, before, after in rec.evaluation]
        lines.append("")
    lines += [
        "## Privacy",
        *_privacy_lines(rec),
        "",
        "Not covered by the guarantee:",
        *_not_covered(rec),
        "",
        "## Use",
        "With ADAPTER the path of this folder:",
        "- predictions: `fedlora-client predict ADAPTER --input rows.csv --out predictions.csv`",
        "- without fedlora: `fedlora-client export ADAPTER --merged merged-model` writes the base with "
        "this adapter merged in, a Hugging Face folder for the Auto classes"
        + (" (`trust_remote_code=True`)" if cfg["model"]["task"] == "classification" else ""),
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path) -> Path:
    """``<folder>/adapter/README.md`` for a run folder (history.json) or a train-local folder
    (metrics.json)."""
    root = Path(folder)
    adapter_dir = root / ADAPTER_DIR
    if (root / HISTORY_FILE).exists():
        records = _run_records(root, adapter_dir)
    elif (root / LOCAL_METRICS_FILE).exists():
        records = _local_records(root, adapter_dir)
    else:
        raise CheckpointError(f"{root}: neither {HISTORY_FILE} nor {LOCAL_METRICS_FILE}: no run to describe")
    path = adapter_dir / CARD_FILE
    path.write_text(render(records))
    return path
