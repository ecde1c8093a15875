"""WAN bytes of a release rollout on a lab fleet, per LAN, read from the routers' WAN interface
counters: the bytes each LAN's router received during the rollout beyond what the LAN receives
when idle over the same time (keepalives, gossip, peer maps), measured just before.

Used by the rollout lab test and by `scripts/bench rollout`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from ._host import LabError
from .fleet import blobs_held, publish_synthetic
from .network import LabNetwork, Router

IDLE_SECONDS: Final = 20.0
ROLLOUT_TIMEOUT: Final = 300.0


@dataclass(frozen=True, slots=True)
class Rollout:
    release_bytes: int  # B: the blob bytes every device needs
    blobs: tuple[str, ...]  # the release's blob ids (hex)
    seconds: float
    idle_rx_per_s: dict[str, float]  # LAN -> WAN bytes/s received with no release in flight
    rollout_rx: dict[str, int]  # LAN -> WAN bytes received during the rollout, idle removed
    devices: int

    def ratio(self, lan: str) -> float:
        return self.rollout_rx[lan] / self.release_bytes


def outer_routers(lab: LabNetwork) -> dict[str, Router]:
    """Each LAN's router on the lab's WAN (the carrier NAT for nat=double)."""
    out: dict[str, Router] = {}
    for r in lab.routers:
        if r.lan and ((r.tier == "carrier") or r.lan not in out):
            out[r.lan] = r
    return out


def rx_by_lan(lab: LabNetwork, routers: dict[str, Router]) -> dict[str, int]:
    return {lan: lab.wan_counters(r)[0] for lan, r in routers.items()}


def measure_idle(lab: LabNetwork, seconds: float = IDLE_SECONDS) -> dict[str, float]:
    routers = outer_routers(lab)
    before, t0 = rx_by_lan(lab, routers), time.monotonic()
    time.sleep(seconds)
    after, t1 = rx_by_lan(lab, routers), time.monotonic()
    return {lan: (after[lan] - before[lan]) / (t1 - t0) for lan in routers}


def rollout(lab: LabNetwork, version: int, size: int, seed: int = 1,
            idle_seconds: float = IDLE_SECONDS, timeout: float = ROLLOUT_TIMEOUT,
            devices: list[str] | None = None) -> Rollout:
    """Measure idle, publish a synthetic release, wait until every device (or `devices`) holds
    all its blobs, and account the WAN bytes per LAN."""
    names = devices if devices is not None else [d.name for d in lab.devices]
    routers = outer_routers(lab)
    idle = measure_idle(lab, idle_seconds)
    before, t0 = rx_by_lan(lab, routers), time.monotonic()
    release = publish_synthetic(lab, version, size, seed)
    wanted = set(release["blobs"])
    deadline = t0 + timeout
    while True:
        missing = [n for n in names if not wanted <= blobs_held(n)]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise LabError(f"rollout of v{version} incomplete after {timeout:.0f} s on: "
                           f"{', '.join(missing)}")
        time.sleep(0.25)
    after, t1 = rx_by_lan(lab, routers), time.monotonic()
    took = t1 - t0
    per_lan = {lan: max(0, round(after[lan] - before[lan] - idle[lan] * took)) for lan in routers}
    return Rollout(int(release["blob_bytes"]), tuple(release["blobs"]), took, idle, per_lan,
                   len(names))
