"""Issue 17's first acceptance line: the agents run as containers (`[agents] mode =
"container"`), each in its device's own engine with docs/services.md's flags, from the agent
image scripts/build-images builds (in the host's engine, under a version of this test's own,
removed at the end with the base if this test imported it; the lab loads it into each device's
engine). About 2 minutes with the build cache (docs/services.md).

One lab, 2 LANs x 2 devices, in order: every engine runs the agent container; v1 and v2 of the
sample app roll out and each engine shows the agent and the app; SIGKILL of an agent's process
→ the engine's restart policy brings it back and it converges, the app's container having run
on meanwhile; killing the app container leaves the agent alone. Then the agent updates itself
(issue 17's second acceptance line): an agent image built on the running one and pushed as the
reserved app `fleetmesh-agent` replaces the agent on every device, fetching only its new
layer; a broken one (it exits at start) leaves every device on the old agent, online, and
`release status` says why.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import (
    AGENTS_DIR,
    Lab,
    agent_status,
    blobs_held,
    kill_agent,
    parse_topology,
    wait_online,
    wait_restarted,
)
from lab.fleet import AGENT_CONTAINER, access, devices, load_agent_image
from lab.fleetimage import base_tag
from lab.rollout import outer_routers, rx_by_lan
from tests.release.test_release_docker import _docker, _docker_skip_reason

from .conftest import REPO, lab_cli, lab_skip_reason, lab_up, operator, release_status
from .test_apply_fleet import APP, release, running, settled, wait

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

VICTIM = "office-1"


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    reason = _docker_skip_reason()
    if reason:
        pytest.skip(f"the host's engine builds the agent image: {reason}")
    version = f"test-{uuid.uuid4().hex[:10]}"
    tag = f"fleetmesh/agent:{version}"
    base = base_tag()
    base_before = _docker("image", "inspect", base, check=False).returncode == 0
    try:
        r = subprocess.run([str(REPO / "scripts" / "build-images"), "--version", version],
                           capture_output=True, text=True, timeout=1800, check=False)
        assert r.returncode == 0, r.stderr
        yield tag
    finally:
        for kind in ("coordinator", "agent"):  # the coordinator image is the agent's child
            found = _docker("image", "inspect", "-f", "{{.Id}}", f"fleetmesh/{kind}:{version}",
                            check=False)
            if found.returncode == 0:
                _docker("rmi", "-f", found.stdout.strip(), check=False, timeout=120)
        found = _docker("image", "inspect", "-f", "{{.Id}}", base, check=False)
        if not base_before and found.returncode == 0:
            _docker("rmi", found.stdout.strip(), check=False, timeout=120)


@pytest.fixture(scope="module")
def fleet(image: str) -> Iterator[Lab]:
    topo = parse_topology({
        "operator": {"on": "wan"},
        "agents": {"mode": "container", "image": image},
        "lan": [{"name": "home", "nat": "firewall", "devices": 2},
                {"name": "office", "nat": "firewall", "devices": 2}],
    }, source="tests/lab/test_agent_container.py")
    with lab_up(topo, network_only=False) as lab:
        wait_online(lab, [d.name for d in lab.devices], 60)
        yield lab


def engine_ps(device: str) -> dict[str, str]:
    """name -> image of the running containers in the device's own engine."""
    out = lab_cli("exec", device, "--", "docker", "ps", "--format", "{{.Names}} {{.Image}}",
                  timeout=60)
    return dict(line.split() for line in out.splitlines())


def app_container(device: str) -> str:
    ids = lab_cli("exec", device, "--", "docker", "ps", "-q", "--filter",
                  f"label=io.fleetmesh.app={APP}", timeout=60).split()
    assert len(ids) == 1, (device, ids)
    return ids[0]


def test_each_engine_runs_the_agent_container(fleet: Lab, image: str) -> None:
    for d in fleet.devices:
        assert engine_ps(d.name).get(AGENT_CONTAINER) == image, d.name
        st = agent_status(fleet, d.name)
        assert st["state"] == "running" and st["container"], st
    assert access(fleet) is not None
    assert all(v["online"] for v in devices(fleet).values())


def test_v1_and_v2_roll_out_beside_the_agents(fleet: Lab, image: str) -> None:
    names = [d.name for d in fleet.devices]
    for version in (1, 2):
        release(version)
        wait(lambda v=version: settled(v, names), 300, f"v{version} running on every device")
    for name in names:
        ps = engine_ps(name)
        assert ps.get(AGENT_CONTAINER) == image, (name, ps)
        assert running(name) == {2}, (name, ps)
        assert f"fleetmesh/{APP}:2" in ps.values(), (name, ps)


def test_sigkilled_agent_is_restarted_by_the_engine_and_converges(fleet: Lab) -> None:
    app = app_container(VICTIM)
    before = agent_status(fleet, VICTIM)
    killed_at = time.time()
    pid = kill_agent(fleet, VICTIM)
    wait_restarted(fleet, VICTIM, pid, timeout=60)
    after = agent_status(fleet, VICTIM)
    assert after["restarts"] == before["restarts"] + 1
    assert after["container"] == before["container"]  # the same container, restarted
    assert app_container(VICTIM) == app  # the app ran on while its agent was dead
    # converged: the restarted agent reports again, and it reports v2 running
    wait(lambda: float(devices(fleet)[VICTIM].get("last_report") or 0) > killed_at, 60,
         f"{VICTIM} reporting after the restart")
    wait(lambda: settled(2, [VICTIM]), 120, f"{VICTIM} on v2 after the restart")


def test_killing_the_app_container_leaves_the_agent(fleet: Lab) -> None:
    before = agent_status(fleet, VICTIM)
    killed = app_container(VICTIM)
    lab_cli("exec", VICTIM, "--", "docker", "kill", killed, timeout=60)
    after = agent_status(fleet, VICTIM)
    assert after["state"] == "running"
    assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])
    assert engine_ps(VICTIM).get(AGENT_CONTAINER)
    wait_online(fleet, [VICTIM], 60)
    # Docker leaves a killed container down (its owner stopped it); the agent, whose target
    # it is, starts the same container again at its next look at the engine
    took = wait(lambda: running(VICTIM) == {2}, 60, f"{VICTIM}'s app started again")
    assert app_container(VICTIM) == killed
    print(f"{VICTIM}: the killed app container was started again after {took:.1f} s")


# --------------------------------------------------------------------------- self-update

AGENT_APP = "fleetmesh-agent"
AGENT_DOCKERFILE = """ARG BASE
FROM ${BASE}
COPY build.txt /etc/fleetmesh-agent-build
"""
BROKEN_DOCKERFILE = AGENT_DOCKERFILE + (
    'ENTRYPOINT ["/bin/sh", "-c", "echo broken agent: refusing to start >&2; exit 3"]\n')


def push_agent(tmp: Path, image: str, name: str, dockerfile: str) -> dict[str, Any]:
    """`fleetmesh push` of an agent image built on `image` (what an operator does with a new
    agent build), as the reserved app's next release."""
    ctx = tmp / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    (ctx / "build.txt").write_text(f"{name}\n")
    return dict(json.loads(operator("fleetmesh", "push", str(ctx), "--app", AGENT_APP,
                                    "--build-arg", f"BASE={image}", "--health-timeout", "60",
                                    "--json", timeout=600)))


def agent_containers(device: str) -> list[tuple[str, str, str]]:
    """(name, image, restart policy) of every agent container in the engine, running or not:
    after a hand-over exactly one, under the agent's name, restarted by the engine."""
    ids = lab_cli("exec", device, "--", "docker", "ps", "-aq", "--filter",
                  "label=org.opencontainers.image.title=fleetmesh-agent", timeout=60).split()
    out = lab_cli("exec", device, "--", "docker", "inspect", "-f",
                  "{{.Name}} {{.Config.Image}} {{.HostConfig.RestartPolicy.Name}}", *ids,
                  timeout=60) if ids else ""
    return sorted((n.lstrip("/"), i, r) for n, i, r in (x.split() for x in out.splitlines()))


def blob_bytes(device: str, blobs: set[str]) -> int:
    store = AGENTS_DIR / device / "blobs"
    return sum((store / b).stat().st_size for b in blobs)


def agent_of(device: str) -> tuple[str, str]:
    """(the image of the device's agent container, its build file)."""
    image = engine_ps(device).get(AGENT_CONTAINER, "")
    if not image:
        return image, ""
    # its file through /proc/PID/root (the lab's engines share this PID namespace), not with
    # `docker exec`: inside a chroot, as in a fresh-Debian box, runc's exec lands in the mount
    # namespace's root, not the container's
    pid = lab_cli("exec", device, "--", "docker", "inspect", "-f", "{{.State.Pid}}",
                  AGENT_CONTAINER, timeout=60, check=False).strip()
    try:
        build = Path(f"/proc/{int(pid)}/root/etc/fleetmesh-agent-build").read_text()
    except (ValueError, OSError):  # stopped or replaced in between: asked again by the wait
        build = ""
    return image, build.strip()


@pytest.fixture(scope="module")
def operator_has_agent_image(fleet: Lab) -> None:
    load_agent_image(fleet, [fleet.node("operator")])


def test_an_agent_release_rolls_out_and_every_device_runs_the_new_agent(
        fleet: Lab, image: str, operator_has_agent_image: None, tmp_path: Path) -> None:
    names = [d.name for d in fleet.devices]
    routers = outer_routers(fleet)
    rx_before, held_before = rx_by_lan(fleet, routers), {d: blobs_held(d) for d in names}
    published = time.monotonic()
    v1 = push_agent(tmp_path, image, "agent-good", AGENT_DOCKERFILE)
    assert v1["version"] == 1
    new_image = f"fleetmesh/{AGENT_APP}:1"
    took = wait(lambda: all(agent_of(d) == (new_image, "agent-good") for d in names)
                and settled(1, names, app=AGENT_APP), 420, "the new agent on every device")
    print(f"\nagent release 1 running on every device {took:.1f} s after the push "
          f"({time.monotonic() - published:.1f} s with the build)")
    wait_online(fleet, names, 60)
    rx = {lan: n - rx_before[lan] for lan, n in rx_by_lan(fleet, routers).items()}
    new_blobs = {d: blob_bytes(d, blobs_held(d) - held_before[d]) for d in names}
    size = sum(x["size"] for x in v1["layers"])
    print(f"agent release 1: image {size} B in layers {[x['size'] for x in v1['layers']]}; "
          f"WAN bytes received per LAN, push to done (idle traffic included): {rx}; new blob "
          f"bytes per device: {new_blobs}")
    for d in names:
        assert agent_containers(d) == [(AGENT_CONTAINER, new_image, "unless-stopped")], d
        assert running(d) == {2}, d  # the app ran on through the hand-over
        # the devices built the new agent's image on the layers of the one they run: only the
        # new layer travelled, not the agent's 180 MB
        assert new_blobs[d] < 64 * 1024, (d, new_blobs[d])
    assert all(n < 2 * 1024 * 1024 for n in rx.values()), rx


def test_a_broken_agent_release_leaves_every_device_on_the_old_agent(
        fleet: Lab, image: str, operator_has_agent_image: None, tmp_path: Path) -> None:
    names = [d.name for d in fleet.devices]
    routers = outer_routers(fleet)
    rx_before = rx_by_lan(fleet, routers)
    v2 = push_agent(tmp_path, image, "agent-broken", BROKEN_DOCKERFILE)
    assert v2["version"] == 2
    took = wait(lambda: settled(2, names, ("failed",), app=AGENT_APP), 420,
                "the broken agent release failed on every device")
    wait_online(fleet, names, 60)
    st = release_status(AGENT_APP, 2)
    rx = {lan: n - rx_before[lan] for lan, n in rx_by_lan(fleet, routers).items()}
    print(f"\nagent release 2 (broken) failed on every device {took:.1f} s after the push; "
          f"WAN bytes received per LAN (idle included): {rx}; blob bytes each device planned "
          f"to fetch: {sorted({d['bytes_total'] for d in st.values()})}")
    for d in names:
        # the old agent, running again, plans nothing but the new layer either
        assert st[d]["bytes_total"] < 64 * 1024, st[d]
        assert agent_of(d) == (f"fleetmesh/{AGENT_APP}:1", "agent-good"), d
        assert agent_containers(d) == [(AGENT_CONTAINER, f"fleetmesh/{AGENT_APP}:1",
                                        "unless-stopped")], d
        assert st[d]["running"] == 1, st[d]
        why = st[d]["error"] or ""
        assert "exited with code 3" in why and "broken agent: refusing to start" in why, st[d]
    text = operator("fleetmesh", "release", "status", "2", "--app", AGENT_APP, timeout=60)
    print(text)
    assert "exited with code 3" in text
    assert all(n < 2 * 1024 * 1024 for n in rx.values()), rx
