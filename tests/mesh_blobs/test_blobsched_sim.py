"""Mini simulation: 3 LANs x 4 devices want the same 200 blobs; LAN fast, WAN slow."""

from __future__ import annotations

import hashlib
import random

import pytest

from mesh.blobsched import COORDINATOR, SchedConfig
from tests.mesh_blobs.sim import FleetSim

LANS, PER_LAN, N_BLOBS = 3, 4, 200
RATES = {"lan_rate": 10e6, "wan_rate": 100e3}  # 100:1, e.g. Wi-Fi vs a cellular uplink


def release(seed: int = 1) -> dict[bytes, int]:
    rng = random.Random(seed)
    return {hashlib.sha256(b"chunk-%d" % i).digest(): rng.randint(200_000, 1_500_000)
            for i in range(N_BLOBS)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_lan_pulls_each_blob_across_the_wan_once(seed: int) -> None:
    sim = FleetSim(LANS, PER_LAN, release(seed), config=SchedConfig(**RATES), seed=seed)
    r = sim.run()
    assert r.complete(sim.devices)
    for lan in range(LANS):
        assert r.wan_fetches[lan] <= 1.15 * N_BLOBS, r.wan_fetches
        assert r.wan_fetches[lan] >= N_BLOBS  # somebody had to bring every blob in
    # observed: exactly 1x for these seeds; allow a few duplicates from timing
    assert sum(r.wan_fetches.values()) <= 1.02 * LANS * N_BLOBS, r.wan_fetches
    assert r.bad_deliveries == 0
    # the WAN work of a LAN is spread over its members (HRW), not done by one of them
    per_device: dict[str, int] = {}
    for _, d, f in r.fetch_log:
        if f.source == COORDINATOR or sim.lan_of[f.source] != sim.lan_of[d]:
            per_device[d] = per_device.get(d, 0) + 1
    assert min(per_device.values()) >= N_BLOBS // PER_LAN // 2, per_device


def test_peer_sharing_off_baseline_pulls_everything_per_device() -> None:
    sim = FleetSim(LANS, PER_LAN, release(), config=SchedConfig(**RATES, peer_sharing=False))
    r = sim.run()
    assert r.complete(sim.devices)
    assert all(r.wan_fetches[lan] == PER_LAN * N_BLOBS for lan in range(LANS))
    assert r.coordinator_fetches == LANS * PER_LAN * N_BLOBS
    shared = FleetSim(LANS, PER_LAN, release(), config=SchedConfig(**RATES)).run()
    assert sum(shared.wan_fetches.values()) * 3 < sum(r.wan_fetches.values())
    # and the fleet finishes sooner with sharing: the WAN was the bottleneck
    assert max(shared.finished_at.values()) < max(r.finished_at.values())


@pytest.mark.parametrize("rogue", ["lan0-dev0", "lan1-dev3"])
def test_rogue_device_serving_corrupt_data_does_not_stop_the_others(rogue: str) -> None:
    sim = FleetSim(LANS, PER_LAN, release(), config=SchedConfig(**RATES), rogues=[rogue])
    r = sim.run()
    assert r.complete(sim.devices)
    assert r.bad_deliveries > 0
    honest = [d for d in sim.devices if d != rogue]
    for d in honest:
        assert sim.nodes[d].banned == {rogue} or sim.nodes[d].banned == frozenset()
        assert sim.held[d] == set(release())
    # each device takes at most one bad blob per rogue before banning it... plus those already
    # in flight from it at that moment (its pipeline)
    assert r.bad_deliveries <= len(honest) * 4
    rogue_lan = sim.lan_of[rogue]
    for lan in range(LANS):
        # the rogue's LAN re-fetches what the rogue was responsible for; the others barely notice
        bound = 1.5 if lan == rogue_lan else 1.15
        assert r.wan_fetches[lan] <= bound * N_BLOBS, r.wan_fetches
