"""A 401 is not a revocation: the agent against a coordinator that refuses its credential
without saying "revoked" (what it answers once somebody enrolled under the device's name),
with the fake link and WireGuard of tests/agent, on trio's autojump clock."""

from __future__ import annotations

import trio

from agent import DataDir
from tests.agent.conftest import enrolled
from tests.agent.fakes import KEYS, FakeCoordinator, peer, peermap
from tests.agent.test_agent_loops import A, running

__all__ = ["enrolled"]  # the fixture this module borrows from tests/agent


async def test_a_401_without_the_revoked_marker_keeps_the_mesh_and_retries(
        enrolled: DataDir, autojump_clock: trio.abc.Clock) -> None:
    """Attack: the coordinator refuses the device's credential (401) without saying the
    device was revoked, e.g. after a token holder re-enrolled its name. Before, any 401 made
    the agent stop polling and reporting for good. Expected: the WireGuard peers stay, the
    agent keeps polling (with backoff) and reporting, and once the coordinator accepts the
    credential again the next peer map is applied. (An explicit revocation still stops the
    polling: tests/agent/test_agent_loops.py, test_revoked_credential_stops_polling_...)"""
    coord = FakeCoordinator(peermap(1, peer(1, A)))
    with trio.fail_after(600):
        async with running(enrolled, coord, reachable=(A,)) as rig:
            await trio.sleep(3)
            coord.unknown_credential = True
            coord.publish(peermap(2, peer(1, A)))  # wakes the long poll, which now gets 401
            await trio.sleep(60)
            polls, reports = len(coord.polls), len(coord.reports)
            await trio.sleep(120)
            assert len(coord.polls) > polls  # still asking (with backoff: a few times)
            assert len(coord.polls) - polls < 20
            assert not rig.agent.link.revoked
            assert not any("revoked;" in line for line in rig.logs)
            assert rig.logged("without saying the device was revoked")
            assert KEYS[1].public in rig.wg.peers and rig.path(1) == "direct"
            coord.unknown_credential = False
            coord.publish(peermap(3, peer(1, A), peer(2, A)))
            await trio.sleep(40)
            assert rig.logged("peer map: coordinator answers again")
            assert KEYS[2].public in rig.wg.peers
            assert len(coord.reports) > reports

