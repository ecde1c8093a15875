"""Attack (or a bad link): clients that go away mid-request. A device's state report is cut
mid-body on a saturated link (headers and half the body, then the connection closes); an
operator's blob download is dropped after the headers. Before, the first reached the catch-all
handler of coordinator/_http.py and was logged as "internal error" with a traceback, which
buried real bugs and alarmed operators. Expected, against a real running coordinator: one log
line per cut request, at INFO, naming the route and who sent it (the device's name, or
"operator"), with no traceback and no "internal error"; the coordinator serves on. A long poll
whose client left (an agent's poll cut by its own deadline on a saturated link) ends at once
with the same one line instead of holding its task until the poll's deadline."""

from __future__ import annotations

import logging
import ssl

import pytest
import trio
from blake3 import blake3

from tests.coordinator.conftest import Harness

SLACK = 10.0  # s: deadline for the log line to appear on a loaded machine (a real condition)
BLOB_BYTES = 8 * 1024 * 1024  # larger than any socket buffer: the download is still streaming


async def _tls(h: Harness) -> trio.SSLStream[trio.SocketStream]:
    ctx = ssl.create_default_context(cafile=str(h.coord.cert_path))
    # TLS 1.2: its session ticket comes inside the handshake. A TLS 1.3 server sends its
    # tickets just after it, and a client that closes with them unread in its socket sends a
    # RST, not a FIN: on a loaded machine the RST reached the server before it had read the
    # request, which the kernel then discarded, so the route never ran and the line these
    # tests wait for never came (seen once, beside a lab run). Closing cleanly is the case
    # under test; a reset connection is another one.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", h.coord.port), ctx,
                            server_hostname="127.0.0.1")
    await stream.do_handshake()
    return stream


def _records(caplog: pytest.LogCaptureFixture, marker: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if marker in r.getMessage()]


async def _wait_for_record(caplog: pytest.LogCaptureFixture, marker: str) -> logging.LogRecord:
    with trio.fail_after(SLACK):
        while not (found := _records(caplog, marker)):
            await trio.sleep(0.05)
    return found[0]


def _no_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if "internal error" in r.getMessage() or r.exc_info
           or r.levelno >= logging.ERROR]
    assert not bad, [(r.levelname, r.getMessage(), r.exc_info) for r in bad]


async def test_report_cut_mid_body_is_one_line_naming_route_and_device(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Headers saying 2,000 bytes, 1,000 of them, then close: one INFO line naming
    POST /api/v1/device/state and the device; no traceback, no "internal error"."""
    caplog.set_level(logging.DEBUG)
    cam = await h.enroll("cam-7")
    stream = await _tls(h)
    head = (f"POST /api/v1/device/state HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            f"{cam.credential}\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n"
            "\r\n").encode()
    await stream.send_all(head + b'{"lan_endpoints": [' + b" " * 980)
    await stream.aclose()
    record = await _wait_for_record(caplog, "client went away")
    text = record.getMessage()
    assert "POST /api/v1/device/state" in text and "device cam-7" in text, text
    assert record.levelno == logging.INFO and record.exc_info is None
    assert "\n" not in text
    assert len(_records(caplog, "client went away")) == 1
    _no_internal_error(caplog)
    r = await cam.client.post("/api/v1/device/state", json={
        "lan_endpoints": [], "agent_version": "test", "peers": []})
    assert r.status_code == 204, r.text


async def test_download_dropped_mid_response_is_one_line(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """An operator reads the headers of an 8 MiB blob and closes: at most one INFO line naming
    the route and "operator", never an error or a traceback; the coordinator serves on."""
    caplog.set_level(logging.DEBUG)
    data = bytes(range(256)) * (BLOB_BYTES // 256)
    blob_id = blake3(data).hexdigest()
    r = await h.op.put(f"/api/v1/blobs/{blob_id}", params={"kind": "delta"}, content=data)
    assert r.status_code in (200, 201), r.text
    stream = await _tls(h)
    await stream.send_all((f"GET /api/v1/blobs/{blob_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           f"Authorization: Bearer {h.coord.operator_key}\r\n\r\n").encode())
    got = b""
    with trio.fail_after(SLACK):
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    await stream.aclose()
    record = await _wait_for_record(caplog, "client went away")
    text = record.getMessage()
    assert f"GET /api/v1/blobs/{blob_id}" in text and "operator" in text, text
    assert record.levelno == logging.INFO and record.exc_info is None
    _no_internal_error(caplog)
    r = await h.op.get("/api/v1/devices")
    assert r.status_code == 200, r.text


async def test_long_poll_whose_client_left_ends_at_once(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A peer-map long poll asking to wait 100 s is closed by its client: within seconds (not
    100 s) one INFO line says so, naming the route and the device; the device's next poll is
    answered as usual."""
    caplog.set_level(logging.DEBUG)
    cam = await h.enroll("cam-7")
    first = await cam.client.get("/api/v1/device/peermap", params={"version": 0, "wait": 0})
    version = first.json()["version"]
    stream = await _tls(h)
    await stream.send_all((f"GET /api/v1/device/peermap?version={version}&wait=100 HTTP/1.1\r\n"
                           f"Host: 127.0.0.1\r\nAuthorization: Bearer {cam.credential}\r\n"
                           "\r\n").encode())
    await stream.aclose()
    record = await _wait_for_record(caplog, "client went away")  # SLACK, far below 100 s
    text = record.getMessage()
    assert "mid-long-poll" in text and "GET /api/v1/device/peermap" in text, text
    assert "device cam-7" in text and record.levelno == logging.INFO
    _no_internal_error(caplog)
    r = await cam.client.get("/api/v1/device/peermap", params={"version": 0, "wait": 0})
    assert r.status_code == 200, r.text
