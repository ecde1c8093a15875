"""Steps of `scripts/demo` on the lab that is up: `python -m lab.demo reach|punch`."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

from .core import Lab
from .wgmesh import WireGuardLab

console = Console()


def reach(lab: Lab) -> bool:
    """Every device pings the coordinator's WAN address."""
    target = str(lab.topology.coordinator_ipv4)
    table = Table("device", "LAN", "NAT", "underlay", f"ping {target}")
    ok = True
    for d in lab.devices:
        nat = lab.topology.lan(d.lan).nat if d.lan else "-"
        r = lab.run(d, ["ping", "-n", "-c", "1", "-W", "2", target], capture_output=True,
                    timeout=10)
        ok &= r.returncode == 0
        table.add_row(d.name, d.lan or "-", nat, d.underlay_ipv4,
                      "[green]ok[/]" if r.returncode == 0 else "[red]no reply[/]")
    console.print(table)
    return ok


def _first_device(lab: Lab, nat: str, skip: str | None = None) -> str | None:
    for d in lab.devices:
        if d.lan and d.lan != skip and lab.topology.lan(d.lan).nat == nat:
            return d.name
    return None


def punch(lab: Lab) -> bool:
    """A WireGuard hub on the coordinator learns two devices' NAT-mapped endpoints; told each
    other's at once, the two devices handshake directly through their home routers."""
    a = _first_device(lab, "firewall")
    b = _first_device(lab, "double") or (a and _first_device(lab, "firewall", skip=lab.node(a).lan))
    if a is None or b is None:
        console.print("punch: this topology has no two devices behind home-router NATs")
        return False
    with WireGuardLab(lab, [a, b]) as mesh:
        for name in (a, b):
            console.print(f"hub sees {name} ({lab.node(name).underlay_ipv4}) "
                          f"as {mesh.observed_endpoint(name)}")
        started = time.monotonic()
        mesh.punch(a, b)
        direct = mesh.wait_direct(a, b)
        took = time.monotonic() - started
        if not direct:
            console.print(f"[red]no direct handshake between {a} and {b}[/]")
            return False
        v4, v6 = mesh.ping(a, b, 4, count=3), mesh.ping(a, b, 6, count=3)
        peer = mesh.members[a].wg.backend().get().peer(mesh.members[b].keys.public)
        via = peer.endpoint if peer else "?"
        console.print(f"direct tunnel {a} <-> {b} up in {took:.1f} s via {via}; ping over it: "
                      f"IPv4 {'ok' if v4 else 'FAILED'}, IPv6 {'ok' if v6 else 'FAILED'}")
        return v4 and v6


def main(argv: list[str]) -> int:
    steps = {"reach": reach, "punch": punch}
    if len(argv) != 1 or argv[0] not in steps:
        print(f"usage: python -m lab.demo {'|'.join(steps)}", file=sys.stderr)
        return 2
    return 0 if steps[argv[0]](Lab.load()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
