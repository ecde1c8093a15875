"""Self-signed certificates and a tiny TLS server on 127.0.0.1 for pinning tests."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Cert:
    der: bytes
    cert_file: Path
    key_file: Path


def make_cert(directory: Path, name: str, ca: bool | None = True) -> Cert:
    """A self-signed certificate for 127.0.0.1. `ca`: basicConstraints CA:TRUE, CA:FALSE, or
    no basicConstraints at all (None) — coordinators may make any of these."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.DNSName("localhost")]), critical=False))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                        critical=True)
    cert = builder.sign(key, hashes.SHA256())
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Cert(cert.public_bytes(serialization.Encoding.DER), cert_file, key_file)


@contextmanager
def tls_server(cert: Cert, reply: bytes = b"",
               handler: Callable[[ssl.SSLSocket, threading.Event], None] | None = None
               ) -> Iterator[int]:
    """Accept TLS on 127.0.0.1:<port>; answer every connection with `reply` (e.g. an HTTP
    response) after reading one chunk, or hand it to `handler` (with the event set on exit).
    Yields the port; stops its thread on exit."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    if handler is not None:
                        handler(tls, stop)
                    elif reply:
                        tls.recv(65536)
                        tls.sendall(reply)
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate: that is the point of some tests
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
