"""Release-key rotation at runtime, through the whole agent (real mesh node, real applier on a
fake engine, fake coordinator link): the device trusts root v1 (old release key); a thief
with the old key gets v1000 installed; root v2, signed by 2 of the 3 root keys, names a new
key. With its next targets poll the agent verifies v2, persists it and the new key, forgets the
rollback floor, restarts its release subsystem with the new key, and installs v4 signed by the
new key although it ran v1000. A root that does not verify is logged once, counted, ignored.
docs/security.md, "Release key rotation"."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from agent import Agent, ApplySettings, GossipSettings
from mesh.control import PeerMap
from mesh.release import SignedRoot, decode_root_body
from tests.agent.fakes import HUB, FakeClient, FakeWireGuard
from tests.gossip.helpers import free_port, wait_for
from tests.rootkit import ROOT_KEYS, root

from ._fake import FakeEngine, Releases
from .test_agent_apply import QUICK, AppClient, AppCoordinator, RealClock, device

A, B, C = ROOT_KEYS


class RootCoordinator(AppCoordinator):
    def __init__(self) -> None:
        super().__init__()
        self.roots: list[SignedRoot] = []
        self.root_asks: list[int] = []

    def factory(self, url: str, credential: str, cert_der: bytes) -> FakeClient:
        client = RootClient(self, url, credential, cert_der)
        self.clients.append(client)
        return client


class RootClient(AppClient):
    coord: RootCoordinator

    async def roots(self, fleet: str, since: int) -> list[SignedRoot]:
        await self._gate()
        self.coord.root_asks.append(since)
        return [r for r in self.coord.roots if decode_root_body(r.body).version > since]


def target(version: int) -> list[dict[str, object]]:
    return [{"app": "web", "version": version, "pin": None, "force": False, "retry": 0}]


async def test_a_rotated_release_key_recovers_the_device_from_a_stolen_one(
        tmp_path: Path) -> None:
    old = Releases(tmp_path / "dev", app="web")  # the key the thief holds
    new = Releases(tmp_path / "dev", app="web")  # the same blob store, the new key
    data = device(tmp_path, old.key_hex)
    data.write_root(root("cams", 1, old.key, A, B))
    coord = RootCoordinator()
    coord.manifests[("cams", "web", 1000)] = old.make(1000, QUICK)  # the thief's release
    coord.manifests[("cams", "web", 1001)] = old.make(1001, QUICK)
    coord.manifests[("cams", "web", 4)] = new.make(4, QUICK)
    coord.targets = target(1000)
    engine = FakeEngine(RealClock())
    logs: list[str] = []
    agent = Agent(data, FakeWireGuard().factory(), coord.factory, log=logs.append,
                  gossip=GossipSettings(port=free_port(),
                                        apply=ApplySettings(engine_factory=lambda: engine)))
    high_water = data.path / "apply" / "web" / "high_water.json"

    def running(version: int) -> bool:
        web = coord.apps().get("web")
        return web is not None and web.state == "running" and web.running == version

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await wait_for(lambda: running(1000), 0.05)  # the compromise
            await wait_for(high_water.exists, 0.05)
            assert json.loads(high_water.read_text())["version"] == 1000

            # A root v2 with one signature, then one the coordinator signed itself: refused,
            # logged once each, counted; the device keeps its key.
            coord.roots = [root("cams", 2, new.key, B)]
            coord.publish(PeerMap(2, HUB, targets=1))
            await wait_for(lambda: agent.roots.refused >= 1, 0.05)
            coord.roots = [root("cams", 2, new.key, new.key, keys=[new.key], threshold=1)]
            coord.publish(PeerMap(3, HUB, targets=2))
            await wait_for(lambda: agent.roots.refused >= 2, 0.05)
            assert agent.enrollment.release_key == old.key_hex
            assert sum("root metadata refused" in m for m in logs) == 2

            # Root v2 signed by B and C names the new key; the target is v4 of the new key.
            coord.roots = [root("cams", 2, new.key, B, C)]
            coord.targets = target(4)
            coord.publish(PeerMap(4, HUB, targets=3))
            await wait_for(lambda: running(4), 0.05)
            assert [c.version for c in engine.running("home-0", "web")] == [4]
            assert agent.enrollment.release_key == new.key_hex
            assert data.read_identity().enrollment.release_key == new.key_hex
            assert data.read_root() == coord.roots[0]
            assert json.loads(high_water.read_text())["version"] == 4
            assert sum("release key rotated" in m for m in logs) == 1
            assert coord.root_asks[-1] == 2  # it now asks from its new root

            # Anything newer the thief signs with the old key is refused now: the restarted
            # mesh node does not take its manifest, the target never reaches the applier.
            asks = len(coord.root_asks)
            coord.targets = target(1001)
            coord.publish(PeerMap(5, HUB, targets=4))
            await wait_for(lambda: len(coord.root_asks) > asks, 0.05)
            node = agent.gossip
            assert node is not None
            assert not node.offer_manifest(coord.manifests[("cams", "web", 1001)])
            newest = node.newest("cams", "web")
            assert newest is not None and newest.manifest.version == 4
            assert running(4)
            assert [c.version for c in engine.running("home-0", "web")] == [4]
            nursery.cancel_scope.cancel()

