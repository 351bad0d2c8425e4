"""Mutual TLS for TCP listeners, with certificates that rotate without a restart.

gRPC calls :meth:`ReloadingCertificates.fetch` before every TLS handshake
(measured: once per new connection).  It compares the (device, inode, size,
mtime) of the three files with what it last loaded and returns a new
configuration only when they changed, or after :meth:`request_reload`
(SIGHUP).  A new set is checked first (the key matches the certificate, the CA
parses); a half-written or mismatched set is logged and skipped, and the agent
keeps serving with the last good one, retrying at the next handshake.

Client certificates are required and must chain to the CA file; a client
without one, with an expired one, or with one from another CA fails the
handshake before any handler runs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import CorepeekError

log = logging.getLogger(__name__)


class TLSConfigError(CorepeekError):
    help = ("--tls-cert and --tls-key must be a PEM certificate and its private key, and "
            "--tls-ca the PEM CA bundle client certificates chain to")


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, ca: str | None) -> TLSFiles | None:
        given = [x for x in (cert, key, ca) if x]
        if not given:
            return None
        if len(given) != 3:
            raise TLSConfigError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        return cls(Path(cert), Path(key), Path(ca))  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoadedSet:
    cert: bytes
    key: bytes
    ca: bytes
    not_after: dt.datetime | None


def _signature(files: TLSFiles) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for p in (files.cert, files.key, files.ca):
        st = os.stat(p)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_set(files: TLSFiles) -> LoadedSet:
    """Read and check the three files; raises TLSConfigError with the reason."""
    try:
        cert, key, ca = (p.read_bytes() for p in (files.cert, files.key, files.ca))
    except OSError as exc:
        raise TLSConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise TLSConfigError(f"{files.cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise TLSConfigError(f"{files.key} holds no PEM private key")
    try:
        ssl.create_default_context(cadata=ca.decode("ascii", errors="strict"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise TLSConfigError(f"{files.ca} is not a usable PEM CA bundle: {exc}") from None
    return LoadedSet(cert, key, ca, _check_pair(cert, key, files))


def _check_pair(cert: bytes, key: bytes, files: TLSFiles) -> dt.datetime | None:
    """The key matches the certificate (with ``cryptography`` when installed)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:                                    # pragma: no cover
        return None
    try:
        c = x509.load_pem_x509_certificate(cert)
        k = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"cannot parse {files.cert} / {files.key}: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if c.public_key().public_bytes(enc, pub) != k.public_key().public_bytes(enc, pub):
        raise TLSConfigError(f"{files.key} is not the private key of {files.cert}")
    return c.not_valid_after_utc


class ReloadingCertificates:
    """The server's certificate configuration, reloaded when the files change."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._force = False
        self.loaded = load_set(files)
        self._sig = _signature(files)
        self.reloads = 0
        self._warn_expiry(self.loaded)

    def _config(self, s: LoadedSet) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(s.key, s.cert)],
                                                         root_certificates=s.ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config(self.loaded), self.fetch,
                                                   require_client_authentication=True)

    def request_reload(self) -> None:
        """Reload at the next handshake even if the files look unchanged (SIGHUP)."""
        with self._lock:
            self._force = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration, or None to keep the current one."""
        try:
            with self._lock:
                sig = _signature(self.files)
                if sig == self._sig and not self._force:
                    return None
                new = load_set(self.files)
                self._sig, self._force = sig, False
                self.loaded = new
                self.reloads += 1
            log.warning("TLS certificates reloaded from %s (reload %d)", self.files.cert,
                        self.reloads)
            self._warn_expiry(new)
            return self._config(new)
        except (OSError, TLSConfigError) as exc:
            msg = exc.details() if isinstance(exc, TLSConfigError) else str(exc)
            log.error("TLS reload skipped, serving with the previous certificates: %s", msg)
            return None
        except Exception:  # noqa: BLE001 - never let the fetcher break the handshake
            log.exception("TLS reload failed")
            return None

    @staticmethod
    def _warn_expiry(s: LoadedSet) -> None:
        if s.not_after is None:
            return
        left = s.not_after - dt.datetime.now(dt.timezone.utc)
        if left.total_seconds() <= 0:
            log.error("the agent's TLS certificate expired at %s", s.not_after.isoformat())
        elif left < dt.timedelta(days=7):
            log.warning("the agent's TLS certificate expires in %s", left)
