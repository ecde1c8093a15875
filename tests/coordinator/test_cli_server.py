"""`fleetmesh coordinator serve` as a user runs it: bad arguments are one line and exit 2; a
real start on loopback prints where the operator key is and stops cleanly on SIGTERM; with
`--store postgresql://...` it keeps its devices in PostgreSQL, across a restart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import trio

from ops.client import ApiError, DeviceClient, OperatorClient, enroll
from tests.coordinator_process import running_coordinator
from tests.pgserver import PgServer
from vpn import generate_keypair

BIN = Path(sys.executable).parent


def serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetmesh"), "coordinator", "serve", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("argv, fragment", [
    ((), "--data"),
    (("--listen", "nope"), "--listen"),
    (("--listen", "127.0.0.1:99999"), "--listen"),
    (("--listen", "0.0.0.0:8443"), "--hub-endpoint"),
    (("--wg-port", "0"), "--wg-port"),
    (("--hub-endpoint", "example.com:1"), "--hub-endpoint"),
    (("--mesh-ipv4", "10.250.0.1/16"), "mesh IPv4"),
    (("--mesh-ipv6", "10.0.0.0/8"), "IPv6"),
    (("--tls-cert", "/nonexistent"), "--tls-key"),
    (("--store", "mysql://u@127.0.0.1/db"), "--store: must be a postgresql://"),
    (("--store", "postgresql://u@127.0.0.1:x/db"), "--store: not a PostgreSQL URL"),
    # port 1 on loopback: nothing listens, refused at once; the password stays out of it
    (("--store", "postgresql://u:s3cret@127.0.0.1:1/db"),
     "--store: cannot reach postgresql://u@127.0.0.1:1/db"),
    (("--metrics-token-file", "/nonexistent"), "--metrics-token-file /nonexistent: No such"),
    (("--metrics-token-file", "/etc/passwd"), "must hold one token of 32 to 256"),  # its colons
])
def test_bad_arguments_are_one_line_exit_2(tmp_path: Path, argv: tuple[str, ...],
                                           fragment: str) -> None:
    data = () if argv == () else ("--data", str(tmp_path / "d"))
    listen = () if any(a == "--listen" for a in argv) else ("--listen", "127.0.0.1:0")
    result = serve(*data, *listen, "--no-hub", *argv)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0] and "s3cret" not in result.stderr


def test_serve_starts_prints_key_location_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = subprocess.Popen([str(BIN / "fleetmesh"), "coordinator", "serve", "--data",
                             str(data), "--listen", "127.0.0.1:0", "--no-hub"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert str(data / "operator.key") in first
        assert "coordinator on https://127.0.0.1:" in proc.stdout.readline()  # type: ignore
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # second start: same key, nothing new printed about it
    again = subprocess.Popen([str(BIN / "fleetmesh"), "coordinator", "serve", "--data",
                              str(data), "--listen", "127.0.0.1:0", "--no-hub"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "coordinator on" in again.stdout.readline()  # type: ignore[union-attr]
        again.send_signal(signal.SIGINT)
        assert again.wait(15) == 0
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()


async def test_serve_on_postgresql_enrolls_and_serves_peer_maps(tmp_path: Path,
                                                               pg_server: PgServer) -> None:
    url = pg_server.new_database()
    data = tmp_path / "d"
    with running_coordinator(data, tmp_path / "first.log", "--store", url) as c:
        with OperatorClient(c.url, c.api_key, cert_der=c.der) as op:
            token = (await trio.to_thread.run_sync(op.create_token, "cams", 2))["token"]
        k1, k2 = generate_keypair(), generate_keypair()
        with trio.fail_after(60):
            e1, der = await enroll(c.url, token, k1.public, name="cam-1")
            e2, _ = await enroll(c.url, token, k2.public, name="cam-2")
            assert e1.mesh_ipv4 != e2.mesh_ipv4
            async with DeviceClient(c.url, e1.credential, der) as d1:
                pm = await d1.peermap(version=0, wait=0)
                while pm is not None and {p.name for p in pm.peers} != {"cam-2"}:
                    pm = await d1.peermap(version=pm.version, wait=5)  # None: settled
                assert pm is not None and [p.public_key for p in pm.peers] == [k2.public]
    assert not (data / "coordinator.db").exists()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT name, mesh_ipv4 FROM devices ORDER BY name").fetchall()
    assert rows == [("cam-1", e1.mesh_ipv4), ("cam-2", e2.mesh_ipv4)]
    # a restart finds its devices (and its operator key hash) in the database
    with running_coordinator(data, tmp_path / "again.log", "--store", url) as c, \
            OperatorClient(c.url, c.api_key, cert_der=c.der) as op:
        listed = await trio.to_thread.run_sync(op.list_devices)
    assert sorted(d["name"] for d in listed) == ["cam-1", "cam-2"]


async def test_serve_answers_503_while_postgresql_is_down_and_recovers(tmp_path: Path) -> None:
    """A PostgreSQL restart under a running coordinator: while the server is down the API
    answers 503 (one line), then the first request after it is back works again."""
    server = PgServer()  # its own: the session's server is not stopped under other tests
    try:
        server.start()
        url = server.new_database()
        with running_coordinator(tmp_path / "d", tmp_path / "c.log", "--store", url) as c, \
                OperatorClient(c.url, c.api_key, cert_der=c.der) as op:
            await trio.to_thread.run_sync(op.create_token, "cams")
            server.stop_server()
            with pytest.raises(ApiError) as down:
                await trio.to_thread.run_sync(op.list_devices)
            assert down.value.status == 503 and "database unavailable" in str(down.value)
            server.start_again()
            assert await trio.to_thread.run_sync(op.list_devices) == []
        assert "Traceback" not in (tmp_path / "c.log").read_text()
    finally:
        server.stop()
