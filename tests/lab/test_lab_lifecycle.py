"""Up and down for real: nothing is left behind, also after a crash or a failed build; the CLI
end to end. Needs root; every test removes its lab whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab, LabError, LabUsageError, Topology, parse_topology
from lab import network as lab_network
from lab._host import host_networks

from .conftest import CLI, REPO, lab_skip_reason, lab_up, require_lab_machine, teardown_if_ours

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

STATE_DIR = Path("/run/fleetmesh-lab")


def small() -> Topology:
    return parse_topology(
        {
            "operator": {"on": "home"},
            "lan": [
                {"name": "home", "nat": "firewall", "devices": 1, "loss": 0.01},
                {"name": "pub", "nat": "none", "devices": 1, "uplink": "10mbit"},
            ],
        }
    )


@pytest.fixture
def clean() -> Iterator[None]:
    require_lab_machine()
    try:
        yield
    finally:
        teardown_if_ours()


def lab_netns() -> list[str]:
    d = Path("/var/run/netns")
    return sorted(n for n in os.listdir(d) if n.startswith("fm-")) if d.is_dir() else []


def lab_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if "/run/fleetmesh-lab" in line.split()[4]]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def assert_nothing_left(pids: list[int]) -> None:
    assert lab_netns() == []
    assert not STATE_DIR.exists()
    assert lab_mounts() == []
    assert [p for p in pids if alive(p)] == []


def start_sleepers(lab: Lab) -> list[int]:
    """One process the lab records and one it doesn't (found by its namespace at down).

    Returns once each has entered its node (nsenter has exec'd sleep): a process still on its
    way in is in no lab namespace yet, so no cleanup could find it by namespace."""
    recorded = lab.spawn("home-1", ["sleep", "600"])
    unrecorded = subprocess.Popen(lab.command("pub-1", ["sleep", "600"]))
    in_router = subprocess.Popen(lab.command("home-router", ["sleep", "600"]))
    pids = [recorded.pid, unrecorded.pid, in_router.pid]
    deadline = time.monotonic() + 5
    while not all(Path(f"/proc/{p}/comm").read_text().strip() == "sleep" for p in pids):
        assert time.monotonic() < deadline, "sleepers did not start"
        time.sleep(0.01)
    return pids


def test_down_removes_everything(clean: None) -> None:
    lab = Lab.up(small())
    assert set(lab_netns()) == {
        "fm-wan",
        "fm-coordinator",
        "fm-operator",
        "fm-home-router",
        "fm-home-1",
        "fm-pub-1",
    }
    # coordinator, operator and both devices each have a private mount namespace, kept by a
    # holder process that down must stop too
    holders = []
    for name in ("coordinator", "operator", "home-1", "pub-1"):
        path = lab.node(name).mountns_path
        assert path is not None and path.startswith("/proc/") and os.path.exists(path)
        holders.append(int(path.split("/")[2]))
    assert all(alive(p) for p in holders)
    assert lab.node("home-router").mountns_path is None
    pids = start_sleepers(lab) + holders
    lab.down()
    assert_nothing_left(pids)
    lab.down()  # idempotent
    assert_nothing_left(pids)


def test_down_after_a_crash(clean: None) -> None:
    lab = Lab.up(small())
    pids = start_sleepers(lab)
    # the process that built it is gone and so is its bookkeeping
    (STATE_DIR / "state.json").unlink()
    del lab
    r = subprocess.run([str(CLI), "down"], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert_nothing_left(pids)


def test_failed_build_leaves_nothing(clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object, **__: object) -> None:
        raise LabError("injected failure")

    monkeypatch.setattr(lab_network, "_run_all", boom)
    with pytest.raises(LabError, match="injected failure"):
        Lab.up(small())
    assert_nothing_left([])


def test_up_refuses_a_subnet_of_the_host(clean: None) -> None:
    usable = [n for n, _ in host_networks() if not n.is_loopback and n.prefixlen <= 28]
    if not usable:
        pytest.skip("the host has no IPv4 network to collide with")
    net = usable[0]
    topo = parse_topology({"wan": {"subnet": str(net)}, "lan": [{"name": "a"}]})
    with pytest.raises(LabUsageError, match=r"^wan\.subnet: .* overlaps the host's "):
        Lab.up(topo)
    assert_nothing_left([])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args], check=False, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_cli_end_to_end(clean: None) -> None:
    r = run("up", "examples/lab/home-office.toml", "--network-only")
    assert r.returncode == 0, r.stderr
    assert "lab up" in r.stdout
    r = run("up", "examples/lab/home-office.toml")
    assert r.returncode == 2 and r.stderr.strip() == (
        "fleetmesh-lab: a lab is already up (run `fleetmesh-lab down` first)"
    )
    r = run("status", "--json")
    assert r.returncode == 0
    st = json.loads(r.stdout)
    nodes = {n["name"]: n for n in st["nodes"]}
    assert set(nodes) == {
        "coordinator",
        "operator",
        "home-router",
        "home-1",
        "home-2",
        "office-router",
        "office-1",
        "office-2",
    }
    assert nodes["operator"]["lan"] == "office"
    assert nodes["operator"]["underlay_ipv4"] == "10.201.2.10"
    assert {r["name"] for r in st["routers"]} == {"home-router", "office-router"}
    r = run("status")
    assert r.returncode == 0 and "office-router" in r.stdout
    r = run("exec", "operator", "--", "busybox", "ping", "-c", "3", "-W", "1", "198.51.100.1")
    assert r.returncode == 0
    r = run("down")
    assert r.returncode == 0 and "removed" in r.stdout
    assert_nothing_left([])
    r = run("down")
    assert r.returncode == 0
    r = run("status")
    assert r.returncode == 1 and r.stderr.strip() == "fleetmesh-lab: no lab is up"
    r = run("exec", "home-1", "--", "true")
    assert r.returncode == 1


def host_iptables() -> str:
    """The host's own rules (counters stripped): the lab must never add or leave one."""
    out = subprocess.run(["iptables-save"], check=True, capture_output=True, text=True,
                         timeout=30).stdout
    return "\n".join(line.split(" [")[0] if line.startswith(":") else line
                     for line in out.splitlines() if not line.startswith("#"))


def test_a_test_failing_midway_leaves_nothing(clean: None) -> None:
    before = host_iptables()
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed here"):
        with lab_up(small()) as lab:
            pids = start_sleepers(lab)
            assert lab_netns()
            raise RuntimeError("the test failed here")
    assert pids
    assert_nothing_left(pids)
    assert host_iptables() == before
