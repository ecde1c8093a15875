"""A hostile device for tests/lab/test_hostile_device.py: the real agent (so it keeps its
WireGuard identity, its credentials and the peer map: what an attacker who owns the device has),
with its gossip driver turned against its peers. Besides following the protocol it

- claims every blob of every release it learns of, as soon as it learns of it, to every peer
  (so its LAN neighbours ask it first), and serves random bytes for any range asked;
- accuses every peer of being dead at the largest incarnation the codec carries, and vouches
  for members that are not in the peer map (ghosts);
- replays the oldest manifest it has seen once a newer one exists, and a forged copy of the
  newest (one byte of its signature flipped);
- sends an undecodable frame on a connection of its own every GARBAGE_EVERY rounds.

It logs one line per kind of attack when it first makes it ("hostile: ..."), which the test
reads to know the attacks happened. Run as `python hostile_agent.py run --data ...`, the agent's
own arguments. Every loop is bounded (ATTACK_ROUNDS) and sends only to peer-map members over
the mesh, i.e. inside the lab.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final

import trio

import agent._release_sync as release_sync
from agent._gossip import GossipNode
from agent.cli import main
from mesh.wire import (
    MAX_UINT,
    BlobData,
    Gossip,
    Have,
    MemberState,
    ReleaseKey,
    Rumor,
    Status,
)

ATTACK_INTERVAL: Final = 1.0  # s between two rounds
ATTACK_ROUNDS: Final = 900  # at most 15 min of attacks, then it only follows the protocol
GHOSTS: Final = ("ghost-a", "ghost-b")
GARBAGE: Final = b"\xff" * 64  # not a frame: the length prefix alone exceeds every limit
GARBAGE_EVERY: Final = 10  # rounds


class HostileNode(GossipNode):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen: dict[tuple[str, str], dict[int, bytes]] = {}
        self._said: set[str] = set()
        self._claimed: dict[tuple[str, str], int] = {}

    def _say(self, what: str) -> None:
        if what not in self._said:
            self._said.add(what)
            self.log(f"hostile: {what}")

    async def _serve(self, p: Any, a: Any) -> None:
        """Random bytes for any range, held or not."""
        data = os.urandom(a.length)
        self._send(p.name, BlobData(a.req_id, a.blob_id, a.offset, data,
                                    a.offset + len(data) >= a.size))
        self.core.served(p.name)
        self._say(f"served {a.length} random bytes of blob {a.blob_id.hex()[:16]} to {p.name}")

    def _run_actions(self) -> None:
        super()._run_actions()
        # A release's blobs are claimed the moment its manifest is here, before an honest
        # neighbour can hold them: its neighbours then ask us first.
        for fleet, app in self.rumor.versions():
            r = self.rumor.release(fleet, app)
            if r is not None and self._claimed.get((fleet, app)) != r.manifest.version:
                self._claimed[(fleet, app)] = r.manifest.version
                self._claim(r)

    def _claim(self, r: Any) -> None:
        m = r.manifest
        ids = tuple(c.id for layer in m.layers for c in layer.chunks)
        for dest in sorted(self.core.peers):
            self._send(dest, Have(ReleaseKey(m.fleet, m.app, m.version), ids[:256]))

    async def run(self, *, task_status: trio.TaskStatus[GossipNode] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(super().run)
            nursery.start_soon(self._attack)
            task_status.started(self)

    async def _attack(self) -> None:
        for n in range(ATTACK_ROUNDS):
            self._attack_round()
            if n % GARBAGE_EVERY == 0:
                for dest, address in sorted(self.core.peers.items()):
                    await self._garbage(dest, address)
                self._say("sent undecodable frames")
            await trio.sleep(ATTACK_INTERVAL)

    async def _garbage(self, dest: str, address: str) -> None:
        """An undecodable frame on a connection of its own: the peer closes that one only, and
        what we send on our regular connection (lies, random blob bytes) still arrives."""
        with trio.move_on_after(5):
            try:
                stream = await self.network.connect(address, self.port, self.mesh_ip)
                async with stream:
                    await stream.send_all(GARBAGE)
                    while await stream.receive_some(4096):
                        pass
            except (OSError, trio.BrokenResourceError):
                pass

    def _attack_round(self) -> None:
        peers = sorted(self.core.peers)
        if not peers:
            return
        # Manifests seen (the rumor core keeps only the newest of each app).
        for fleet, app in self.rumor.versions():
            r = self.rumor.release(fleet, app)
            if r is not None:
                self._seen.setdefault((fleet, app), {})[r.manifest.version] = r.encoded
        accusations = tuple(MemberState(p, MAX_UINT, Status.DEAD, self.core.peers[p])
                            for p in peers[:4])
        ghosts = tuple(MemberState(g, 0, Status.ALIVE, "10.250.255.250") for g in GHOSTS)
        for dest in peers:
            self._send(dest, Gossip(self.name, accusations))
            self._send(dest, Gossip(self.name, ghosts))
            for (fleet, app), versions in self._seen.items():
                newest = max(versions)
                r = self.rumor.release(fleet, app)
                if r is not None and r.manifest.version == newest:
                    forged = bytearray(versions[newest])
                    forged[-1] ^= 0x01
                    self._send(dest, Rumor((bytes(forged),)))
                if len(versions) > 1:
                    self._send(dest, Rumor((versions[min(versions)],)))
        for r in filter(None, (self.rumor.release(f, a) for f, a in self._seen)):
            self._claim(r)
        self._say(f"accused {len(accusations)} peers of death at incarnation 2^64-1 and "
                  f"vouched for ghosts {', '.join(GHOSTS)} to {len(peers)} peers")
        if any(len(v) > 1 for v in self._seen.values()):
            self._say("replayed an old manifest")
        if self._seen:
            self._say("claimed every blob of the newest release and sent a forged manifest")


release_sync.GossipNode = HostileNode  # type: ignore[attr-defined]

if __name__ == "__main__":
    sys.exit(main())
