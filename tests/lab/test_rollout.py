"""Release rollout over the gossip mesh on real parts: 3 home-router LANs x 4 devices behind
4 Mbit/s uplinks. Each LAN pulls the release's bytes across its WAN link about once (LAN-first
sharing), against about once per device without sharing; a device whose agent was stopped during
the rollout catches up from its LAN neighbours without adding WAN bytes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lab import Lab, blobs_held, parse_topology, start_agent, stop_agent, wait_online
from lab.rollout import rollout

from .conftest import lab_skip_reason, lab_up, log_tail

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

RELEASE_BYTES = 1_500_000  # incompressible: ~3 s across one 4 Mbit/s uplink
LANS = ("lana", "lanb", "lanc")


def topology(peer_sharing: bool):  # noqa: ANN201 - a Topology
    return parse_topology({
        "agents": {"peer_sharing": peer_sharing},
        "lan": [{"name": n, "nat": "firewall", "devices": 4, "uplink": "4mbit"} for n in LANS],
    }, source="tests/lab/test_rollout.py")


def settle(lab: Lab) -> None:
    """Agents online and LAN discovery done (mDNS answers within seconds)."""
    wait_online(lab, [d.name for d in lab.devices], 60)
    time.sleep(10)


@pytest.fixture(scope="module")
def shared() -> Iterator[Lab]:
    with lab_up(topology(True), network_only=False) as lab:
        settle(lab)
        yield lab


def test_each_lan_pulls_the_release_across_its_wan_about_once(shared: Lab) -> None:
    r = rollout(shared, version=1, size=RELEASE_BYTES)
    for lan in LANS:
        print(f"{lan}: {r.rollout_rx[lan]} WAN bytes for a {r.release_bytes}-byte release "
              f"(x{r.ratio(lan):.2f}) in {r.seconds:.1f} s")
        assert r.ratio(lan) <= 1.15, lan


def test_a_device_stopped_during_the_rollout_catches_up_on_the_lan(shared: Lab) -> None:
    late = "lana-4"
    assert stop_agent(shared, late) == 1
    others = [d.name for d in shared.devices if d.name != late]
    r = rollout(shared, version=2, size=RELEASE_BYTES, seed=2, devices=others)
    assert not set(r.blobs) <= blobs_held(late)
    router = shared.router("lana")
    rx0, t0 = shared.wan_counters(router)[0], time.monotonic()
    start_agent(shared, late)
    deadline = time.monotonic() + 120
    while not set(r.blobs) <= blobs_held(late):
        assert time.monotonic() < deadline, \
            f"the returning device did not catch up; its log:\n{log_tail(late)}"
        time.sleep(0.25)
    took = time.monotonic() - t0
    extra = shared.wan_counters(router)[0] - rx0 - r.idle_rx_per_s["lana"] * took
    print(f"returning device caught up in {took:.1f} s; its LAN's extra WAN bytes: "
          f"{extra:.0f} (release {r.release_bytes} bytes)")
    # rejoining costs a few handshakes and peer-map/gossip messages, never the release again
    assert extra < 0.10 * r.release_bytes, f"{late}'s log:\n{log_tail(late)}"
