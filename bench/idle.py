"""What an idle device costs on its WAN link (issue 14), and what those bytes are.

    scripts/bench idle [--settle 120] [--seconds 900]

The lab of the issue: two `firewall` LANs of three devices and one `symmetric` LAN of one device
(relayed: no direct path through that NAT), the operator on the WAN, the whole fleet running
(coordinator, agents with wireguard-go, gossip, LAN discovery). After `--settle` seconds (the
start-up exchanges: first reports, targets, push-pulls, path punching) nothing is done for
`--seconds`, and the bench prints:

- per LAN, from its router's WAN interface counters: bytes received and sent per device per hour
  (kB = 1000 bytes), their sum against the bar (20 kB/h per device, in + out; goal 10 kB/h) and
  the month (30 days) it makes;
- for the first device of each LAN, counting rules in its own namespace (both directions): its
  LAN link split by the other end — the hub (WireGuard keepalives and handshakes with the hub,
  the coordinator API and relayed traffic inside), LAN neighbours (free: never on the WAN), other
  WAN addresses (direct peers on other LANs, relay probes) — and inside the tunnel, the
  coordinator API and gossip.

- for the same devices, their own byte account (agent/_account.py: WireGuard framing, keepalives
  and handshakes; control API; gossip; blobs; logs), read from the account file each agent
  saves in its data directory (at most every 5 minutes), between the saves nearest the window's
  ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent._account import WanAccount
from agent._datadir import WAN_ACCOUNT
from agent._device import DEFAULT_IFNAME
from agent._gossip import GOSSIP_PORT
from lab import API_PORT, Lab, parse_topology, teardown_all, wait_online
from lab.fleet import AGENTS_DIR
from lab.network import LabNetwork, Node
from lab.rollout import outer_routers
from mesh.control import WAN_PURPOSES

CHAIN: Final = "FM-BENCH-IDLE"  # lab-prefixed; only ever created inside a lab namespace
BAR: Final = 20_000  # bytes per device per hour, in + out (issue 14)
GOAL: Final = 10_000
IDLE_TOPOLOGY: Final[dict[str, Any]] = {"operator": {"on": "wan"}, "lan": [
    {"name": "lana", "nat": "firewall", "devices": 3},
    {"name": "lanb", "nat": "firewall", "devices": 3},
    {"name": "lanc", "nat": "symmetric", "devices": 1}]}


def _rules(lab: LabNetwork, node: Node) -> list[tuple[str, list[str]]]:
    """(part, iptables match) for INPUT and OUTPUT, each direction counted."""
    assert node.lan is not None
    subnet = lab.router(node.lan).lan_subnet
    hub = next(n for n in lab.nodes if n.role == "coordinator").underlay_ipv4
    api, gossip = str(API_PORT), str(GOSSIP_PORT)
    out: list[tuple[str, list[str]]] = []
    for way, other, port in (("-i", "-s", "--sport"), ("-o", "-d", "--dport")):
        out += [
            ("link", [way, node.iface]),
            ("lan", [way, node.iface, other, subnet]),
            ("hub", [way, node.iface, other, hub]),
            ("api", [way, DEFAULT_IFNAME, "-p", "tcp", port, api]),
            ("gossip", [way, DEFAULT_IFNAME, "-p", "tcp", "--sport", gossip]),
            ("gossip", [way, DEFAULT_IFNAME, "-p", "tcp", "--dport", gossip]),
        ]
    return out


class Counting:
    """Counting rules (no target: each only counts, every packet meets all of them) in one
    chain of a lab node, hooked into INPUT and OUTPUT; `close` removes them."""

    def __init__(self, lab: LabNetwork, node: Node, rules: Sequence[tuple[str, list[str]]]):
        self.lab, self.node, self.rules = lab, node, list(rules)
        self._ipt("-N", CHAIN)
        try:
            for hook in ("INPUT", "OUTPUT"):
                self._ipt("-I", hook, "-j", CHAIN)
            for _, match in self.rules:
                self._ipt("-A", CHAIN, *match)
        except BaseException:
            self.close()
            raise

    def _ipt(self, *argv: str) -> str:
        r = self.lab.run(self.node, ["iptables", "-w", *argv], capture_output=True, text=True,
                         timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(argv)} in {self.node.name}: "
                               f"{r.stderr.strip()}")
        return str(r.stdout)

    def zero(self) -> None:
        self._ipt("-Z", CHAIN)

    def read(self) -> dict[str, int]:
        """Bytes per part since the last `zero`."""
        counted: list[int] = []
        for line in self._ipt("-L", CHAIN, "-v", "-x", "-n").splitlines()[2:]:
            fields = line.split()
            if fields and fields[0].isdigit():
                counted.append(int(fields[1]))
        if len(counted) != len(self.rules):
            raise RuntimeError(f"expected {len(self.rules)} counting rules, read {len(counted)}")
        total: dict[str, int] = {}
        for (part, _), n in zip(self.rules, counted, strict=True):
            total[part] = total.get(part, 0) + n
        return total

    def close(self) -> None:
        for hook in ("INPUT", "OUTPUT"):
            self.lab.run(self.node, ["iptables", "-w", "-D", hook, "-j", CHAIN],
                         capture_output=True)
        self.lab.run(self.node, ["iptables", "-w", "-F", CHAIN], capture_output=True)
        self.lab.run(self.node, ["iptables", "-w", "-X", CHAIN], capture_output=True)


@dataclass(frozen=True, slots=True)
class IdleCost:
    seconds: float
    devices: dict[str, int]  # LAN -> devices on it
    wan: dict[str, tuple[int, int]]  # LAN -> (received, sent) on its router's WAN interface
    sampled: dict[str, tuple[str, dict[str, int]]]  # LAN -> (device, bytes per part)
    # device -> (seconds between its two account saves, bytes per purpose between them)
    accounts: dict[str, tuple[float, dict[str, int]]]

    def hourly(self, n: int) -> float:
        return n * 3600 / self.seconds

    def per_device(self, lan: str) -> tuple[float, float]:
        rx, tx = self.wan[lan]
        n = max(1, self.devices[lan])
        return self.hourly(rx) / n, self.hourly(tx) / n

    def worst(self) -> float:
        return max(sum(self.per_device(lan)) for lan in self.wan)

    def lines(self) -> list[str]:
        out = [f"idle over {self.seconds:.0f} s (routers' WAN counters, kB = 1000 B):"]
        for lan in self.wan:
            rx, tx = self.per_device(lan)
            out.append(
                f"  {lan} ({self.devices[lan]} device{'s' * (self.devices[lan] != 1)}): "
                f"{(rx + tx) / 1000:7.1f} kB/h per device = in {rx / 1000:.1f} + out "
                f"{tx / 1000:.1f}; {(rx + tx) * 24 * 30 / 1e6:.1f} MB per month; "
                f"x{(rx + tx) / BAR:.2f} of the bar ({BAR // 1000} kB/h)")
        for device, parts in self.sampled.values():
            h = {k: self.hourly(v) / 1000 for k, v in parts.items()}
            other = h["link"] - h["lan"] - h["hub"]
            out.append(
                f"  {device} (both ways on its LAN link, kB/h): {h['link']:.1f} = hub "
                f"{h['hub']:.1f} + LAN neighbours {h['lan']:.1f} (free) + other WAN "
                f"{other:.1f}; inside the tunnel: coordinator API {h['api']:.1f}, gossip "
                f"{h['gossip']:.1f}")
        for device, (seconds, purposes) in self.accounts.items():
            if seconds <= 0:
                out.append(f"  {device}'s own account: not saved twice in the window")
                continue
            rate = {k: v * 3600 / seconds / 1000 for k, v in purposes.items()}
            split = ", ".join(f"{k} {rate.get(k, 0.0):.1f}" for k in WAN_PURPOSES)
            out.append(f"  {device}'s own account (kB/h over {seconds:.0f} s): "
                       f"{sum(rate.values()):.1f} = {split}")
        verdict = "met" if self.worst() <= BAR else "missed"
        out.append(f"issue 14 idle bar: {verdict} (worst LAN {self.worst() / 1000:.1f} kB/h per "
                   f"device; goal {GOAL // 1000} kB/h)")
        return out


def own_account(device: str) -> tuple[float, dict[str, int]]:
    """(when the agent last saved its account, bytes per purpose summed over its days)."""
    path = AGENTS_DIR / device / WAN_ACCOUNT
    saved = path.stat().st_mtime
    account = WanAccount.from_json(json.loads(path.read_text()))
    total = dict.fromkeys(WAN_PURPOSES, 0)
    for day in account.days(saved, 8).values():
        for purpose, n in day.items():
            total[purpose] += n
    return saved, total


def measure(lab: LabNetwork, seconds: float) -> IdleCost:
    routers = outer_routers(lab)
    devices = {lan: sum(1 for d in lab.devices if d.lan == lan) for lan in routers}
    first: dict[str, Node] = {}
    for d in lab.devices:
        if d.lan is not None:
            first.setdefault(d.lan, d)
    counters: dict[str, Counting] = {}
    try:
        for lan, node in first.items():
            counters[lan] = Counting(lab, node, _rules(lab, node))
        for c in counters.values():
            c.zero()
        own_before = {n.name: own_account(n.name) for n in first.values()}
        before, t0 = {lan: lab.wan_counters(r) for lan, r in routers.items()}, time.monotonic()
        time.sleep(seconds)
        after, t1 = {lan: lab.wan_counters(r) for lan, r in routers.items()}, time.monotonic()
        sampled = {lan: (first[lan].name, c.read()) for lan, c in counters.items()}
        accounts = {}
        for name, (saved0, bytes0) in own_before.items():
            saved1, bytes1 = own_account(name)
            accounts[name] = (saved1 - saved0,
                              {k: max(0, bytes1[k] - bytes0[k]) for k in WAN_PURPOSES})
    finally:
        for c in counters.values():
            c.close()
    wan = {lan: (after[lan][0] - before[lan][0], after[lan][1] - before[lan][1])
           for lan in routers}
    return IdleCost(t1 - t0, devices, wan, sampled, accounts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench idle", description=__doc__.split("\n")[0])
    p.add_argument("--settle", type=float, default=120.0,
                   help="seconds after every device is online before counting (default 120)")
    p.add_argument("--seconds", type=float, default=900.0,
                   help="seconds of idle counted (default 900)")
    args = p.parse_args(argv)
    if args.settle < 0 or args.seconds < 10:
        print("bench.idle: --settle must be >= 0 and --seconds >= 10", file=sys.stderr)
        return 2
    if Lab.is_up():
        print("bench.idle: a lab is up; run `fleetmesh-lab down` first", file=sys.stderr)
        return 2
    lab = Lab.up(parse_topology(IDLE_TOPOLOGY, source="bench/idle.py"), network_only=False)
    try:
        wait_online(lab, [d.name for d in lab.devices], 120)
        time.sleep(args.settle)
        cost = measure(lab, args.seconds)
    finally:
        teardown_all()
    for line in cost.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
