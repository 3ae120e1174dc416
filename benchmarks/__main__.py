"""``python -m benchmarks NAME [ARGS]``: every benchmark behind one entry point.

Each prints its table on stdout and its progress on stderr; a FedloraError is one line and exit code
2. ``NAME --help`` lists a benchmark's options.
"""

from __future__ import annotations

import sys
from importlib import import_module

from fedlora.common.cli_support import report, run_cli
from fedlora.common.errors import ConfigError

BENCHMARKS = {
    "aggregators": "fedavg vs exact vs ffa (and mixed ranks), DP and not, repeated, with intervals",
    "deployment_overhead": "per-round client overhead in deployment: model reloaded per message vs kept",
    "distributed_noise": "statistics head: local vs distributed (secure aggregation) vs centralised DP noise",
    "dp_throughput": "samples/s of local training: non-private vs DP hooks vs DP ghost clipping",
    "llm_throughput": "causal LM (SmolLM2, or a 7B Llama on a GPU): DP vs non-DP tokens/s and peak memory",
    "memory": "memory per round of a long simulation, per process",
    "privacy_unit": "accuracy and rows/s of person-level vs row-level DP on synthetic patients",
    "person_stats": "round-0 statistics head per person vs per row vs label names, synthetic patients",
    "overhead": "fedlora's simulation overhead over bare Flower, training off",
    "scale": "client updates per minute and memory at 10 to 1,000 institutions, fedlora vs bare Flower",
    "recipe": "held-out accuracy of local LoRA recipes, DP and not, against the linear probe",
    "secure_aggregation": "time and bytes per institution of a secure aggregation round at 10 and 50",
    "head_rounds": "statistics head vs + DP head rounds, local/distributed/central noise, lr on train rows",
    "stats_head": "summed DP class statistics head vs probe vs averaged per-institution heads, 3 sets",
    "seeds": "settings on the same seeds (reproducible mode): each one's mean and paired difference",
}


def usage() -> str:
    names = "\n".join(f"  {name:14s} {what}" for name, what in BENCHMARKS.items())
    return f"usage: python -m benchmarks NAME [ARGS]\n\n{names}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        report.print(usage(), highlight=False)
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    if name not in BENCHMARKS:

        def refuse() -> None:
            raise ConfigError(f"{argv[0]}: no such benchmark; expected one of {', '.join(BENCHMARKS)}")

        return run_cli(refuse)
    return import_module(f"benchmarks.{name}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
