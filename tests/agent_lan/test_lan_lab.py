"""LAN discovery for real: two firewall LANs x 3 devices, one `python -m agent._lan` per device
namespace. Each device finds exactly its two LAN neighbours (right underlay IPs, ports and
fingerprints) and nobody behind the other router; a stopped device is dropped by its
neighbours (goodbye) within seconds. Needs root; the lab is always torn down."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent._lan import fingerprint
from lab import Lab, parse_topology
from tests.lab.conftest import lab_skip_reason, lab_up
from vpn import generate_keypair

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

REPO = Path(__file__).resolve().parents[2]
RUN_SECONDS = 60  # each agent exits by itself after this, whatever happens to the test
DISCOVERY_DEADLINE = 30.0  # six interpreters starting at once on two cores take a while
GOODBYE_DEADLINE = 5.0  # goodbye = TTL 0 records; caches drop them after 1 s (RFC 6762 §10.1)
FLEET = "lanfleet"


class Agent:
    """One `python -m agent._lan` process and the JSON lines it printed, read on a thread."""

    def __init__(self, lab: Lab, node: str, port: int) -> None:
        self.node = node
        self.port = port
        self.key = generate_keypair().public
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        argv = [sys.executable, "-m", "agent._lan", "--name", node, "--fleet", FLEET,
                "--key", self.key, "--interface", "eth0", "--port", str(port),
                "--seconds", str(RUN_SECONDS)]
        self.proc = lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self.lock:
                self.events.append(event)

    def neighbours(self) -> dict[str, dict[str, Any]] | None:
        """The latest neighbour set, by name (None before the first change)."""
        with self.lock:
            sets = [e["neighbours"] for e in self.events if e["event"] == "neighbours"]
        return None if not sets else {n["name"]: n for n in sets[-1]}

    def ever_seen(self) -> set[str]:
        with self.lock:
            return {n["name"] for e in self.events if e["event"] == "neighbours"
                    for n in e["neighbours"]}

    def stop(self) -> None:
        """By PID: SIGTERM (the agent says goodbye), SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.reader.join(timeout=5)


def wait_for(what: str, check: Callable[[], bool], deadline: float,
             agents: dict[str, Agent]) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > deadline:
            state = {n: sorted((a.neighbours() or {}).keys()) for n, a in agents.items()}
            errors = {n: (a.proc.stderr.read() if a.proc.poll() is not None and a.proc.stderr
                          else "") for n, a in agents.items()}
            pytest.fail(f"{what} not within {deadline}s: neighbours {state}, stderr {errors}")
        time.sleep(0.1)
    return time.monotonic() - start


def test_devices_discover_exactly_their_lan_neighbours_and_see_goodbyes() -> None:
    topology = parse_topology({"lan": [{"name": "lana", "nat": "firewall", "devices": 3},
                                       {"name": "lanb", "nat": "firewall", "devices": 3}]},
                              source="tests/agent_lan/test_lan_lab.py")
    with lab_up(topology) as lab:
        agents: dict[str, Agent] = {}
        # a second multicast-capable interface (standing in for wg0 or a container bridge) in
        # one device: the agent must not join mDNS there
        extra = lab.devices[0].name
        for cmd in (["ip", "link", "add", "fmx0", "type", "veth", "peer", "name", "fmx1"],
                    ["ip", "addr", "add", "10.250.0.1/24", "dev", "fmx0"],
                    ["ip", "link", "set", "fmx1", "up"],
                    ["ip", "link", "set", "fmx0", "up"]):
            lab.run(extra, cmd, check=True, timeout=10)
        try:
            for i, device in enumerate(lab.devices):
                agents[device.name] = Agent(lab, device.name, 51820 + i)
            lans = {lan.name: [d.name for d in lab.devices if d.lan == lan.name]
                    for lan in lab.topology.lans}
            assert all(len(names) == 3 for names in lans.values())
            expected = {
                name: {other: agents[other] for other in members if other != name}
                for members in lans.values() for name in members
            }

            def everyone_complete() -> bool:
                for name, agent in agents.items():
                    seen = agent.neighbours()
                    if seen is None or set(seen) != set(expected[name]):
                        return False
                return True

            wait_for("full discovery", everyone_complete, DISCOVERY_DEADLINE, agents)
            for name, agent in agents.items():
                seen = agent.neighbours()
                assert seen is not None
                for other, other_agent in expected[name].items():
                    entry = seen[other]
                    assert entry["ipv4"] == str(lab.node(other).underlay_ipv4)
                    assert entry["port"] == other_agent.port
                    assert entry["fp"] == fingerprint(other_agent.key)
                # never, at any point, anyone from behind the other router
                assert agent.ever_seen() <= set(expected[name]), (name, agent.ever_seen())

            maddr = {ifname: lab.run(extra, ["ip", "-4", "maddr", "show", "dev", ifname],
                                     capture_output=True, text=True, timeout=10).stdout
                     for ifname in ("eth0", "fmx0")}
            assert "224.0.0.251" in maddr["eth0"], maddr
            assert "224.0.0.251" not in maddr["fmx0"], maddr

            # stop one device: its LAN neighbours drop it (goodbye), the other LAN is unaffected
            gone = lans["lana"][0]
            stopped_at = time.monotonic()
            agents[gone].stop()
            assert agents[gone].proc.returncode == 0, agents[gone].proc.stderr
            with agents[gone].lock:
                assert agents[gone].events[-1]["event"] == "stats"
            stayed = [n for n in lans["lana"] if n != gone]
            wait_for(f"{gone} dropped by {stayed}",
                     lambda: all(gone not in (agents[n].neighbours() or {gone: 1})
                                 for n in stayed),
                     GOODBYE_DEADLINE, agents)
            took = time.monotonic() - stopped_at
            for n in stayed:
                assert set(agents[n].neighbours() or {}) == {m for m in stayed if m != n}
            for n in lans["lanb"]:
                assert set(agents[n].neighbours() or {}) == set(expected[n])
            print(f"goodbye seen {took:.2f}s after SIGTERM")
            assert took < GOODBYE_DEADLINE + 10
        finally:
            for agent in agents.values():
                agent.stop()
