"""Long-term identities (Bell et al. 2020's malicious setting): each institution signs its round's
adverts and the survivor list it was sent with an Ed25519 key of its own, and verifies its peers'
signatures against the federation's roster of identities, which it holds out of band.

The roster is the trust root: a coordinator that could edit it could add institutions of its own, so
it travels outside the federation (e-mail, a signed document) and never through the coordinator. Its
file is YAML, one line per institution: ``<name>: <base64 of the raw 32-byte Ed25519 public key>``
(what ``fedlora-client keys`` prints). The signing key is a PEM (PKCS#8) file readable by its owner
only; it never leaves the institution.
"""

from __future__ import annotations

import base64
import binascii
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlora.common.config import read_yaml
from fedlora.common.durable import write_durably
from fedlora.common.errors import ConfigError
from fedlora.common.secure_aggregation.keys import node_bytes
from fedlora.common.secure_aggregation.messages import Advert

PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64
ADVERT_PURPOSE = b"fedlora secagg advert v1"
SURVIVORS_PURPOSE = b"fedlora secagg survivors v1"


def public_text(public: bytes) -> str:
    """A public identity as the roster file writes it."""
    return base64.b64encode(public).decode("ascii")


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def create_signing_key(path: Path) -> bytes:
    """A new signing key at ``path`` (owner-only, never replacing one); its public identity."""
    if path.exists():
        raise ConfigError(f"{path}: already exists; refusing to replace the institution's identity key")
    key = Ed25519PrivateKey.generate()
    write_durably(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    path.chmod(0o600)
    return public_bytes(key)


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The institution's signing key; refused in one line when unreadable, not an Ed25519 PEM key, or
    readable by anyone but its owner (group or others: a key others could read is no identity)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"security.identity_key: {path}: cannot read ({err.strerror or err}); expected the key "
            "`fedlora-client keys` created"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"security.identity_key: {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
            "expected 0600 (chmod 600)"
        )
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"security.identity_key: {path}: expected an unencrypted Ed25519 PEM key")
    return key


@dataclass(frozen=True)
class Roster:
    """The federation's identities: public key -> institution name."""

    names: Mapping[bytes, str]

    @classmethod
    def of(cls, entries: Mapping[str, bytes]) -> Roster:
        """From name -> public key; a key listed twice is refused (one institution, one identity)."""
        names: dict[bytes, str] = {}
        for name, public in entries.items():
            if public in names:
                raise ConfigError(
                    f"security.identity_roster: {name!r} repeats the key of {names[public]!r}; expected one "
                    "identity per institution"
                )
            names[public] = name
        return cls(names)


def load_roster(path: str | Path) -> Roster:
    """The roster file (``<name>: <base64 key>`` per line), each entry checked, in one line."""
    entries = {}
    data = read_yaml(path)
    if not data:
        raise ConfigError(
            f"security.identity_roster: {path} names no institution; expected <name>: <key> lines"
        )
    for name, text in data.items():
        try:
            public = base64.b64decode(str(text), validate=True)
        except (binascii.Error, ValueError):
            public = b""
        if len(public) != PUBLIC_BYTES:
            raise ConfigError(
                f"security.identity_roster: {path}: {name!s}: {str(text)[:60]!r} is not an Ed25519 public "
                f"key; expected the base64 of {PUBLIC_BYTES} bytes that `fedlora-client keys` printed"
            )
        entries[str(name)] = public
    return Roster.of(entries)


def write_roster(path: Path, entries: Mapping[str, bytes]) -> None:
    """A roster file (the simulation's, of its virtual institutions)."""
    lines = "".join(f"{name}: {public_text(public)}\n" for name, public in entries.items())
    write_durably(path, lines.encode())


@dataclass(frozen=True)
class Identity:
    """An institution's signing key and the roster it checks its peers against."""

    key: Ed25519PrivateKey
    roster: Roster

    def __post_init__(self) -> None:
        if self.public not in self.roster.names:
            raise ConfigError(
                f"security.identity_key: its public key {public_text(self.public)} is not in "
                "security.identity_roster; expected the roster to list this institution"
            )

    @property
    def public(self) -> bytes:
        return public_bytes(self.key)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


def load_identity(key_path: str | Path | None, roster_path: str | Path | None) -> Identity:
    """The institution's identity from its config, both keys required (one line naming the missing)."""
    for key, value in (("identity_key", key_path), ("identity_roster", roster_path)):
        if not value:
            raise ConfigError(
                f"secure aggregation: security.{key} is not set; without identities a coordinator could "
                "substitute its own keys and unmask this institution's release (docs/privacy.md)"
            )
    return Identity(load_signing_key(key_path), load_roster(roster_path))


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s over ``message`` (malformed inputs are simply invalid)."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def advert_message(context: bytes, node: int, advert: Advert, noise: float) -> bytes:
    """What an advert's signature covers: the round, the node, both keys and the noise multiplier."""
    noise_bytes = struct.pack(">d", noise)
    return ADVERT_PURPOSE + context + node_bytes(node) + advert.cipher + advert.mask + noise_bytes


def survivors_message(context: bytes, survivors: Sequence[int]) -> bytes:
    """What a survivor's consistency signature covers: the round and the sorted survivor list."""
    return SURVIVORS_PURPOSE + context + b"".join(node_bytes(node) for node in sorted(survivors))
