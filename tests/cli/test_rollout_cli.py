"""`fleetmesh devices tag|list --selector`, `rollout ...` and `release create --phases|
--no-rollout` as an operator runs them, against a real coordinator process: devices enrolled
with tags through the SDK, releases published with the operator's release key, and
`release create` in-process with `docker save` replaced by a synthetic image (as
tests/release/test_cli_publish.py does), talking to the same coordinator."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import ops._publish as publish
from mesh.clikit import run
from mesh.image import ImageError
from mesh.release import decode_signed_pin, read_signing_key, verify_pin, write_signing_key
from ops.cli import build_parser
from ops.client import DeviceClient, OperatorClient, enroll
from tests.coordinator.releasekit import build
from tests.coordinator_process import RunningCoordinator, running_coordinator
from tests.release._fakes import image_config, layer_tar, saved_image_tar
from vpn import generate_keypair

FLEET = "rollfleet"
DEVICES = ("d1", "d2", "d3")


@dataclass
class Fleet:
    coord: RunningCoordinator
    home: Path
    creds: dict[str, str]
    op: OperatorClient

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.coord.cli(self.home, *argv)

    def ok(self, *argv: str) -> str:
        return self.coord.cli_ok(self.home, *argv)

    def targets(self, device: str) -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            async with DeviceClient(self.coord.url, self.creds[device], self.coord.der) as c:
                return await c.targets()
        return trio.run(go)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data = tmp_path_factory.mktemp("coord")
    home = tmp_path_factory.mktemp("home")
    key_path = home / ".config" / "fleetmesh" / "release.key"
    key_path.parent.mkdir(parents=True)
    key = write_signing_key(key_path)  # the operator's key: the CLI signs rollback pins with it
    with running_coordinator(data, data.parent / f"{data.name}.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        op.set_release_key(FLEET, bytes(key.verify_key).hex())
        built = build(key, fleet=FLEET, app="app", version=1)
        for blob_id, (blob, kind) in built.blobs.items():
            op.put_blob(blob_id, blob, kind)
        op.publish_release(built.signed)
        token = op.create_token(FLEET, uses=3, tags={"site": "paris"})["token"]

        async def join() -> dict[str, str]:
            out = {}
            for name in DEVICES:
                e, _ = await enroll(coord.url, token, generate_keypair().public, name=name)
                out[name] = e.credential
            return out

        try:
            yield Fleet(coord, home, trio.run(join), op)
        finally:
            op.close()


def _one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_tags_from_the_token_then_set_removed_and_selected(fleet: Fleet) -> None:
    out = json.loads(fleet.ok("devices", "tag", "d1", "role=canary", "site=berlin", "--json"))
    assert out == {"device": "d1", "tags": {"role": "canary", "site": "berlin"}}
    assert "d1: rack= role=canary site=berlin" in fleet.ok("devices", "tag", "d1", "rack=")
    assert "d1: role=canary site=berlin" in fleet.ok("devices", "tag", "d1", "--remove", "rack")
    listed = json.loads(fleet.ok("devices", "list", "--selector", "site=berlin", "--json"))
    assert [d["name"] for d in listed["devices"]] == ["d1"]
    assert listed["devices"][0]["tags"] == {"role": "canary", "site": "berlin"}
    both = json.loads(fleet.ok("devices", "list", "--selector", "site=paris", "--json"))
    assert sorted(d["name"] for d in both["devices"]) == ["d2", "d3"]  # the token's tags
    assert {d["tags"]["site"] for d in both["devices"]} == {"paris"}
    table = fleet.ok("devices", "list", "--selector", "site=berlin+role=canary")
    assert "TAGS" in table and "role=canary site=berlin" in table and "d2" not in table
    assert "no devices" in fleet.ok("devices", "list", "--selector", "role=nothing")
    shown = fleet.ok("devices", "show", "d1")
    assert "tags" in shown and "role=canary site=berlin" in shown and "time zone" in shown
    missing = fleet.run("devices", "tag", "nobody", "a=b")
    assert "nobody" in _one_line(missing, 1)


def _publish_held(fleet: Fleet, app: str, version: int) -> None:
    key = read_signing_key(fleet.home / ".config" / "fleetmesh" / "release.key")
    built = build(key, fleet=FLEET, app=app, version=version)
    for blob_id, (blob, kind) in built.blobs.items():
        fleet.op.put_blob(blob_id, blob, kind)
    fleet.op.publish_release(built.signed, rollout="held")


def test_rollout_start_status_actions(fleet: Fleet) -> None:
    _publish_held(fleet, "app", 2)
    held = json.loads(fleet.ok("rollout", "status", "2", "--app", "app", "--json"))
    assert held["state"] == "held" and held["previous"] == 1

    fleet.op.tag_device("d2", set={"ring": "canary"})
    started = fleet.ok("rollout", "start", "2", "--app", "app", "--phases", "ring=canary,1,100%",
                       "--soak", "1h")
    assert "rollout running, phase 1 of 3" in started
    rollout = json.loads(fleet.ok("rollout", "status", "2", "--app", "app", "--json"))
    assert rollout["state"] == "running" and rollout["previous"] == 1
    assert [p["spec"] for p in rollout["phases"]] == ["ring=canary", "1", "100%"]
    assert rollout["phases"][0]["devices"] == ["d2"]
    assert sorted(d for p in rollout["phases"] for d in p["devices"]) == list(DEVICES)
    assert rollout["spec"]["soak"] == 3600.0

    shown = fleet.ok("rollout", "status", "2", "--app", "app")
    assert "PHASE" in shown and "SPEC" in shown and "HEALTHY" in shown
    assert "timeline:" in shown and " UTC  phase 1" in shown

    assert "rollout paused" in fleet.ok("rollout", "pause", "2", "--app", "app")
    again = fleet.run("rollout", "pause", "2", "--app", "app")
    _one_line(again, 1)  # 409: not running
    assert "rollout running" in fleet.ok("rollout", "resume", "2", "--app", "app")
    promoted = json.loads(fleet.ok("rollout", "promote", "2", "--app", "app", "--json"))
    assert promoted["phase"] == 1 and promoted["phases"][0]["ended_at"] is not None
    status = fleet.ok("release", "status", "2", "--app", "app")
    assert "PHASE" in status and "; rollout running, phase 2 of 3" in status
    rows = json.loads(fleet.ok("release", "status", "2", "--app", "app", "--json"))["devices"]
    assert {r["device"]: r["phase"] for r in rows}["d2"] == 0
    aborted = fleet.ok("rollout", "abort", "2", "--app", "app")
    assert "rollout aborted" in aborted and "reason: aborted by operator" in aborted
    # The rollback pin the CLI signed: every device is sent back to version 1 with it.
    key = read_signing_key(fleet.home / ".config" / "fleetmesh" / "release.key")
    for device in DEVICES:
        (target,) = [t for t in fleet.targets(device) if t["app"] == "app"]
        assert target["version"] == 1, target
        pin = verify_pin(decode_signed_pin(bytes.fromhex(target["pin"])), key.verify_key)
        assert (pin.fleet, pin.app, pin.version, pin.device) == (FLEET, "app", 1, None)
        assert 29 * 86400 < pin.expires_at - time.time() <= 30 * 86400  # 30 days from signing
    watched = fleet.run("release", "watch", "2", "--app", "app")  # a pipe: plain lines
    assert watched.returncode == 1, watched.stderr
    assert "rollout aborted, phase 2 of 3: aborted by operator" in watched.stdout
    timeline = fleet.ok("rollout", "status", "2", "--app", "app")
    assert "aborted" in timeline.split("timeline:")[1]
    listed = [r for r in fleet.op.rollouts(FLEET) if r["app"] == "app"]
    assert [(r["version"], r["state"]) for r in listed] == [(2, "aborted")]


def test_every_rollout_option_reaches_the_spec(fleet: Fleet) -> None:
    _publish_held(fleet, "full", 1)
    none = fleet.run("rollout", "status", "1", "--app", "other", "--fleet", FLEET)
    _one_line(none, 1)  # no such release: the coordinator's 404 line
    rollout = json.loads(fleet.ok(
        "rollout", "start", "1", "--app", "full", "--fleet", FLEET, "--phases",
        "site=paris+role=,10%,100%", "--soak", "1m30s", "--max-failures", "10%",
        "--min-devices", "3", "--selector", "site=paris", "--window", "02:00-04:30",
        "--deadline", "2h", "--json"))
    assert rollout["previous"] is None  # the first release: no rollback pin to sign
    assert rollout["spec"] == {"phases": "role=+site=paris,10%,100%", "soak": 90.0,
                               "max_failures": "10%", "min_devices": 3,
                               "selector": "site=paris", "window": "02:00-04:30",
                               "deadline": 7200.0}  # conditions in canonical order
    members = sorted(d for p in rollout["phases"] for d in p["devices"])
    assert "d1" not in members  # site=berlin: outside the rollout's selector


def _fleetmesh_in_process(fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                          *argv: str) -> int:
    """`fleetmesh ARGV` in this process, configured for the coordinator, with `docker save`
    giving a synthetic image per tag."""
    for k, v in fleet.coord.operator_env(fleet.home).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def fake_save(image: str, out: Path, **kw: object) -> Path:
        tag = image.partition(":")[2]
        if not tag:
            raise ImageError(f"docker save {image}: No such image: {image}")
        layers = [layer_tar({"app/VERSION": tag.encode()})]
        saved = saved_image_tar(tmp_path / f"{tag}.tar", layers,
                                image_config(layers, ("echo", tag)))
        shutil.copy(saved, out)
        return Path(out)

    monkeypatch.setattr(publish, "docker_save", fake_save)
    return run(build_parser(), list(argv))


def test_release_create_with_phases_publishes_held_then_starts(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _fleetmesh_in_process(fleet, monkeypatch, tmp_path, "release", "create", "web:1",
                                 "--fleet", FLEET, "--app", "web") == 0
    capsys.readouterr()
    assert _fleetmesh_in_process(fleet, monkeypatch, tmp_path, "release", "create", "web:2",
                                 "--fleet", FLEET, "--app", "web", "--phases", "1,100%",
                                 "--soak", "1h", "--max-failures", "0") == 0
    out = capsys.readouterr().out
    assert "published" in out and "rollout running, phase 1 of 2 (previous: 1)" in out
    rollout = fleet.op.rollout(FLEET, "web", 2)
    assert rollout["state"] == "running" and len(rollout["phases"]) == 2
    first = set(rollout["phases"][0]["devices"])
    assert len(first) == 1
    for device in DEVICES:
        (target,) = [t for t in fleet.targets(device) if t["app"] == "web"]
        assert target["version"] == 2
        assert target["hold"] is (device not in first), (device, target)


def test_release_create_no_rollout_targets_nobody(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _fleetmesh_in_process(fleet, monkeypatch, tmp_path, "release", "create", "cam:1",
                                 "--fleet", FLEET, "--app", "cam", "--no-rollout") == 0
    assert "held: it targets no device" in capsys.readouterr().out
    assert [r["version"] for r in fleet.op.list_releases(FLEET, "cam")] == [1]
    assert fleet.op.rollout(FLEET, "cam", 1)["state"] == "held"
    for device in DEVICES:
        assert [t for t in fleet.targets(device) if t["app"] == "cam"] == []


def test_token_and_provisioning_tags_reach_the_enrolled_device(fleet: Fleet) -> None:
    token = fleet.ok("token", "create", "--fleet", FLEET, "--tag", "site=lyon", "--tag",
                     "window=02:00-04:00").strip()
    joined = json.loads(fleet.ok("devices", "provision", "p1", "--fleet", FLEET, "--tag",
                                 "site=nice"))

    async def join() -> None:
        await enroll(fleet.coord.url, token, generate_keypair().public, name="t1")
        await enroll(fleet.coord.url, joined["token"], generate_keypair().public, name="p1")

    trio.run(join)
    tags = {d["name"]: d["tags"] for d in json.loads(fleet.ok(
        "devices", "list", "--selector", "site=lyon", "--json"))["devices"]}
    assert tags == {"t1": {"site": "lyon", "window": "02:00-04:00"}}
    nice = json.loads(fleet.ok("devices", "list", "--selector", "site=nice", "--json"))
    assert [(d["name"], d["tags"]) for d in nice["devices"]] == [("p1", {"site": "nice"})]

