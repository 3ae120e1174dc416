"""simulation.reproducible: seeded DP noise and sampling for research comparisons, never in production.

The ClientApp's own handler trains from the same global adapter twice: the same seeds must give the
same delta bit for bit (Poisson sampling, Opacus' noise and LoRA dropout all seeded), another round or
another simulation.seed a different one; without the mode the noise stays unseeded.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.client.app import ClientSetup, handle_train
from fedlora.client.ledger import STATISTICS_ROUND
from fedlora.common import protocol as P
from fedlora.common.adapter import from_record
from fedlora.common.config import config_from_dict
from fedlora.common.errors import ConfigError
from fedlora.simulations.partitions import simulation_partitions
from fedlora.simulations.report import write_report
from fedlora.simulations.run import prepare_run_dir
from helpers.messages import train_message

SETTINGS = {
    "model": {"source": "tiny-bert", "lora_dropout": 0.2},
    "data": {"max_length": 32},
    "training": {"device": "cpu", "batch_size": 16, "local_steps": 3},
    "privacy": {"accountant": "rdp", "epsilon": 8.0},
    "federation": {"rounds": 2},
    "simulation": {"num_clients": 2, "reproducible": True},
}


def simulation_config(**sections: dict):
    data = {key: {**value, **sections.get(key, {})} for key, value in SETTINGS.items()}
    return config_from_dict(data, source="<test>", persona="simulation")


def delta_of_one_round(cfg, folder, round_id: int = 1) -> dict[str, torch.Tensor]:
    """handle_train, as the simulation's ClientApp calls it, for virtual institution 0 with a fresh
    ledger: the delta it sends (round 0: its class statistics, as round 0 asks for them)."""
    msg = train_message(cfg, round_id)
    if round_id == STATISTICS_ROUND:
        msg.content[P.CONFIG][P.STAGE] = P.STATISTICS
    folder.mkdir(parents=True)
    trains, evals = simulation_partitions(cfg)
    rows = (trains[0], evals[0] if evals else None)
    setup = ClientSetup(cfg, client_id=0, ledger_path=folder / "ledger.json", rows=rows)
    reply = handle_train(msg, setup)
    assert reply.content[P.METRICS]["epsilon"] > 0
    return from_record(reply.content[P.ARRAYS])


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_seeds_give_the_same_delta_bit_for_bit_and_other_seeds_another(tmp_path):
    cfg = simulation_config()
    first = delta_of_one_round(cfg, tmp_path / "first")
    torch.rand(7)  # whatever the process drew in between changes nothing
    again = delta_of_one_round(cfg, tmp_path / "again")
    assert same_bits(first, again)
    assert any(v.abs().max() > 0 for v in first.values())

    later_round = delta_of_one_round(cfg, tmp_path / "round-2", round_id=2)
    other_seed = delta_of_one_round(simulation_config(simulation={"seed": 1}), tmp_path / "seed-1")
    assert not same_bits(first, later_round)
    assert not same_bits(first, other_seed)


def test_round_zero_statistics_noise_is_seeded_too(tmp_path):
    """The shared head is built from the noisy round-0 releases: drawn from the unseeded RNG, two
    runs on the same seeds started from different heads, and no adapter of theirs was the same."""
    cfg = simulation_config()
    first = delta_of_one_round(cfg, tmp_path / "first", STATISTICS_ROUND)
    torch.rand(7)
    assert same_bits(first, delta_of_one_round(cfg, tmp_path / "again", STATISTICS_ROUND))
    other_seed = simulation_config(simulation={"seed": 1})
    assert not same_bits(first, delta_of_one_round(other_seed, tmp_path / "seed-1", STATISTICS_ROUND))


def test_without_the_mode_dp_noise_stays_unseeded(tmp_path):
    cfg = simulation_config(simulation={"reproducible": False})
    assert not same_bits(delta_of_one_round(cfg, tmp_path / "a"), delta_of_one_round(cfg, tmp_path / "b"))


@pytest.mark.parametrize("persona", ["institution", "coordinator"])
def test_an_institution_or_coordinator_config_that_seeds_noise_is_refused(persona):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"simulation": {"reproducible": True}}, source="site.yaml", persona=persona)
    message = str(err.value)
    article = "an" if persona == "institution" else "a"
    assert message.startswith(f"site.yaml: simulation.reproducible: not {article} {persona} setting: ")
    assert "research simulations only" in message
    assert "\n" not in message


@pytest.mark.parametrize("reproducible", [True, False])
def test_the_report_of_a_seeded_run_says_it_is_not_for_production(tmp_path, reproducible):
    prepare_run_dir(simulation_config(simulation={"reproducible": reproducible}), tmp_path)
    history = [{"round": 0, "central": {"loss": 1.0, "accuracy": 0.5}}]
    text = write_report(tmp_path, history, "run").read_text()
    assert ("seeded noise, not for production" in text) is reproducible
