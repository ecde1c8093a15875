"""Issue 17's first acceptance line: the agents run as containers (`[agents] mode =
"container"`), each in its device's own engine with docs/services.md's flags, from the agent
image scripts/build-images builds (in the host's engine, under a version of this test's own,
removed at the end with the base if this test imported it; the lab loads it into each device's
engine). About 2 minutes with the build cache (docs/services.md).

One lab, 2 LANs x 2 devices, in order: every engine runs the agent container; v1 and v2 of the
sample app roll out and each engine shows the agent and the app; SIGKILL of an agent's process
→ the engine's restart policy brings it back and it converges, the app's container having run
on meanwhile; killing the app container leaves the agent alone.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from lab import Lab, agent_status, kill_agent, parse_topology, wait_online, wait_restarted
from lab.fleet import AGENT_CONTAINER, access, devices
from lab.fleetimage import base_tag
from tests.release.test_release_docker import _docker, _docker_skip_reason

from .conftest import REPO, lab_cli, lab_skip_reason, lab_up
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
