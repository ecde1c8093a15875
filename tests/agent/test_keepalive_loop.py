"""The hub keepalive tuned to a NAT by the agent's own long polls (agent/_keepalive.py), on a
fake WireGuard whose hub entry sends keepalives and a fake coordinator behind a NAT that
forgets a silent binding after `lifetime` seconds: an answer sent later than that waits at the
NAT for our next packet (as a real one waits for the hub to roam to it)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from agent import Agent, DataDir, Intervals
from mesh.control import PeerMap

from .fakes import HUB, FakeClient, FakeCoordinator, FakeWireGuard, peer, peermap


class NatWireGuard(FakeWireGuard):
    """The hub entry sends a keepalive whenever its interval passed without anything sent."""

    def __init__(self) -> None:
        super().__init__(clock=trio.current_time)
        self.hub_sent_at = 0.0

    def send(self, public_key: str, nbytes: int) -> None:
        super().send(public_key, nbytes)
        if public_key == HUB.public_key:
            self.hub_sent_at = trio.current_time()

    def simulate(self) -> None:
        super().simulate()
        hub = self.peers.get(HUB.public_key)
        if hub is not None and hub.keepalive and \
                trio.current_time() - self.hub_sent_at >= hub.keepalive:
            self.send(HUB.public_key, 32)


@dataclass
class Nat:
    wg: NatWireGuard
    lifetime: float
    late: int = 0  # answers that waited for our next packet
    quiet_polls: int = 0


class NatClient(FakeClient):
    nat: Nat

    async def peermap(self, version: int, wait: float, hold: float = 0.0,
                      quiet: bool = False, held: PeerMap | None = None) -> PeerMap | None:
        tunnel = self.url == HUB.api_url  # the join URL's TCP crosses the NAT on its own
        if tunnel:
            self.nat.wg.send(HUB.public_key, 300)  # the request goes up the tunnel
        self.nat.quiet_polls += quiet  # a trial says so (the coordinator counts us online)
        answer = await super().peermap(version, wait, hold, quiet, held)
        if tunnel and trio.current_time() - self.nat.wg.hub_sent_at > self.nat.lifetime:
            self.nat.late += 1
            sent = self.nat.wg.hub_sent_at
            while self.nat.wg.hub_sent_at == sent:  # held until our next packet
                await trio.sleep(0.5)
        return answer


@asynccontextmanager
async def running(data: DataDir, lifetime: float) -> AsyncIterator[tuple[Agent, Nat, list[str],
                                                                         FakeCoordinator]]:
    wg = NatWireGuard()
    wg.reachable.add(HUB.endpoint)
    nat = Nat(wg, lifetime)
    coord = FakeCoordinator(peermap(1, peer(1)))

    def factory(url: str, credential: str, cert_der: bytes) -> FakeClient:
        client = NatClient(coord, url, credential, cert_der)
        client.nat = nat
        coord.clients.append(client)
        return client

    logs: list[str] = []
    agent = Agent(data, wg.factory(), factory, lan_endpoints=(), agent_version="9.9",
                  clock=trio.current_time, rng=random.Random(7), log=logs.append,
                  intervals=Intervals(lazy_after=0, tune_keepalive=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        yield agent, nat, logs, coord
        nursery.cancel_scope.cancel()


async def test_the_keepalive_climbs_under_a_2_minute_nat_and_falls_back_when_it_shrinks(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(48 * 3600):
        async with running(enrolled, lifetime=120.0) as (agent, nat, logs, coord):
            await trio.sleep(3600)
            tuner = agent.wg.tuner
            assert tuner is not None
            k = tuner.keepalive
            assert 60 <= k < 120, logs  # under the NAT's lifetime, well above 25 s
            assert tuner.failed is not None and tuner.proven < 120 <= tuner.failed + 15
            assert nat.wg.peers[HUB.public_key].keepalive == k
            assert nat.quiet_polls >= 4  # 50, 100 through, 200 not, then between
            assert any(f"hub keepalive {k} s: the NAT kept our binding" in x for x in logs)
            # the report tells the coordinator (and `devices show`)
            await trio.sleep(120)
            link = coord.reports[-1][1].link
            assert link is not None and link.hub_keepalive == k
            assert link.binding_survived == round(tuner.proven, 1)
            # in steady state the answers come in time: nothing is held at the NAT
            late = nat.late
            await trio.sleep(4 * 3600)
            assert nat.late == late and tuner.keepalive == k

            # the NAT now forgets after 30 s: the next ordinary answer waits for our
            # keepalive, and the tuner falls back at once; nothing longer holds there
            nat.lifetime = 30.0
            await trio.sleep(3 * 3600)
            assert any("hub keepalive back to 25 s" in x for x in logs), "\n".join(logs[-40:])
            assert tuner.keepalive == 25 and tuner.failed is not None and tuner.failed <= 50
            late = nat.late
            await trio.sleep(6 * 3600)
            # one retune trial (RETUNE_AFTER: the NAT may have changed) is all that is held
            assert nat.late - late <= 1 and tuner.keepalive == 25
