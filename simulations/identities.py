"""The virtual institutions' long-term identities, so that a simulation's secure aggregation runs signed,
as a deployment's does: one Ed25519 key per virtual institution (``client-N``) and their roster, made
once in the run folder (``identities/``, owner-only; kept on resume) by the driver before Ray starts.
The coordinator's config names the roster; each virtual institution's names its own key beside it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedlora.common.config import FedloraConfig
from fedlora.common.secure_aggregation.identity import (
    create_signing_key,
    load_signing_key,
    public_bytes,
    write_roster,
)

FOLDER = "identities"
ROSTER = "roster.yaml"


def key_file(folder: Path, pid: int) -> Path:
    return folder / f"client-{pid}.key"


def with_identities(cfg: FedloraConfig, run_dir: Path) -> FedloraConfig:
    """``cfg`` naming the run's roster (created, with a key per virtual institution, where missing);
    unchanged without federation.secure_aggregation."""
    if not cfg.federation.secure_aggregation:
        return cfg
    folder = (run_dir / FOLDER).resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    entries = {}
    for pid in range(cfg.simulation.num_clients):
        path = key_file(folder, pid)
        entries[f"client-{pid}"] = (
            public_bytes(load_signing_key(path)) if path.exists() else create_signing_key(path)
        )
    write_roster(folder / ROSTER, entries)
    security = dataclasses.replace(cfg.security, identity_roster=str(folder / ROSTER))
    return dataclasses.replace(cfg, security=security)


def own_identity(cfg: FedloraConfig, pid: int) -> FedloraConfig:
    """Virtual institution ``pid``'s config: its key beside the run's roster (where there is one)."""
    if cfg.security.identity_roster is None:
        return cfg
    key = key_file(Path(cfg.security.identity_roster).parent, pid)
    return dataclasses.replace(cfg, security=dataclasses.replace(cfg.security, identity_key=str(key)))
