"""The real coordinator in a subprocess, driven by the real CLI and the SDK end to end.

Skipped while `fleetmesh coordinator serve` does not exist yet.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from mesh.control import DeviceReport, PeerMap, PeerPath, TokenParts
from mesh.tlspin import PinError, fingerprint
from ops.client import ApiError, DeviceClient, OperatorClient, enroll
from tests.coordinator_process import running_coordinator
from vpn import generate_keypair

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FLEETMESH = str(BIN / "fleetmesh")
SERVER_READY_S = 30.0


@dataclass(frozen=True)
class Coordinator:
    url: str
    api_key: str
    der: bytes
    data: Path
    home: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.der)

    def env(self, **override: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMESH_")}
        env.pop("XDG_CONFIG_HOME", None)
        env.update(HOME=str(self.home), FLEETMESH_URL=self.url, FLEETMESH_API_KEY=self.api_key,
                   FLEETMESH_FINGERPRINT=self.fingerprint)
        env.update(override)
        return env

    def cli(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLEETMESH, *argv], capture_output=True, text=True, timeout=60,
                              env=self.env(**env), check=False)

    def ok(self, *argv: str) -> str:
        result = self.cli(*argv)
        assert result.returncode == 0, (argv, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stdout

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv))


def _one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    data = tmp_path_factory.mktemp("coord-data")
    home = tmp_path_factory.mktemp("home")
    with running_coordinator(data, data.parent / f"{data.name}.log") as c:
        yield Coordinator(c.url, c.api_key, c.der, data, home)


def test_operator_key_file_is_private(coordinator: Coordinator) -> None:
    assert (coordinator.data / "operator.key").stat().st_mode & 0o077 == 0
    assert coordinator.api_key.startswith("fmo_")


async def test_enroll_list_peers_provision_revoke(coordinator: Coordinator) -> None:
    c = coordinator
    out = c.json("token", "create", "--fleet", "cams", "--uses", "2", "--expires", "30m",
                 "--json")
    token = out["token"]
    assert out["fleet"] == "cams" and out["uses"] == 2
    assert TokenParts.parse(token).fingerprint == c.fingerprint
    plain = c.ok("token", "create", "--fleet", "cams").strip()
    assert TokenParts.parse(plain).fingerprint == c.fingerprint

    k1, k2 = generate_keypair(), generate_keypair()
    with trio.fail_after(30):
        e1, der = await enroll(c.url, token, k1.public, name="cam-1",
                               lan_endpoints=("10.9.0.5:51820",), agent_version="test-1")
        e2, _ = await enroll(c.url, token, k2.public, name="cam-2", agent_version="test-1")
        assert der == c.der
        assert (e1.name, e1.fleet, e2.name) == ("cam-1", "cams", "cam-2")
        assert ipaddress.ip_address(e1.mesh_ipv4) in ipaddress.ip_network(e1.mesh_prefix_v4)
        assert e1.mesh_ipv4 != e2.mesh_ipv4 and e1.credential != e2.credential
        # The token had two uses.
        with pytest.raises(ApiError) as used_up:
            await enroll(c.url, token, generate_keypair().public, name="cam-x")
        assert used_up.value.status == 401

        async with DeviceClient(c.url, e1.credential, der) as d1:
            pm = await d1.peermap(version=0, wait=0)
            assert isinstance(pm, PeerMap)
            # cam-2's arrival is batched (<= 500 ms): a newer version may follow; then 304.
            for _ in range(10):
                newer = await d1.peermap(version=pm.version, wait=1)
                if newer is None:
                    break
                pm = newer
            else:
                pytest.fail("peer map never settled: no 304")
            assert {p.name for p in pm.peers} == {"cam-2"}
            await d1.report(DeviceReport(
                lan_endpoints=("10.9.0.5:51820",), agent_version="test-2",
                peers=(PeerPath(k2.public, "direct", "10.9.0.6:51820", time.time() - 3),)))

    listed = c.json("devices", "list", "--json")
    by_name = {d["name"]: d for d in listed["devices"]}
    assert {"cam-1", "cam-2"} <= set(by_name)
    for d in by_name.values():
        assert {"name", "mesh_ipv4", "mesh_ipv6", "online", "state", "fleet"} <= set(d)
    assert by_name["cam-1"]["mesh_ipv4"] == e1.mesh_ipv4
    assert by_name["cam-1"]["online"] is True
    assert by_name["cam-1"]["agent_version"] == "test-2"
    assert c.json("devices", "list", "--fleet", "other", "--json") == {"devices": []}
    table = c.ok("devices", "list")
    assert "cam-1" in table and e1.mesh_ipv4 in table

    peers = c.json("peers", "cam-1", "--json")["peers"]
    assert [(p["peer"], p["path"], p["endpoint"]) for p in peers] == [
        ("cam-2", "direct", "10.9.0.6:51820")]
    assert "direct" in c.ok("peers", "cam-1")

    join = json.loads(c.ok("devices", "provision", "cam-3", "--fleet", "cams"))
    assert (join["name"], join["fleet"]) == ("cam-3", "cams")
    assert TokenParts.parse(join["token"]).fingerprint == c.fingerprint
    assert join["url"]
    assert c.json("devices", "show", "cam-3", "--json")["state"] == "provisioned"
    with trio.fail_after(30):
        e3, _ = await enroll(c.url, join["token"], generate_keypair().public)
    assert e3.name == "cam-3"

    assert "cam-2" in c.ok("devices", "revoke", "cam-2")
    shown = c.json("devices", "show", "cam-2", "--json")
    assert shown["state"] == "revoked"
    assert "revoked" in c.ok("devices", "show", "cam-2")
    with trio.fail_after(30):
        async with DeviceClient(c.url, e2.credential, c.der) as d2:
            with pytest.raises(ApiError) as gone:
                await d2.peermap(version=0, wait=0)
            assert gone.value.status == 401
        async with DeviceClient(c.url, e1.credential, c.der) as d1:
            pm = await d1.peermap(version=0, wait=0)
            assert pm is not None and "cam-2" not in {p.name for p in pm.peers}

    assert "404" in _one_line(c.cli("devices", "show", "nope"), 1)


def test_sdk_operator_client(coordinator: Coordinator) -> None:
    c = coordinator
    with OperatorClient(c.url, c.api_key, fingerprint=c.fingerprint) as client:
        assert client.cert_der == c.der
        out = client.create_token("sdk", uses=1, expires_in=60, name="sdk-1")
        assert TokenParts.parse(out["token"]).fingerprint == c.fingerprint
        with pytest.raises(ApiError) as missing:
            client.device("no-such-device")
        assert missing.value.status == 404 and "\n" not in str(missing.value)
    with OperatorClient(c.url, "fmo_wrong", cert_der=c.der) as bad:
        with pytest.raises(ApiError) as unauth:
            bad.list_devices()
        assert unauth.value.status == 401


async def test_forged_fingerprint_is_refused(coordinator: Coordinator) -> None:
    c = coordinator
    forged = "0" * 64
    line = _one_line(c.cli("devices", "list", FLEETMESH_FINGERPRINT=forged), 4)
    assert "fingerprint" in line
    with pytest.raises(PinError):
        OperatorClient(c.url, c.api_key, fingerprint=forged).list_devices()
    token = c.json("token", "create", "--fleet", "cams", "--json")["token"]
    secret = TokenParts.parse(token).secret
    with trio.fail_after(30), pytest.raises(PinError):
        await enroll(c.url, f"fm1.{forged}.{secret}", generate_keypair().public, name="evil")
    # The real token still works: the forged attempt did not consume it.
    with trio.fail_after(30):
        e, _ = await enroll(c.url, token, generate_keypair().public, name="honest")
    assert e.name == "honest"


def test_wrong_api_key_is_one_line_exit_1(coordinator: Coordinator) -> None:
    assert "401" in _one_line(coordinator.cli("devices", "list", FLEETMESH_API_KEY="fmo_bad"),
                              1)


def test_config_file_is_read(coordinator: Coordinator, tmp_path: Path) -> None:
    c = coordinator
    cfg = tmp_path / "op.toml"
    cfg.write_text(f'url = "{c.url}"\napi_key = "{c.api_key}"\nfingerprint = "{c.fingerprint}"\n')
    env = {k: v for k, v in c.env().items() if not k.startswith("FLEETMESH_")}
    result = subprocess.run([FLEETMESH, "devices", "list", "--json", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "devices" in json.loads(result.stdout)


def test_operator_config_is_a_wg_quick_file(coordinator: Coordinator, tmp_path: Path) -> None:
    c = coordinator
    out = tmp_path / "fleetmesh.conf"
    result = c.cli("operator-config", "laptop", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o077 == 0
    text = out.read_text()
    iface, _, peer = text.partition("[Peer]")
    assert "[Interface]" in iface and "PrivateKey = " in iface
    address = next(line for line in iface.splitlines() if line.startswith("Address"))
    v4, v6 = (a.strip() for a in address.split("=", 1)[1].split(","))
    assert v4.endswith("/32") and v6.endswith("/128")
    assert "Endpoint = " in peer and "PersistentKeepalive = 25" in peer
    allowed = next(line for line in peer.splitlines() if line.startswith("AllowedIPs"))
    nets = [ipaddress.ip_network(n.strip()) for n in allowed.split("=", 1)[1].split(",")]
    assert ipaddress.ip_interface(v4).ip in nets[0] and ipaddress.ip_interface(v6).ip in nets[1]
    again = c.cli("operator-config", "laptop2", "--out", str(out))
    assert "exists" in _one_line(again, 2)


def test_provisioned_device_joins_with_device_json(coordinator: Coordinator,
                                                   tmp_path: Path) -> None:
    """`fleetmesh devices provision NAME --fleet F > device.json`, then on first boot
    `fleetmesh-agent join --config device.json` enrolls exactly that device."""
    device_json = tmp_path / "device.json"
    device_json.write_text(coordinator.ok("devices", "provision", "cam-7", "--fleet", "shop"))
    shown = coordinator.json("devices", "show", "cam-7", "--json")
    assert shown["state"] == "provisioned" and shown["online"] is False
    joined = subprocess.run([str(BIN / "fleetmesh-agent"), "join", "--config", str(device_json),
                             "--data", str(tmp_path / "agent")], capture_output=True, text=True,
                            timeout=60, env=coordinator.env(), check=False)
    assert joined.returncode == 0, joined.stderr
    shown = coordinator.json("devices", "show", "cam-7", "--json")
    assert shown["state"] == "active" and shown["fleet"] == "shop"
    assert (tmp_path / "agent" / "private.key").stat().st_mode & 0o077 == 0
    # the provisioning token was single-use: a second device with the same file is refused
    again = subprocess.run([str(BIN / "fleetmesh-agent"), "join", "--config", str(device_json),
                            "--data", str(tmp_path / "agent2")], capture_output=True, text=True,
                           timeout=60, env=coordinator.env(), check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
