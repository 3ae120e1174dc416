"""Development certificates: a throw-away CA and a server certificate for this machine only.

A first-time user should be able to try a secured federation (TLS + SuperNode authentication) on one
machine without learning openssl. These files are for localhost; a real deployment uses certificates
from the institution's own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.common.durable import write_durably
from fedlora.common.errors import FedloraError

VALID_DAYS = 30


@dataclass(frozen=True)
class DevCerts:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_dev_certs(out_dir: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> DevCerts:
    """Write ca.crt, server.pem and server.key into ``out_dir``; refuses to overwrite them."""
    out = Path(out_dir)
    certs = DevCerts(out / "ca.crt", out / "server.pem", out / "server.key")
    existing = [str(p) for p in (certs.ca_cert, certs.server_cert, certs.server_key) if p.exists()]
    if existing:
        raise FedloraError(f"{existing[0]}: already exists; pick an empty folder")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedlora development CA"))
        .issuer_name(_name("fedlora development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    write_durably(certs.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    write_durably(certs.server_cert, server.public_bytes(serialization.Encoding.PEM))
    write_durably(certs.server_key, _pem_key(server_key))
    certs.server_key.chmod(0o600)
    return certs
