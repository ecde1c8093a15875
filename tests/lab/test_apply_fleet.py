"""Issue 6 on real parts: every lab device runs its own Docker engine and agent; the operator
builds the sample app in its own engine and publishes it with `fleetmesh release create`; the
agents rebuild the image from verified blobs and run it.

One lab for the whole story, in order: v1 reaches every device (download progress over a
shaped uplink); v2 waits for an app's update lock and runs within seconds of its release; an
unhealthy v3 is rolled back everywhere and shown failed; then the agent of one device is killed
with SIGKILL at each named point of the download/apply path, and each time the device ends on
the target or the previous release with the app running, never fetching a verified blob twice.
Last, `fleetmesh push` builds a second app from examples/app and rolls it out, then a delta; and
a release with an image per platform brings these amd64 devices only the amd64 image's blobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent._crashpoints import ALL_CRASH_POINTS, CRASH_FILE
from lab import (
    AGENTS_DIR,
    LOG_DIR,
    Lab,
    access,
    agent_status,
    blobs_held,
    parse_topology,
    wait_online,
)
from lab.engines import BUSYBOX_IMAGE
from lab.fleet import COORDINATOR_DIR, FLEET
from mesh.release import decode_manifest, decode_signed_manifest, release_images

from .conftest import lab_cli, lab_skip_reason, lab_up, operator, release_status

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

APP = "sample"
PORT = 8080
HEALTH_TIMEOUT = 20  # s: a healthy release answers HTTP within a second or two
UNHEALTHY_TIMEOUT = 8  # s: how long a broken release is given
LOCKED = "office-1"  # holds its app's update lock during v2
VICTIM = "office-2"  # the device whose agent is killed
ROLLBACK_POINTS = ("before-rollback", "during-rollback", "after-rollback")


def topology():  # noqa: ANN201 - a Topology
    return parse_topology({
        "operator": {"on": "wan"},
        "lan": [{"name": "home", "nat": "firewall", "devices": 2, "uplink": "1mbit"},
                {"name": "office", "nat": "firewall", "devices": 2}],
    }, source="tests/lab/test_apply_fleet.py")


def release(version: int, *, unhealthy: bool = False) -> float:
    """Build vN of the sample app in the operator's engine and publish it (the fleet's
    newest release is every device's target); returns when it was published."""
    operator("python", "-m", "lab.sampleapp", str(version),
             *(["--unhealthy"] if unhealthy else []))
    timeout = UNHEALTHY_TIMEOUT if unhealthy else HEALTH_TIMEOUT
    operator("fleetmesh", "release", "create", f"fleetmesh-sample:v{version}", "--app", APP,
             "--health-http", str(PORT), "--health-timeout", str(timeout), "--json")
    return time.monotonic()


def status(version: int) -> dict[str, dict[str, Any]]:
    return release_status(APP, version)


def containers(device: str) -> list[tuple[int, str, str]]:
    """(release, state, name) of the device's app containers, from its own engine."""
    out = lab_cli("exec", device, "--", "docker", "ps", "-a", "--filter",
                  f"label=io.fleetmesh.app={APP}", "--format",
                  '{{.Label "io.fleetmesh.release"}} {{.State}} {{.Names}} '
                  '{{.Label "io.fleetmesh.device"}}', timeout=60)
    rows = []
    for line in out.splitlines():
        version, state, name, owner = line.split()
        assert owner == device
        rows.append((int(version), state, name))
    return rows


def running(device: str) -> set[int]:
    return {v for v, state, _ in containers(device) if state == "running"}


def app_output(device: str) -> str:
    """The output of the app's running container. Found by its labels, not its name: the
    agent reports "running" when the health check passes and gives the new container the
    app's name a moment later, after removing the old one."""
    ids = lab_cli("exec", device, "--", "docker", "ps", "-q", "--filter",
                  f"label=io.fleetmesh.app={APP}", timeout=60).split()
    assert len(ids) == 1, (device, ids)
    return lab_cli("exec", device, "--", "docker", "logs", ids[0], timeout=60)


def wait(pred: Any, timeout: float, what: str, interval: float = 0.5) -> float:
    """Poll until pred() is truthy; the seconds it took."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout:.0f} s: {what}\n{_diagnosis()}")
        time.sleep(interval)


def _diagnosis() -> str:
    """What the devices said lately: the newest releases' status and the agents' last words."""
    out = []
    for log in sorted(LOG_DIR.glob("*-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        out.append(f"--- {log.name}\n" + "\n".join(lines[-15:]))
    return "\n".join(out)


def settled(version: int, devices: list[str], states: tuple[str, ...] = ("running",),
            app: str = APP) -> bool:
    st = release_status(app, version)
    return all(st.get(d, {}).get("state") in states for d in devices)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Lab]:
    with lab_up(topology(), network_only=False) as lab:
        wait_online(lab, [d.name for d in lab.devices], 60)
        yield lab


@pytest.fixture(scope="module")
def devices(fleet: Lab) -> list[str]:
    return [d.name for d in fleet.devices]


def test_v1_reaches_every_device_with_progress_over_the_shaped_link(
        fleet: Lab, devices: list[str]) -> None:
    release(1)
    seen: dict[str, list[int]] = {d: [] for d in devices}

    def done() -> bool:
        st = status(1)
        for d in devices:
            b = st.get(d, {}).get("bytes_done")
            if isinstance(b, int) and (not seen[d] or seen[d][-1] != b):
                seen[d].append(b)
        return all(st.get(d, {}).get("state") == "running" for d in devices)

    took = wait(done, 300, "v1 running on every device", interval=0.3)
    print(f"v1 on {len(devices)} devices in {took:.1f} s; bytes_done seen: {seen}")
    # behind the 1 Mbit/s uplink the coordinator saw the download grow, report by report
    home = [d for d in devices if d.startswith("home-")]
    assert any(len([b for b in seen[d] if b > 0]) >= 2 for d in home), seen
    for d in devices:
        assert seen[d] == sorted(seen[d]), (d, seen[d])
        assert running(d) == {1}
        assert "fleetmesh-sample v1" in app_output(d)
    listed = json.loads(operator("fleetmesh", "devices", "list", "--json"))["devices"]
    assert {x["name"]: x["release"] for x in listed} == {d: 1 for d in devices}


def test_v2_waits_for_the_update_lock_then_runs_within_seconds(
        fleet: Lab, devices: list[str]) -> None:
    lock = AGENTS_DIR / LOCKED / "locks" / APP / "updates.lock"
    # the app's side of the lock, as documented: O_EXCL create in its lock directory
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    try:
        release(2)
        others = [d for d in devices if d != LOCKED]
        wait(lambda: settled(2, others), 180, "v2 running on the unlocked devices")
        st = wait(lambda: status(2)[LOCKED]["state"] == "waiting-lock", 60,
                  f"{LOCKED} reports that it waits for the lock")
        row = status(2)[LOCKED]
        assert row["running"] == 1 and row["lock_since"] is not None
        assert row["bytes_done"] == row["bytes_total"] > 0  # v2 is downloaded already
        time.sleep(3)
        assert running(LOCKED) == {1}  # still on v1 while the lock is held
        print(f"{LOCKED} waiting for its lock after {st:.1f} s")
    finally:
        lock.unlink(missing_ok=True)
    took = wait(lambda: running(LOCKED) == {2}, 30, f"{LOCKED} runs v2", interval=0.2)
    print(f"{LOCKED}: v2 running {took:.1f} s after the lock was released")
    assert took <= 5.0
    wait(lambda: settled(2, devices), 60, "v2 committed everywhere")
    for d in devices:
        # the labelled v2 container runs in the device's own engine, and the app says v2
        assert [(v, state) for v, state, _ in containers(d)] == [(2, "running")], d
        assert "fleetmesh-sample v2" in app_output(d)


def test_an_unhealthy_v3_is_rolled_back_everywhere(fleet: Lab, devices: list[str]) -> None:
    published = release(3, unhealthy=True)
    took = wait(lambda: settled(3, devices, ("failed",)), 240, "v3 failed everywhere")
    print(f"v3 failed and rolled back on every device {took:.1f} s after publishing "
          f"(health timeout {UNHEALTHY_TIMEOUT} s)")
    assert time.monotonic() - published >= UNHEALTHY_TIMEOUT
    # issue 6: back on v2 within the health timeout plus 10 s (here counted from the publish,
    # so download and load are inside the bound too)
    assert took <= UNHEALTHY_TIMEOUT + 10
    for d in devices:
        assert running(d) == {2}, d
        row = status(3)[d]
        assert row["running"] == 2 and row["error"], row
    # a failed release is not retried by itself
    time.sleep(5)
    assert all(status(3)[d]["state"] == "failed" for d in devices)


def _fetched(device: str) -> Counter[str]:
    text = (LOG_DIR / f"{device}.log").read_text(errors="replace")
    return Counter(re.findall(r"gossip: blob ([0-9a-f]{16}) \(\d+ B\) from \S+: ", text))


def test_sigkill_at_every_point_of_the_apply_path_converges(
        fleet: Lab, devices: list[str]) -> None:
    points = [p for p in ALL_CRASH_POINTS if p not in ROLLBACK_POINTS] + list(ROLLBACK_POINTS)
    assert len(points) >= 10
    version, good = 3, 2  # v3 failed: v2 runs
    crash_file = AGENTS_DIR / VICTIM / CRASH_FILE
    for point in points:
        version += 1
        unhealthy = point in ROLLBACK_POINTS
        restarts = agent_status(fleet, VICTIM)["restarts"]
        crash_file.write_text(point + "\n")
        release(version, unhealthy=unhealthy)
        wait(lambda r=restarts: agent_status(fleet, VICTIM)["restarts"] > r, 240,
             f"{VICTIM}'s agent killed at {point}")
        assert not crash_file.exists()
        expected = ("failed",) if unhealthy else ("running",)
        wait(lambda v=version, e=expected: settled(v, [VICTIM], e), 240,
             f"{VICTIM} converges on v{version} after a kill at {point}")
        now = running(VICTIM)
        if unhealthy:
            assert now == {good}, (point, now)
        else:
            assert now == {version}, (point, now)
            good = version
        print(f"killed at {point}: converged, running v{good}")
        wait(lambda v=version, e=expected: settled(v, [d for d in devices if d != VICTIM], e),
             240,
             f"v{version} settled on the other devices")
    twice = {b: n for b, n in _fetched(VICTIM).items() if n > 1}
    assert not twice, f"verified blobs fetched more than once: {twice}"


WEB = "web"  # `fleetmesh push examples/app`: busybox httpd beside the sample app
WEB_PORT = 8081  # the sample app has 8080 on the devices' (host) network
EXAMPLE_APP = Path(__file__).parents[2] / "examples" / "app"
PAGE_GET = ("import sys, httpx\n"
            "print(httpx.get(f'http://127.0.0.1:{sys.argv[1]}/', timeout=5).text)\n")


def test_push_from_a_dockerfile_rolls_out_and_a_one_line_change_ships_a_delta(
        fleet: Lab, devices: list[str], tmp_path: Path) -> None:
    """Issue 17's `fleetmesh push examples/app --app web` on the operator node: built on its
    engine from the Dockerfile, published, and running on every device; after a one-line edit
    a second push ships the changed layer as a delta, and that is what the devices fetch."""
    ctx = tmp_path / "app"
    shutil.copytree(EXAMPLE_APP, ctx)
    push = ("fleetmesh", "push", str(ctx), "--app", WEB, "--build-arg", f"BASE={BUSYBOX_IMAGE}",
            "--command", f"httpd -f -v -p {WEB_PORT} -h /www", "--health-http", f"{WEB_PORT}/",
            "--json")

    def served(device: str) -> str:
        return lab_cli("exec", device, "--", "python", "-c", PAGE_GET, str(WEB_PORT), timeout=60)

    v1 = json.loads(operator(*push))
    assert v1["version"] == 1 and v1["created"] is True
    wait(lambda: settled(1, devices, app=WEB), 240, "web v1 running everywhere")
    for d in devices:
        assert "the first release of the example app" in served(d), d

    page = ctx / "www" / "index.html"
    text = page.read_text()
    assert text.count("the first release of the example app") == 1
    page.write_text(text.replace("the first release of the example app",
                                 "the second release: one line changed"))
    v2 = json.loads(operator(*push))
    assert v2["version"] == 2 and v2["created"] is True
    base, www = v2["layers"]
    assert base["reused_from"] == 1 and www["reused_from"] is None
    best = min(d["size"] for d in www["deltas"])
    wait(lambda: settled(2, devices, app=WEB), 240, "web v2 running everywhere")
    # what each device fetched for v2, from its LAN, peers or the coordinator (its v1 blobs,
    # the base layer among them, it held already)
    fetched = {d: sum(r["by_source"].values()) for d, r in release_status(WEB, 2).items()}
    print(f"\npush v2: www layer {www['size']} B, its chunks {www['stored_size']} B, delta "
          f"{best} B; uploaded {v2['uploaded_bytes']} B (v1: {v1['uploaded_bytes']} B); "
          f"each device fetched {sorted(set(fetched.values()))} B")
    for d in devices:
        assert "the second release: one line changed" in served(d), d
        assert 0 < fetched[d] < www["stored_size"], (d, fetched[d], www)  # the delta, not the layer


ARM_PAYLOAD = 2 * 1024 * 1024  # incompressible: a LAN that fetched it would show it at once


def test_a_two_platform_release_brings_amd64_devices_only_amd64_blobs(
        fleet: Lab, devices: list[str], tmp_path: Path) -> None:
    """Issue 17's multi-architecture release: the sample app for the devices' platform plus an
    arm64 image built on the operator's engine without running it (`FROM scratch` + `COPY` of
    2 MiB of random bytes), published as one release. Every device runs it; no device's blob
    store holds a blob of the arm64 image, and no LAN's WAN link carried its bytes."""
    version = 1 + max((int(r["version"]) for r in json.loads(operator(
        "fleetmesh", "release", "list", "--fleet", FLEET, "--app", APP, "--json",
        timeout=60))["releases"]),
        default=0)
    operator("python", "-m", "lab.sampleapp", str(version))
    ctx = tmp_path / "arm"
    ctx.mkdir()
    (ctx / "payload.bin").write_bytes(os.urandom(ARM_PAYLOAD))
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY payload.bin /payload.bin\n")
    arm = f"fleetmesh-sample-arm:v{version}"
    operator("docker", "build", "--no-cache", "--platform", "linux/arm64", "-t", arm, str(ctx))
    routers = {lan: fleet.router(lan) for lan in ("home", "office")}
    before = {lan: fleet.wan_counters(r)[0] for lan, r in routers.items()}
    t0 = time.monotonic()
    out = json.loads(operator("fleetmesh", "release", "create", f"fleetmesh-sample:v{version}",
                              arm, "--app", APP, "--health-http", str(PORT),
                              "--health-timeout", str(HEALTH_TIMEOUT), "--json"))
    platforms = {layer["platform"] for layer in out["layers"]}
    assert platforms == {"linux/amd64", "linux/arm64"}, platforms
    wait(lambda: settled(version, devices), 240, f"v{version} running everywhere")
    took = time.monotonic() - t0
    rx = {lan: fleet.wan_counters(r)[0] - before[lan] for lan, r in routers.items()}

    # the blob ids of each platform's image, from the signed manifest the devices get
    acc = access(fleet)
    assert acc is not None
    r = httpx.get(f"{acc.url}/api/v1/releases/{FLEET}/{APP}/{version}/manifest",
                  headers={"Authorization": f"Bearer {acc.api_key}"}, timeout=30,
                  verify=ssl.create_default_context(cafile=str(COORDINATOR_DIR / "tls.crt")))
    assert r.status_code == 200, r.text
    manifest = decode_manifest(decode_signed_manifest(r.content).manifest)
    by_platform = {image.platform: {c.id.hex() for layer in image.layers for c in layer.chunks}
                   | {d.blob_id.hex() for layer in image.layers for d in layer.deltas}
                   for image in release_images(manifest)}
    assert set(by_platform) == {"linux/amd64", "linux/arm64"}, set(by_platform)
    arm_stored = sum(c.stored_size for image in release_images(manifest)
                     if image.platform == "linux/arm64" for layer in image.layers
                     for c in layer.chunks)
    assert arm_stored >= ARM_PAYLOAD
    for d in devices:
        held = blobs_held(d)
        assert not held & by_platform["linux/arm64"], (d, held & by_platform["linux/arm64"])
        assert running(d) == {version}, d
    print(f"\ntwo-platform v{version}: arm64 image {arm_stored} B stored; running everywhere "
          f"after {took:.1f} s; WAN received per LAN meanwhile: {rx}")
    for lan, n in rx.items():
        assert n < arm_stored / 2, (lan, n, arm_stored)  # no arm64 bytes crossed any WAN
