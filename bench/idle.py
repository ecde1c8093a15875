"""What an idle device costs on its WAN link, and what those bytes are.

Used by `scripts/bench rollout`: over one idle window the routers' WAN counters give the
figure the issue asks for (WAN bytes received per device per hour), and counting rules inside
one device's namespace split that device's traffic (both directions) into the coordinator's API
(peer-map long polls, reports, targets reads, all over TLS inside the tunnel), gossip (SWIM
probes, push-pull, rumors), and what WireGuard adds on the underlay (framing, keepalives to the
hub and to direct peers, handshakes every two minutes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from agent._device import DEFAULT_IFNAME
from agent._gossip import GOSSIP_PORT
from lab import API_PORT, Lab
from lab.rollout import outer_routers, rx_by_lan

CHAIN: Final = "FM-BENCH-IDLE"  # lab-prefixed; only ever created inside a lab namespace


@dataclass(frozen=True, slots=True)
class IdleBreakdown:
    seconds: float
    devices: int
    wan_rx: int  # bytes all LAN routers received on their WAN links
    api: int  # the sampled device, both directions, inner (TCP over the tunnel)
    gossip: int
    inner: int  # everything through the tunnel
    underlay: int  # everything on the device's LAN interface

    def per_hour(self, n: int) -> float:
        return n * 3600 / self.seconds

    @property
    def wan_rx_per_device_hour(self) -> float:
        return self.per_hour(self.wan_rx) / max(1, self.devices)

    def lines(self, device: str) -> list[str]:
        def kib(n: int) -> str:
            return f"{self.per_hour(n) / 1024:.0f} KiB/h"

        under = max(1, self.underlay)
        wg = max(0, self.underlay - self.inner)
        other = max(0, self.inner - self.api - self.gossip)
        return [
            f"idle over {self.seconds:.0f} s: WAN received {self.wan_rx_per_device_hour / 1024:.0f}"
            f" KiB per device per hour (routers' counters; "
            f"{self.wan_rx_per_device_hour * 24 * 30 / 2**20:.1f} MiB per device per month)",
            f"  {device}, both directions on its LAN link: {kib(self.underlay)} = coordinator API "
            f"{kib(self.api)} ({self.api / under:.0%}), gossip {kib(self.gossip)} "
            f"({self.gossip / under:.0%}), other tunnel traffic {kib(other)} "
            f"({other / under:.0%}), WireGuard framing+keepalives+handshakes {kib(wg)} "
            f"({wg / under:.0%})"]


def _rules(iface: str) -> list[tuple[str, list[str]]]:
    """(name, iptables match) for INPUT and OUTPUT, each counted both ways."""
    api, gossip = str(API_PORT), str(GOSSIP_PORT)
    return [
        ("api", ["-i", DEFAULT_IFNAME, "-p", "tcp", "--sport", api]),
        ("api", ["-o", DEFAULT_IFNAME, "-p", "tcp", "--dport", api]),
        ("gossip", ["-i", DEFAULT_IFNAME, "-p", "tcp", "--sport", gossip]),
        ("gossip", ["-i", DEFAULT_IFNAME, "-p", "tcp", "--dport", gossip]),
        ("gossip", ["-o", DEFAULT_IFNAME, "-p", "tcp", "--sport", gossip]),
        ("gossip", ["-o", DEFAULT_IFNAME, "-p", "tcp", "--dport", gossip]),
        ("inner", ["-i", DEFAULT_IFNAME]),
        ("inner", ["-o", DEFAULT_IFNAME]),
        ("underlay", ["-i", iface]),
        ("underlay", ["-o", iface]),
    ]


def measure_idle_breakdown(lab: Lab, device: str, seconds: float) -> IdleBreakdown:
    node = lab.node(device)
    rules = _rules(node.iface)

    def ipt(*argv: str) -> str:
        r = lab.run(node, ["iptables", "-w", *argv], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(argv)} in {device}: {r.stderr.strip()}")
        return str(r.stdout)

    ipt("-N", CHAIN)
    try:
        for hook in ("INPUT", "OUTPUT"):
            ipt("-I", hook, "-j", CHAIN)
        for i, (_, match) in enumerate(rules):
            # no target: each rule only counts, and every packet meets all of them
            ipt("-A", CHAIN, *match, "-m", "comment", "--comment", f"r{i}")
        routers = outer_routers(lab)
        ipt("-Z", CHAIN)
        before, t0 = rx_by_lan(lab, routers), time.monotonic()
        time.sleep(seconds)
        after, t1 = rx_by_lan(lab, routers), time.monotonic()
        counted = _read(ipt("-L", CHAIN, "-v", "-x", "-n"), len(rules))
    finally:
        for hook in ("INPUT", "OUTPUT"):
            lab.run(node, ["iptables", "-w", "-D", hook, "-j", CHAIN], capture_output=True)
        lab.run(node, ["iptables", "-w", "-F", CHAIN], capture_output=True)
        lab.run(node, ["iptables", "-w", "-X", CHAIN], capture_output=True)
    total = {"api": 0, "gossip": 0, "inner": 0, "underlay": 0}
    for (name, _), n in zip(rules, counted, strict=True):
        total[name] += n
    return IdleBreakdown(t1 - t0, len(lab.devices), sum(after.values()) - sum(before.values()),
                         total["api"], total["gossip"], total["inner"], total["underlay"])


def _read(listing: str, n: int) -> list[int]:
    """Byte counters of the chain's rules, in order (iptables -L -v -x -n)."""
    out: list[int] = []
    for line in listing.splitlines()[2:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            out.append(int(fields[1]))
    if len(out) != n:
        raise RuntimeError(f"expected {n} counting rules, read {len(out)}")
    return out
