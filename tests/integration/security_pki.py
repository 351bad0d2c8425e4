"""Throw-away X.509 material for the security tests, made with ``cryptography``.

A CA, a server certificate for 127.0.0.1, client certificates whose identity
is a SAN URI (SPIFFE id) or DNS name, an expired client certificate and one
signed by an unrelated CA.  Nothing is written outside the directory given.
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

NOW = dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class CA:
    """A self-signed certificate authority that issues leaf certificates."""

    def __init__(self, directory: Path, name: str = "corepeek-test-ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (x509.CertificateBuilder()
                     .subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - dt.timedelta(days=1))
                     .not_valid_after(NOW + dt.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                         decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / f"{name}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, *, cn: str | None = None, uris: tuple[str, ...] = (),
              dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool = False,
              not_before: dt.datetime | None = None,
              not_after: dt.datetime | None = None) -> KeyPair:
        """A leaf certificate + key written to ``<dir>/<stem>.{crt,key}``."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(cn or stem)).issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
                   .not_valid_after(not_after or NOW + dt.timedelta(days=7))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server
                        else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pair = KeyPair(self.dir / f"{stem}.crt", self.dir / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(pair.key, key)
        return pair


@dataclass(frozen=True)
class PKI:
    ca: CA
    other_ca: CA
    server: KeyPair
    oncall: KeyPair         # uri:spiffe://corepeek.test/oncall
    reader: KeyPair         # dns:reader.corepeek.test (notes only)
    stranger: KeyPair       # valid, but no policy rule names it
    cn_only: KeyPair        # CN looks privileged, no SAN: must get nothing
    expired: KeyPair        # oncall's identity, but expired
    foreign: KeyPair        # oncall's identity, signed by another CA


ONCALL = "spiffe://corepeek.test/oncall"
READER_DNS = "reader.corepeek.test"


def make_pki(directory: Path) -> PKI:
    ca = CA(directory / "ca")
    other = CA(directory / "other", name="unrelated-ca")
    return PKI(
        ca=ca, other_ca=other,
        server=ca.issue("server", ips=("127.0.0.1",), dns=("localhost",), server=True),
        oncall=ca.issue("oncall", uris=(ONCALL,)),
        reader=ca.issue("reader", dns=(READER_DNS,)),
        stranger=ca.issue("stranger", uris=("spiffe://corepeek.test/stranger",)),
        cn_only=ca.issue("cn-only", cn=ONCALL),
        expired=ca.issue("expired", uris=(ONCALL,), not_before=NOW - dt.timedelta(days=10),
                         not_after=NOW - dt.timedelta(days=1)),
        foreign=other.issue("foreign", uris=(ONCALL,)))
