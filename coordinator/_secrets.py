"""Secrets the coordinator hands out, and its TLS identity.

- enrollment token `fm1.<cert sha256 hex>.<secret>` (mesh.control.TokenParts), secret 32 random
  bytes in URL-safe base64 (43 characters);
- device credential `fmd_<43 characters>`, operator API key `fmo_<43 characters>`.
Only the SHA-256 (hex) of a secret is stored, so a leaked database enrolls and impersonates
nobody. 256-bit secrets make a plain hash enough: there is nothing to brute-force.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.blobs import write_atomically
from vpn import write_private_file

DEVICE_PREFIX: Final = "fmd_"
OPERATOR_PREFIX: Final = "fmo_"
SECRET_BYTES: Final = 32
CERT_DAYS: Final = 3650  # pinned by fingerprint, so expiry protects nothing; rotate by re-issue


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def new_device_credential() -> str:
    return DEVICE_PREFIX + new_secret()


def new_operator_key() -> str:
    return OPERATOR_PREFIX + new_secret()


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def write_secret_file(path: Path, text: str) -> None:
    """Create `path` 0600 (never world-readable, not even for a moment) and write `text`."""
    write_private_file(path, text.encode())


# --------------------------------------------------------------------------- TLS


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 (hex) of the certificate's DER bytes: what tokens carry (mesh/tlspin.py)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def make_self_signed(cert_path: Path, key_path: Path, ips: list[str], now: dt.datetime
                     ) -> None:
    """ECDSA P-256, SAN = the given IPs (plus loopback and `localhost`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetmesh coordinator")])
    seen: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in [*ips, "127.0.0.1", "::1"]:
        addr = ipaddress.ip_address(ip)
        if not addr.is_unspecified and addr not in seen:
            seen.append(addr)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), *(x509.IPAddress(a) for a in seen)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_secret_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode())
    # atomic and durable like the key: a torn certificate would stop every later start
    write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM))
