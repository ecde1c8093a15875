"""The console scripts as a user runs them: real processes, real files, a real wireguard-go."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vpn import DesiredDevice, DesiredPeer, Endpoint, WireGuardGo, generate_keypair, reconcile

BIN = Path(sys.executable).parent


def cli(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], check=False, input=stdin,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_keygen_writes_0600_and_prints_matching_public_key(tmp_path: Path) -> None:
    key = tmp_path / "wg.key"
    made = cli("fleetmesh", "keygen", "--out", str(key))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = made.stdout.strip()
    assert cli("fleetmesh", "pubkey", str(key)).stdout.strip() == public
    if shutil.which("wg"):
        wg = subprocess.run(["wg", "pubkey"], check=False, input=key.read_text(),
                            capture_output=True, text=True, timeout=10)
        assert wg.stdout.strip() == public
    # Never silently replace a key.
    again = cli("fleetmesh", "keygen", "--out", str(key))
    assert "exists" in assert_one_line_error(again)
    assert cli("fleetmesh", "pubkey", str(key)).stdout.strip() == public


def test_pubkey_reads_stdin_and_rejects_garbage(tmp_path: Path) -> None:
    pair = generate_keypair()
    assert cli("fleetmesh", "pubkey", stdin=pair.private + "\n").stdout.strip() == pair.public
    assert "private key" in assert_one_line_error(cli("fleetmesh", "pubkey", stdin="nope\n"))
    missing = cli("fleetmesh", "pubkey", str(tmp_path / "absent"))
    assert "cannot read" in assert_one_line_error(missing)


def test_bad_arguments_exit_2_without_traceback() -> None:
    for argv in (["fleetmesh", "no-such-command"], ["fleetmesh-agent", "wg-status"],
                 ["fleetmesh-lab", "exec"]):
        result = cli(*argv)
        assert result.returncode == 2 and "Traceback" not in result.stderr, argv


def test_agent_wg_status_unreachable_socket(tmp_path: Path) -> None:
    result = cli("fleetmesh-agent", "wg-status", "--socket", str(tmp_path / "wg0.sock"))
    assert "cannot reach WireGuard" in assert_one_line_error(result, code=3)


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("wireguard-go") is None,
                    reason="needs root and wireguard-go")
def test_agent_wg_status_reads_a_real_wireguard_go() -> None:
    mine, peer = generate_keypair(), generate_keypair()
    with WireGuardGo().start("fmcli0") as wg:
        reconcile(DesiredDevice(mine.private, listen_port=0, peers=(DesiredPeer(
            peer.public, allowed_ips=frozenset({ipaddress.ip_network("10.250.9.0/24")}),
            endpoint=Endpoint(ipaddress.IPv4Address("127.0.0.1"), 51999),
            ),)), wg.backend())  # no keepalive: nothing is sent to that endpoint
        result = cli("fleetmesh-agent", "wg-status", "--socket", wg.socket_path, "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["public_key"] == mine.public
    assert "private_key" not in result.stdout and mine.private not in result.stdout
    assert shown["peers"] == [{
        "public_key": peer.public, "endpoint": "127.0.0.1:51999",
        "allowed_ips": ["10.250.9.0/24"], "persistent_keepalive": 0, "last_handshake": None,
        "rx_bytes": 0, "tx_bytes": 0,
    }]
