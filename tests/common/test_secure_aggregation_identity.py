"""Long-term identities of secure aggregation (common.secure_aggregation.identity): the signing key file
(made once by `fedlora-client keys`, owner-only, never replaced), the roster file, and their one-line
refusals; `fedlora-client check` states what secure aggregation the institution can take part in."""

from __future__ import annotations

import pytest

from fedlora.client import cli as client_cli
from fedlora.common.config import load_config
from fedlora.common.errors import ConfigError
from fedlora.common.secure_aggregation.identity import (
    create_signing_key,
    load_identity,
    load_roster,
    load_signing_key,
    public_text,
    write_roster,
)
from fedlora.server.cli import identities_line


def flat(table: str) -> str:
    """A printed table's words in order, cell borders and wrapping gone."""
    return " ".join(table.replace("│", " ").split())


def test_the_signing_key_is_owner_only_and_refused_in_one_line_otherwise(tmp_path):
    path = tmp_path / "a.identity"
    public = create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_signing_key(path).public_key().public_bytes_raw() == public
    with pytest.raises(ConfigError, match="already exists; refusing to replace"):
        create_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"a.identity is readable by others \(mode 0644\); expected 0600"):
        load_signing_key(path)
    for bad, match in (
        (tmp_path / "missing", "cannot read"),
        (tmp_path / "garbage", "expected an unencrypted Ed25519 PEM key"),
    ):
        if bad.name == "garbage":
            bad.write_text("not a key")
            bad.chmod(0o600)
        with pytest.raises(ConfigError, match=match) as err:
            load_signing_key(bad)
        assert "\n" not in str(err.value) and "security.identity_key" in str(err.value)


def test_the_roster_file_is_checked_entry_by_entry_in_one_line(tmp_path):
    key = tmp_path / "a.identity"
    public = create_signing_key(key)
    roster = tmp_path / "roster.yaml"
    write_roster(roster, {"hospital-a": public, "hospital-b": b"\1" * 32})
    assert load_roster(roster).names == {public: "hospital-a", b"\1" * 32: "hospital-b"}
    assert load_identity(key, roster).roster.names[public] == "hospital-a"
    cases = {
        "hospital-c: not-base64!\n": r"hospital-c: 'not-base64!' is not an Ed25519 public key",
        f"hospital-c: {public_text(b'short')}\n": "expected the base64 of 32 bytes",
        f"a: {public_text(public)}\nb: {public_text(public)}\n": "'b' repeats the key of 'a'",
        "": "names no institution",
    }
    for text, match in cases.items():
        roster.write_text(text)
        with pytest.raises(ConfigError, match=match) as err:
            load_roster(roster)
        assert "\n" not in str(err.value)
    write_roster(roster, {"hospital-b": b"\1" * 32})
    with pytest.raises(ConfigError, match=r"is not in security\.identity_roster"):
        load_identity(key, roster)
    with pytest.raises(ConfigError, match=r"security\.identity_roster is not set"):
        load_identity(key, None)


def test_keys_makes_the_identity_prints_its_roster_line_and_check_states_it(tmp_path, capsys):
    identity, node = tmp_path / "keys" / "a.identity", tmp_path / "keys" / "a.key"
    args = ["--set", f"security.identity_key={identity}", "--set", f"security.node_private_key={node}"]
    assert client_cli.main(["keys", *args, "--set", "name=hospital-a"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    public = load_signing_key(identity).public_key().public_bytes_raw()
    assert f"hospital-a: {public_text(public)}" in out and node.exists()
    assert client_cli.main(["keys", *args]) == 2  # nothing left to make: nothing replaced
    assert "already exists" in capsys.readouterr().err
    write_roster(tmp_path / "roster.yaml", {"hospital-a": public})
    check = ["check", "--set", "model.source=tiny-bert", "--set", "privacy.enabled=false"]
    assert client_cli.main([*check, "--set", f"security.identity_key={identity}"]) == 0
    assert "refused: security.identity_key and security.identity_roster" in flat(capsys.readouterr().out)
    roster = f"security.identity_roster={tmp_path / 'roster.yaml'}"
    assert client_cli.main([*check, "--set", f"security.identity_key={identity}", "--set", roster]) == 0
    assert "signed as 'hospital-a', peers checked against a roster of 1" in flat(capsys.readouterr().out)


def test_the_coordinators_check_says_whether_it_holds_the_roster(tmp_path):
    secure = ["federation.secure_aggregation=true", "federation.min_clients=3"]
    assert "no security.identity_roster here" in identities_line(load_config(overrides=secure))
    roster = tmp_path / "roster.yaml"
    write_roster(roster, {"hospital-a": b"\1" * 32, "hospital-b": b"\2" * 32})
    cfg = load_config(overrides=[*secure, f"security.identity_roster={roster}"])
    assert "outside its roster of 2 dropped before relaying" in identities_line(cfg)
    roster.write_text("hospital-a: nope\n")
    with pytest.raises(ConfigError, match="hospital-a: 'nope' is not an Ed25519 public key"):
        identities_line(cfg)
