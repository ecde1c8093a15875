"""Blob exchange in mesh.sim: 3 LANs x 4 devices, each a whole MeshNode, want the same 200
blobs; LAN fast, WAN slow (per transfer, without link contention), transfer times jittered."""

from __future__ import annotations

import random

import pytest

from mesh.blobsched import COORDINATOR, SchedConfig
from mesh.sim import NetConfig, SimConfig, Simulator, sim_blob_ids

LANS, PER_LAN, N_BLOBS = 3, 4, 200
RATES = {"lan_rate": 10e6, "wan_rate": 100e3}  # 100:1, e.g. Wi-Fi vs a cellular uplink
NET = NetConfig(lan_latency=0.002, wan_latency=0.08, shared_wan=False, jitter=0.3, **RATES)
LIMIT = 10_000.0


def release(seed: int = 1) -> dict[bytes, int]:
    rng = random.Random(seed)
    return {b: rng.randint(200_000, 1_500_000) for b in sim_blob_ids(N_BLOBS, seed)}


def fleet(seed: int = 0, *, peer_sharing: bool = True, rogues: frozenset[int] = frozenset(),
          blobs: dict[bytes, int] | None = None) -> Simulator:
    sim = Simulator(SimConfig(n=LANS * PER_LAN, lan_size=PER_LAN, seed=seed, net=NET,
                              sched=SchedConfig(**RATES, peer_sharing=peer_sharing),
                              rogues=rogues, start_spread=1.0))
    sim.release(blobs if blobs is not None else release(seed), 0.0)
    sim.run(LIMIT, stop=sim.all_finished)
    return sim


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_lan_pulls_each_blob_across_the_wan_once(seed: int) -> None:
    sim = fleet(seed)
    r = sim.blob_stats
    assert sim.all_finished()
    for lan in range(LANS):
        assert r.wan_fetches[lan] <= 1.15 * N_BLOBS, r.wan_fetches
        assert r.wan_fetches[lan] >= N_BLOBS  # somebody had to bring every blob in
    assert sum(r.wan_fetches.values()) <= 1.02 * LANS * N_BLOBS, r.wan_fetches
    assert r.bad_deliveries == 0
    # the WAN work of a LAN is spread over its members (HRW), not done by one of them
    per_device: dict[int, int] = {}
    for _, d, source, _ in r.fetches:
        if source == COORDINATOR or sim.index[source] // PER_LAN != d // PER_LAN:
            per_device[d] = per_device.get(d, 0) + 1
    assert min(per_device.values()) >= N_BLOBS // PER_LAN // 2, per_device


def test_peer_sharing_off_baseline_pulls_everything_per_device() -> None:
    sim = fleet(peer_sharing=False, blobs=release())
    r = sim.blob_stats
    assert sim.all_finished()
    assert all(r.wan_fetches[lan] == PER_LAN * N_BLOBS for lan in range(LANS))
    assert r.coordinator_fetches == LANS * PER_LAN * N_BLOBS
    shared = fleet(blobs=release()).blob_stats
    assert sum(shared.wan_fetches.values()) * 3 < sum(r.wan_fetches.values())
    # and the fleet finishes sooner with sharing: the WAN was the bottleneck
    assert max(shared.finished_at.values()) < max(r.finished_at.values())


@pytest.mark.parametrize("rogue", [0, 7])  # lan0's first device, lan1's last
def test_rogue_device_serving_corrupt_data_does_not_stop_the_others(rogue: int) -> None:
    blobs = release()
    sim = fleet(rogues=frozenset({rogue}), blobs=blobs)
    r = sim.blob_stats
    honest = [n for n in sim.nodes if n.index != rogue]
    assert sim.all_finished()  # the rogue too: it takes good bytes from the others
    assert r.bad_deliveries > 0
    for n in honest:
        assert n.node is not None
        assert n.node.banned("fleet", "app") in ({sim.ids[rogue]}, frozenset())
        assert set(n.store.blobs) == set(blobs)
    # each device takes at most one bad blob per rogue before banning it... plus those already
    # in flight from it at that moment (its pipeline)
    assert r.bad_deliveries <= len(honest) * 4
    rogue_lan = rogue // PER_LAN
    for lan in range(LANS):
        # the rogue's LAN re-fetches what the rogue was responsible for; the others barely notice
        bound = 1.5 if lan == rogue_lan else 1.15
        assert r.wan_fetches[lan] <= bound * N_BLOBS, r.wan_fetches
