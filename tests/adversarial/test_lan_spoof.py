"""Attack: a host on the device's LAN (no fleet member, or one that is) makes a *remote* peer
count as a LAN neighbour. mDNS is unauthenticated: it advertises `home-2._fleetmesh._udp` with
the fleet's name, a fingerprint of its choosing and an address on our subnet. LAN discovery
checked the record's shape and the address, but never the `fp` against the key the peer map
gives for that name, so the node took home-2, a peer across the WAN, for a LAN neighbour:
preferred it as a source and counted what came from it as LAN bytes.

Expected: a neighbour counts only if the peer map has its name, the key fingerprint it
advertises is that of the peer map's key for the name, and its advertised address is on our
LAN subnet; the join is made again whenever the peer map changes (a key that changes, or a
peer map that arrives after the adverts). Tested on the records a hostile host sends, through
the real parser (`parse_advert`), and through whole agents: adverts -> the agent's join with
its peer map -> release sync -> the gossip node's `lan`.
"""

from __future__ import annotations

import base64
import hashlib
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest
import trio

from agent import Agent, GossipSettings
from agent._lan import SERVICE_TYPE, InvalidAdvert, Neighbour, lan_peers, parse_advert
from mesh.control import PeerEntry
from tests.agent.fakes import KEYS, FakeWireGuard, peermap
from tests.gossip.helpers import free_port, make_blobs, make_manifest, wait_for
from tests.gossip.test_agent_gossip import ReleaseCoordinator, device, entry

UNDERLAY = IPv4Interface("10.201.1.11/24")
ATTACKER_KEY = bytes(range(32))


def fp_of(key_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(key_b64)).hexdigest()[:16]


def record(name: str, fp: str, address: str, *, fleet: bytes = b"cams") -> Neighbour:
    """What zeroconf hands over for one advert, through the real parser."""
    txt = {b"id": name.encode(), b"fp": fp.encode(), b"fleet": fleet, b"v": b"1"}
    return parse_advert(f"{name}.{SERVICE_TYPE}", 51820, [address], txt, 60, fleet="cams",
                        underlay=UNDERLAY, now=1.0)


GENUINE_1 = ("home-1", fp_of(KEYS[1].public), "10.201.1.12")
# home-2 sits behind another LAN; the attacker advertises its name with its own key's print
SPOOFED_2 = ("home-2", hashlib.sha256(ATTACKER_KEY).hexdigest()[:16], "10.201.1.66")
# a name the peer map does not have
STRANGER = ("home-9", fp_of(KEYS[9].public), "10.201.1.67")


def test_only_peer_map_members_with_their_own_key_fingerprint_count() -> None:
    keys = {f"home-{i}": KEYS[i].public for i in (1, 2)}
    adverts = [record(*GENUINE_1), record(*SPOOFED_2), record(*STRANGER)]
    assert {n.name for n in lan_peers(adverts, keys)} == {"home-1"}
    # the right fingerprint (a fleet member knows every public key) from off our subnet:
    # refused by the parser
    with pytest.raises(InvalidAdvert) as exc:
        record("home-2", fp_of(KEYS[2].public), "203.0.113.5")
    assert exc.value.reason == "address"
    # a key that changed in the peer map: the old print no longer counts
    assert lan_peers(adverts, {"home-1": KEYS[5].public}) == frozenset()
    # a malformed key in a peer map (validated elsewhere) counts nobody and raises nothing
    assert lan_peers(adverts, {"home-1": "not base64!"}) == frozenset()


async def test_agents_take_no_spoofed_lan_neighbour(tmp_path: Path) -> None:
    """Three agents gossip on loopback. home-0's LAN shows the genuine home-1 and the
    spoofed home-2 (a live peer, but across the WAN): only home-1 is home-0's LAN neighbour.
    When the peer map gives home-1 another key, home-1 stops counting too."""
    blobs = make_blobs(2)
    port = free_port()
    seen = {"home-0": [GENUINE_1, SPOOFED_2, STRANGER], "home-1": [], "home-2": []}
    log0: list[str] = []

    async def hostile_lan(name: str, fleet: str, public_key: str, underlay: str, port_: int,
                          on_change: Any) -> None:
        on_change(frozenset(record(*r) for r in seen[name]))
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agents, coords = [], []
            for i in range(3):
                coord = ReleaseCoordinator(blobs, make_manifest(blobs))
                coord.targets = []
                coord.peermap = peermap(1, *[entry(j) for j in range(3) if j != i])
                agent = Agent(device(tmp_path, i, None), FakeWireGuard().factory(),
                              coord.factory, log=log0.append if i == 0 else lambda m: None,
                              gossip=GossipSettings(port=port, underlay="lan0",
                                                    lan_discovery=hostile_lan))
                await nursery.start(agent.run)
                agents.append(agent)
                coords.append(coord)
            a0 = agents[0]

            def live() -> set[str]:
                g = a0.gossip
                return set() if g is None else set(g.core.membership.live_members())

            await wait_for(lambda: {"home-1", "home-2"} <= live(), 0.05)
            await wait_for(lambda: a0.gossip is not None and "home-1" in a0.gossip.lan, 0.05)
            await trio.sleep(1.0)  # more rounds: still only home-1
            assert a0.gossip is not None and a0.gossip.lan == {"home-1"}
            spoof = [m for m in log0 if m.startswith("LAN: home-2 advertised from 10.201.1.66")]
            assert len(spoof) == 1 and "not the peer map's" in spoof[0]  # logged once
            rekeyed = PeerEntry("home-1", KEYS[5].public, "127.0.0.41", "fd7a:f1ee::29")
            coords[0].publish(peermap(2, rekeyed, entry(2)))
            await wait_for(lambda: a0.gossip is not None and a0.gossip.lan == frozenset(), 0.05)
            nursery.cancel_scope.cancel()
