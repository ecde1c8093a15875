"""WAN bytes of a release rollout on a real lab, LAN-first sharing against every device
fetching from the coordinator, and the idle cost of the mesh.

    python -m bench.rollout [--size BYTES]

Two labs, one after the other: 3 home-router LANs x 4 devices, 4 Mbit/s uplinks, the whole
fleet running (coordinator, agents with wireguard-go, gossip, LAN discovery). For each: the WAN
bytes each LAN's router received while a synthetic release of B incompressible bytes rolled out,
minus what the LAN receives idle over the same time (measured just before), as a multiple of B;
and, in the sharing lab before the rollout, the idle figure itself over a longer window
(`--idle-seconds`, default 600: several of every periodic exchange) as WAN bytes per device per
hour, with what one device's bytes are (bench/idle.py).
"""

from __future__ import annotations

import argparse
import sys
import time

from lab import Lab, parse_topology, teardown_all, wait_online
from lab.rollout import rollout

from .idle import measure_idle_breakdown

LANS = ("lana", "lanb", "lanc")


def one(peer_sharing: bool, size: int, idle_seconds: float) -> None:
    topo = parse_topology({"agents": {"peer_sharing": peer_sharing}, "lan": [
        {"name": n, "nat": "firewall", "devices": 4, "uplink": "4mbit"} for n in LANS]},
        source="bench/rollout.py")
    lab = Lab.up(topo, network_only=False)
    try:
        wait_online(lab, [d.name for d in lab.devices], 60)
        time.sleep(10)  # LAN discovery
        idle = None
        if idle_seconds > 0:
            time.sleep(30)  # past the start-up exchanges (first reports, targets, push-pulls)
            idle = measure_idle_breakdown(lab, lab.devices[0].name, idle_seconds)
        r = rollout(lab, version=1, size=size)
    finally:
        teardown_all()
    label = "LAN-first sharing" if peer_sharing else "peer_sharing = false"
    ratios = ", ".join(f"{lan} x{r.ratio(lan):.2f}" for lan in LANS)
    print(f"{label:22} release {r.release_bytes} B in {r.seconds:5.1f} s; WAN bytes per LAN / B:"
          f" {ratios}")
    if idle is not None:
        for line in idle.lines(lab.devices[0].name):
            print(f"{'':22} {line}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout")
    p.add_argument("--size", type=int, default=1_500_000)
    p.add_argument("--idle-seconds", type=float, default=600.0,
                   help="idle window of the sharing lab (0: skip)")
    args = p.parse_args(argv)
    if Lab.is_up():
        print("bench.rollout: a lab is up; run `fleetmesh-lab down` first", file=sys.stderr)
        return 2
    one(True, args.size, args.idle_seconds)
    one(False, args.size, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
