"""Attack: a coordinator (compromised, or a man in the middle holding its key) answers with a
body that never ends. The SDK must stop reading once the answer passes its limit, not buffer
the whole body first and then compare its length (docs/security.md, "The SDK refuses endless
answers while reading").

A real TLS HTTP server on loopback streams an endless chunked body (or declares a huge
Content-Length) and counts what it manages to send; the client must refuse with one
ProtocolError line, and the server must have been able to push no more than the limit plus
what the kernel's socket buffers hold.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from mesh.control import MAX_BODY_BYTES, MAX_PEERMAP_BYTES
from mesh.tlspin import fingerprint
from ops.client import (
    MAX_BLOB_ANSWER,
    MAX_MANIFEST_ANSWER,
    DeviceClient,
    OperatorClient,
    ProtocolError,
    enroll,
)
from tests.client._tls import Cert, make_cert, tls_server

PIECE = 64 * 1024
# What the server may push past the client's limit: socket buffers on both sides (Linux
# autotunes loopback buffers up to a few MiB) and httpx's read size.
SLACK = 16 * 1024 * 1024
# Where the server gives up: far past every limit, so a client that reads everything before
# checking makes the server send all of it (and the test fails on the count, not by hanging).
CAP = MAX_BLOB_ANSWER + 64 * 1024 * 1024


@dataclass
class Sent:
    bytes: int = 0


@contextmanager
def endless_server(cert: Cert, status: str = "200 OK", declared: int | None = None
                   ) -> Iterator[tuple[int, Sent]]:
    """TLS on 127.0.0.1: every request is answered with `status` and a body of spaces that
    goes on until CAP (chunked, or with `declared` as its Content-Length)."""
    sent = Sent()

    def answer(tls: ssl.SSLSocket, stop: threading.Event) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = tls.recv(65536)
            if not data:
                return
            request += data
        framing = (f"Content-Length: {declared}" if declared is not None
                   else "Transfer-Encoding: chunked")
        tls.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{framing}\r\n"
                    "\r\n".encode())
        piece = b" " * PIECE
        frame = piece if declared is not None else f"{PIECE:x}\r\n".encode() + piece + b"\r\n"
        while sent.bytes < CAP and not stop.is_set():
            tls.sendall(frame)
            sent.bytes += PIECE

    with tls_server(cert, handler=answer) as port:
        yield port, sent


def test_operator_sdk_stops_reading_an_endless_answer(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")
    with endless_server(cert) as (port, sent):
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ProtocolError) as exc:
                c.list_devices()
    assert "larger than" in str(exc.value) and "\n" not in str(exc.value)
    assert sent.bytes <= 16 * MAX_BODY_BYTES + SLACK, sent.bytes
    with endless_server(cert) as (port, sent):
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ProtocolError):
                c.release_manifest("cams", "web", 1)
    assert sent.bytes <= MAX_MANIFEST_ANSWER + SLACK, sent.bytes


def test_an_endless_error_answer_is_cut_off_too(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")
    with endless_server(cert, "404 Not Found") as (port, sent):
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ProtocolError):
                c.device("nope")
    assert sent.bytes <= 16 * MAX_BODY_BYTES + SLACK, sent.bytes


def test_a_declared_oversized_answer_is_refused_before_reading(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")
    with endless_server(cert, declared=CAP) as (port, sent):
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ProtocolError) as exc:
                c.list_devices()
    assert f"declares {CAP} bytes" in str(exc.value)
    assert sent.bytes <= SLACK, sent.bytes


def test_device_sdk_stops_reading_endless_blobs_manifests_maps_and_enrollments(
        tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")

    async def blob(port: int) -> None:
        async with DeviceClient(f"https://127.0.0.1:{port}", "cred", cert.der) as dev:
            await dev.blob("ab" * 32)

    async def manifest(port: int) -> None:
        async with DeviceClient(f"https://127.0.0.1:{port}", "cred", cert.der) as dev:
            await dev.manifest("cams", "web", 1)

    async def peermap(port: int) -> None:
        async with DeviceClient(f"https://127.0.0.1:{port}", "cred", cert.der) as dev:
            await dev.peermap(0, 0)

    async def join(port: int) -> None:
        token = f"fm1.{fingerprint(cert.der)}.{'s' * 32}"
        await enroll(f"https://127.0.0.1:{port}", token, "A" * 43 + "=", name="cam-1")

    for call, limit in ((blob, MAX_BLOB_ANSWER), (manifest, MAX_MANIFEST_ANSWER),
                        (peermap, MAX_PEERMAP_BYTES), (join, MAX_BODY_BYTES)):
        with endless_server(cert) as (port, sent):
            with pytest.raises(ProtocolError):
                trio.run(call, port)
        assert sent.bytes <= limit + SLACK, (call.__name__, sent.bytes)
