"""The SDK and CLI against canned HTTPS answers: error mapping, 304, pin changes, rendering."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from mesh.control import DeviceReport, HubInfo, PeerEntry, PeerMap, PeerMapDelta
from mesh.meter import metered
from mesh.release import MAX_ROOT_CHAIN, signed_root_to_json
from mesh.tlspin import PinError, fingerprint
from ops.client import (
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PROBES,
    MAX_WAIT,
    ApiError,
    CoordinatorUnreachable,
    DeviceClient,
    OperatorClient,
    ProtocolError,
)
from tests.rootkit import ROOT_KEYS, root
from vpn import generate_keypair

from ._tls import make_cert, tls_server

BIN = Path(sys.executable).parent


def http(status: str, body: bytes = b"", ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def jhttp(status: str, obj: Any) -> bytes:
    return http(status, json.dumps(obj).encode())


DEVICE = {"name": "cam-1", "fleet": "cams", "state": "active", "online": True,
          "public_key": "A" * 43 + "=", "mesh_ipv4": "100.96.0.2", "mesh_ipv6": "fd7a::2",
          "agent_version": "1.0", "endpoint": "198.51.100.7:40000", "lan_endpoints": [],
          "last_seen": 1.0, "enrolled_at": 1.0}


def test_error_answers_become_api_errors(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")
    with tls_server(cert, jhttp("404 Not Found", {"error": "no device named nope"})) as port:
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ApiError) as exc:
                c.device("nope")
    assert (exc.value.status, exc.value.message) == (404, "no device named nope")
    assert str(exc.value) == "no device named nope (HTTP 404)"
    with tls_server(cert, http("500 Internal Server Error", b"<html>boom</html>", "text/html")
                    ) as port:
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ApiError) as exc:
                c.list_devices()
    assert exc.value.status == 500 and "coordinator failed" in exc.value.message
    with tls_server(cert, http("200 OK", b"not json", "text/plain")) as port:
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ProtocolError):
                c.list_devices()
    with tls_server(cert, jhttp("200 OK", {"devices": "nope"})) as port:
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            with pytest.raises(ProtocolError):
                c.list_devices()


def test_a_changed_certificate_is_a_pin_error_not_unreachable(tmp_path: Path) -> None:
    pinned, other = make_cert(tmp_path, "pinned"), make_cert(tmp_path, "other")
    with tls_server(other, jhttp("200 OK", {"devices": []})) as port:
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=pinned.der) as c:
            with pytest.raises(PinError) as exc:
                c.list_devices()
    assert not isinstance(exc.value, CoordinatorUnreachable)
    with pytest.raises(PinError):  # cert and fingerprint that disagree
        OperatorClient("https://127.0.0.1:1", "k", cert_der=pinned.der,
                       fingerprint=fingerprint(other.der))
    with pytest.raises(ValueError):
        OperatorClient("https://127.0.0.1:1", "k")


async def test_peermap_304_is_none(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")
    with tls_server(cert, http("304 Not Modified")) as port:
        with trio.fail_after(10):
            async with DeviceClient(f"https://127.0.0.1:{port}", "fmd_x", cert.der) as d:
                assert await d.peermap(version=3, wait=1) is None
    with tls_server(cert, jhttp("401 Unauthorized", {"error": "unknown credential"})) as port:
        with trio.fail_after(10):
            async with DeviceClient(f"https://127.0.0.1:{port}", "fmd_x", cert.der) as d:
                with pytest.raises(ApiError) as exc:
                    await d.peermap()
    assert exc.value.status == 401


def _keepalive_timer(local_port: int) -> tuple[int, float] | None:
    """(timer kind, seconds until it fires) of our TCP socket on 127.0.0.1:`local_port`, as
    the kernel shows it in /proc/net/tcp (kind 2 is the keepalive timer; clock ticks of
    USER_HZ = 100)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == local_port:
            kind, when = fields[5].split(":")
            return int(kind, 16), int(when, 16) / 100
    return None


async def test_a_long_poll_connection_is_probed_by_tcp_keepalive(tmp_path: Path) -> None:
    """A long poll waits up to MAX_WAIT (30 min) with nothing sent either way: the device's
    connection carries TCP keepalive, so a coordinator host gone without closing it is found
    after KEEPALIVE_IDLE plus the probes, not after the wait. Read from the kernel's own
    timer on the socket while the poll is parked."""
    cert = make_cert(tmp_path, "c")
    peers: list[int] = []

    def park(tls: Any, stop: Any) -> None:  # reads the request and never answers
        peers.append(tls.getpeername()[1])
        tls.recv(65536)
        stop.wait(10)

    with tls_server(cert, handler=park) as port:
        with trio.fail_after(10):
            async with DeviceClient(f"https://127.0.0.1:{port}", "fmd_x", cert.der) as d, \
                    trio.open_nursery() as nursery:
                nursery.start_soon(d.peermap, 1, MAX_WAIT)
                timer = None
                while timer is None or timer[0] != 2:  # until the request is sent and acked
                    await trio.sleep(0.02)
                    timer = _keepalive_timer(peers[0]) if peers else None
                nursery.cancel_scope.cancel()
    assert KEEPALIVE_IDLE - 5 <= timer[1] <= KEEPALIVE_IDLE
    assert KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL < MAX_WAIT / 2


def _cli(port: int, cert_der: bytes, *argv: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMESH_")}
    env.update(HOME=str(home), FLEETMESH_URL=f"https://127.0.0.1:{port}",
               FLEETMESH_API_KEY="fmo_k", FLEETMESH_FINGERPRINT=fingerprint(cert_der))
    return subprocess.run([str(BIN / "fleetmesh"), *argv], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def test_cli_renders_tables_and_json(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")
    with tls_server(cert, jhttp("200 OK", {"devices": [DEVICE]})) as port:
        table = _cli(port, cert.der, "devices", "list", home=tmp_path)
        as_json = _cli(port, cert.der, "devices", "list", "--json", home=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "cam-1" in table.stdout and "100.96.0.2" in table.stdout and "fd7a::2" in table.stdout
    assert json.loads(as_json.stdout) == {"devices": [DEVICE]}
    peers = {"peers": [{"peer": "cam-2", "public_key": "B" * 43 + "=", "path": "relay",
                        "endpoint": None, "last_handshake": None}]}
    with tls_server(cert, jhttp("200 OK", peers)) as port:
        shown = _cli(port, cert.der, "peers", "cam-1", home=tmp_path)
    assert shown.returncode == 0 and "relay" in shown.stdout and "never" in shown.stdout
    with tls_server(cert, jhttp("404 Not Found", {"error": "no device named x"})) as port:
        missing = _cli(port, cert.der, "devices", "show", "x", home=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == "fleetmesh: no device named x (HTTP 404)"


def test_devices_show_prints_the_byte_account_by_day_and_purpose(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "c")
    wan = {"2026-12-03": {"wireguard": 1200, "control": 4100, "gossip": 0, "blobs": 2_500_000,
                          "logs": 700},
           "2026-12-02": {"wireguard": 9000, "control": 48_000, "gossip": 512, "blobs": 0,
                          "logs": 0}}
    device = {**DEVICE, "apps": [], "link": None, "wan_bytes": wan,
              "wan_budget": {"limit": 50_000_000, "period": "month", "used": 51_200_000,
                             "over": True}}
    with tls_server(cert, jhttp("200 OK", device)) as port:
        shown = _cli(port, cert.der, "devices", "show", "cam-1", home=tmp_path)
        as_json = _cli(port, cert.der, "devices", "show", "cam-1", "--json", home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    header = rows.index(["DAY", "WIREGUARD", "CONTROL", "GOSSIP", "BLOBS", "LOGS", "TOTAL"])
    assert rows[header + 1] == ["2026-12-03", "1.2", "KB", "4.1", "KB", "0", "B", "2.5", "MB",
                                "700", "B", "2.5", "MB"]
    assert rows[header + 2] == ["2026-12-02", "9.0", "KB", "48.0", "KB", "512", "B", "0", "B",
                                "0", "B", "57.5", "KB"]
    assert json.loads(as_json.stdout)["wan_bytes"] == wan
    assert ["WAN", "budget", "51.2", "MB", "of", "50.0", "MB", "this", "month;", "used", "up:",
            "log", "shipping", "deferred"] in rows


def test_logs_of_an_offline_device_say_what_they_are(tmp_path: Path) -> None:
    """`devices logs` (no -f) of an offline device: what it uploaded before, at once, and one
    line on stderr saying that newer lines stay on the device until it is back and read (it
    uploads only while someone reads them, issue 14). The canned answer serves both the log
    page and the device's info (offline)."""
    cert = make_cert(tmp_path, "c")
    answer = {**DEVICE, "online": False, "next": 1, "dropped": 0,
              "lines": [{"seq": 1, "ts": 1.0, "app": "web", "stream": "stdout",
                         "line": "uploaded before"}]}
    with tls_server(cert, jhttp("200 OK", answer)) as port:
        shown = _cli(port, cert.der, "devices", "logs", "cam-1", home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["1970-01-01T00:00:01.000Z web stdout uploaded before"]
    assert shown.stderr.strip() == ("fleetmesh: cam-1 is offline: these are the lines it "
                                    "uploaded before; it keeps newer ones until it is back "
                                    "and they are read")


def test_operator_wg_quick_config() -> None:
    from mesh.control import HubInfo
    from ops._cli_ops import operator_wg_quick
    from vpn import generate_keypair
    me, hub = generate_keypair(), generate_keypair()
    text = operator_wg_quick(me.private, {
        "name": "laptop", "mesh_ipv4": "100.96.0.9", "mesh_ipv6": "fd7a:115c:a1e0::9",
        "mesh_prefix_v4": "100.96.0.0/12", "mesh_prefix_v6": "fd7a:115c:a1e0::/48",
        "hub": HubInfo(hub.public, "203.0.113.1:51820", "100.96.0.1", "fd7a:115c:a1e0::1",
                       "https://100.96.0.1:8443")})
    lines = [line.strip() for line in text.splitlines()]
    assert f"PrivateKey = {me.private}" in lines
    assert "Address = 100.96.0.9/32, fd7a:115c:a1e0::9/128" in lines
    assert f"PublicKey = {hub.public}" in lines and "Endpoint = 203.0.113.1:51820" in lines
    assert "AllowedIPs = 100.96.0.0/12, fd7a:115c:a1e0::/48" in lines
    assert "PersistentKeepalive = 25" in lines


def test_root_answers_are_bounded_and_an_old_coordinator_has_no_roots(tmp_path: Path) -> None:
    """GET /fleets/{fleet}/root: a coordinator from before root metadata (404) means no root
    fingerprint for a token; a list that is not roots, or longer than MAX_ROOT_CHAIN, is a
    ProtocolError, never a crash."""
    cert = make_cert(tmp_path, "c")
    with tls_server(cert, jhttp("404 Not Found", {"error": "Not Found"})) as port:
        with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
            assert c.token_root_fingerprint("cams", None) is None
    one = signed_root_to_json(root("cams", 1, ROOT_KEYS[0], ROOT_KEYS[0], ROOT_KEYS[1]))
    for body in ({"roots": [{"format": "nope"}]}, {"roots": [one] * (MAX_ROOT_CHAIN + 1)},
                 {"roots": "x"}):
        with tls_server(cert, jhttp("200 OK", body)) as port:
            with OperatorClient(f"https://127.0.0.1:{port}", "k", cert_der=cert.der) as c:
                with pytest.raises(ProtocolError):
                    c.roots("cams")


async def test_a_device_call_counts_the_bytes_it_moved_into_the_open_meter(tmp_path: Path
                                                                          ) -> None:
    """What the agent's WAN byte account gets from one call (mesh.meter): the request and the
    answer exactly as they crossed the connection inside TLS."""
    cert = make_cert(tmp_path, "c")
    received: list[bytes] = []
    reply = http("204 No Content")

    def handler(tls: ssl.SSLSocket, stop: threading.Event) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += tls.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += tls.recv(65536)
        received.append(head + b"\r\n\r\n" + body)
        tls.sendall(reply)

    counted: list[int] = []
    with tls_server(cert, handler=handler) as port:
        with trio.fail_after(10):
            async with DeviceClient(f"https://127.0.0.1:{port}", "fmd_x", cert.der) as d:
                with metered(counted.append):
                    await d.report(DeviceReport(agent_version="1.0"))
                await d.report(DeviceReport())  # no meter open: counted nowhere
    assert counted == [len(received[0]) + len(reply)]


async def test_a_delta_from_another_base_is_not_applied_the_full_map_is_asked(
        tmp_path: Path) -> None:
    """The SDK applies a delta only to the map it holds (its `base`); one from any other base
    (a confused proxy or server) is dropped and the full map fetched with version=0."""
    hub = HubInfo(generate_keypair().public, "198.51.100.1:51820", "10.250.0.1",
                  "fd7a:f1ee:7000::1", "https://10.250.0.1:8443")
    entry = PeerEntry("cam-2", generate_keypair().public, "10.250.0.3", "fd7a:f1ee:7000::3")
    held = PeerMap(7, hub, ())
    full = PeerMap(9, hub, (entry,))
    wrong = PeerMapDelta(9, 8, hub, (entry,))
    asked: list[str] = []

    def handler(tls: Any, stop: threading.Event) -> None:
        line = tls.recv(65536).split(b"\r\n", 1)[0].decode()
        asked.append(line)
        tls.sendall(jhttp("200 OK", (wrong if "delta=1" in line else full).to_json()))

    cert = make_cert(tmp_path, "c")
    with tls_server(cert, handler=handler) as port:
        with trio.fail_after(10):
            async with DeviceClient(f"https://127.0.0.1:{port}", "fmd_x", cert.der) as d:
                assert await d.peermap(7, 1, held=held) == full
    assert "version=7" in asked[0] and "delta=1" in asked[0]
    assert "version=0" in asked[1] and "delta" not in asked[1]
