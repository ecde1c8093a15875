"""Docker engines per node, the operator ready to publish, supervised agents and the host's
route to the dashboard, on a real lab: one home LAN (firewall NAT) with two devices and the
operator on the WAN. Needs root, wireguard-go and docker.io; every lab is removed again."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lab import (
    BUSYBOX_IMAGE,
    Lab,
    agent_status,
    devices,
    parse_topology,
    start_agent,
    stop_agent,
    wait_online,
)
from lab.engines import CGROUP_ROOT, DATA_DIR, busybox_rootfs_tar
from lab.hostlink import HOST_LINK
from lab.sampleapp import build_sample

from .conftest import CLI, REPO, lab_skip_reason, lab_up, require_lab_machine, teardown_if_ours
from .test_lab_lifecycle import alive

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

DEVICES = ("home-1", "home-2")
SETTLE = 60.0


def topology():  # noqa: ANN201 - a Topology
    return parse_topology({
        "operator": {"on": "wan"},
        "lan": [{"name": "home", "nat": "firewall", "devices": 2}],
    }, source="tests/lab/test_lab_engines.py")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up(topology(), network_only=False) as lab:
        yield lab


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def in_node(node: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return cli("exec", node, "--", *argv, timeout=timeout)


def until(what: str, check: Callable[[], bool], timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.25)


def status() -> dict[str, object]:
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def has_image(node: str, image: str) -> bool:
    return in_node(node, "docker", "image", "inspect", image).returncode == 0


# ---------------------------------------------------------------- down (first: a lab of its own)


def host_snapshot() -> dict[str, object]:
    def out(*argv: str) -> str:
        return subprocess.run(list(argv), check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def no_counters(text: str) -> str:
        return "\n".join(line.split(" [")[0] if line.startswith(":") else line
                         for line in text.splitlines() if not line.startswith("#"))

    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f)
    cgroups = sorted(str(p) for p in CGROUP_ROOT.glob("*/fleetmesh-lab")) + sorted(
        str(p) for p in CGROUP_ROOT.glob("fleetmesh-lab"))
    return {
        "routes": out("ip", "-4", "route", "show", "table", "all"),
        "links": sorted(line.split(":")[1].strip().split("@")[0]
                        for line in out("ip", "-o", "link").splitlines()),
        "addresses": out("ip", "-4", "-o", "addr"),
        "iptables": no_counters(out("iptables-save")),
        "mounts": mounts,
        "cgroups": cgroups,
        "data": DATA_DIR.exists(),
        "containerd_sockets": sorted(os.listdir("/run/containerd/s"))
        if os.path.isdir("/run/containerd/s") else [],
    }


def test_down_leaves_the_host_as_it_found_it() -> None:
    require_lab_machine()
    before = host_snapshot()
    try:
        lab = Lab.up(parse_topology({
            "operator": {"on": "wan"}, "lan": [{"name": "solo", "devices": 1}]}),
            network_only=False)
        during = host_snapshot()
        assert HOST_LINK in during["links"]  # type: ignore[operator]
        assert during["data"]
        engine_pids = [e["pid"] for e in lab.status()["engines"]]
        # a container in a network namespace of its own: only its cgroup leads to it
        r = subprocess.run(lab.command("operator", [
            "docker", "run", "-d", "--name", "fleetmesh-lab-orphan", BUSYBOX_IMAGE, "sleep",
            "600"]), capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        cid = r.stdout.strip()
        procs = Path(next(CGROUP_ROOT.glob(f"*/fleetmesh-lab/operator/{cid}"))) / "cgroup.procs"
        sleeper = int(procs.read_text().split()[0])
        assert host_snapshot()["cgroups"]
        r = subprocess.run(lab.command("operator", ["docker", "info"]), capture_output=True,
                           text=True, timeout=60, check=False)
        assert "Docker Root Dir: /var/lib/fleetmesh-lab/docker/operator" in r.stdout
        r = cli("down")
        assert r.returncode == 0, r.stderr
    finally:
        teardown_if_ours()
    after = host_snapshot()
    assert after == before
    assert [pid for pid in [*engine_pids, sleeper] if alive(pid)] == []
    assert not DATA_DIR.exists()


# --------------------------------------------------------------------------- engines


def test_each_device_and_the_operator_has_its_own_engine(lab: Lab) -> None:
    engines = {e["node"]: e for e in status()["engines"]}  # type: ignore[attr-defined]
    assert set(engines) == {*DEVICES, "operator"}
    assert all(e["running"] for e in engines.values())
    for node in (*DEVICES, "operator"):
        r = in_node(node, "docker", "info", "--format", "{{.DockerRootDir}}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{DATA_DIR}/docker/{node}"
    # the base image is in the operator's engine only
    assert has_image("operator", BUSYBOX_IMAGE)
    assert not has_image("home-1", BUSYBOX_IMAGE)
    # an image loaded into one device's engine is not visible in the other's
    probe = "fleetmesh-lab/probe:1"
    r = subprocess.run(lab.command("home-1", ["docker", "import", "-", probe]),
                       input=busybox_rootfs_tar(), capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert has_image("home-1", probe)
    assert not has_image("home-2", probe)
    assert not has_image("operator", probe)
    # the engine runs in the node's network namespace: a host-network container sees its address
    r = in_node("home-1", "docker", "run", "--rm", "--network", "host", probe, "ip", "-4",
                "addr", "show", "eth0")
    assert r.returncode == 0, r.stderr
    assert f"inet {lab.node('home-1').underlay_ipv4}/" in r.stdout


def test_the_agent_gets_its_node_engine(lab: Lab) -> None:
    pid = agent_status(lab, "home-2")["pid"]
    assert pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"DOCKER_HOST={lab.node_env('home-2')['DOCKER_HOST']}".encode() in environ
    assert b"home-2" in lab.node_env("home-2")["DOCKER_HOST"].encode()


# --------------------------------------------------------------------------- operator


def test_the_operator_builds_and_publishes_with_no_flags(lab: Lab) -> None:
    r = in_node("operator", "python", "-m", "lab.sampleapp", "1", timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fleetmesh-sample:v1"
    r = in_node("operator", "fleetmesh", "release", "create", "fleetmesh-sample:v1", "--app",
                "sample", timeout=300)
    assert r.returncode == 0, r.stderr
    r = in_node("operator", "fleetmesh", "release", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    releases = listed["releases"] if isinstance(listed, dict) else listed
    assert [(x["app"], x["version"]) for x in releases] == [("sample", 1)]


def test_sample_app_versions_share_their_big_layer_and_print_their_version(lab: Lab) -> None:
    v1, v2 = build_sample(lab, 1), build_sample(lab, 2)

    def inspect(image: str) -> dict[str, object]:
        r = in_node("operator", "docker", "image", "inspect", image)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)[0]  # type: ignore[no-any-return]

    base, i1, i2 = inspect(BUSYBOX_IMAGE), inspect(v1), inspect(v2)
    l1, l2 = i1["RootFS"]["Layers"], i2["RootFS"]["Layers"]  # type: ignore[index]
    assert len(l1) == len(l2) == 3
    assert l1[:2] == l2[:2] and l1[2] != l2[2]  # base and assets shared; the app layer differs
    assert 0 < i1["Size"] - base["Size"] < 300_000  # type: ignore[operator]

    name = "fleetmesh-lab-sample-check"
    try:
        r = in_node("operator", "docker", "run", "-d", "--name", name, "--network", "host",
                    "-e", "PORT=18080", "-e", "HEARTBEAT=1", v2)
        assert r.returncode == 0, r.stderr
        until("v2 answers over HTTP", lambda: in_node(
            "operator", "busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:18080/"
        ).stdout == "fleetmesh-sample v2\n", 30)
        until("a heartbeat", lambda: "fleetmesh-sample v2 heartbeat 1" in in_node(
            "operator", "docker", "logs", name).stdout, 30)
        assert in_node("operator", "docker", "logs", name).stdout.startswith(
            "fleetmesh-sample v2\n")
        until("v2 healthy", lambda: in_node(
            "operator", "docker", "inspect", "-f", "{{.State.Health.Status}}", name
        ).stdout.strip() == "healthy", 30)
    finally:
        in_node("operator", "docker", "rm", "-f", name)

    bad = build_sample(lab, 3, unhealthy=True)
    try:
        r = in_node("operator", "docker", "run", "-d", "--name", name, "--network", "host",
                    "-e", "PORT=18081", bad)
        assert r.returncode == 0, r.stderr
        until("the unhealthy build reports unhealthy", lambda: in_node(
            "operator", "docker", "inspect", "-f", "{{.State.Health.Status}}", name
        ).stdout.strip() == "unhealthy", 45)
        assert in_node("operator", "busybox", "wget", "-q", "-O", "-",
                       "http://127.0.0.1:18081/").returncode != 0
        assert "fleetmesh-sample v3" in in_node("operator", "docker", "logs", name).stdout
    finally:
        in_node("operator", "docker", "rm", "-f", name)


# --------------------------------------------------------------------------- supervised agents


def test_a_killed_agent_is_restarted(lab: Lab) -> None:
    before = agent_status(lab, "home-1")
    assert before["state"] == "running" and before["pid"]
    r = cli("agent", "home-1", "kill")
    assert r.returncode == 0, r.stderr
    assert f"pid {before['pid']} killed" in r.stdout

    def restarted() -> bool:
        a = {x["node"]: x for x in status()["agents"]}["home-1"]  # type: ignore[attr-defined]
        return bool(a["pid"]) and a["pid"] != before["pid"] and a["restarts"] == \
            before["restarts"] + 1
    until("the agent is back under a new pid", restarted)
    wait_online(lab, ["home-1"], SETTLE)


def test_a_stopped_agent_stays_stopped_until_started(lab: Lab) -> None:
    old = agent_status(lab, "home-2")["pid"]
    r = cli("agent", "home-2", "stop")
    assert r.returncode == 0 and r.stdout.strip() == "home-2: agent stopped", r.stderr
    assert agent_status(lab, "home-2") | {"restarts": 0} == {
        "node": "home-2", "state": "stopped", "pid": None, "restarts": 0,
        "supervisor_pid": None}
    assert not alive(old)
    # longer than the supervisor's restart delay: nothing brought it back
    time.sleep(3)
    assert agent_status(lab, "home-2")["state"] == "stopped"
    until("the coordinator sees it offline", lambda: not devices(lab)["home-2"]["online"], 120)
    assert stop_agent(lab, "home-2") == 0  # stopping a stopped agent is no error
    r = cli("agent", "home-2", "start")
    assert r.returncode == 0, r.stderr
    pid = agent_status(lab, "home-2")["pid"]
    assert r.stdout.strip() == f"home-2: agent running, pid {pid}"
    assert start_agent(lab, "home-2") == pid  # already running: nothing new
    wait_online(lab, ["home-2"], SETTLE)


def test_agent_command_errors(lab: Lab) -> None:
    r = cli("agent", "nosuch", "kill")
    assert r.returncode == 2 and r.stderr.startswith("fleetmesh-lab: unknown node 'nosuch'")
    r = cli("agent", "home-router", "stop")
    assert r.returncode == 2
    assert r.stderr.strip() == ("fleetmesh-lab: home-router is not a device (role: router): "
                                "it runs no agent")
    r = cli("agent", "home-1", "restart")
    assert r.returncode == 2 and "invalid choice: 'restart'" in r.stderr


# --------------------------------------------------------------------------- the host's view


def test_status_gives_the_dashboard_and_the_host_reaches_it(lab: Lab) -> None:
    st = status()
    coordinator = lab.topology.coordinator_ipv4
    assert st["dashboard_url"] == f"https://{coordinator}:8443/"
    assert st["operator_key"] == lab.state_now()["fleet"]["api_key"]
    r = httpx.get(f"{st['dashboard_url']}openapi.json", verify=False, timeout=30)
    assert r.status_code == 200 and "paths" in r.json()
    # only the coordinator is routed from the host: not its neighbours on the WAN
    routes = subprocess.run(["ip", "-4", "route", "show", "dev", HOST_LINK], check=True,
                            capture_output=True, text=True).stdout.split("\n")
    assert [x.split()[0] for x in routes if x.strip()] == [str(coordinator)]
    other = subprocess.run(["ip", "-4", "route", "get", str(lab.router("home").wan_ipv4)],
                           check=False, capture_output=True, text=True)
    assert HOST_LINK not in other.stdout
