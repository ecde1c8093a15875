"""`Agent(gossip=GossipSettings(...))`: the mesh node runs beside the agent's loops, manifests
come from the coordinator's targets, LAN neighbours from (fake) LAN discovery."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio

from agent import Agent, CoordinatorLink, DataDir, GossipSettings, Identity
from agent._lan import Neighbour, fingerprint
from agent._link import UNREACHABLE_AFTER
from agent._release_sync import ReleaseSync
from mesh.control import Enrollment, PeerEntry, PeerMap, PeerMisbehaviour
from tests.agent.fakes import HUB, KEYS, FakeClient, FakeCoordinator, FakeWireGuard, peermap

from .helpers import KEY, Blob, free_port, make_blobs, make_manifest, wait_for

URL = "https://198.51.100.1:8443"


class ReleaseCoordinator(FakeCoordinator):
    def __init__(self, blobs: list[Blob], manifest: bytes) -> None:
        super().__init__()
        self.targets = [{"app": "cam", "version": 1, "pin": None}]
        self.manifests = {("cams", "cam", 1): manifest}
        self.blobs = {b.ref.id.hex(): b.frame for b in blobs}
        self.blob_bytes: Counter[str] = Counter()
        self.blobs_served: Counter[str] = Counter()  # blob id (hex) -> range requests answered
        self.target_reads = 0

    def factory(self, url: str, credential: str, cert_der: bytes) -> FakeClient:
        client = ReleaseClient(self, url, credential, cert_der)
        self.clients.append(client)
        return client


class ReleaseClient(FakeClient):
    coord: ReleaseCoordinator

    async def targets(self) -> list[dict[str, Any]]:
        await self._gate()
        self.coord.target_reads += 1
        return self.coord.targets

    async def manifest(self, fleet: str, app: str, version: int) -> bytes:
        await self._gate()
        return self.coord.manifests[(fleet, app, version)]

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        await self._gate()
        data = self.coord.blobs[blob_id][start:end]
        self.coord.blob_bytes[self.credential] += len(data)
        self.coord.blobs_served[blob_id] += 1
        return data


def device(tmp: Path, i: int, release_key: str | None) -> DataDir:
    data = DataDir(tmp / f"d{i}")
    data.write_key(KEYS[i].private)
    e = Enrollment(f"dev-{i}", f"home-{i}", "cams", f"cred-{i}", f"127.0.0.{40 + i}",
                   f"fd7a:f1ee::{40 + i:x}", "10.250.0.0/16", "fd7a:f1ee::/64", HUB, release_key)
    data.write_identity(Identity(URL, e, b"\x30\x82fake-der", 51820, None))
    return data


def entry(i: int) -> PeerEntry:
    return PeerEntry(f"home-{i}", KEYS[i].public, f"127.0.0.{40 + i}", f"fd7a:f1ee::{40 + i:x}")


async def test_agents_fetch_the_targeted_release_over_the_mesh(tmp_path: Path) -> None:
    blobs = make_blobs(12, large=1)
    total = sum(b.ref.stored_size for b in blobs)
    key = bytes(KEY.verify_key).hex()
    port = free_port()
    logs: dict[int, list[str]] = {0: [], 1: [], 2: []}

    async def fake_lan(name: str, fleet: str, public_key: str, underlay: str, port_: int,
                       on_change: Any) -> None:
        # device 2 wants nothing: as an HRW owner it would only make the others wait (the
        # "owner may not want the blob" gap, docs/blob-exchange.md), so 0 and 1 do not see it
        seen = range(3) if name == "home-2" else range(2)
        # as discovery reports them: with the fingerprint of the key the peer map has (the
        # agent takes no neighbour without it, docs/security.md)
        on_change([Neighbour(f"home-{i}", IPv4Address(f"10.201.1.{20 + i}"), 51820,
                             fingerprint(KEYS[i].public), 0.0) for i in seen])
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            agents = []
            for i in range(3):
                # device 2 has no pinned release key: it must not accept any manifest
                data = device(tmp_path, i, key if i < 2 else None)
                coord = ReleaseCoordinator(blobs, make_manifest(blobs))
                coord.peermap = peermap(1, *[entry(j) for j in range(3) if j != i])
                agent = Agent(data, FakeWireGuard().factory(), coord.factory,
                              log=logs[i].append,
                              gossip=GossipSettings(port=port, underlay="lan0",
                                                    targets_interval=0.3,
                                                    lan_discovery=fake_lan))
                await nursery.start(agent.run)
                agents.append((agent, coord))
            await wait_for(lambda: all(a.gossip is not None and a.gossip.complete("cams", "cam")
                                       for a, _ in agents[:2]), 0.05)
            fetched = sum(c.blob_bytes[f"cred-{i}"] for i, (_, c) in enumerate(agents))
            assert total <= fetched <= 1.15 * total  # the LAN pulled each byte about once
            a2 = agents[2][0]
            assert a2.gossip is not None and a2.gossip.releases() == {}
            assert a2.gossip.lan == {"home-0", "home-1"}
            await wait_for(lambda: any("no release key" in m for m in logs[2]))
            await trio.sleep(0.5)  # more targets polls and rumors: still logged only once
            assert sum("no release key" in m for m in logs[2]) == 1
            await wait_for(lambda: any("blobs 12/12" in m for m in logs[0] + logs[1]))
            # an honest rollout accuses nobody in the reports, not even on device 2, which
            # refused every manifest for want of a key
            assert [a.report().misbehaving_peers for a, _ in agents] == [(), (), ()]
            # what the node counts goes up in the agent's next report
            a0 = agents[0][0]
            assert a0.gossip is not None
            a0.gossip.core.misbehaved("home-1", "bad_frame")
            assert a0.report().misbehaving_peers == (
                PeerMisbehaviour("home-1", {"bad_frame": 1}),)
            nursery.cancel_scope.cancel()


async def test_a_new_targets_revision_in_the_peer_map_is_read_at_once(tmp_path: Path) -> None:
    """With the default slow targets poll (TARGETS_INTERVAL, minutes), a target change reaches
    the agent through its peer-map long poll: it reads the targets at start and on change only."""
    blobs = make_blobs(2)
    logs: list[str] = []
    data = device(tmp_path, 0, bytes(KEY.verify_key).hex())
    coord = ReleaseCoordinator(blobs, make_manifest(blobs))
    coord.targets = []
    coord.peermap = peermap(1)
    agent = Agent(data, FakeWireGuard().factory(), coord.factory, log=logs.append,
                  gossip=GossipSettings(port=free_port()))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await wait_for(lambda: coord.target_reads >= 1, 0.05)  # the read at start
            await trio.sleep(2)
            start_reads = coord.target_reads
            await trio.sleep(3)
            assert coord.target_reads == start_reads <= 2  # no polling
            coord.targets = [{"app": "cam", "version": 1, "pin": None}]
            coord.publish(PeerMap(2, HUB, (), (), targets=1))
            await wait_for(lambda: any("release cams/cam v1 from the coordinator" in m
                                       for m in logs), 0.05)
            assert coord.target_reads == start_reads + 1
            coord.publish(PeerMap(3, HUB, (), (), targets=1))  # same revision: no read
            await trio.sleep(2)
            assert coord.target_reads == start_reads + 1
            nursery.cancel_scope.cancel()


class DownClient(FakeClient):
    async def targets(self) -> list[dict[str, Any]]:
        raise OSError("connection refused")


async def test_an_unreachable_coordinator_reaches_the_mesh_node(tmp_path: Path) -> None:
    """The agent's control calls going unanswered tell the node (the outage rule: peers on
    other LANs help, docs/blob-exchange.md), and an answer tells it the outage is over."""
    data = device(tmp_path, 0, None)
    identity = data.read_identity()
    coord = FakeCoordinator()
    down = True

    def factory(url: str, credential: str, cert: bytes) -> FakeClient:
        return (DownClient if down else FakeClient)(coord, url, credential, cert)

    link = CoordinatorLink(identity, factory, hub_up=lambda: False, log=lambda _m: None)
    sync = ReleaseSync(data.path, identity.enrollment, KEYS[0].public, 51820, link,
                       GossipSettings(), peers=dict, log=lambda _m: None,
                       rng=random.Random(1))
    heard: list[bool] = []
    sync.node = SimpleNamespace(coordinator_reachable=heard.append)  # type: ignore[assignment]
    for _ in range(UNREACHABLE_AFTER):
        with contextlib.suppress(OSError):
            await link.targets()
    assert heard == [False]
    down = False
    link._clients.clear()  # a fresh connection finds the coordinator back
    await link.peermap(0, 0)
    assert heard == [False, True]
