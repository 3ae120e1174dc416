"""The cost of secure aggregation per institution: the protocol alone, and the whole round 0 plain vs secure.

Run: ``python -m benchmarks secure_aggregation [--institutions 10 50]
[--length 100000] [--dropped 0.1] [--ring-bits 32] [--repeats 3] [--round-repeats 2]``

One round of the protocol in one process: every institution's five steps (signed, as deployed) and the
server's, each timed alone (seconds: the median of ``--repeats`` rounds, as the machine may be shared),
with ``--dropped`` of the institutions leaving after they shared keys (so the server also rebuilds their
keys and pairwise masks). Bytes are what one institution sends and receives (node ids 8 bytes each),
beside the plain round's upload of the same vector as float32. The client's time grows with n (one
pairwise mask per peer); the server's with n x dropped.

Then the whole round 0 (the statistics release of the default simulation: MiniLM, drug-review triage,
64 tokens, DP epsilon 8, partitioned IID into n institutions), plain (server.strategy's statistics
message and summed releases) against secure (server.secure_statistics' five stages), side by side at
each n, through the real ServerApp body and ClientApps (client.app, with their ledgers and audit logs)
in one process (no network: Flower's transport is not in either figure). Wall seconds of the round
(the median of ``--round-repeats``, the two modes alternated), where they go (per stage: the
institutions' ClientApp time, summed over institutions, and the server's own), and the bytes per
institution as Flower serialises the messages (flwr.common.serde.message_to_proto), to and from it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity
from rich.table import Table

from benchmarks import PROG
from benchmarks.stats_head import set_config
from fedlora.client.app import build_client_app
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state
from fedlora.common.cli_support import console, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import FedloraError
from fedlora.common.secure_aggregation.client import ClientRound
from fedlora.common.secure_aggregation.identity import Identity, Roster, public_bytes
from fedlora.common.secure_aggregation.messages import SignedAdvert, UnmaskShares
from fedlora.common.secure_aggregation.quantise import Quantiser
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import SecAggConfig
from fedlora.server.app import as_record, server_workbench
from fedlora.server.secure_statistics import secure_statistics
from fedlora.server.strategy import build_strategy
from fedlora.simulations.identities import with_identities
from fedlora.simulations.virtual_client import simulation_setup

ID_BYTES = 8


@dataclass(frozen=True)
class Cost:
    institutions: int
    dropped: int
    client_seconds: float  # mean over institutions of its five steps
    server_seconds: float
    sent_bytes: int  # by the first institution
    received_bytes: int
    plain_bytes: int  # the same vector as float32, the plain round's upload
    exact: bool  # the unmasked sum equals the plain sum of the quantised survivors' vectors


def advert_bytes(advert: SignedAdvert) -> int:
    """Node id, two keys, the noise multiplier (8 bytes), identity and signature."""
    return ID_BYTES + len(advert.keys.cipher) + len(advert.keys.mask) + 8 + len(advert.identity) + len(
        advert.signature
    )


def inbox_bytes(sealed: dict[int, bytes]) -> int:
    return sum(ID_BYTES + len(text) for text in sealed.values())


def answer_bytes(answer: UnmaskShares) -> int:
    return sum(ID_BYTES + len(share) for part in (answer.seeds, answer.keys) for share in part.values())


def measure(institutions: int, length: int, dropped_share: float, ring_bits: int) -> Cost:
    """One round of ``institutions`` masking ``length`` values, ``dropped_share`` leaving after sharing."""
    nodes = list(range(1, institutions + 1))
    rng = np.random.default_rng(0)
    inputs = {node: rng.normal(size=length) for node in nodes}
    dropped = set(nodes[len(nodes) - int(dropped_share * institutions) :])
    config = SecAggConfig(ring_bits=ring_bits, tolerated_dropouts=len(dropped))
    context = b"benchmark/round-1"
    spent = dict.fromkeys(nodes, 0.0)
    server_spent = 0.0

    def timed(node: int | None, step, *args):
        nonlocal server_spent
        start = time.perf_counter()
        out = step(*args)
        if node is None:
            server_spent += time.perf_counter() - start
        else:
            spent[node] += time.perf_counter() - start
        return out

    signing = {node: Ed25519PrivateKey.generate() for node in nodes}
    identities = Roster.of({f"client-{node}": public_bytes(key) for node, key in signing.items()})
    server = timed(None, ServerRound, config, context, length, institutions, identities)
    clients = {
        node: timed(node, ClientRound, node, config, context, Identity(signing[node], identities))
        for node in nodes
    }
    adverts = {node: timed(node, clients[node].advertise_keys, 1.0) for node in nodes}
    roster = timed(None, server.collect_keys, adverts)
    sent = {node: timed(node, clients[node].share_keys, roster, server.threshold) for node in nodes}
    inbox = timed(None, server.route_shares, sent)
    masked = {
        node: timed(node, clients[node].masked_input, inbox[node], inputs[node])
        for node in nodes
        if node not in dropped
    }
    survivors = timed(None, server.collect_masked, masked)
    signatures = {node: timed(node, clients[node].sign_survivors, survivors) for node in survivors}
    relayed = timed(None, server.collect_signatures, signatures)
    answers = {node: timed(node, clients[node].unmask, relayed) for node in survivors}
    total = timed(None, server.unmask, answers)
    quantised = [Quantiser.of(config).quantise(inputs[node]) for node in survivors]
    expected = np.sum(quantised, axis=0, dtype=quantised[0].dtype)
    first = nodes[0]
    return Cost(
        institutions=institutions,
        dropped=len(dropped),
        client_seconds=float(np.mean(list(spent.values()))),
        server_seconds=server_spent,
        sent_bytes=advert_bytes(adverts[first]) + inbox_bytes(sent[first]) + masked[first].nbytes
        + len(signatures[first]) + answer_bytes(answers[first]),
        received_bytes=sum(map(advert_bytes, roster.values())) + inbox_bytes(inbox[first])
        + ID_BYTES * len(survivors) + inbox_bytes(relayed),
        plain_bytes=length * 4,
        exact=bool(np.array_equal(total, expected)),
    )  # fmt: skip


class TimedGrid:
    """The institutions of ``cfg``'s simulation, their ClientApps run here (node i + 1 serves partition
    i, each with a context kept across messages as Flower keeps it): each exchange's ClientApp seconds
    by stage, and the serialised bytes to and from every institution."""

    def __init__(self, cfg: FedloraConfig, run_dir: Path) -> None:
        nodes = range(1, cfg.simulation.num_clients + 1)
        self.setups = {
            n: simulation_setup(cfg, run_dir, SimpleNamespace(node_config={P.PARTITION_ID: n - 1}))
            for n in nodes
        }
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes
        }
        self.app = build_client_app(lambda context: self.setups[context.node_id])
        self.client_seconds: dict[str, float] = defaultdict(float)
        self.received: dict[int, int] = defaultdict(int)
        self.sent: dict[int, int] = defaultdict(int)

    def get_node_ids(self) -> list[int]:
        return list(self.setups)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            stage = str(msg.content[P.CONFIG].get(P.SECAGG_STAGE, P.STATISTICS))
            start = time.perf_counter()
            reply = self.app(msg, self.contexts[node])
            self.client_seconds[stage] += time.perf_counter() - start
            self.received[node] += message_to_proto(msg).ByteSize()
            self.sent[node] += message_to_proto(reply).ByteSize()
            replies.append(reply)
        return replies


@dataclass(frozen=True)
class RoundCost:
    seconds: float
    client_seconds: dict[str, float]
    """ClientApp seconds by stage, summed over institutions."""
    sent: float
    """Bytes per institution (mean), serialised as Flower sends them."""
    received: float


def one_round(institutions: int, secure: bool, run_dir: Path) -> RoundCost:
    """Round 0 of ``institutions`` (fresh ledgers in ``run_dir``), plain or under secure aggregation."""
    cfg = set_config(
        "triage",
        f"simulation.num_clients={institutions}",
        f"federation.min_clients={institutions}",
        "simulation.partition=iid",
        f"federation.secure_aggregation={str(secure).lower()}",
    )
    cfg = with_identities(cfg, run_dir)
    bench, _ = server_workbench(cfg)
    arrays = as_record(adapter_state(bench.built.model))
    strategy = build_strategy(cfg, bench.built.fingerprint, institutions)
    grid = TimedGrid(cfg, run_dir)
    start = time.perf_counter()
    if secure:
        head = secure_statistics(grid, strategy, arrays, cfg)
    else:
        replies = grid.send_and_receive(strategy.configure_statistics(arrays, grid))
        head = strategy.aggregate_statistics(replies, cfg.model.head_scale)
    seconds = time.perf_counter() - start
    if head is None:
        raise FedloraError(f"round 0 of {institutions} institutions built no head (secure: {secure})")
    return RoundCost(
        seconds=seconds,
        client_seconds=dict(grid.client_seconds),
        sent=statistics.fmean(grid.sent.values()),
        received=statistics.fmean(grid.received.values()),
    )


def protocol_seconds(cost: RoundCost) -> float:
    """A round's time outside the institutions' release (whose embedding, the same work in both modes,
    varies most on a shared machine): the key, share and unmask stages at the institutions and all the
    server's own time; the plain round's is the server's alone. The masking itself is in the
    masked-input stage (the protocol table above times it)."""
    extra = sum(s for stage, s in cost.client_seconds.items() if stage not in (P.STATISTICS, P.MASKED_INPUT))
    return extra + cost.seconds - sum(cost.client_seconds.values())


def round_table(args: argparse.Namespace) -> Table:
    """Round 0 plain and secure, side by side at each size, the modes alternated."""
    for identity in ("run_id", "node_id", "task_id"):  # the Messages a ServerApp process makes
        setattr(TaskIdentity, identity, 1)
    table = Table(title="round 0 (statistics, MiniLM triage, DP epsilon 8), plain vs secure aggregation")
    for column in (
        "n", "mode", "round s", "x plain", "ClientApp s by stage", "server s", "outside the release s",
        "sent", "received",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="fedlora-secagg-round-") as scratch:
        one_round(args.institutions[0], False, Path(scratch) / "warm-up")  # model, data and accountant caches
        for institutions in args.institutions:
            console.print(f"round 0 of {institutions} institutions, plain and secure ...")
            costs: dict[bool, list[RoundCost]] = {False: [], True: []}
            for repeat in range(args.round_repeats):
                for secure in (False, True):
                    folder = Path(scratch) / f"{institutions}-{secure}-{repeat}"
                    costs[secure].append(one_round(institutions, secure, folder))
            plain = statistics.median(c.seconds for c in costs[False])
            for secure in (False, True):
                seconds = statistics.median(c.seconds for c in costs[secure])
                cost = min(costs[secure], key=lambda c, median=seconds: abs(c.seconds - median))  # its stages
                stages = ", ".join(f"{stage} {s:.2f}" for stage, s in cost.client_seconds.items())
                server = cost.seconds - sum(cost.client_seconds.values())
                table.add_row(
                    str(institutions), "secure" if secure else "plain", f"{seconds:.2f}",
                    f"{seconds / plain:.2f}", stages, f"{server:.2f}", f"{protocol_seconds(cost):.2f}",
                    f"{cost.sent / 1e3:,.1f} kB", f"{cost.received / 1e3:,.1f} kB",
                )  # fmt: skip
    return table


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} secure_aggregation", description=__doc__.split("\n")[0])
    parser.add_argument("--institutions", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--length", type=int, default=100_000, help="values per institution's vector")
    parser.add_argument("--dropped", type=float, default=0.1, help="share leaving after sharing keys")
    parser.add_argument("--ring-bits", type=int, default=32, choices=(32, 64))
    parser.add_argument("--repeats", type=int, default=3, help="rounds per size; seconds are the median")
    parser.add_argument(
        "--round-repeats", type=int, default=2, help="whole rounds 0 per size and mode (0: the protocol only)"
    )
    return parser


def run(args: argparse.Namespace) -> None:
    table = Table(title=f"secure aggregation, {args.length:,} values, ring 2^{args.ring_bits}")
    for column in ("n", "dropped", "client s", "server s", "sent", "received", "sent / plain", "exact"):
        table.add_column(column, justify="right")
    for institutions in args.institutions:
        console.print(f"round of {institutions} institutions ...")
        costs = [
            measure(institutions, args.length, args.dropped, args.ring_bits) for _ in range(args.repeats)
        ]
        cost = replace(
            costs[0],
            client_seconds=statistics.median(c.client_seconds for c in costs),
            server_seconds=statistics.median(c.server_seconds for c in costs),
            exact=all(c.exact for c in costs),
        )
        table.add_row(
            str(cost.institutions), str(cost.dropped),
            f"{cost.client_seconds:.3f}", f"{cost.server_seconds:.3f}",
            f"{cost.sent_bytes / 1e3:,.1f} kB", f"{cost.received_bytes / 1e3:,.1f} kB",
            f"{cost.sent_bytes / cost.plain_bytes:.3f}", "yes" if cost.exact else "NO",
        )  # fmt: skip
    report.print(table)
    if args.round_repeats > 0:
        report.print(round_table(args))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: run(args))
