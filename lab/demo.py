"""Steps of `scripts/demo` on the lab that is up: `python -m lab.demo reach|mesh|dashboard|
release VERSION`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from .fleet import BIN, devices, fleetmesh
from .rollout import outer_routers, rx_by_lan
from .session import Lab

APP = "sample"
RATIO_MIN = 100_000  # bytes: below this a release is lost in the mesh's own traffic

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


def _operator(*argv: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """`fleetmesh-lab exec operator -- ARGV`: the operator's own environment and engine."""
    return subprocess.run([str(BIN / "fleetmesh-lab"), "exec", "operator", "--", *argv],
                          capture_output=capture, text=True, timeout=900, check=False)


def dashboard(lab: Lab) -> bool:
    """Where the operator's browser goes (the lab routes the host to the coordinator)."""
    st = lab.status()
    url, key = st.get("dashboard_url"), st.get("operator_key")
    if not url:
        console.print("[red]no dashboard: the lab runs no fleet[/]")
        return False
    console.print(f"dashboard: [bold]{url}[/] (self-signed certificate; sign in with the "
                  f"operator key)\noperator key: [bold]{key}[/]")
    return True


def release(lab: Lab, version: int) -> bool:
    """Build vVERSION of the sample app in the operator's engine, publish it, follow the
    rollout live, and sum up: devices updated, time, WAN bytes per LAN against what a device
    needed."""
    console.print(f"[bold]building fleetmesh-sample:v{version}[/] in the operator's engine")
    if _operator("python", "-m", "lab.sampleapp", str(version)).returncode != 0:
        return False
    routers = outer_routers(lab)
    before, t0 = rx_by_lan(lab, routers), time.monotonic()
    if _operator("fleetmesh", "release", "create", f"fleetmesh-sample:v{version}", "--app",
                 APP, "--health-http", "8080", "--health-timeout", "30").returncode != 0:
        return False
    console.print(f"[bold]rollout of v{version}[/] (fleetmesh release watch)")
    watched = _operator("fleetmesh", "release", "watch", str(version), "--app", APP,
                        "--timeout", "600")
    took = time.monotonic() - t0
    after = rx_by_lan(lab, routers)
    r = _operator("fleetmesh", "release", "status", str(version), "--app", APP, "--json",
                  capture=True)
    if r.returncode != 0:
        console.print(f"[red]release status: {r.stderr.strip()}[/]")
        return False
    rows = json.loads(r.stdout)["devices"]
    updated = sum(1 for d in rows if d["state"] == "running")
    # B: the new bytes (chunks, deltas) one device had to get for this release, whatever the
    # source; what it already held from earlier releases is not counted
    fetched = max((sum((d.get("by_source") or {}).values()) for d in rows), default=0)
    table = Table("LAN", "devices", "WAN bytes received", "B (new bytes a device got)",
                  "WAN / B", title=f"v{version}: {updated}/{len(rows)} devices updated in "
                                   f"{took:.0f} s")
    for lan in sorted(routers):
        n = sum(1 for d in lab.devices if d.lan == lan)
        got = after[lan] - before[lan]
        table.add_row(f"{lan} ({lab.topology.lan(lan).nat})", str(n), f"{got:,}",
                      f"{fetched:,}", f"x{got / fetched:.2f}" if fetched >= RATIO_MIN else "-")
    console.print(table)
    console.print("WAN bytes are everything the LAN received meanwhile (keepalives, gossip, "
                  "reports too); each LAN pulls the release's new bytes about once"
                  + ("" if fetched >= RATIO_MIN else
                     f"; B is below {RATIO_MIN // 1000} kB (a delta), so the WAN bytes here are "
                     "that traffic, not the release"))
    show = lab.devices[0].name
    out = subprocess.run([str(BIN / "fleetmesh-lab"), "exec", show, "--", "docker", "ps",
                          "--format", "{{.Names}}  {{.Image}}  {{.Status}}  "
                          '{{.Label "io.fleetmesh.release"}}'],
                         capture_output=True, text=True, timeout=60, check=False)
    console.print(f"docker ps on {show}:\n{out.stdout.strip()}")
    return watched.returncode == 0 and updated == len(rows)


def main(argv: list[str]) -> int:
    steps = {"reach": reach, "mesh": mesh, "dashboard": dashboard}
    if len(argv) == 2 and argv[0] == "release" and argv[1].isdigit():
        return 0 if release(Lab.load(), int(argv[1])) else 1
    if len(argv) != 1 or argv[0] not in steps:
        print(f"usage: python -m lab.demo {'|'.join(steps)}|release VERSION", file=sys.stderr)
        return 2
    return 0 if steps[argv[0]](Lab.load()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
