"""The apply engine on the host's real Docker engine.

Images are built from `busybox-static` as in tests/release/test_release_docker.py and published
with the real publishing code into an in-memory registry; a real BlobStore is filled with what
the device wants (`wanted_blobs`, with the engine's own layers as delta bases); the applier
rebuilds, loads and runs them. Everything is named `fleetmesh-test-<hex>` (the app is
`test-<hex>`, so its container is `fleetmesh-test-<hex>` and its images
`fleetmesh/test-<hex>:N`) and removed in `finally`. Marked `lab` (root, a Docker engine);
skipped with the reason when there is no engine. No timed assertions: only generous deadlines.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from nacl.signing import SigningKey

from agent._apply_core import LOCK_FILE
from agent._apply_driver import Applier
from agent._blobstore import BlobStore
from agent._crashpoints import CRASH_FILE
from agent._engine import DockerEngine
from agent._gossip import wanted_blobs
from mesh.release import (
    ContainerSettings,
    HealthCheck,
    HealthKind,
    ReleaseManifest,
    RestartPolicy,
    VerifiedRelease,
    verify_release,
)
from mesh.rollout import Window
from tests.release._fakes import FakeRegistry
from tests.release.test_release_docker import _docker, _docker_skip_reason

pytestmark = pytest.mark.lab

REPO = Path(__file__).parents[2]
FLEET = "cams"
APPLETS = ("sh", "echo", "cat", "ls", "true", "false", "sleep")
DEADLINE_S = 180.0  # per step, for a loaded 2-core machine


@dataclass
class Env:
    prefix: str  # fleetmesh-test-<hex>
    app: str  # test-<hex>
    device: str
    tmp: Path
    images: dict[int, str]  # source image per app version (1, 2)
    key: SigningKey
    registry: FakeRegistry
    data: Path
    store: BlobStore

    @property
    def key_hex(self) -> str:
        return bytes(self.key.verify_key).hex()

    @property
    def container(self) -> str:
        return f"fleetmesh-{self.app}"

    def publish(self, source: int, settings: ContainerSettings) -> tuple[int, bytes]:
        from ops._publish import publish_image

        result = publish_image(self.registry, fleet=FLEET, app=self.app, signing_key=self.key,
                               image=self.images[source], cache_dir=self.tmp / "cache",
                               container=settings)
        assert result.created
        return result.version, self.registry.release_manifest(FLEET, self.app, result.version)

    def fill_store(self, signed: bytes, local_diff_ids: frozenset[str]) -> dict[bytes, Any]:
        """What the gossip node would fetch: deltas against the engine's layers, else chunks."""
        m = self.manifest(signed)
        want = wanted_blobs(m, local_diff_ids | self.store.complete_layers(), self.store.has)
        for blob_id, w in want.items():
            self.store.put(blob_id, self.registry.get_blob(blob_id.hex()), w.kind, ref=w.ref,
                           size=w.size)
        return want

    def verified(self, signed: bytes) -> VerifiedRelease:
        """As the agent passes a release on: verified once, where it arrived."""
        return verify_release(signed, self.key.verify_key, fleet=FLEET, app=self.app)

    def manifest(self, signed: bytes) -> ReleaseManifest:
        return self.verified(signed).manifest

    def ps(self) -> list[dict[str, str]]:
        out = _docker("ps", "-a", "--filter", f"label=io.fleetmesh.device={self.device}",
                      "--format", "{{json .}}").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        for r in rows:
            r["labels"] = dict(kv.split("=", 1) for kv in r["Labels"].split(",") if "=" in kv)
        return rows


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    reason = _docker_skip_reason()
    if reason:
        pytest.skip(reason)
    hexid = uuid.uuid4().hex[:10]
    prefix = f"fleetmesh-test-{hexid}"
    app = f"test-{hexid}"
    device = f"{prefix}-dev"
    base = f"{prefix}-base:1"
    images = {1: f"{prefix}-app:1", 2: f"{prefix}-app:2"}
    try:
        root = tmp_path / "rootfs"
        (root / "bin").mkdir(parents=True)
        shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
        for applet in APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        subprocess.run(["tar", "-C", str(root), "-cf", str(tmp_path / "rootfs.tar"), "."],
                       check=True, timeout=60)
        _docker("import", "--change", 'CMD ["/bin/sh"]', str(tmp_path / "rootfs.tar"), base)
        build_env = dict(os.environ, DOCKER_BUILDKIT="0")
        script = ('trap "exit 0" TERM; echo "app $(cat /app/VERSION) ${APPV:-}"; '
                  "while true; do sleep 1; done")
        for version, tag in images.items():
            ctx = tmp_path / f"ctx{version}"
            (ctx / "app").mkdir(parents=True)
            (ctx / "app" / "VERSION").write_text(f"v{version}\n")
            words = ["one" if version == 1 or i % 50 else "two" for i in range(4000)]
            (ctx / "app" / "data.txt").write_text(
                "\n".join(f"line {i} of the app, version {w}" for i, w in enumerate(words)))
            (ctx / "Dockerfile").write_text(
                f"FROM {base}\nCOPY app /app\nCMD [\"sh\", \"-c\", {json.dumps(script)}]\n")
            _docker("build", "-q", "-t", tag, str(ctx), env=build_env)
        key = SigningKey(os.urandom(32))
        data = tmp_path / "data"
        yield Env(prefix, app, device, tmp_path, images, key, FakeRegistry(key.verify_key),
                  data, BlobStore(data / "blobs"))
    finally:
        ids = _docker("ps", "-aq", "--filter", f"label=io.fleetmesh.device={device}",
                      check=False).stdout.split()
        if ids:
            _docker("rm", "-f", *ids, check=False, timeout=120)
        tags = _docker("images", "--format", "{{.Repository}}:{{.Tag}}", f"fleetmesh/{app}",
                       check=False).stdout.split()
        for tag in [*tags, *images.values(), base]:
            _docker("rmi", "-f", tag, check=False, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(what: str, pred: Callable[[], bool], applier: Applier | None = None,
                   deadline: float = DEADLINE_S) -> None:
    try:
        with trio.fail_after(deadline):
            while not pred():
                await trio.sleep(0.2)
    except trio.TooSlowError:
        raise AssertionError(f"{what}: not within {deadline:.0f} s; "
                             f"{None if applier is None else applier.statuses()}") from None


def saw(applier: Applier, seen: list[str], text: str) -> bool:
    """Whether the app's collected output has shown `text` (the buffer drained into seen)."""
    lines, _ = applier.logs.take(1000)
    seen.extend(x["line"] for x in lines)
    return any(text in line for line in seen)


def _status(applier: Applier, app: str) -> dict[str, Any]:
    """The app's status in its contract form (what the report carries)."""
    s = applier.status(app)
    assert s is not None
    return s.to_json()


async def test_update_lock_and_rollback(env: Env) -> None:
    messages: list[str] = []
    applier = Applier(device=env.device, fleet=FLEET, data_dir=env.data, engine=DockerEngine(),
                      store=env.store, release_key_hex=env.key_hex, log=messages.append)
    quick = ContainerSettings(health_check=HealthCheck(HealthKind.RUNNING, seconds=1.0),
                              restart_policy=RestartPolicy.UNLESS_STOPPED)
    logs: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(applier.run)

        # v1: everything as chunks (nothing local yet).
        v1, signed1 = env.publish(1, quick)
        want1 = env.fill_store(signed1, applier.local_diff_ids())
        assert {w.kind for w in want1.values()} == {"chunk"}
        applier.set_target(env.verified(signed1), ready=True)
        await wait_for("v1 running", lambda: _status(applier, env.app)["running"] == v1
                       and _status(applier, env.app)["state"] == "running", applier)
        (row,) = env.ps()
        assert row["Names"] == env.container and row["State"] == "running"
        assert row["labels"]["io.fleetmesh.app"] == env.app
        assert row["labels"]["io.fleetmesh.release"] == str(v1)
        await wait_for("v1's output", lambda: saw(applier, logs, "app v1"), applier)
        assert env.manifest(signed1).layers[-1].diff_id in applier.local_diff_ids()

        # The app holds its lock (the agent's directory is mounted into the container).
        (env.data / "locks" / env.app / LOCK_FILE).write_text("busy\n")
        # (read from the engine, not with `docker exec`: inside a chroot, as in a fresh-Debian
        # box, runc's exec lands in the mount namespace's root, not the container's)
        mounts = json.loads(_docker("inspect", "-f", "{{json .Mounts}}", env.container).stdout)
        lock_dir = env.data / "locks" / env.app
        assert [(m["Source"], m["Destination"], m["RW"]) for m in mounts] == [
            (str(lock_dir), "/run/fleetmesh/lock", True)]
        assert [p.name for p in lock_dir.iterdir()] == [LOCK_FILE]

        # v2 arrives: its changed layer as a delta against the layer the engine runs.
        v2, signed2 = env.publish(2, quick)
        want2 = env.fill_store(signed2, applier.local_diff_ids())
        assert "delta" in {w.kind for w in want2.values()}
        applier.set_target(env.verified(signed2), ready=True)
        await wait_for("v2 waiting for the lock",
                       lambda: _status(applier, env.app)["state"] == "waiting-lock", applier)
        status = _status(applier, env.app)
        assert status["lock_since"] is not None and status["running"] == v1
        assert _docker("image", "inspect", f"fleetmesh/{env.app}:{v2}",
                       check=False).returncode == 0  # loaded while waiting
        assert [r["labels"]["io.fleetmesh.release"] for r in env.ps()] == [str(v1)]
        (env.data / "locks" / env.app / LOCK_FILE).unlink()
        await wait_for("v2 running after the lock went", lambda: _status(
            applier, env.app)["running"] == v2 and _status(applier, env.app)["state"]
            == "running", applier)
        # "running" comes with the commit; the old container goes in the next step
        await wait_for("v1's container removed", lambda: len(env.ps()) == 1, applier)
        (row,) = env.ps()
        assert row["Names"] == env.container and row["labels"]["io.fleetmesh.release"] == str(v2)
        await wait_for("v2's output", lambda: saw(applier, logs, "app v2"), applier)
        assert any("delta" in m for m in messages), messages

        # v3: the same image, but an http check on a port nothing listens on.
        port = free_port()
        bad = ContainerSettings(health_check=HealthCheck(HealthKind.HTTP, port=port,
                                                         path="/health", interval_s=0.5),
                                health_timeout_s=4.0)
        v3, signed3 = env.publish(2, bad)
        env.fill_store(signed3, applier.local_diff_ids())
        applier.set_target(env.verified(signed3), ready=True)
        await wait_for("v3 failed", lambda: _status(applier, env.app)["state"] == "failed",
                       applier)
        status = _status(applier, env.app)
        assert status["failed"] == [v3] and status["running"] == v2
        assert f"release {v3}: not healthy within 4 s (http port {port}/health)" \
            == status["error"]
        (row,) = env.ps()
        assert row["State"] == "running" and row["Names"] == env.container
        assert row["labels"]["io.fleetmesh.release"] == str(v2)
        nursery.cancel_scope.cancel()


def _created_at(container: str) -> float:
    """The container's creation time as the engine recorded it (epoch seconds)."""
    text = _docker("inspect", "-f", "{{.Created}}", container).stdout.strip()
    day, _, rest = text.partition("T")
    clock, _, fraction = rest.rstrip("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(f"{day}T{clock}+00:00").timestamp()
    return stamp + float(f"0.{fraction or 0}")


async def test_a_held_release_is_downloaded_not_applied_and_a_window_waits(env: Env) -> None:
    """Issue 16 on the host's engine: a held v2 (its blobs in the store) creates no container
    and loads no image; lifting the hold applies it; v3 with a window a few seconds ahead (the
    device's local time, HH:MM:SS) waits, and its container is created once the window has
    opened."""
    applier = Applier(device=env.device, fleet=FLEET, data_dir=env.data, engine=DockerEngine(),
                      store=env.store, release_key_hex=env.key_hex, log=lambda m: None)
    quick = ContainerSettings(health_check=HealthCheck(HealthKind.RUNNING, seconds=1.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(applier.run)
        v1, signed1 = env.publish(1, quick)
        env.fill_store(signed1, applier.local_diff_ids())
        applier.set_target(env.verified(signed1), ready=True)
        await wait_for("v1 running", lambda: _status(applier, env.app)["state"] == "running"
                       and _status(applier, env.app)["running"] == v1, applier)

        v2, signed2 = env.publish(2, quick)
        env.fill_store(signed2, applier.local_diff_ids())  # downloaded ahead
        applier.set_target(env.verified(signed2), ready=True, hold=True)
        await wait_for("v2 held", lambda: _status(applier, env.app)["state"]
                       == "waiting-phase", applier)
        assert [r["labels"]["io.fleetmesh.release"] for r in env.ps()] == [str(v1)]
        assert _docker("image", "inspect", f"fleetmesh/{env.app}:{v2}",
                       check=False).returncode != 0  # not even rebuilt
        applier.set_target(env.verified(signed2), ready=True, hold=False)
        await wait_for("v2 running once the hold is lifted", lambda: _status(
            applier, env.app)["running"] == v2 and _status(applier, env.app)["state"]
            == "running", applier)

        v3, signed3 = env.publish(1, ContainerSettings(
            environment=(("APPV", "three"),),
            health_check=HealthCheck(HealthKind.RUNNING, seconds=1.0)))
        env.fill_store(signed3, applier.local_diff_ids())
        opens = math.floor(time.time()) + 8
        window = Window.parse(f"{time.strftime('%H:%M:%S', time.localtime(opens))}-"
                              f"{time.strftime('%H:%M:%S', time.localtime(opens + 3600))}")
        applier.set_target(env.verified(signed3), ready=True, window=window)
        await wait_for("v3 waiting for its window", lambda: _status(applier, env.app)["state"]
                       == "waiting-window", applier)
        assert [r["labels"]["io.fleetmesh.release"] for r in env.ps()] == [str(v2)]
        await wait_for("v3 running once its window opened", lambda: _status(
            applier, env.app)["running"] == v3 and _status(applier, env.app)["state"]
            == "running", applier)
        await wait_for("v2's container removed", lambda: len(env.ps()) == 1, applier)
        (row,) = env.ps()
        assert row["labels"]["io.fleetmesh.release"] == str(v3)
        assert _created_at(row["ID"]) >= opens
        nursery.cancel_scope.cancel()


def _child(env: Env, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.apply._child", str(env.data), env.device, FLEET, env.app,
         env.key_hex, str(target)], cwd=REPO, capture_output=True, text=True, timeout=600,
        check=False)


def test_sigkilled_at_crash_points_converges(env: Env) -> None:
    """The applier in a child process, killed with a real SIGKILL at a crash point, then
    started again without it: the app ends on the target, or back on the previous release."""
    target = env.tmp / "target.bin"
    ok = ContainerSettings(health_check=HealthCheck(HealthKind.CMD, ("true",), interval_s=0.5))
    v, signed = env.publish(1, ok)
    env.fill_store(signed, frozenset())
    target.write_bytes(signed)
    r = _child(env, target)
    assert r.returncode == 0, r.stderr[-2000:]
    good = v
    for n, (point, healthy) in enumerate([("after-stop-old", True), ("after-create-new", True),
                                          ("during-health", True),
                                          ("after-commit-journal", True),
                                          ("during-rollback", False)]):
        check = ("true",) if healthy else ("false",)
        settings = ContainerSettings(
            environment=(("APPV", f"step{n}"),), health_timeout_s=3.0,
            health_check=HealthCheck(HealthKind.CMD, check, interval_s=0.5))
        v, signed = env.publish(2 if n % 2 == 0 else 1, settings)
        env.fill_store(signed, frozenset())
        target.write_bytes(signed)
        (env.data / CRASH_FILE).write_text(point)
        r = _child(env, target)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        assert not (env.data / CRASH_FILE).exists()
        r = _child(env, target)
        assert r.returncode == 0, (point, r.stderr[-2000:])
        status = json.loads(r.stdout.strip().splitlines()[-1])
        want = v if healthy else good
        rows = env.ps()
        assert [(x["State"], x["Names"], x["labels"]["io.fleetmesh.release"]) for x in rows] \
            == [("running", env.container, str(want))], (point, rows)
        assert status["running"] == want and status["state"] == (
            "running" if healthy else "failed"), (point, status)
        if healthy:
            good = v
