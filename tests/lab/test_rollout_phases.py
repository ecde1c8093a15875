"""Issue 16 on real parts: phased rollouts on 3 LANs x 3 devices behind three NAT kinds, each
device with its own Docker engine and agent, the operator on the WAN.

In order, on one lab: v1 goes to every device at once (today's behaviour without rollout
options); v2 is published with `--no-rollout` and rolled out with `fleetmesh rollout start 2
--phases 1,50%,100% --soak 20s`: it advances through every phase, no device applies it before its
phase starts (each engine's own event log says when the v2 container was created), and each LAN
pays about B of WAN bytes, at the phase that first touches it or ahead of it; an unhealthy v3
halts in phase 1, its one device goes back to v2 by itself and no other engine ever creates a v3
container, also not after its agent restarts; v4 with a maintenance window a minute ahead is
downloaded at once and applied only when the window opens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab import Lab, parse_topology, start_agent, stop_agent, wait_online
from lab import devices as listed_devices
from lab.rollout import outer_routers, release_bytes

from .conftest import lab_cli, lab_skip_reason, lab_up, log_tail, operator, release_status

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

APP = "sample"
PORT = 8080
PAYLOAD = 3 * 1024 * 1024  # B of each release: ~6 s across a 4 Mbit/s uplink
HEALTH_TIMEOUT = 20  # s
UNHEALTHY_TIMEOUT = 8  # s: how long the broken v3 is given
LANS = (("lana", "firewall"), ("lanb", "symmetric"), ("lanc", "hard"))
SOAK = 20  # s


def topology():  # noqa: ANN201 - a Topology
    return parse_topology({
        "operator": {"on": "wan"},
        "lan": [{"name": n, "nat": nat, "devices": 3, "uplink": "4mbit"} for n, nat in LANS],
    }, source="tests/lab/test_rollout_phases.py")


def publish(version: int, *options: str, unhealthy: bool = False) -> int:
    """Build vN (with a fresh payload) on the operator's engine and publish it; returns B."""
    operator("python", "-m", "lab.sampleapp", str(version), "--payload", str(PAYLOAD),
             *(["--unhealthy"] if unhealthy else []))
    timeout = UNHEALTHY_TIMEOUT if unhealthy else HEALTH_TIMEOUT
    out = operator("fleetmesh", "release", "create", f"fleetmesh-sample:v{version}", "--app",
                   APP, "--health-http", str(PORT), "--health-timeout", str(timeout), "--json",
                   *options)
    return release_bytes(json.loads(out))[0]


def rollout_status(version: int) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(operator("fleetmesh", "rollout", "status", str(version),
                                              "--app", APP, "--json", timeout=60))
    return out


def status(version: int) -> dict[str, dict[str, Any]]:
    return release_status(APP, version)


def events(device: str, since: float, version: int | None = None) -> list[dict[str, Any]]:
    """The app's container events on the device's own engine since `since` (epoch s)."""
    filters = ["--filter", f"label=io.fleetmesh.app={APP}", "--filter", "type=container"]
    if version is not None:
        filters += ["--filter", f"label=io.fleetmesh.release={version}"]
    out = lab_cli("exec", device, "--", "docker", "events", "--since", f"{since:.3f}",
                  "--until", f"{time.time():.3f}", *filters, "--format", "{{json .}}",
                  timeout=60)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def created_at(device: str, since: float, version: int) -> list[float]:
    return [e["timeNano"] / 1e9 for e in events(device, since, version)
            if e.get("Action") == "create"]


def running(device: str) -> set[int]:
    out = lab_cli("exec", device, "--", "docker", "ps", "--filter",
                  f"label=io.fleetmesh.app={APP}", "--format",
                  '{{.Label "io.fleetmesh.release"}}', timeout=60)
    return {int(v) for v in out.split()}


def wan_bytes(lab: Lab) -> dict[str, tuple[int, int]]:
    """Per LAN: (bytes in, bytes out) on its router's WAN interface."""
    stats = {lan: lab.wan_stats(r) for lan, r in outer_routers(lab).items()}
    return {lan: (s["rx_bytes"], s["tx_bytes"]) for lan, s in stats.items()}


def wait(pred: Any, timeout: float, what: str, devices: list[str], interval: float = 1.0
         ) -> float:
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            tails = "\n".join(f"--- {d}\n{log_tail(d, 15)}" for d in devices)
            raise AssertionError(f"not within {timeout:.0f} s: {what}\n{tails}")
        time.sleep(interval)


def timeline(version: int) -> str:
    return operator("fleetmesh", "rollout", "status", str(version), "--app", APP, timeout=60)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Lab]:
    with lab_up(topology(), network_only=False) as lab:
        wait_online(lab, [d.name for d in lab.devices], 90)
        yield lab


@pytest.fixture(scope="module")
def devices(fleet: Lab) -> list[str]:
    return sorted(d.name for d in fleet.devices)


@pytest.fixture(scope="module")
def on_v2(fleet: Lab, devices: list[str]) -> dict[str, Any]:
    """v1 everywhere at once, then v2 by phases; the v2 rollout's final status."""
    publish(1)
    wait(lambda: all(s.get("state") == "running" for s in status(1).values())
         and len(status(1)) == len(devices), 600, "v1 running on every device", devices)
    before, since = wan_bytes(fleet), time.time()
    b = publish(2, "--no-rollout")
    assert b > 0.9 * PAYLOAD
    time.sleep(5)  # published held: nobody is targeted, nobody creates a v2 container
    assert not any(created_at(d, since, 2) for d in devices)
    operator("fleetmesh", "rollout", "start", "2", "--app", APP, "--phases", "1,50%,100%",
             "--soak", f"{SOAK}s")
    wait(lambda: rollout_status(2)["state"] == "done", 900, "v2 rollout done", devices)
    after = wan_bytes(fleet)
    final = rollout_status(2)
    final["_since"], final["_B"] = since, b
    final["_wan"] = {lan: (after[lan][0] - before[lan][0], after[lan][1] - before[lan][1])
                     for lan in after}
    print(timeline(2))
    return final


def test_a_phased_rollout_advances_through_every_phase(on_v2: dict[str, Any],
                                                       devices: list[str]) -> None:
    phases = on_v2["phases"]
    assert [p["spec"] for p in phases] == ["1", "50%", "100%"]
    sizes = [len(p["devices"]) for p in phases]
    assert sizes == [1, math.ceil(0.5 * len(devices)) - 1, len(devices) - math.ceil(
        0.5 * len(devices))]
    assert sorted(d for p in phases for d in p["devices"]) == devices
    for earlier, later in zip(phases, phases[1:], strict=False):
        assert earlier["ended_at"] is not None and later["started_at"] is not None
        # a phase ends only after every device of it ran v2 for the soak time
        assert later["started_at"] >= earlier["ended_at"] >= earlier["started_at"] + SOAK
    assert all(2 in running(d) for d in devices)


def test_no_device_applies_before_its_phase(on_v2: dict[str, Any]) -> None:
    for phase in on_v2["phases"]:
        for device in phase["devices"]:
            created = created_at(device, on_v2["_since"], 2)
            assert created, f"{device} never created a v2 container"
            assert min(created) >= phase["started_at"] - 1.0, (
                f"{device} created v2 at {min(created):.1f}, its phase started at "
                f"{phase['started_at']:.1f}")


def test_each_lan_pays_about_the_release_once(on_v2: dict[str, Any]) -> None:
    """What the LAN's router received from the WAN, from before the operator built v2 until the
    rollout was done (the idle traffic of those minutes included): the release crosses each
    WAN link once, whichever phase first needs it. What the LAN sent is printed: TCP
    acknowledgements inside WireGuard, about 4 % of what it received, reports and requests."""
    b = on_v2["_B"]
    for lan, (rx, tx) in sorted(on_v2["_wan"].items()):
        print(f"{lan}: WAN in {rx} bytes (x{rx / b:.3f} B), out {tx} (x{tx / b:.3f} B), "
              f"in + out x{(rx + tx) / b:.3f} B, B = {b}")
        assert rx <= 1.15 * b, lan


def test_an_unhealthy_release_halts_in_phase_one_and_goes_back(
        fleet: Lab, on_v2: dict[str, Any], devices: list[str]) -> None:
    since = time.time()
    publish(3, "--no-rollout", unhealthy=True)
    operator("fleetmesh", "rollout", "start", "3", "--app", APP, "--phases", "1,50%,100%",
             "--max-failures", "0", "--soak", f"{SOAK}s")
    wait(lambda: rollout_status(3)["state"] == "halted", 600, "v3 rollout halted", devices)
    st = rollout_status(3)
    print(timeline(3))
    assert st["phase"] == 0 and st["reason"]
    canary = st["phases"][0]["devices"]
    assert len(canary) == 1
    assert canary[0] in st["reason"]
    wait(lambda: running(canary[0]) == {2}, HEALTH_TIMEOUT + 60, f"{canary[0]} back on v2",
         canary)
    # on its own engine: from the v3 container's start to v2 running again
    evs = events(canary[0], since)
    v3_start = min(e["timeNano"] / 1e9 for e in evs if e.get("Action") == "start"
                   and e["Actor"]["Attributes"].get("io.fleetmesh.release") == "3")
    v2_back = min(e["timeNano"] / 1e9 for e in evs if e.get("Action") == "start"
                  and e["Actor"]["Attributes"].get("io.fleetmesh.release") == "2"
                  and e["timeNano"] / 1e9 > v3_start)
    print(f"{canary[0]}: v3 started, v2 back after {v2_back - v3_start:.1f} s")
    assert v2_back - v3_start <= UNHEALTHY_TIMEOUT + 10
    others = [d for d in devices if d not in canary]
    for d in others:
        assert not created_at(d, since, 3), f"{d} created a v3 container"
    # an agent restarted later takes v3 neither from the coordinator nor from gossip
    restarted = [others[0], canary[0]]
    for d in restarted:
        stop_agent(fleet, d)
        start_agent(fleet, d)
    t_restart = time.time()
    wait_online(fleet, restarted, 90)
    # a state report since the restart (the coordinator's clock: same host) carries the
    # apps as the new agent sees them, after it read its targets
    wait(lambda: all(((listed_devices(fleet).get(d) or {}).get("last_report") or 0)
                     > t_restart for d in restarted), 120, "restarted agents reported",
         restarted)
    time.sleep(10)
    for d in others:
        assert not created_at(d, since, 3), f"{d} created a v3 container"
    assert all(running(d) == {2} for d in devices)
    assert rollout_status(3)["state"] == "halted"


def test_a_device_outside_its_window_downloads_but_applies_when_it_opens(
        on_v2: dict[str, Any], devices: list[str]) -> None:
    since = time.time()
    publish(4, "--no-rollout")
    opens = time.time() + 90  # the lab's agents share this host's clock and time zone
    start = time.strftime("%H:%M:%S", time.localtime(opens))
    end = time.strftime("%H:%M:%S", time.localtime(opens + 3600))
    operator("fleetmesh", "rollout", "start", "4", "--app", APP, "--phases", "100%", "--soak",
             "0s", "--window", f"{start}-{end}")
    wait(lambda: all(s.get("state") == "waiting-window" for s in status(4).values())
         and len(status(4)) == len(devices), 85, "v4 downloaded, waiting for the window",
         devices)
    assert time.time() < opens
    assert not any(created_at(d, since, 4) for d in devices)
    wait(lambda: all(s.get("state") == "running" for s in status(4).values()), 300,
         "v4 running once the window opened", devices)
    for d in devices:
        created = created_at(d, since, 4)
        assert created and min(created) >= opens - 1.0, d
