"""The cost of secure aggregation (common/secure_aggregation) per institution, without Flower.

Run: ``python -m benchmarks secure_aggregation [--institutions 10 50]
[--length 100000] [--dropped 0.1] [--ring-bits 32] [--repeats 3]``

One round of the protocol in one process: every institution's four steps and the server's, each
timed alone (seconds: the median of ``--repeats`` rounds, as the machine may be shared), with
``--dropped`` of the institutions leaving after they shared keys (so the server also rebuilds their
keys and pairwise masks). Bytes are what one institution sends and receives (node ids 8 bytes each),
beside the plain round's upload of the same vector as float32. The client's time grows with n (one
pairwise mask per peer); the server's with n x dropped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
from rich.table import Table

from benchmarks import PROG
from fedlora.common.cli_support import console, report, run_cli
from fedlora.common.secure_aggregation.client import ClientRound
from fedlora.common.secure_aggregation.messages import Advert, UnmaskShares
from fedlora.common.secure_aggregation.quantise import Quantiser
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import SecAggConfig

ID_BYTES = 8


@dataclass(frozen=True)
class Cost:
    institutions: int
    dropped: int
    client_seconds: float  # mean over institutions of its four steps
    server_seconds: float
    sent_bytes: int  # by the first institution
    received_bytes: int
    plain_bytes: int  # the same vector as float32, the plain round's upload
    exact: bool  # the unmasked sum equals the plain sum of the quantised survivors' vectors


def advert_bytes(advert: Advert) -> int:
    return ID_BYTES + len(advert.cipher) + len(advert.mask)


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

    server = timed(None, ServerRound, config, context, length, institutions)
    clients = {node: timed(node, ClientRound, node, config, context) for node in nodes}
    adverts = {node: timed(node, clients[node].advertise_keys) for node in nodes}
    roster = timed(None, server.collect_keys, adverts)
    sent = {node: timed(node, clients[node].share_keys, roster, server.threshold) for node in nodes}
    inbox = timed(None, server.route_shares, sent)
    masked = {
        node: timed(node, clients[node].masked_input, inbox[node], inputs[node])
        for node in nodes
        if node not in dropped
    }
    survivors = timed(None, server.collect_masked, masked)
    answers = {node: timed(node, clients[node].unmask, survivors) for node in survivors}
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
        + answer_bytes(answers[first]),
        received_bytes=sum(map(advert_bytes, roster.values())) + inbox_bytes(inbox[first])
        + ID_BYTES * len(survivors),
        plain_bytes=length * 4,
        exact=bool(np.array_equal(total, expected)),
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} secure_aggregation", description=__doc__.split("\n")[0])
    parser.add_argument("--institutions", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--length", type=int, default=100_000, help="values per institution's vector")
    parser.add_argument("--dropped", type=float, default=0.1, help="share leaving after sharing keys")
    parser.add_argument("--ring-bits", type=int, default=32, choices=(32, 64))
    parser.add_argument("--repeats", type=int, default=3, help="rounds per size; seconds are the median")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: run(args))
