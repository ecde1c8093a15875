"""WAN bytes of a release rollout on a real lab, LAN-first sharing against every device
fetching from the coordinator, and the idle cost of the mesh.

    python -m bench.rollout [--size BYTES]

Two labs, one after the other: 3 home-router LANs x 4 devices, 4 Mbit/s uplinks, the whole
fleet running (coordinator, agents with wireguard-go, gossip, LAN discovery). For each: the WAN
bytes each LAN's router received while a synthetic release of B incompressible bytes rolled out,
minus what the LAN receives idle over the same time (measured just before), as a multiple of B;
and the idle figure itself as WAN bytes per device per hour.
"""

from __future__ import annotations

import argparse
import sys
import time

from lab import Lab, parse_topology, teardown_all
from lab.fleet import wait_online
from lab.rollout import rollout

LANS = ("lana", "lanb", "lanc")


def one(peer_sharing: bool, size: int) -> None:
    topo = parse_topology({"agents": {"peer_sharing": peer_sharing}, "lan": [
        {"name": n, "nat": "firewall", "devices": 4, "uplink": "4mbit"} for n in LANS]},
        source="bench/rollout.py")
    lab = Lab.up(topo, network_only=False)
    try:
        wait_online(lab, [d.name for d in lab.devices], 60)
        time.sleep(10)  # LAN discovery
        r = rollout(lab, version=1, size=size)
    finally:
        teardown_all()
    label = "LAN-first sharing" if peer_sharing else "peer_sharing = false"
    ratios = ", ".join(f"{lan} x{r.ratio(lan):.2f}" for lan in LANS)
    print(f"{label:22} release {r.release_bytes} B in {r.seconds:5.1f} s; WAN bytes per LAN / B:"
          f" {ratios}")
    print(f"{'':22} idle: {r.idle_bytes_per_device_hour() / 1024:.0f} KiB per device per hour "
          f"(keepalives, gossip, peer maps; {r.idle_bytes_per_device_hour() * 24 * 30 / 2**20:.0f}"
          f" MiB per device per month)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout")
    p.add_argument("--size", type=int, default=1_500_000)
    args = p.parse_args(argv)
    if Lab.is_up():
        print("bench.rollout: a lab is up; run `fleetmesh-lab down` first", file=sys.stderr)
        return 2
    one(True, args.size)
    one(False, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
