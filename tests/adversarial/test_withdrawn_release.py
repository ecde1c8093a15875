"""A withdrawn newer release cannot block the one the device is targeted at.

Attack: the operator published v8, then withdrew it (deleted it, targeted the fleet back at
v7); a peer that still holds v8's signed manifest keeps gossiping it. The mesh node kept and
fetched only the newest signed manifest per app, so a device targeted at v7 that had not got
it yet never fetched v7's blobs while its applier waited for them forever.
Expected: the node fetches what the device's target needs (v7), whatever newer manifest is
circulating; v8 stays known (a later target of v8 is fetched at once) but is not fetched.
Real agent (ReleaseSync, the trio driver, the node) over loopback, the coordinator faked.
"""

from __future__ import annotations

from pathlib import Path

import trio

from agent import Agent, GossipSettings
from mesh.control import PeerMap
from tests.agent.fakes import HUB, FakeWireGuard, peermap
from tests.gossip.helpers import KEY, free_port, make_blobs, make_manifest, wait_for
from tests.gossip.test_agent_gossip import ReleaseCoordinator, device


async def test_a_withdrawn_newer_manifest_does_not_block_the_target(tmp_path: Path) -> None:
    v7_blobs, v8_blobs = make_blobs(3, seed=7, large=0), make_blobs(3, seed=8, large=0)
    v7, v8 = make_manifest(v7_blobs, version=7), make_manifest(v8_blobs, version=8)
    coord = ReleaseCoordinator([*v7_blobs, *v8_blobs], v7)
    coord.manifests = {("cams", "cam", 7): v7, ("cams", "cam", 8): v8}
    coord.targets = []
    coord.peermap = peermap(1)
    logs: list[str] = []
    agent = Agent(device(tmp_path, 0, bytes(KEY.verify_key).hex()), FakeWireGuard().factory(),
                  coord.factory, log=logs.append, gossip=GossipSettings(port=free_port()))
    v7_ids = {b.ref.id.hex() for b in v7_blobs}
    v8_ids = {b.ref.id.hex() for b in v8_blobs}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await wait_for(lambda: agent.gossip is not None and coord.target_reads >= 1, 0.05)
            gossip = agent.gossip
            assert gossip is not None
            # v8's manifest arrives over the mesh, as a peer that still holds it gossips it
            assert gossip.offer_manifest(v8)
            # the operator's target is v7
            coord.targets = [{"app": "cam", "version": 7, "pin": None}]
            coord.publish(PeerMap(2, HUB, (), (), targets=1))
            await wait_for(lambda: gossip.complete("cams", "cam")
                           and gossip.releases()[("cams", "cam")].version == 7, 0.05)
            assert v7_ids <= set(coord.blobs_served)
            assert not v8_ids & set(coord.blobs_served), "a withdrawn release was fetched"
            # the target moves on to v8: fetched at once, from the manifest already held
            coord.targets = [{"app": "cam", "version": 8, "pin": None}]
            coord.publish(PeerMap(3, HUB, (), (), targets=2))
            await wait_for(lambda: gossip.complete("cams", "cam")
                           and gossip.releases()[("cams", "cam")].version == 8, 0.05)
            assert v8_ids <= set(coord.blobs_served)
            nursery.cancel_scope.cancel()
