"""Certificate pinning for the coordinator's self-signed certificate (docs/api.md, "Trust").

The enrollment token and the operator's configuration carry the SHA-256 of the coordinator
certificate's DER bytes. A client fetches the certificate once without verification, compares
its fingerprint, and from then on trusts exactly that certificate: no CA, no trust on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
import ssl
from typing import Final
from urllib.parse import urlsplit

import trio

DEFAULT_TIMEOUT: Final = 10.0  # seconds for connect + handshake; a coordinator answers in ms
_FINGERPRINT_RE: Final = re.compile(r"^[0-9a-f]{64}$")


class PinError(Exception):
    """The coordinator's certificate could not be fetched or is not the expected one; str() is
    one line."""


class CertificateFetchError(PinError):
    """No certificate could be read: nothing listens, timeout, not TLS. The server may be fine
    but unreachable; a caller may treat this as "unreachable" rather than "untrusted"."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, lowercase hex (what tokens carry)."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept `AB:CD:…` (openssl's form), upper case and a `sha256:` prefix; return 64 hex
    digits or raise PinError."""
    t = text.strip().lower() if isinstance(text, str) else ""
    if t.startswith("sha256:"):
        t = t[len("sha256:"):]
    t = t.replace(":", "")
    if not _FINGERPRINT_RE.match(t):
        raise PinError("certificate fingerprint must be 64 hex digits (SHA-256)")
    return t


def _probe_context() -> ssl.SSLContext:
    # Verification off on purpose: this context only reads the peer's certificate so that the
    # caller can compare it with a fingerprint it already trusts. Nothing is sent over it.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _sni(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return None  # SNI must not carry an IP literal (RFC 6066 section 3)
    except ValueError:
        return host


def fetch_certificate(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The DER certificate that host:port presents (unverified: compare it before trusting)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with _probe_context().wrap_socket(raw, server_hostname=_sni(host)) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; kept for clarity
        raise CertificateFetchError(
            f"cannot read the TLS certificate of {host}:{port}: {_reason(exc)}") from exc
    if not der:
        raise CertificateFetchError(f"{host}:{port} presented no certificate")
    return der


async def fetch_certificate_async(host: str, port: int, timeout: float = DEFAULT_TIMEOUT
                                  ) -> bytes:
    """trio version of `fetch_certificate`."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            tls = trio.SSLStream(stream, _probe_context(), server_hostname=_sni(host))
            try:
                await tls.do_handshake()
                der = tls.getpeercert(binary_form=True)
            finally:
                await trio.aclose_forcefully(tls)
    except trio.TooSlowError as exc:
        raise CertificateFetchError(
            f"cannot read the TLS certificate of {host}:{port}: timed out") from exc
    except (OSError, trio.BrokenResourceError) as exc:
        raise CertificateFetchError(
            f"cannot read the TLS certificate of {host}:{port}: {_reason(exc)}") from exc
    if not der:
        raise CertificateFetchError(f"{host}:{port} presented no certificate")
    return bytes(der)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc).splitlines()[0]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text


def pinned_ssl_context(der: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly this certificate and nothing else.

    The certificate is the only trust anchor (`cadata`); hostnames are not checked because the
    pin already names the server. PARTIAL_CHAIN lets OpenSSL accept the anchor itself as the
    leaf even when it is not marked as a CA (a plain self-signed server certificate).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        ctx.load_verify_locations(cadata=der)
    except (ssl.SSLError, ValueError, TypeError) as exc:
        raise PinError("pinned certificate is not a valid DER certificate") from exc
    return ctx


def split_url(url: str) -> tuple[str, int]:
    """host and port of an https URL (port 443 when absent)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PinError(f"not a valid URL: {url!r}") from exc
    if parts.scheme != "https" or not parts.hostname:
        raise PinError(f"coordinator URL must be https://host[:port], got {url!r}")
    return parts.hostname, port or 443


def check_fingerprint(der: bytes, expected: str, where: str) -> bytes:
    want = normalize_fingerprint(expected)
    got = fingerprint(der)
    if not hmac.compare_digest(got, want):
        raise PinError(f"certificate of {where} has fingerprint {got[:16]}…, expected "
                       f"{want[:16]}…: refusing to talk to it")
    return der


def connect_pinned(url: str, expected_fingerprint: str, timeout: float = DEFAULT_TIMEOUT
                   ) -> bytes:
    """Fetch the certificate of the server at `url`, check it against the fingerprint and return
    its DER bytes, to be pinned with `pinned_ssl_context` for every later call."""
    host, port = split_url(url)
    normalize_fingerprint(expected_fingerprint)  # a malformed pin fails before any I/O
    return check_fingerprint(fetch_certificate(host, port, timeout), expected_fingerprint,
                             f"{host}:{port}")


async def connect_pinned_async(url: str, expected_fingerprint: str,
                               timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """trio version of `connect_pinned`."""
    host, port = split_url(url)
    normalize_fingerprint(expected_fingerprint)
    der = await fetch_certificate_async(host, port, timeout)
    return check_fingerprint(der, expected_fingerprint, f"{host}:{port}")
