"""Release integrity against the TUF/Uptane threat model, one test per attack, in the spirit
of the TUF conformance tests. Each docstring states the attack and the expected outcome; each
test runs the real code path a device uses (the Applier on real files, real signed releases
and pins, the real gossip driver over loopback, the real SDK against a real HTTP server or a
real coordinator process). docs/security.md has the defence behind each one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
from nacl.signing import SigningKey

from agent import DataDir
from agent._rotation import RootWatch
from agent.cli import main as agent_main
from mesh.clikit import EXIT_UNTRUSTED
from mesh.image import materialize_release
from mesh.release import (
    ChunkError,
    ReleaseError,
    VerificationError,
    decode_root_body,
    decode_signed_manifest,
    encode_signed_manifest,
    encode_signed_pin,
    new_pin,
    sign_pin,
    verify_release,
    write_signing_key,
)
from ops.client import MAX_BLOB_ANSWER, DeviceClient, OperatorClient, ProtocolError
from tests.adversarial.test_apply_downgrade import replay, world
from tests.adversarial.test_freeze import frozen_agent_reports_stale
from tests.adversarial.test_sdk_endless import SLACK, endless_server
from tests.apply._fake import Releases
from tests.apply.test_agent_apply import device
from tests.apply.test_applier_fake import APP, DEVICE, World, install, run_until, state
from tests.client._tls import make_cert
from tests.coordinator_process import running_coordinator
from tests.gossip.helpers import OTHER_KEY, Seed, free_port, make_blobs, make_manifest, wait_for
from tests.gossip.helpers import Fleet as GossipFleet
from tests.gossip.test_gossip_nodes import check_store, start_with_rogue
from tests.rootkit import ROOT_KEYS, root

__all__ = ["world"]  # the fixture this suite borrows from tests/adversarial


def test_arbitrary_software(world: World) -> None:
    """Attack: whoever controls the coordinator or a mirror offers a release of its own making:
    signed with another key, or the fleet's signed manifest with its bytes altered.
    Expected: not verified, not installed; the device keeps running what it runs."""
    a = world.applier()
    install(world, a, 1)
    forger = Releases(world.tmp / "forger")
    assert not a.set_target(forger.verified(forger.make(2)), ready=True)
    signed = decode_signed_manifest(world.releases.make(2))
    altered = dataclasses.replace(signed, manifest=signed.manifest[:-1] + b"\x00")
    with pytest.raises(ReleaseError):
        verify_release(encode_signed_manifest(altered), world.releases.key.verify_key)
    run_until(world, a, lambda: state(a) == "running")
    assert world.running() == [1]


def test_rollback(world: World) -> None:
    """Attack: the coordinator names an older signed release (one with a known hole) as the
    target, without an operator's pin. Expected: refused, whether or not a container runs at
    that moment; the device stays on the newer release."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    for c in world.engine.containers_.values():
        c.status = "restarting"  # nothing runs: the moment a naive check would let it in
    a.reconcile_all()
    assert not replay(world, a, 1)
    assert world.journal().current == 2
    assert all(c.version == 2 for c in world.engine.containers_.values())


def test_replayed_rollback_pin(world: World) -> None:
    """Attack: the coordinator keeps a rollback pin the operator once signed and replays it
    after the fleet moved on. Expected: refused once the device moved past it (and an expired
    pin is refused always); a pin the operator signs later still goes back."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    now = world.clock()
    pin = encode_signed_pin(sign_pin(new_pin("cams", APP, 1, DEVICE, now=now),
                                     world.releases.key))
    assert a.set_target(world.release(world.releases.make(1)), ready=True, pin=pin)
    run_until(world, a, lambda: world.running() == [1] and state(a) == "running")
    install(world, a, 3)
    assert not replay(world, a, 1, pin)
    assert world.running() == [3]
    later = encode_signed_pin(sign_pin(new_pin("cams", APP, 1, DEVICE, now=now + 1),
                                       world.releases.key))
    assert a.set_target(world.release(world.releases.make(1)), ready=True, pin=later)


def test_mix_and_match(world: World, tmp_path: Path) -> None:
    """Attack: metadata and content of different releases combined: v2's manifest bytes under
    v1's signature, or v1's layer bytes served for v2's chunk IDs. Expected: the signature does
    not verify; the rebuild refuses the chunk (blake3) and writes nothing."""
    v1, v2 = (decode_signed_manifest(world.releases.make(v)) for v in (1, 2))
    mixed = dataclasses.replace(v2, signature=v1.signature)
    with pytest.raises(VerificationError):
        verify_release(encode_signed_manifest(mixed), world.releases.key.verify_key)
    r1 = world.release(encode_signed_manifest(v1))
    r2 = world.release(encode_signed_manifest(v2))
    v1_chunk = world.releases.store.get(r1.manifest.layers[0].chunks[0].id)
    work = tmp_path / "work"
    with pytest.raises(ChunkError):
        materialize_release(r2, lambda _blob_id: v1_chunk, {}, work, "fleetmesh/web:2")
    assert not [p for p in work.rglob("*") if p.is_file()]


def test_wrong_fleet_or_app(world: World) -> None:
    """Attack: a release signed with the right key but for another fleet (the operator's key
    signs several) or another app is named as this device's target. Expected: refused."""
    a = world.applier()
    dogs = Releases(world.tmp / "dogs", fleet="dogs")
    dogs.key = world.releases.key
    assert not a.set_target(dogs.verified(dogs.make(1)), ready=True)
    api = Releases(world.tmp / "api", app="api")
    api.key = world.releases.key
    with pytest.raises(VerificationError, match="app"):
        verify_release(api.make(1), world.releases.key.verify_key, fleet="cams", app=APP)
    assert a.statuses() == []


def test_endless_data(tmp_path: Path) -> None:
    """Attack: the coordinator (or whoever holds its TLS key) answers a blob request with a
    body that never ends. Expected: the device's SDK stops reading past the blob limit and
    fails with one line; it never buffers the stream."""
    cert = make_cert(tmp_path, "c")

    async def fetch(port: int) -> None:
        async with DeviceClient(f"https://127.0.0.1:{port}", "cred", cert.der) as dev:
            await dev.blob("ab" * 32)

    with endless_server(cert) as (port, sent):
        with pytest.raises(ProtocolError):
            trio.run(fetch, port)
    assert sent.bytes <= MAX_BLOB_ANSWER + SLACK


async def test_malicious_mirror(tmp_path: Path) -> None:
    """Attack: a rogue fleet peer serves corrupted bytes for every blob and offers a release
    signed with a key of its own. Expected: the honest devices never store a wrong byte, ban
    the rogue, complete the release from the others, and never adopt the forged release."""
    names = ["a", "b", "rogue"]
    blobs = make_blobs(8, large=1)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            honest, _ = await start_with_rogue(
                GossipFleet(nursery, tmp_path, Seed(blobs), free_port(), names), names, blobs)
            assert not honest[0].offer_manifest(make_manifest(blobs, version=2, key=OTHER_KEY))
            await wait_for(lambda: all(n.complete("cams", "cam") for n in honest), 0.05)
            for n in honest:
                check_store(n, blobs)
                assert "rogue" in n.core.banned("cams", "cam")
                newest = n.rumor.newest("cams", "cam")
                assert newest is not None and newest[0] == 1
            nursery.cancel_scope.cancel()


def test_compromised_coordinator_may_withhold_but_not_install_unsigned_or_older(
        world: World) -> None:
    """Attack: the coordinator is the attacker's. It signs a release with a key it holds, names
    an older release, and withholds the target altogether. Expected: its own release and the
    older one are refused; withholding leaves the device running what it runs (a denial of
    updates, not an installation)."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    coordinators_own = Releases(world.tmp / "coordinator")
    assert not a.set_target(coordinators_own.verified(coordinators_own.make(3)), ready=True)
    assert not replay(world, a, 1)
    a.clear_target(APP)
    for _ in range(5):
        a.reconcile_all()
        world.clock.advance(10.0)
    assert world.running() == [2] and world.journal().current == 2


def test_compromised_coordinator_cannot_hand_a_new_device_its_own_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack: the coordinator gives a device that enrolls a release key of its own (then
    everything it signs would install). Expected: the enrollment token, made by the operator's
    tooling, names the fleet's key; `fleetmesh-agent join` refuses with one line, exit 4, and
    writes no enrollment."""
    operator_key = write_signing_key(tmp_path / "release.key")
    attacker_key = write_signing_key(tmp_path / "attacker.key")
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        token = op.create_token("cams", release_key=bytes(operator_key.verify_key).hex())
        op.set_release_key("cams", bytes(attacker_key.verify_key).hex())
        capsys.readouterr()
        code = agent_main(["join", coord.url, "--token", token["token"], "--name", "cam-1",
                           "--data", str(tmp_path / "dev"), "--lan-endpoint",
                           "192.168.1.2:51820"])
        assert code == EXIT_UNTRUSTED
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not DataDir(tmp_path / "dev").is_enrolled()


async def test_indefinite_freeze(tmp_path: Path) -> None:
    """Attack: the coordinator (or a front replaying its old answers) freezes: it keeps serving
    what was true once, or stops answering. Expected: the fleet's signed timestamp (an online
    key the release key granted) stops being renewed; once the newest one the device holds has
    expired, the device reports every app "stale" and logs why once; a fresh one clears it.
    (tests/adversarial/test_freeze.py also runs it through a coordinator process and shows it
    in `fleetmesh devices list`.)"""
    await frozen_agent_reports_stale(tmp_path)


def test_fast_forward_recovery_after_key_rotation(world: World) -> None:
    """Attack: the release key is stolen. The thief signs v1000 and gets it installed (that is
    the compromise), then keeps signing releases with it; it also offers roots of its own: a
    root v2 with one root-key signature, one signed by the coordinator's own key, one that
    skips a version. Expected: those roots are refused (counted, logged) and change nothing;
    root v2 signed by 2 of the 3 offline root-key holders, naming a new release key, is
    verified; the device forgets the rollback floor v1000 set under the revoked key (TUF's
    fast-forward recovery), refuses anything new signed by the old key, and accepts v4 signed
    by the new key although it ran v1000. (The agent does this at runtime:
    tests/apply/test_agent_rotation.py.)"""
    a_, b_, c_ = ROOT_KEYS
    thief = world.releases  # the stolen key is the fleet's release key of root v1
    data = device(world.tmp, thief.key_hex)
    world.data = data.path
    data.write_root(root("cams", 1, thief.key, a_, b_))
    a = world.applier()
    install(world, a, 1)
    install(world, a, 1000)  # signed with the stolen key: accepted, that is the compromise
    assert world.running() == [1000]

    new = Releases(world.tmp)  # the new release key (the same blob store)
    messages: list[str] = []
    watch = RootWatch(data, messages.append)  # what the agent runs with every targets poll
    coordinators_own = SigningKey(b"\x66" * 32)
    for forged in ([root("cams", 2, new.key, b_)],
                   [root("cams", 2, thief.key, coordinators_own, keys=[coordinators_own],
                         threshold=1)],
                   [root("cams", 3, new.key, b_, c_)]):
        assert watch.advance(forged) is None
    assert watch.refused == 3 and len(messages) == 3
    kept = data.read_root()
    assert kept is not None and decode_root_body(kept.body).version == 1

    v2 = root("cams", 2, new.key, b_, c_)
    found = watch.advance([v2])
    assert found is not None and found[1].release_key == bytes(new.key.verify_key)
    identity = watch.rotate(data.read_identity(), *found)
    assert identity.enrollment.release_key == new.key_hex
    assert data.read_identity().enrollment.release_key == new.key_hex and data.read_root() == v2

    world.releases = new
    a = world.applier()  # the release subsystem, restarted with the new key
    assert not a.set_target(thief.verified(thief.make(1001)), ready=True)
    install(world, a, 4)
    assert world.running() == [4] and world.journal().current == 4


def test_suite_states_attack_and_outcome_for_every_case() -> None:
    """Every case above says what the attack is and what must happen (the suite's contract)."""
    cases = [f for name, f in globals().items() if name.startswith("test_")
             and name != "test_suite_states_attack_and_outcome_for_every_case"]
    assert len(cases) == 11
    for f in cases:
        doc = f.__doc__ or ""
        assert "Attack:" in doc and "Expected:" in doc, f.__name__
