"""Attack: one multi-use enrollment token spends mesh addresses until none are left for any
fleet (one address counter for the whole coordinator, never reused; a token could be good for
100,000 uses, more than a /16 holds). Expected: a fleet holds at most its quota of devices
(configurable; by default no more than an agent accepts in its peer map, mesh.control.MAX_PEERS);
the enrollment past it is a 409 that names the fleet, while other fleets still enroll; a token
cannot promise more uses than a fleet can hold."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator._server import Coordinator, CoordinatorConfig, CoordinatorConfigError
from mesh.control import MAX_PEERS, PeerMap
from tests.coordinator.conftest import Harness, running_harness
from vpn import generate_keypair

QUOTA = 3


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            max_fleet_devices=QUOTA)) as harness:
        yield harness


async def test_a_full_fleet_refuses_enrollment_with_409_naming_it(h: Harness) -> None:
    """Multi-use tokens enroll QUOTA devices of fleet `cams`; the next enrollment (with uses
    left on a token) gets 409 naming `cams`; provisioning into it is refused the same way;
    fleet `doors` still enrolls; the same device enrolling again (its answer was lost; it proves
    itself with its credential, docs/security.md) takes no new place and still works."""
    first = await h.enroll("cam-0", token=await h.token("cams", uses=1))
    token = await h.token("cams", uses=QUOTA)
    for i in range(1, QUOTA):
        await h.enroll(f"cam-{i}", token=token)
    keys = generate_keypair()
    r = await h.anon.post("/api/v1/enroll", json={
        "token": token, "public_key": keys.public, "name": "cam-extra", "lan_endpoints": [],
        "agent_version": "test"})
    assert r.status_code == 409, r.text
    assert "'cams'" in r.json()["error"] and "full" in r.json()["error"]
    r = await h.op.post("/api/v1/devices", json={"name": "cam-late", "fleet": "cams"})
    assert r.status_code == 409, r.text
    assert "'cams'" in r.json()["error"]
    await h.enroll("door-0", fleet="doors")
    r = await h.anon.post("/api/v1/enroll", json={
        "token": token, "public_key": first.public_key, "name": first.name,
        "lan_endpoints": [], "agent_version": "test", "credential": first.credential})
    assert r.status_code == 201, r.text
    listed = (await h.op.get("/api/v1/devices", params={"fleet": "cams"})).json()["devices"]
    assert sorted(d["name"] for d in listed) == [f"cam-{i}" for i in range(QUOTA)]


async def test_a_revoked_device_frees_its_place(h: Harness) -> None:
    """Revoking a device of a full fleet lets the next one in."""
    token = await h.token("cams", uses=QUOTA)
    for i in range(QUOTA):
        await h.enroll(f"cam-{i}", token=token)
    assert (await h.op.post("/api/v1/devices/cam-0/revoke")).status_code == 200
    await h.enroll("cam-next", token=await h.token("cams"))


async def test_token_uses_cannot_exceed_the_fleet_quota(h: Harness) -> None:
    """A token for more enrollments than a fleet can hold is refused (400)."""
    r = await h.op.post("/api/v1/tokens", json={"fleet": "cams", "uses": QUOTA + 1})
    assert r.status_code == 400, r.text
    r = await h.op.post("/api/v1/tokens", json={"fleet": "cams", "uses": 100_000})
    assert r.status_code == 400, r.text
    r = await h.op.post("/api/v1/tokens", json={"fleet": "cams", "uses": QUOTA})
    assert r.status_code == 201, r.text


def test_quota_beyond_what_agents_accept_is_refused(tmp_path: Path) -> None:
    """A fleet quota above MAX_PEERS would hand agents maps they refuse: a config error."""
    with pytest.raises(CoordinatorConfigError, match="max-fleet-devices"):
        Coordinator(CoordinatorConfig(data_dir=tmp_path, listen="127.0.0.1:0", hub=False,
                                      max_fleet_devices=MAX_PEERS + 1))
    with pytest.raises(CoordinatorConfigError, match="max-fleet-devices"):
        Coordinator(CoordinatorConfig(data_dir=tmp_path, listen="127.0.0.1:0", hub=False,
                                      max_fleet_devices=0))


async def test_operators_cannot_push_peer_maps_past_what_agents_accept(h: Harness) -> None:
    """Each operator workstation adds two relay addresses to every device's peer map, which
    agents bound by MAX_PEERS: once MAX_PEERS // 2 are registered, one more is a 409 (the same
    one registering again still works)."""
    store = h.coord.service.store
    for i in range(MAX_PEERS // 2 - 1):
        store.add_operator(f"op-{i}", generate_keypair().public, 0.0)
    last = generate_keypair().public
    r = await h.op.post("/api/v1/operators", json={"name": "op-last", "public_key": last})
    assert r.status_code == 201, r.text
    r = await h.op.post("/api/v1/operators", json={"name": "op-more",
                                                   "public_key": generate_keypair().public})
    assert r.status_code == 409, r.text
    assert "operator" in r.json()["error"]
    r = await h.op.post("/api/v1/operators", json={"name": "op-last", "public_key": last})
    assert r.status_code == 201, r.text
    device = await h.enroll("cam-0", fleet="cams")
    r = await device.client.get("/api/v1/device/peermap", params={"version": 0, "wait": 0})
    assert r.status_code == 200, r.text
    assert len(PeerMap.from_json(r.json()).relay_ips) == MAX_PEERS  # what an agent accepts
