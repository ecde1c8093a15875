"""Steps of `scripts/demo` on the lab that is up: `python -m lab.demo reach|mesh`."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from .core import Lab
from .fleet import devices, fleetmesh

SETTLE_SECONDS = 45.0

# wide enough for a 10-device path matrix when piped (rich assumes 80 columns then)
console = Console(width=None if sys.stdout.isatty() else 160)


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


def mesh(lab: Lab) -> bool:
    """The fleet's own view: every device pair's path (direct or relay) once paths settle, and a
    ping over the mesh from every device to every other, IPv4 and IPv6."""
    shown = devices(lab)
    names = sorted(shown)
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:  # paths settle within a punch timeout or two; bounded
        paths = {a: _peers(lab, a) for a in names}
        if all(p.get("path") != "none" for v in paths.values() for p in v.values()) \
                or time.monotonic() > deadline:
            break
        time.sleep(1)
    table = Table("from \\ to", *names, title="paths (fleetmesh peers): D direct, R relay")
    for a in names:
        table.add_row(a, *("-" if a == b else
                           {"direct": "[green]D[/]", "relay": "[yellow]R[/]"}.get(
                               str(paths[a].get(b, {}).get("path")), "?") for b in names))
    console.print(table)
    failed = []
    for a in names:
        for b in names:
            for family in ("mesh_ipv4", "mesh_ipv6"):
                if a != b and not any(
                        lab.run(a, ["ping", "-n", "-c1", "-W1", shown[b][family]],
                                capture_output=True, timeout=10).returncode == 0
                        for _ in range(3)):
                    failed.append(f"{a}->{b} ({family})")
    pairs = len(names) * (len(names) - 1)
    console.print(f"mesh pings: {2 * pairs - len(failed)}/{2 * pairs} answered"
                  + (f"; no answer: {', '.join(failed)}" if failed else ""))
    return not failed


def _peers(lab: Lab, name: str) -> dict[str, dict[str, object]]:
    r = fleetmesh(lab, "operator" if any(n.role == "operator" for n in lab.nodes)
                  else "coordinator", "peers", name, "--json")
    return {p["peer"]: p for p in json.loads(r.stdout)["peers"]} if r.returncode == 0 else {}


def main(argv: list[str]) -> int:
    steps = {"reach": reach, "mesh": mesh}
    if len(argv) != 1 or argv[0] not in steps:
        print(f"usage: python -m lab.demo {'|'.join(steps)}", file=sys.stderr)
        return 2
    return 0 if steps[argv[0]](Lab.load()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
