"""Enrollment cannot take over a device: attacks by a holder of a fleet's multi-use token
against a real coordinator on loopback (tests/coordinator/conftest.py), over real HTTPS."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from coordinator._server import Coordinator, CoordinatorConfig
from coordinator._service import CHALLENGE_TTL
from mesh.control import TokenParts, key_proof_mac, x25519_secret
from ops.client import ApiError, DeviceClient, enroll
from tests.coordinator.conftest import Harness, client_for, coord, h
from vpn import KeyPair, generate_keypair

__all__ = ["coord", "h"]  # the fixtures this module borrows from tests/coordinator


async def enroll_raw(h: Harness, token: str, keys: KeyPair | str, name: str | None,
                     **extra: Any) -> httpx.Response:
    public = keys if isinstance(keys, str) else keys.public
    return await h.anon.post("/api/v1/enroll", json={
        "token": token, "public_key": public, "name": name, "lan_endpoints": [],
        "agent_version": "test", **extra})


async def works(h: Harness, credential: str) -> bool:
    async with client_for(h.coord, credential) as dev:
        r = await dev.get("/api/v1/device/peermap", params={"wait": 0})
    return r.status_code == 200


async def test_token_holder_cannot_reenroll_an_active_device_with_its_public_key(
        h: Harness) -> None:
    """Attack: the victim's name and public key are in every member's peer map; a holder of
    the fleet's multi-use token enrolls with both to get a fresh credential for the victim.
    Expected: refused (409, saying a proof of possession is needed, with a challenge); the
    victim's credential keeps working and its record is unchanged."""
    token = await h.token(uses=10)
    victim_keys = generate_keypair()
    r = await enroll_raw(h, token, victim_keys, "cam-1")
    assert r.status_code == 201, r.text
    victim = r.json()["credential"]
    attack = await enroll_raw(h, token, victim_keys.public, "cam-1")
    assert attack.status_code == 409, attack.text
    body = attack.json()
    assert "proof" in body["error"] and isinstance(body.get("challenge"), str)
    assert await works(h, victim)
    # a made-up proof or somebody else's credential does not do either
    other = (await enroll_raw(h, token, generate_keypair(), "cam-2")).json()["credential"]
    for proof in ({"credential": other}, {"credential": "fmd_" + "x" * 40},
                  {"key_proof": {"challenge": body["challenge"], "mac": "00" * 32}}):
        refused = await enroll_raw(h, token, victim_keys.public, "cam-1", **proof)
        assert refused.status_code in (403, 409), refused.text
    assert await works(h, victim)
    info = (await h.op.get("/api/v1/devices/cam-1")).json()
    assert info["state"] == "active" and info["public_key"] == victim_keys.public


async def test_token_holder_cannot_claim_a_provisioned_name(h: Harness) -> None:
    """Attack: the operator provisioned `kiosk-1`; a holder of the fleet's multi-use token
    enrolls under that name before the kiosk joins. Expected: refused (409 naming the
    provisioning token); the kiosk then joins with its own provisioning token."""
    token = await h.token(fleet="shops", uses=10)
    r = await h.op.post("/api/v1/devices", json={"name": "kiosk-1", "fleet": "shops"})
    assert r.status_code == 201, r.text
    join = r.json()["join"]
    attack = await enroll_raw(h, token, generate_keypair(), "kiosk-1")
    assert attack.status_code == 409, attack.text
    assert "provision" in attack.json()["error"]
    info = (await h.op.get("/api/v1/devices/kiosk-1")).json()
    assert info["state"] == "provisioned" and info["public_key"] is None
    kiosk = generate_keypair()
    ok = await enroll_raw(h, join["token"], kiosk, None)
    assert ok.status_code == 201, ok.text
    assert ok.json()["name"] == "kiosk-1" and await works(h, ok.json()["credential"])


async def test_the_device_itself_reenrolls_with_its_credential(h: Harness) -> None:
    """Legitimate: a device that still has its credential enrolls again (e.g. to get a new
    one). Expected: 201, same addresses, the new credential works and the old one no longer
    does."""
    token = await h.token(uses=10)
    keys = generate_keypair()
    first = (await enroll_raw(h, token, keys, "cam-1")).json()
    again = await enroll_raw(h, token, keys, "cam-1", credential=first["credential"])
    assert again.status_code == 201, again.text
    assert again.json()["mesh_ipv4"] == first["mesh_ipv4"]
    assert await works(h, again.json()["credential"])
    assert not await works(h, first["credential"])


async def test_the_device_itself_reenrolls_with_its_private_key(h: Harness) -> None:
    """Legitimate: a device lost its enrollment (data directory) but kept its WireGuard key;
    the SDK answers the coordinator's challenge with a MAC keyed by X25519(device key, hub
    key). Expected: 201 with the same addresses; without the private key the SDK's call is
    refused (409)."""
    token = await h.token(uses=10)
    assert TokenParts.parse(token).fingerprint == h.coord.fingerprint
    keys = generate_keypair()
    first = (await enroll_raw(h, token, keys, "cam-1")).json()
    with pytest.raises(ApiError) as refused:
        await enroll(h.coord.url, token, keys.public, "cam-1")
    assert refused.value.status == 409
    again, _ = await enroll(h.coord.url, token, keys.public, "cam-1",
                            private_key=keys.private)
    assert again.name == "cam-1" and again.mesh_ipv4 == first["mesh_ipv4"]
    assert await works(h, again.credential)
    # a thief with another key pair cannot answer the challenge for this public key
    thief = generate_keypair()
    with pytest.raises(ApiError) as stolen:
        await enroll(h.coord.url, token, keys.public, "cam-1", private_key=thief.private)
    assert stolen.value.status in (403, 409)
    assert await works(h, again.credential)


async def test_first_enrollment_is_unchanged(h: Harness) -> None:
    """Backward compatibility: a new device with a token and no proof enrolls as before."""
    token = await h.token()
    r = await enroll_raw(h, token, generate_keypair(), "new-1")
    assert r.status_code == 201 and await works(h, r.json()["credential"])


async def parked(dev: httpx.AsyncClient, at: int, out: list[httpx.Response]) -> None:
    """A long poll kept parked until it is refused (a map published meanwhile: again)."""
    while True:
        r = await dev.get("/api/v1/device/peermap", params={"version": at, "wait": 20})
        if r.status_code != 200:
            out.append(r)
            return
        at = r.json()["version"]


async def test_only_a_revoked_credential_is_answered_revoked(h: Harness) -> None:
    """The agent stops for good only on an explicit revocation, so the coordinator must tell
    it apart: a revoked device's credential gets 401 with `"revoked": true` (also a parked
    long poll that the revocation ends, and through the SDK's ApiError.revoked); a replaced
    or unknown credential gets 401 without it."""
    token = await h.token(uses=10)
    keys = generate_keypair()
    first = (await enroll_raw(h, token, keys, "cam-1")).json()
    replaced = await enroll_raw(h, token, keys, "cam-1", credential=first["credential"])
    current = replaced.json()["credential"]
    async with client_for(h.coord, first["credential"]) as old:
        r = await old.get("/api/v1/device/peermap", params={"wait": 0})
    assert r.status_code == 401 and "revoked" not in r.json()
    statuses: list[httpx.Response] = []
    async with client_for(h.coord, current) as dev:
        version = (await dev.get("/api/v1/device/peermap", params={"wait": 0})).json()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(parked, dev, version["version"], statuses)
                await trio.sleep(0.2)
                assert (await h.op.post("/api/v1/devices/cam-1/revoke")).status_code == 200
        after = await dev.post("/api/v1/device/state", json={})
        blob = await dev.get("/api/v1/blobs/" + "0" * 64)
    for answer in (statuses[0], after, blob):
        assert answer.status_code == 401 and answer.json()["revoked"] is True, answer.text
    der = ssl.PEM_cert_to_DER_cert(h.coord.cert_path.read_text())
    device = DeviceClient(h.coord.url, current, der)
    with pytest.raises(ApiError) as refused:
        await device.peermap(0, 0)
    await device.aclose()
    assert refused.value.status == 401 and refused.value.revoked


async def test_malformed_and_misdirected_proofs_are_refused_without_a_5xx(h: Harness) -> None:
    """Garbage where a proof goes, and a real challenge answered for another key or twice:
    400 or 403, never a 5xx, and the victim's credential still works."""
    token = await h.token(uses=10)
    keys = generate_keypair()
    victim = (await enroll_raw(h, token, keys, "cam-1")).json()["credential"]
    for proof in ({"key_proof": "x"}, {"key_proof": {"challenge": "", "mac": "00" * 32}},
                  {"key_proof": {"challenge": "n", "mac": "zz"}}, {"credential": 7},
                  {"key_proof": {"challenge": "n" * 300, "mac": "00" * 32}}):
        r = await enroll_raw(h, token, keys, "cam-1", **proof)
        assert r.status_code == 400, r.text
    challenge = (await enroll_raw(h, token, keys, "cam-1")).json()["challenge"]
    other = generate_keypair()
    r = await enroll_raw(h, token, other, "cam-1",
                         key_proof={"challenge": challenge, "mac": "00" * 32})
    assert r.status_code in (403, 409), r.text  # another key: the name is taken anyway
    r = await enroll_raw(h, token, keys, "cam-1",
                         key_proof={"challenge": challenge, "mac": "00" * 32})
    assert r.status_code == 403, r.text  # the challenge was for this key, but is used up
    assert await works(h, victim)


async def test_a_challenge_expires_and_a_low_order_key_proves_nothing(tmp_path: Path) -> None:
    """A challenge answered after CHALLENGE_TTL (coordinator clock moved explicitly) is refused
    even with the right key; a device enrolled with a low-order public key (X25519 secret all
    zero, which anybody could "compute") can never be re-enrolled by a key proof."""
    now = [1_000_000.0]
    config = CoordinatorConfig(data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False,
                               batch_window=0.05, clock=lambda: now[0])
    async with Coordinator(config) as c, client_for(c, c.operator_key) as op, \
            client_for(c) as anon:
        h = Harness(c, op, anon)
        token = await h.token(uses=10)
        keys = generate_keypair()
        victim = (await enroll_raw(h, token, keys, "cam-1")).json()["credential"]
        challenge = (await enroll_raw(h, token, keys, "cam-1")).json()["challenge"]
        hub = x25519_secret(keys.private, c.service.identity.hub.public_key)
        mac = key_proof_mac(hub, challenge, keys.public)
        now[0] += CHALLENGE_TTL
        late = await enroll_raw(h, token, keys, "cam-1",
                                key_proof={"challenge": challenge, "mac": mac})
        assert late.status_code == 403 and "expired" in late.text
        assert await works(h, victim)
        zero = base64.b64encode(bytes(32)).decode()
        assert (await enroll_raw(h, token, zero, "odd-1")).status_code == 201
        challenge = (await enroll_raw(h, token, zero, "odd-1")).json()["challenge"]
        forged = key_proof_mac(bytes(32), challenge, zero)
        r = await enroll_raw(h, token, zero, "odd-1",
                             key_proof={"challenge": challenge, "mac": forged})
        assert r.status_code == 403, r.text
