"""mesh.tlspin: fetch, fingerprint, and a context that trusts exactly one certificate."""

from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path

import httpx
import pytest
import trio

from mesh.control import TokenParts
from mesh.tlspin import (
    CertificateFetchError,
    PinError,
    connect_pinned,
    connect_pinned_async,
    fetch_certificate,
    fetch_certificate_async,
    fingerprint,
    normalize_fingerprint,
    pinned_ssl_context,
)

from ._tls import make_cert, tls_server

HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _handshake(ctx: ssl.SSLContext, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True) or b""


def test_fingerprint_is_sha256_of_der_and_fits_tokens(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "a")
    fp = fingerprint(cert.der)
    assert fp == hashlib.sha256(cert.der).hexdigest() and len(fp) == 64
    assert TokenParts.parse(f"fm1.{fp}.{'s' * 32}").fingerprint == fp
    colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colons) == fp
    assert normalize_fingerprint(f"sha256:{fp}") == fp
    for bad in ("", "abc", fp[:-1], fp + "0", "g" * 64):
        with pytest.raises(PinError):
            normalize_fingerprint(bad)


@pytest.mark.parametrize("ca", [True, False, None], ids=["ca", "leaf", "no-constraints"])
def test_pinned_context_trusts_exactly_that_certificate(tmp_path: Path, ca: bool | None) -> None:
    good, other = make_cert(tmp_path, "good", ca), make_cert(tmp_path, "other", ca)
    with tls_server(good) as port:
        assert fetch_certificate("127.0.0.1", port) == good.der
        assert _handshake(pinned_ssl_context(good.der), port) == good.der
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(pinned_ssl_context(other.der), port)
    with tls_server(other) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(pinned_ssl_context(good.der), port)


def test_pinned_context_does_not_trust_system_cas(tmp_path: Path) -> None:
    ctx = pinned_ssl_context(make_cert(tmp_path, "a").der)
    assert len(ctx.get_ca_certs()) == 1
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname


def test_httpx_with_pinned_context(tmp_path: Path) -> None:
    good, other = make_cert(tmp_path, "good"), make_cert(tmp_path, "other")
    with tls_server(good, HTTP_OK) as port:
        url = f"https://127.0.0.1:{port}/"
        with httpx.Client(verify=pinned_ssl_context(good.der), trust_env=False) as c:
            assert c.get(url).text == "ok"
        with httpx.Client(verify=pinned_ssl_context(other.der), trust_env=False) as c:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                c.get(url)


def test_connect_pinned_checks_the_fingerprint(tmp_path: Path) -> None:
    good, other = make_cert(tmp_path, "good"), make_cert(tmp_path, "other")
    with tls_server(good) as port:
        url = f"https://127.0.0.1:{port}"
        assert connect_pinned(url, fingerprint(good.der)) == good.der
        assert connect_pinned(url + "/", fingerprint(good.der).upper()) == good.der
        with pytest.raises(PinError) as exc:
            connect_pinned(url, fingerprint(other.der))
        assert not isinstance(exc.value, CertificateFetchError)
        assert "expected" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(PinError, match="https"):
        connect_pinned(f"http://127.0.0.1:{port}", fingerprint(good.der))
    with pytest.raises(CertificateFetchError, match="cannot read"):
        connect_pinned(f"https://127.0.0.1:{_free_port()}", fingerprint(good.der), timeout=2)


async def test_async_fetch_and_connect_pinned(tmp_path: Path) -> None:
    good, other = make_cert(tmp_path, "good"), make_cert(tmp_path, "other")
    with tls_server(good) as port:
        with trio.fail_after(10):
            assert await fetch_certificate_async("127.0.0.1", port) == good.der
            url = f"https://127.0.0.1:{port}"
            assert await connect_pinned_async(url, fingerprint(good.der)) == good.der
            with pytest.raises(PinError, match="expected"):
                await connect_pinned_async(url, fingerprint(other.der))
    with trio.fail_after(10):
        with pytest.raises(CertificateFetchError):
            await fetch_certificate_async("127.0.0.1", _free_port(), timeout=2)
