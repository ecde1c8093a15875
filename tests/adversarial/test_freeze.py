"""Attack: indefinite freeze. The coordinator (or a front replaying its old answers) stops
telling devices about new releases: it keeps answering with what was true once. Nothing a
device received was wrong, so nothing was refused, and neither the device nor the operator
noticed that the fleet no longer moved.

Expected (docs/security.md, "A frozen coordinator is detected"): the operator grants the
coordinator's online timestamp key for the fleet with the release key (`fleetmesh release
grant-timestamp`); the coordinator answers every `GET /device/timestamp` with a timestamp of the
fleet's newest release per app, signed with that key, expiring after a day; the device checks
grant and signature against its pinned release key and, once the newest timestamp it got has
expired, reports its apps "stale", which `fleetmesh devices list` shows. A timestamp signed by
a key the release key did not grant is refused and refreshes nothing.

Real parts: a `fleetmesh coordinator serve` process, the `fleetmesh` CLI, the SDK over HTTPS,
the agent's FreshnessWatch and the release sync's reporting of it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from nacl.signing import SigningKey

from agent._appsync import AppSync
from agent._freshness import FreshnessWatch
from mesh.control import AppStatus, DeviceReport
from mesh.release import (
    Timestamp,
    TimestampGrant,
    sign_timestamp,
    sign_timestamp_grant,
    write_signing_key,
)
from ops.client import ApiError, DeviceClient, OperatorClient, enroll
from tests.apply._fake import FakeEngine, Releases
from tests.apply.test_agent_apply import (
    QUICK,
    AppCoordinator,
    RealClock,
    _Applier,
    release_sync,
)
from tests.coordinator.releasekit import build
from tests.coordinator_process import running_coordinator
from vpn import generate_keypair

FLEETMESH = str(Path(sys.executable).parent / "fleetmesh")
DAY = 86400


def test_a_frozen_coordinator_is_detected_and_shown(tmp_path: Path) -> None:
    key_path = tmp_path / "release.key"
    release_key = write_signing_key(key_path)
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        env = coord.operator_env(tmp_path / "home")
        env["FLEETMESH_SIGNING_KEY"] = str(key_path)
        for args in (["release", "set-key", "--fleet", "cams"],
                     ["release", "grant-timestamp", "--fleet", "cams"]):
            out = subprocess.run([FLEETMESH, *args], env=env, capture_output=True, text=True,
                                 timeout=60, check=False)
            assert out.returncode == 0, out.stderr
        # a grant the release key did not sign, or of another key, is refused
        other = SigningKey.generate()
        coordinator_key = bytes.fromhex(op.timestamp_key("cams"))
        for grant, status in (
                (sign_timestamp_grant(TimestampGrant("cams", coordinator_key, 0), other), 403),
                (sign_timestamp_grant(TimestampGrant("cams", bytes(other.verify_key), 0),
                                      release_key), 409)):
            with pytest.raises(ApiError) as exc:
                op.set_timestamp_grant("cams", grant)
            assert exc.value.status == status, exc.value
        rel = build(release_key, fleet="cams", app="web", version=1)
        for blob_id, (data, kind) in rel.blobs.items():
            op.put_blob(blob_id, data, kind)
        op.publish_release(rel.signed)
        token = op.create_token("cams", release_key=bytes(release_key.verify_key).hex())

        async def device() -> tuple[bytes | None, list[str]]:
            enrollment, der = await enroll(coord.url, token["token"], generate_keypair().public,
                                           name="cam-1")
            async with DeviceClient(coord.url, enrollment.credential, der) as dev:
                stamp = await dev.timestamp()
                watch = FreshnessWatch(enrollment.release_key or "", "cams", log.append)
                now = time.time()
                watch.update(stamp, now)
                assert watch.newest is not None and watch.newest.newest == (("web", 1),)
                assert not watch.stale(now)
                # a timestamp the coordinator signs with a key nobody granted: refused
                rogue = SigningKey.generate()
                rogue_grant = sign_timestamp_grant(
                    TimestampGrant("cams", bytes(rogue.verify_key), int(now)), rogue)
                later = Timestamp("cams", (("web", 1),), int(now) + DAY, int(now) + 3 * DAY)
                watch.update(sign_timestamp(later, rogue_grant, rogue), now + DAY + 1)
                # frozen: a day later the device still only gets the old answer
                watch.update(stamp, now + DAY + 1)
                assert watch.stale(now + DAY + 1)
                apps = (AppStatus("web", "running", running=1, stale=True),)
                await dev.report(DeviceReport(apps=apps))
            return stamp, log

        log: list[str] = []
        stamp, messages = trio.run(device)
        assert stamp is not None
        assert any("timestamp refused" in m for m in messages), messages
        assert any("stale" in m and "frozen" in m for m in messages), messages
        out = subprocess.run([FLEETMESH, "devices", "list"], env=env, capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        (row,) = [line for line in out.stdout.splitlines() if "cam-1" in line]
        assert "stale" in row, out.stdout
        assert op.device("cam-1")["apps"][0]["stale"] is True


async def test_the_agent_reports_stale_once_the_timestamp_expired(tmp_path: Path) -> None:
    """Through the agent's release sync (tests/apply's fake coordinator link and applier): the
    coordinator serves a validly signed timestamp that expired a day ago, then nothing at all:
    every reported app says stale, and the log says why, once. A fresh timestamp clears it."""
    await frozen_agent_reports_stale(tmp_path)


async def frozen_agent_reports_stale(tmp_path: Path) -> None:
    """The agent-side freeze scenario (also the conformance suite's)."""
    releases = Releases(tmp_path / "dev", app="web")
    coord = AppCoordinator()
    coord.manifests[("cams", "web", 2)] = releases.make(2, QUICK)
    coord.targets = [{"app": "web", "version": 2, "pin": None, "force": False, "retry": 0}]
    logs: list[str] = []
    sync, node = release_sync(tmp_path, coord, logs, FakeEngine(RealClock()), releases)
    sync.appsync = AppSync(_Applier(), "cams")
    timestamp_key = SigningKey.generate()
    grant = sign_timestamp_grant(TimestampGrant("cams", bytes(timestamp_key.verify_key), 0),
                                 releases.key)
    now = int(time.time())
    coord.timestamp = sign_timestamp(Timestamp("cams", (("web", 2),), now - 2 * DAY,
                                               now - DAY), grant, timestamp_key)
    await sync._read_targets(node)  # type: ignore[arg-type]
    coord.timestamp = None  # then the coordinator says nothing at all
    await sync._read_targets(node)  # type: ignore[arg-type]
    assert [a.stale for a in sync.app_statuses()] == [True]
    assert [a.stale for a in sync.app_statuses()] == [True]
    assert sum("releases stale" in m for m in logs) == 1, logs
    coord.timestamp = sign_timestamp(Timestamp("cams", (("web", 2),), now, now + DAY), grant,
                                     timestamp_key)
    await sync._read_targets(node)  # type: ignore[arg-type]
    assert [a.stale for a in sync.app_statuses()] == [False]
